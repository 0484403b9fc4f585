"""Prepare a corpus into token arrays for training and evaluation.

    gptjax prepare                                     # built-in Shakespeare, characters
    gptjax prepare --input 'books/*.txt' --tokenizer gpt2 --out data/books
    gptjax prepare --tokenizer ~/models/SmolLM2-135M/tokenizer.json --out data/shakespeare_smollm2
    gptjax prepare --input tfds:my_corpus --tfds-data-dir ~/tensorflow_datasets --tokenizer gpt2 --out data/my_corpus
"""

import argparse

from gptjax import data


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="gptjax prepare", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--input", default=data.BUILTIN_SHAKESPEARE,
                      help=f"a text file, a folder, a glob, {data.BUILTIN_SHAKESPEARE} or tfds:NAME")
  parser.add_argument("--tokenizer", default="char",
                      help="char, gpt2, or a Hugging Face tokenizer.json (end-of-text: a config.json beside it)")
  parser.add_argument("--out", default="data/shakespeare_char", help="output folder (data.dir in configs)")
  parser.add_argument("--val-fraction", type=float, default=0.1,
                      help="end of the text held out for validation (TFDS uses its validation/test split)")
  parser.add_argument("--tfds-data-dir", default=None, help="where TFDS datasets are prepared")
  parser.add_argument("--text-key", default="text", help="the TFDS feature holding the text")
  parser.add_argument("--overwrite", action="store_true", help="replace prepared data already in --out")
  args = parser.parse_args(argv)
  meta = data.prepare(args.input, args.tokenizer, args.out, val_fraction=args.val_fraction,
                      tfds_data_dir=args.tfds_data_dir, text_key=args.text_key, overwrite=args.overwrite)
  print(f"prepared {args.out}: {meta['tokens']['train']:,} train and {meta['tokens']['val']:,} val tokens, "
        f"{args.tokenizer} vocabulary of {meta['vocab_size']}")
