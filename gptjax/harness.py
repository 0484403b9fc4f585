"""lm-evaluation-harness on a checkpoint: gptjax as lm-eval's `LM` (registered as "gptjax") and the
`gptjax eval` command.

    gptjax eval --checkpoint out/shakespeare_char_cpu --tasks shakespeare_next_line,milton_lines
    gptjax eval --checkpoint out/gpt2 --tasks my_task --include-path my_tasks/ --limit 100 --output results.json
    python -m gptjax.harness --model gptjax --model_args checkpoint=out/gpt2 --tasks ...   # lm_eval's own CLI

Offline: tasks read local files (HF_DATASETS_OFFLINE and HF_HUB_OFFLINE are set unless already
given). The shipped tasks (`tasks/`: a multiple-choice task over held-out Shakespeare lines and a
rolling-perplexity task over Milton's verse) show how: a YAML beside a JSON-lines file. Needs the
`eval` extra (`pip install gptjax[eval]`: lm_eval).

- `loglikelihood`: the context and continuation scored in batches of whole contexts (the model's
  log-softmax, as the server's `echo` + `logprobs` gives it);
- `loglikelihood_rolling`: a text's log-likelihood as `gptjax perplexity --text` computes it
  (`evaluate.document_tokens`, sliding windows of stride block_size // 2);
- `generate_until`: greedy (or sampled, as the task says) through the server's continuous-batching
  engine, cut at the task's stop sequences.
"""

import argparse
import copy
import functools
import importlib.resources
import json
import os
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import checkpoint
from gptjax import evaluate
from gptjax import model as model_lib
from gptjax import sharding
from gptjax import tokenizer as tokenizer_lib
from gptjax.errors import UserError
from gptjax.serve.engine import FINISHED
from gptjax.serve.engine import Engine
from gptjax.serve.engine import Generation
from gptjax.serve.engine import Sampling

GENERATION_SLOTS = 16  # generate_until's requests decoded together
TASKS_DIR = str(importlib.resources.files("gptjax.tasks"))  # the repository's tasks/, installed as package data


def _lm_eval():
  """lm-eval's TemplateLM, offline and quiet (no dataset progress bars; no git hash, which it reads
  by running `git describe` where a model's results are: a `fatal:` line outside a repository)."""
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  try:
    import datasets
    import lm_eval.evaluator
    from lm_eval.api.model import TemplateLM
  except ImportError:
    raise UserError("gptjax eval needs the eval extra (pip install 'gptjax[eval]'): lm_eval is missing") from None
  datasets.disable_progress_bars()
  datasets.logging.set_verbosity_error()
  lm_eval.evaluator.get_git_commit_hash = lambda: None
  return TemplateLM


