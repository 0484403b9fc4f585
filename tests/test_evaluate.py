import re

import jax
import numpy as np
import optax
import pytest

from gptjax import evaluate
from gptjax import model as model_lib
from gptjax.config import ModelConfig
from gptjax.errors import UserError

from conftest import run_cli, run_cli_on_terminal

CFG = ModelConfig(vocab_size=30, block_size=16, n_layer=2, n_head=2, n_embd=32)


@pytest.mark.parametrize("n_tokens, stride", [(100, 16), (100, 5), (16, 8), (17, 16), (2, 1), (64, 16)])
def test_windows_score_every_token_with_context_once(n_tokens, stride):
  scored = []
  for begin, end, first in evaluate.sliding_windows(n_tokens, CFG.block_size, stride):
    assert 0 <= begin < first <= end <= n_tokens and end - begin <= CFG.block_size
    assert first - begin >= min(first, CFG.block_size - stride)  # context before each scored token
    scored.extend(range(first, end))
  if stride < CFG.block_size:
    assert scored == list(range(1, n_tokens))
  else:  # disjoint windows: a window's first token has nothing to be predicted from
    assert scored == [i for i in range(1, n_tokens) if i % CFG.block_size]


def _reference_nll(params, tokens, stride):
  """Each window run on its own, unpadded; the scored tokens' NLL summed."""
  total, count = 0.0, 0
  for begin, end, first in evaluate.sliding_windows(len(tokens), CFG.block_size, stride):
    logits = model_lib.bind(CFG, params)(tokens[None, begin:end])[0]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits[:-1], tokens[begin + 1:end])
    total += float(nll[first - begin - 1:].sum())
    count += end - first
  return total / count, count


@pytest.mark.parametrize("stride", [16, 7])
def test_perplexity_matches_window_by_window_computation(stride):
  params = model_lib.init_params(CFG, jax.random.key(0))
  tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, 75).astype(np.int32)
  result = evaluate.perplexity(CFG, params, tokens, stride=stride, batch_size=3)
  nll, count = _reference_nll(params, tokens, stride)
  assert result["tokens"] == count == (74 if stride < CFG.block_size else 75 - 5)
  assert result["nll"] == pytest.approx(nll, rel=1e-5)
  assert result["perplexity"] == pytest.approx(np.exp(nll), rel=1e-5)


def test_more_context_never_hurts_much_and_bad_stride_is_an_error():
  params = model_lib.init_params(CFG, jax.random.key(0))
  with pytest.raises(UserError, match="stride=17"):
    evaluate.perplexity(CFG, params, np.zeros(40, np.int32), stride=17)
  with pytest.raises(UserError, match="at least 2"):
    evaluate.perplexity(CFG, params, np.zeros(1, np.int32), stride=4)


def test_perplexity_command_on_split_and_text(tiny_run, tmp_path):
  out_dir, _ = tiny_run
  split = run_cli("perplexity", "--checkpoint", out_dir, "--split", "val")
  assert split.returncode == 0, split.stderr
  assert "111,538 tokens" in split.stdout and "perplexity" in split.stdout
  ppl = float(split.stdout.rsplit("perplexity", 1)[1])
  assert 1.0 < ppl < 77.0  # better than uniform over the 77 characters
  (tmp_path / "lines.txt").write_text("To be, or not to be: that is the question.\n")
  text = run_cli("perplexity", "--checkpoint", out_dir, "--text", tmp_path / "lines.txt", "--stride", 8)
  assert text.returncode == 0, text.stderr
  assert "42 tokens" in text.stdout and "stride 8" in text.stdout  # 43 characters, the first unscored
  assert split.stderr == text.stderr == ""  # no progress bar off a terminal


def test_a_long_command_shows_a_progress_bar_on_a_terminal(tiny_run):
  out_dir, _ = tiny_run
  status, stdout, shown = run_cli_on_terminal("perplexity", "--checkpoint", out_dir, "--split", "val", "--batch-size", 512)
  assert status == 0 and "perplexity" in stdout
  assert re.search(r"perplexity: +100%.*\| 6971/6971 \[.*window/s\]", shown), shown  # count, rate, time
