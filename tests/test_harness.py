"""lm-evaluation-harness: gptjax's in-process `LM` against the model's own numbers and
`gptjax perplexity`, and the shipped tasks evaluated in process and through `gptjax serve` with
lm-eval's `local-completions`: the same metrics both ways."""

import math

import jax
import numpy as np
import pytest

from gptjax import convert
from gptjax import evaluate
from gptjax import harness
from gptjax import sample

from conftest import gptjax_logits
from conftest import load_checkpoint
from conftest import run_cli
from conftest import start_cli

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
  """A random GPT-2 (2 layers, 32 wide, context 64, GPT-2's tokenizer) imported from transformers."""
  import torch
  import transformers
  root = tmp_path_factory.mktemp("gpt2")
  torch.manual_seed(0)
  transformers.GPT2LMHeadModel(transformers.GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                                       initializer_range=0.2)).save_pretrained(root / "hf")
  convert.import_hf(str(root / "hf"), str(root / "run"))
  return root / "run"


def _instances(kind, args):
  return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_loglikelihood_is_the_models_log_probability_and_rolling_is_gptjax_perplexity(tiny_run, tmp_path):
  out, _ = tiny_run
  cfg, tok, params, _ = load_checkpoint(out)
  lm = harness.make_lm(cfg, tok, params, batch_size=3)
  pairs = [("ROMEO:", " What"), ("To be, or not", " to be"), ("A", "nd so"), ("KING", " HENRY:\nNo")]
  got = lm.loglikelihood(_instances("loglikelihood", pairs))
  for (context, continuation), (logprob, greedy) in zip(pairs, got):
    ids = tok.encode(context + continuation)
    logprobs = np.asarray(jax.nn.log_softmax(gptjax_logits(cfg, params, [ids])[0], axis=-1))
    positions = np.arange(len(tok.encode(context)) - 1, len(ids) - 1)
    assert logprob == pytest.approx(float(logprobs[positions, np.asarray(ids)[positions + 1]].sum()), abs=1e-4)
    assert greedy == bool((logprobs[positions].argmax(-1) == np.asarray(ids)[positions + 1]).all())

  text = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 2  # 3 windows
  (tmp_path / "text.txt").write_text(text)
  [rolling] = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(text,)]))
  command = run_cli("perplexity", "--checkpoint", out, "--text", tmp_path / "text.txt")
  assert command.returncode == 0, command.stderr
  assert f"{len(text) - 1:,} tokens" in command.stdout
  nll = float(command.stdout.split("mean NLL ")[1].split(" nats")[0])
  assert -rolling / (len(text) - 1) == pytest.approx(nll, abs=1e-4)
  exact = evaluate.perplexity(cfg.model, params, evaluate.document_tokens(tok, text), stride=16)
  assert rolling == pytest.approx(-exact["nll"] * exact["tokens"], rel=1e-6)


def test_generate_until_is_greedy_generation_cut_at_the_stop(tiny_run):
  out, _ = tiny_run
  cfg, tok, params, _ = load_checkpoint(out)
  lm = harness.make_lm(cfg, tok, params)
  prompts = ["ROMEO:", "To be"]
  alone = [tok.decode(sample.generate(cfg.model, params, np.asarray([tok.encode(p)], np.int32), max_new_tokens=12,
                                      rng=jax.random.key(0), temperature=0)[0]) for p in prompts]
  stop = alone[0][4:6]
  got = lm.generate_until(_instances("generate_until", [(prompts[0], {"until": [stop], "max_gen_toks": 12}),
                                                        (prompts[1], {"until": ["never"], "max_gen_toks": 12})]))
  assert got == [alone[0][:alone[0].index(stop)], alone[1]]


def test_the_shipped_tasks_give_the_same_metrics_in_process_and_through_the_server(gpt2_run, tmp_path):
  in_process = run_cli("eval", "--checkpoint", gpt2_run, "--tasks", "shakespeare_next_line,milton_lines",
                       "--limit", "16", "--output", tmp_path / "in_process.json")
  assert in_process.returncode == 0, in_process.stderr
  assert "shakespeare_next_line" in in_process.stdout and "word_perplexity" in in_process.stdout
  import json
  ours = json.loads((tmp_path / "in_process.json").read_text())["results"]

  server = start_cli("serve", "--checkpoint", gpt2_run, "--port", "0", "--slots", "4", "--model-name", "tiny-gpt2")
  try:
    line = server.stdout.readline()
    assert " at http://" in line, line
    base = line.split(" at ")[-1].strip()
    import lm_eval
    cfg_ours = harness.task_configs(["shakespeare_next_line", "milton_lines"])
    from lm_eval.tasks import TaskManager
    theirs = lm_eval.simple_evaluate(
        model="local-completions", tasks=cfg_ours, limit=16, bootstrap_iters=0, log_samples=False,
        task_manager=TaskManager(include_defaults=False),  # lm-eval's own tasks not indexed (10 s)
        model_args=f"base_url={base}/completions,model=tiny-gpt2,tokenizer_backend=remote,max_length=64,"
                   "tokenized_requests=True,num_concurrent=1,max_retries=1")["results"]
  finally:
    server.terminate()
    server.wait(timeout=60)
  for task, metrics in (("shakespeare_next_line", ("acc,none", "acc_norm,none")),
                        ("milton_lines", ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"))):
    for metric in metrics:
      assert math.isclose(ours[task][metric], theirs[task][metric], rel_tol=1e-4), (task, metric)
  assert 0 <= ours["shakespeare_next_line"]["acc,none"] <= 1 and ours["milton_lines"]["bits_per_byte,none"] > 0


def test_lm_eval_knows_gptjax_by_name(tiny_run):
  import lm_eval
  harness.register()
  from lm_eval.tasks import TaskManager
  results = lm_eval.simple_evaluate(model="gptjax", model_args=f"checkpoint={tiny_run[0]},batch_size=4",
                                    tasks=harness.task_configs(["shakespeare_next_line"]), limit=4, bootstrap_iters=0,
                                    task_manager=TaskManager(include_defaults=False))["results"]
  assert 0 <= results["shakespeare_next_line"]["acc,none"] <= 1


def test_a_run_evaluates_its_tasks_at_each_evaluation(char_data, tmp_path):
  from conftest import tiny
  import json
  result = run_cli("train", "shakespeare_char_cpu", *tiny(f"data.dir={char_data}", f"train.out_dir={tmp_path / 'run'}",
                                                          "train.max_iters=10", "train.eval_interval=10",
                                                          "train.checkpoint_interval=10",
                                                          "train.eval_tasks=shakespeare_next_line,milton_lines",
                                                          "train.eval_tasks_limit=4", "model.block_size=64"),
                   "--no-progress")
  assert result.returncode == 0, result.stderr
  rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  tasks = [row for row in rows if row["kind"] == "tasks"]
  assert [row["step"] for row in tasks] == [10]
  assert set(tasks[0]) >= {"shakespeare_next_line/acc", "shakespeare_next_line/acc_norm", "milton_lines/bits_per_byte"}
  assert "step 10: shakespeare_next_line/acc" in result.stdout
  assert [row["step"] for row in rows if row["kind"] == "eval"] == [10]  # the losses' row as before