@functools.partial(jax.jit, static_argnames="cfg")
def _continuation_scores(params, inputs_BT, targets_BT, *, cfg):
  """Each target's log-probability [B, T] and whether it is the likeliest token [B, T]."""
  logprobs_BTV = jax.nn.log_softmax(model_lib.bind(cfg, params)(inputs_BT), axis=-1)
  chosen_BT = jnp.take_along_axis(logprobs_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return chosen_BT, targets_BT == logprobs_BTV.argmax(-1)


def make_lm(cfg, tokenizer, params, mesh=None, batch_size: int = 16, max_gen_toks: int = 256):
  """A gptjax model as an lm-eval `LM`: cfg a Config, params placed on `mesh`."""
  return _lm_class()(cfg, tokenizer, params, mesh, batch_size, max_gen_toks)


def register() -> None:
  """Registers "gptjax" with lm-eval: `lm_eval.simple_evaluate(model="gptjax",
  model_args="checkpoint=DIR,step=best,batch_size=16")`."""
  _lm_eval()
  from lm_eval.api.registry import register_model
  register_model("gptjax")(_lm_class())


@functools.cache
def _lm_class():
  """The LM class, made once lm-eval is imported (an optional extra)."""
  TemplateLM = _lm_eval()

  class GptjaxLM(TemplateLM):

    def __init__(self, cfg, tokenizer, params, mesh=None, batch_size: int = 16, max_gen_toks: int = 256):
      super().__init__()
      self.cfg, self.tokenizer, self.params, self.mesh = cfg.model, tokenizer, params, mesh
      shards = sharding.batch_shards(mesh)
      self.batch_size, self.max_gen_toks = -(-int(batch_size) // shards) * shards, int(max_gen_toks)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
      """`checkpoint=DIR[,step=best][,batch_size=16][,max_gen_toks=256]`, as lm-eval's model_args."""
      args = dict(item.split("=", 1) for item in arg_string.split(",") if item)
      return cls.create_from_arg_obj(args, additional_config)

    @classmethod
    def create_from_arg_obj(cls, args: dict, additional_config: dict | None = None):
      args = dict(args)
      if "checkpoint" not in args:
        raise UserError("the gptjax model needs model_args checkpoint=DIR")
      cfg, tok, params, _, mesh = checkpoint.load_model(args.pop("checkpoint"), args.pop("step", "best"), [])
      return cls(cfg, tok, params, mesh, **{k: v for k, v in args.items() if k in ("batch_size", "max_gen_toks")})

    @property
    def eot_token_id(self):
      return self.tokenizer.eot_id

    @property
    def prefix_token_id(self):
      return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eot_id

    @property
    def max_length(self) -> int:
      return self.cfg.block_size

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
      return self.tokenizer.encode(string)

    def tok_decode(self, tokens, **kwargs) -> str:
      return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
      return _loglikelihoods(self, [(context, continuation) for _, context, continuation in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
      return [_rolling_loglikelihood(self, text) for (text,) in [request.args for request in requests]]

    def generate_until(self, requests, disable_tqdm: bool = False):
      return _generate(self, [request.args for request in requests])

  return GptjaxLM


def _loglikelihoods(lm, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
  """(log-likelihood of the continuation, whether it is the greedy one) per (context, continuation)
  of token ids, the sequence left-truncated to block_size + 1 tokens, in batches of
  [batch_size, block_size]."""
  block, results = lm.cfg.block_size, []
  for first in range(0, len(pairs), lm.batch_size):
    inputs = np.zeros((lm.batch_size, block), np.int32)
    targets = np.zeros((lm.batch_size, block), np.int32)
    spans = []
    for row, (context, continuation) in enumerate(pairs[first:first + lm.batch_size]):
      if None in context:
        raise UserError("an empty context needs a tokenizer with end-of-text or beginning-of-sequence")
      tokens = (list(context) + list(continuation))[-(block + 1):]
      inputs[row, :len(tokens) - 1], targets[row, :len(tokens) - 1] = tokens[:-1], tokens[1:]
      spans.append((max(len(tokens) - 1 - len(continuation), 0), len(tokens) - 1))
    with sharding.on_mesh(lm.mesh):
      scores = _continuation_scores(lm.params, *sharding.put_rows((inputs, targets), lm.mesh), cfg=lm.cfg)
    chosen, greedy = jax.device_get(scores)
    results += [(float(chosen[row, begin:end].sum()), bool(greedy[row, begin:end].all()))
                for row, (begin, end) in enumerate(spans)]
  return results


def _rolling_loglikelihood(lm, text: str) -> float:
  """`text`'s log-likelihood as `gptjax perplexity --text` computes it (stride block_size // 2)."""
  tokens = evaluate.document_tokens(lm.tokenizer, text)
  if len(tokens) < 2:
    return 0.0
  scored = evaluate.perplexity(lm.cfg, lm.params, tokens, stride=lm.cfg.block_size // 2, mesh=lm.mesh)
  return -scored["nll"] * scored["tokens"]


def _generate(lm, requests: list[tuple[str, dict]]) -> list[str]:
  """Each (context, settings) continued through the serving engine until a stop text, end-of-text
  or max_gen_toks: greedy, or sampled where settings say do_sample (temperature 1 unless given)."""
  done = threading.Semaphore(0)
  generations = []
  for context, settings in requests:
    until = settings.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    max_tokens = min(int(settings.get("max_gen_toks", lm.max_gen_toks)), lm.cfg.block_size - 1)
    prompt = tokenizer_lib.encode_sequence(lm.tokenizer, context) or [lm.prefix_token_id]
    if None in prompt:
      raise UserError("an empty context needs a tokenizer with end-of-text or beginning-of-sequence")
    sampled = settings.get("do_sample", False)
    sampling = Sampling(max_tokens=max_tokens, temperature=float(settings.get("temperature", 1.0)) if sampled else 0.0,
                        top_p=float(settings.get("top_p", 1.0)) if sampled else 1.0,
                        top_k=int(settings.get("top_k", 0)) if sampled else 0, stop=tuple(until), seed=len(generations))
    generations.append(Generation(prompt[-(lm.cfg.block_size - max_tokens):], sampling, lm.tokenizer,  # room to answer
                                  lambda event: done.release() if event is FINISHED else None))
  engine = Engine(lm.cfg, lm.params, lm.tokenizer, lm.mesh, GENERATION_SLOTS).start()
  try:
    for generation in generations:
      engine.submit(generation)
    for _ in generations:
      done.acquire()
  finally:
    engine.close()
  if engine.error is not None:
    raise engine.error
  return [generation.text for generation in generations]


def task_configs(names: list[str]) -> list:
  """Each task as lm-eval takes it: a shipped task's config (tasks/, its data files named from
  there, so that it runs from any folder), else the name (a task of an --include-path, or lm-eval's own)."""
  return [copy.deepcopy(_shipped_tasks().get(name, name)) for name in names]


@functools.cache
def _shipped_tasks() -> dict:
  import yaml
  shipped = {}
  for entry in sorted(os.listdir(TASKS_DIR)):
    if entry.endswith(".yaml"):
      with open(os.path.join(TASKS_DIR, entry), encoding="utf-8") as f:
        config = yaml.safe_load(f)
      files = config["dataset_kwargs"]["data_files"]
      config["dataset_kwargs"]["data_files"] = {split: os.path.join(TASKS_DIR, path) for split, path in files.items()}
      shipped[config["task"]] = config
  return shipped


def check_tasks(names: list[str], include_path: str | None = None):
  """(`task_configs`, the lm-eval TaskManager that knows the rest), every task known (lm-eval
  installed, a name it or the --include-path defines), or a one-line UserError."""
  _lm_eval()
  from lm_eval.tasks import TaskManager
  configs = task_configs(names)
  if not any(isinstance(c, str) for c in configs):
    return configs, TaskManager(include_defaults=False)  # the shipped tasks alone: lm-eval's own not indexed
  manager = TaskManager(include_path=include_path)
  if unknown := [c for c in configs if isinstance(c, str) and c not in manager.all_tasks]:
    raise UserError(f"unknown task {unknown[0]!r}: not in tasks/, the --include-path or lm-eval's own tasks")
  return configs, manager


def evaluate_tasks(lm, tasks: list[str], include_path: str | None = None, limit: int | None = None,
                   num_fewshot: int | None = None) -> dict:
  """lm-eval's results dict for `tasks` (`check_tasks`)."""
  import lm_eval
  configs, manager = check_tasks(tasks, include_path)
  return lm_eval.simple_evaluate(model=lm, tasks=configs, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                                 bootstrap_iters=0, log_samples=False, verbosity="ERROR")


def metrics(results: dict) -> dict:
  """{task/metric: value} of lm-eval's results (no standard errors, no aliases)."""
  return {f"{task}/{key.split(',')[0]}": value for task, values in results["results"].items()
          for key, value in values.items()
          if isinstance(value, float) and "_stderr" not in key}  # (sample_len is an int)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="gptjax eval", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  checkpoint.add_inference_arguments(parser)
  parser.add_argument("--tasks", required=True, help="comma-separated task names")
  parser.add_argument("--include-path", default=None, help="a folder of task YAMLs besides the shipped tasks/ (their data_files "
                      "read from the current folder, as lm-eval reads them)")
  parser.add_argument("--limit", type=int, default=None, help="at most this many documents per task")
  parser.add_argument("--num-fewshot", type=int, default=None)
  parser.add_argument("--batch-size", type=int, default=16, help="contexts scored per forward pass")
  parser.add_argument("--output", default=None, help="also write lm-eval's results as JSON here")
  args = parser.parse_intermixed_args(argv)
  if args.batch_size < 1:
    raise UserError(f"--batch-size={args.batch_size} is not positive")
  _lm_eval()
  cfg, tok, params, _, mesh = checkpoint.load_model(args.checkpoint, args.step, args.mesh)
  results = evaluate_tasks(make_lm(cfg, tok, params, mesh, args.batch_size), args.tasks.split(","),
                           args.include_path, args.limit, args.num_fewshot)
  from lm_eval.utils import make_table
  print(make_table(results))
  if args.output:
    with open(args.output, "w", encoding="utf-8") as f:
      json.dump({name: results[name] for name in ("results", "versions", "n-shot", "configs") if name in results},
                f, indent=2, default=str)


if __name__ == "__main__":  # lm_eval's own command line, with "gptjax" among its models
  register()
  from lm_eval.__main__ import cli_evaluate
  sys.exit(cli_evaluate())
