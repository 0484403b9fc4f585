"""Test fixtures. The test process simulates 8 CPU devices so that sharding is tested for real;
commands run as subprocesses see the machine's real devices. The compilation cache is off for the
session (a user's own cache is not touched): shared by every test, it made the suite slower
(benchmarks/RESULTS.md); tests/test_compile_cache.py turns it on where it is what is tested."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "")  # empty: off, in this process and the commands it runs

import hashlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from gptjax import checkpoint  # noqa: E402
from gptjax import config as config_lib  # noqa: E402
from gptjax import model as model_lib  # noqa: E402
from gptjax import tokenizer as tokenizer_lib  # noqa: E402
from gptjax import sources  # noqa: E402
from gptjax import prepare  # noqa: E402

TINY_OVERRIDES = [
    "model.block_size=32", "model.n_layer=2", "model.n_head=2", "model.n_embd=32",
    "train.batch_size=8", "train.max_iters=30", "train.eval_interval=15", "train.eval_iters=2",
    "train.checkpoint_interval=15", "train.log_interval=5", "optim.warmup_iters=5", "optim.lr_decay_iters=100",
    "train.sample_tokens=0",  # the sample at each evaluation is tested on its own (tiny_run)
]


def tiny(*extra) -> list[str]:
  """TINY_OVERRIDES with `extra` overrides (and flags) added, replacing those of the same key: a key
  given twice on a command line is an error."""
  merged = {item.split("=")[0]: item for item in [*TINY_OVERRIDES, *extra]}  # the last of each key
  return list(merged.values())


def tiny_config(tmp_path, *extra) -> config_lib.Config:
  """A 2-layer, 32-wide model on prepared Shakespeare characters, writing under tmp_path."""
  return config_lib.load_config("shakespeare_char_cpu", tiny(
      f"data.dir={tmp_path / 'data'}", f"train.out_dir={tmp_path / 'out'}", *extra))


def load_checkpoint(out_dir, which="best"):
  """(config, tokenizer, params on the first device, step) of a run's checkpoint."""
  cfg, tokenizer_meta, params, step = checkpoint.load_for_inference(str(out_dir), which)
  return cfg, tokenizer_lib.from_meta(tokenizer_meta), params, step


def user_env():
  return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # a user's machine: one CPU device


def run_cli(*args, cwd=None):
  """Runs `gptjax ARGS` as a user would; returns the CompletedProcess."""
  return subprocess.run([sys.executable, "-m", "gptjax.cli", *map(str, args)], capture_output=True,
                        text=True, cwd=cwd, env=user_env(), timeout=600)


def run_cli_on_terminal(*args) -> tuple[int, str, str]:
  """Runs `gptjax ARGS` with stderr on a pseudo-terminal, as in a user's shell: (exit status,
  stdout, what the terminal showed)."""
  import fcntl, pty, struct, termios  # noqa: E401, PLC0415 (POSIX only)
  controller, terminal = pty.openpty()
  fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 150, 0, 0))  # rows, columns: a real window's
  process = subprocess.Popen([sys.executable, "-m", "gptjax.cli", *map(str, args)], stdout=subprocess.PIPE,
                             stderr=terminal, text=True, env=user_env())
  os.close(terminal)
  shown = b""
  while True:
    try:
      chunk = os.read(controller, 65536)
    except OSError:  # the terminal's other end is closed: the command has ended
      break
    if not chunk:
      break
    shown += chunk
  stdout = process.stdout.read()
  os.close(controller)
  return process.wait(timeout=600), stdout, shown.decode("utf-8", "replace")


def start_cli(*args) -> subprocess.Popen:
  """Starts `gptjax ARGS` as a user would, its stdout and stderr piped as text."""
  return subprocess.Popen([sys.executable, "-m", "gptjax.cli", *map(str, args)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=user_env())


def one_line_error(result, *fragments):
  """Asserts that a finished command failed with exit 2 and one `gptjax: error:` line naming `fragments`."""
  assert result.returncode == 2, (result.stdout, result.stderr)
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("gptjax: error: "), result.stderr
  for fragment in fragments:
    assert fragment in lines[0], lines[0]
  assert "Traceback" not in result.stderr


def digest(directory):
  """{relative path: sha256} of every file under `directory`: proof that nothing was touched."""
  files = sorted(p for p in directory.rglob("*") if p.is_file())
  return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def gptjax_logits(cfg, params, tokens):
  """float32 logits [B, T, vocab] of a gptjax model (`cfg` a Config) on token ids [B, T]."""
  return np.asarray(model_lib.bind(cfg.model, params)(np.asarray(tokens, np.int32)))


def hf_logits(model, tokens):
  """The logits of a transformers causal LM (torch) on token ids [B, T], as numpy."""
  import torch
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def transformers_sliding_window_nll(model, tokens, context, stride):
  """Hugging Face's perplexity recipe: windows every `stride` tokens, earlier tokens masked with -100;
  (mean NLL, scored tokens) of a transformers causal LM."""
  import torch
  nll_sum, count, prev_end = 0.0, 0, 0
  for begin in range(0, len(tokens), stride):
    end = min(begin + context, len(tokens))
    inputs = torch.tensor(tokens[None, begin:end], dtype=torch.long)
    labels = inputs.clone()
    labels[:, :-(end - prev_end)] = -100
    n_scored = int((labels[:, 1:] != -100).sum())  # the model shifts labels by one internally
    with torch.no_grad():
      nll_sum += float(model(inputs, labels=labels).loss) * n_scored
    count += n_scored
    prev_end = end
    if end == len(tokens):
      break
  return nll_sum / count, count


@pytest.fixture(scope="session")
def char_data(tmp_path_factory):
  """The built-in Shakespeare, prepared at character level."""
  path = tmp_path_factory.mktemp("char_data")
  prepare.prepare(sources.BUILTIN_SHAKESPEARE, "char", str(path))
  return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, char_data):
  """A tiny model trained for 30 steps through the command line: (out_dir, data_dir)."""
  out = tmp_path_factory.mktemp("tiny_run") / "out"
  result = run_cli("train", "shakespeare_char_cpu", *tiny(f"data.dir={char_data}", f"train.out_dir={out}",
                                                          "train.sample_tokens=24", "train.peak_flops_per_device=1e11"),
                   "--no-progress")  # a peak for MFU, which the CPU has no table entry for
  assert result.returncode == 0, result.stderr
  return out, char_data
