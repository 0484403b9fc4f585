"""Train a GPT: `python train.py shakespeare_char_cpu [section.field=value ...] [--resume]`."""
import sys

from gptjax import cli

if __name__ == "__main__":
  cli.run("train", sys.argv[1:])
