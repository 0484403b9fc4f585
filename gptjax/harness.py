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
import functools
import importlib.resources
import json
import os
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import evaluate
from gptjax import model as model_lib
from gptjax import sharding
from gptjax.errors import UserError
from gptjax.serve.engine import FINISHED
from gptjax.serve.engine import Engine
from gptjax.serve.engine import Generation
from gptjax.serve.engine import Sampling

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
  TemplateLM = _lm_eval()

  class GptjaxLM(TemplateLM):

    def __init__(self):
      super().__init__()
      self.cfg, self.tokenizer, self.params, self.mesh = cfg.model, tokenizer, params, mesh
      shards = sharding.batch_shards(mesh)
      self.batch_size, self.max_gen_toks = -(-batch_size // shards) * shards, max_gen_toks
      self._engine = None

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
      """(log-likelihood of the continuation, whether it is the greedy one) per request, the whole
      sequence left-truncated to the context + 1 tokens, in batches of [batch_size, block_size]."""
      block, results = self.cfg.block_size, []
      for first in range(0, len(requests), self.batch_size):
        chunk = requests[first:first + self.batch_size]
        inputs = np.zeros((self.batch_size, block), np.int32)
        targets = np.zeros((self.batch_size, block), np.int32)
        spans = []
        for row, (_, context, continuation) in enumerate(chunk):
          tokens = (list(context) + list(continuation))[-(block + 1):]
          inputs[row, :len(tokens) - 1], targets[row, :len(tokens) - 1] = tokens[:-1], tokens[1:]
          spans.append((len(tokens) - 1 - len(continuation), len(tokens) - 1))
        with sharding.on_mesh(self.mesh):
          scores = _continuation_scores(self.params, *sharding.put_rows((inputs, targets), self.mesh), cfg=self.cfg)
        chosen, greedy = jax.device_get(scores)
        for row, (begin, end) in enumerate(spans):
          results.append((float(chosen[row, begin:end].sum()), bool(greedy[row, begin:end].all())))
      return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
      results = []
      for (text,) in [request.args for request in requests]:
        tokens = evaluate.document_tokens(self.tokenizer, text)
        if len(tokens) < 2:
          results.append(0.0)
          continue
        scored = evaluate.perplexity(self.cfg, self.params, tokens, stride=self.cfg.block_size // 2, mesh=self.mesh)
        results.append(-scored["nll"] * scored["tokens"])
      return results

    def generate_until(self, requests, disable_tqdm: bool = False):
      engine = self._engine = self._engine or Engine(self.cfg, self.params, self.tokenizer, self.mesh, 16).start()
      done = threading.Semaphore(0)
      generations = []
      for context, settings in [request.args for request in requests]:
        until = settings.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_tokens = min(settings.get("max_gen_toks", self.max_gen_toks), self.cfg.block_size - 1)
        prompt = evaluate.document_tokens(self.tokenizer, context).tolist() or [0]
        prompt = prompt[-(self.cfg.block_size - max_tokens):]  # left-truncated to leave room for the answer
        temperature = float(settings.get("temperature", 0.0)) if settings.get("do_sample") else 0.0
        generation = Generation(prompt, Sampling(max_tokens=max_tokens, temperature=temperature,
                                                 stop=tuple(until), seed=len(generations)), self.tokenizer,
                                lambda event: done.release() if event is FINISHED else None)
        generations.append(generation)
        engine.submit(generation)
      for _ in generations:
        done.acquire()
      if engine.error is not None:
        raise engine.error
      return [generation.text for generation in generations]

  return GptjaxLM()


def register() -> None:
  """Registers "gptjax" with lm-eval: `lm_eval.simple_evaluate(model="gptjax", model_args="checkpoint=DIR")`."""
  _lm_eval()
  from lm_eval.api.registry import register_model

  @register_model("gptjax")
  def from_args(checkpoint: str, step: str = "best", batch_size: int = 16, max_gen_toks: int = 256, **_):
    cfg, tok, params, _ = _load(checkpoint, step, [])
    return make_lm(cfg, tok, params, None, int(batch_size), int(max_gen_toks))

  from_args.create_from_arg_string = lambda arg_string, additional=None: from_args(
      **{k: v for k, v in (item.split("=", 1) for item in arg_string.split(",") if item)})
  from_args.create_from_arg_obj = lambda args, additional=None: from_args(**args)


def _load(checkpoint: str, step: str, mesh_overrides: list[str]):
  from gptjax import checkpoint as checkpoint_lib
  from gptjax import sharding
  from gptjax import tokenizer as tokenizer_lib
  mesh = sharding.inference_mesh(mesh_overrides)
  cfg, tokenizer_meta, params, _ = checkpoint_lib.load_for_inference(checkpoint, step, mesh)
  return cfg, tokenizer_lib.from_meta(tokenizer_meta), params, mesh


def task_configs(names: list[str], include_path: str | None = None) -> list:
  """Each task as lm-eval takes it: the config of a YAML in the shipped tasks/ (or `include_path`)
  that defines it, with its data files named from the YAML's folder; else the name, for lm-eval's
  own tasks (read offline, from the local Hugging Face cache)."""
  import yaml
  defined = {}
  for folder in [TASKS_DIR] + ([include_path] if include_path else []):
    for entry in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
      if entry.endswith((".yaml", ".yml")):
        with open(os.path.join(folder, entry), encoding="utf-8") as f:
          config = yaml.safe_load(f)
        if isinstance(config, dict) and "task" in config:
          files = config.get("dataset_kwargs", {}).get("data_files", {})
          for split, path in files.items():
            files[split] = os.path.join(folder, path)
          defined[config["task"]] = config
  return [defined.get(name, name) for name in names]


def check_tasks(names: list[str], include_path: str | None = None) -> list:
  """`task_configs`, each known (lm-eval installed, a name lm-eval or a task folder defines), or a
  one-line UserError."""
  _lm_eval()
  from lm_eval.tasks import TaskManager
  configs = task_configs(names, include_path)
  if any(isinstance(c, str) for c in configs):
    known = TaskManager().all_tasks
    if unknown := [c for c in configs if isinstance(c, str) and c not in known]:
      raise UserError(f"unknown task {unknown[0]!r}: not in tasks/, the --include-path or lm-eval's own tasks")
  return configs


def evaluate_tasks(lm, tasks: list[str], include_path: str | None = None, limit: int | None = None,
                   num_fewshot: int | None = None) -> dict:
  """lm-eval's results dict for `tasks` (`task_configs`)."""
  import lm_eval
  from lm_eval.tasks import TaskManager
  configs = check_tasks(tasks, include_path)
  manager = TaskManager(include_defaults=any(isinstance(c, str) for c in configs))
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
  parser.add_argument("--checkpoint", required=True, help="a run's out_dir")
  parser.add_argument("--step", default="best", help="best (lowest val loss), latest, or a step number")
  parser.add_argument("--tasks", required=True, help="comma-separated task names")
  parser.add_argument("--include-path", default=None, help="a folder of task YAMLs besides the shipped tasks/")
  parser.add_argument("--limit", type=int, default=None, help="at most this many documents per task")
  parser.add_argument("--num-fewshot", type=int, default=None)
  parser.add_argument("--batch-size", type=int, default=16, help="contexts scored per forward pass")
  parser.add_argument("--output", default=None, help="also write lm-eval's results as JSON here")
  parser.add_argument("mesh", nargs="*", help="mesh.data=N, mesh.fsdp=N, mesh.expert=N, mesh.tensor=N (default: data parallel)")
  args = parser.parse_intermixed_args(argv)
  if args.batch_size < 1:
    raise UserError(f"--batch-size={args.batch_size} is not positive")
  _lm_eval()
  cfg, tok, params, mesh = _load(args.checkpoint, args.step, args.mesh)
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
