"""Sample from a checkpoint: `python sample.py --checkpoint out/shakespeare_char_cpu --prompt ROMEO:`."""
import sys

from gptjax import cli

if __name__ == "__main__":
  cli.run("sample", sys.argv[1:])
