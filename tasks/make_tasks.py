"""Writes the shipped lm-eval tasks' data (run from the repository root):

    python tasks/make_tasks.py --milton 'path/to/paradise_lost_(no_introduction)_gut.txt'

- shakespeare_next_line.jsonl: 100 pairs of verse lines from the held-out end of the built-in
  Shakespeare (the last 10%, which the demo does not train on): the end of one line (at most 34
  characters) as the context, the start of the next (at most 24) as the answer among three
  other lines' starts; a context and a choice fit in 60 characters.
- milton_lines.jsonl: 200 lines of Paradise Lost (Project Gutenberg, public domain), only of the
  characters the built-in Shakespeare holds, so that its character model can read them.
"""

import argparse
import json
import random

from gptjax import sources


def _words_within(text: str, limit: int, from_end: bool = False) -> str:
  """The most whole words of `text` within `limit` characters, from its start (or end)."""
  words = text.split()[::-1] if from_end else text.split()
  kept = []
  while words and len(" ".join(kept + words[:1])) <= limit:
    kept.append(words.pop(0))
  return " ".join(kept[::-1] if from_end else kept)


def next_line_items(text: str, n: int, rng: random.Random) -> list[dict]:
  """Verse lines of a speech (not speakers' names), the end of one as the context and the start of
  the next as the answer."""
  held_out = text[int(len(text) * 0.9):]
  lines = [line.strip() for line in held_out.splitlines()]
  verse = lambda line: len(line) >= 20 and not line.isupper()  # noqa: E731 (speakers are upper case)
  pairs = [(_words_within(a, 34, from_end=True), _words_within(b, 24)) for a, b in zip(lines, lines[1:])
           if verse(a) and verse(b)]
  pairs = [(a, b) for a, b in pairs if len(a) >= 16 and len(b) >= 12]
  endings = sorted({b for _, b in pairs})
  items = []
  for context, answer in rng.sample(pairs, n):
    choices = rng.sample([e for e in endings if e != answer], 3) + [answer]
    rng.shuffle(choices)
    items.append({"context": context, "choices": choices, "label": choices.index(answer)})
  return items


def milton_items(path: str, vocabulary: set, n: int, rng: random.Random) -> list[dict]:
  lines = [line.strip() for line in open(path, encoding="utf-8")]
  lines = [line for line in lines if 30 <= len(line) <= 60 and set(line) <= vocabulary and not line.isupper()]
  return [{"text": line} for line in rng.sample(lines, n)]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--milton", required=True)
  args = parser.parse_args()
  rng = random.Random(0)
  text = sources.read_text(sources.BUILTIN_SHAKESPEARE)
  for name, items in (("shakespeare_next_line", next_line_items(text, 100, rng)),
                      ("milton_lines", milton_items(args.milton, set(text), 200, rng))):
    with open(f"tasks/{name}.jsonl", "w", encoding="utf-8") as f:
      f.writelines(json.dumps(item) + "\n" for item in items)


if __name__ == "__main__":
  main()
