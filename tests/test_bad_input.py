"""Every bad input the README's table lists: one `gptjax: error:` line, exit status 2, and no file
changed in the run directory, the prepared data, or the inputs given. Each case runs the command
as a user would, against the tiny trained run; `{new}` is a path that must stay uncreated."""

import json
import shutil

import numpy as np
import pytest

from gptjax import prepare
from gptjax import sources

from conftest import digest, one_line_error, run_cli, tiny



def train(*overrides):
  """`gptjax train` of the tiny model on the prepared data into {new}, with `overrides`."""
  return ["train", "shakespeare_char_cpu", *tiny("data.dir={data}", "train.out_dir={new}", *overrides)]


SAMPLE = ["sample", "--checkpoint", "{run}", "--max-new-tokens", "5"]
SWEEP = ["sweep", "shakespeare_char_cpu", "data.dir={data}", "--out", "{new}"]
PERPLEXITY = ["perplexity", "--checkpoint", "{run}"]

CASES = {
    # prepare
    "prepare: no such input": (["prepare", "--input", "{inp}/nope.txt", "--out", "{new}"], "no text found"),
    "prepare: empty text": (["prepare", "--input", "{inp}/empty.txt", "--out", "{new}"], "holds no text"),
    "prepare: text not UTF-8": (["prepare", "--input", "{inp}/latin1.txt", "--out", "{new}"], "is not UTF-8 text"),
    "prepare: over prepared data": (["prepare", "--out", "{data}"], "already holds prepared data; pass --overwrite"),
    "prepare: bad --val-fraction": (["prepare", "--val-fraction", "1.5", "--out", "{new}"], "val_fraction=1.5 is not in (0, 1)"),
    "prepare: out is a file": (["prepare", "--out", "{inp}/a_file"], "cannot create", "a_file: File exists"),
    "prepare: out under /proc": (["prepare", "--out", "/proc/gptjax-data"], "cannot create /proc/gptjax-data"),
    "prepare: JSON line without the text field": (["prepare", "--input", "{inp}/docs.jsonl", "--tokenizer", "gpt2",
                                                   "--out", "{new}"], "docs.jsonl line 2 is not a JSON object with a 'text' field"),
    "prepare: Parquet without the text column": (["prepare", "--input", "{inp}/docs.parquet", "--out", "{new}"],
                                                 "has no column 'text' (--text-key); it has ['content']"),
    "prepare: no workers": (["prepare", "--workers", "0", "--out", "{new}"], "--workers=0: at least 1"),
    "prepare: unknown tokenizer": (["prepare", "--tokenizer", "bpe", "--out", "{new}"],
                                   "unknown tokenizer 'bpe': choose char, gpt2 or a Hugging Face tokenizer.json file"),
    "prepare: a tokenizer.json that is not one": (["prepare", "--tokenizer", "{inp}/list.yaml", "--out", "{new}"],
                                                  "not a Hugging Face tokenizer.json"),
    # train: the config
    "unknown config name": (["train", "shakespeare_xl"], "unknown config 'shakespeare_xl'", "shakespeare_char_cpu"),
    "config file missing": (["train", "{inp}/missing.yaml"], "missing.yaml does not exist"),
    "config YAML syntax error": (["train", "{inp}/syntax.yaml"], "cannot read config"),
    "config YAML duplicate key": (["train", "{inp}/duplicate.yaml"], "cannot read config", "duplicate.yaml: found duplicate key model at line 3"),
    "config YAML a number": (["train", "{inp}/number.yaml"], "number.yaml: Invalid loaded object type: int"),
    "config YAML a list": (["train", "{inp}/list.yaml"], "list.yaml holds a list, not a mapping of sections"),
    "unknown field": (train("model.n_layers=4"), "Key 'n_layers' not in 'ModelConfig'"),
    "unknown section": (train("nonsense.key=1"), "Key 'nonsense' not in 'Config'"),
    "value of the wrong type": (train("train.max_iters=many"), "train.max_iters"),
    "dropout out of range": (train("model.dropout=2.0"), "model.dropout=2.0 is not in [0, 1)"),
    "heads do not divide width": (train("model.n_head=5"), "not divisible by model.n_head=5"),
    "zero heads": (train("model.n_head=0"), "n_layer, n_head and n_embd must be positive"),
    "key/value heads do not divide heads": (train("model.n_kv_head=3"), "model.n_head=2 is not a multiple of model.n_kv_head=3"),
    "unknown norm": (train("model.norm=batchnorm"), "model.norm='batchnorm' is not layernorm or rmsnorm"),
    "rope scaling without rope": (train("model.rope_scaling_factor=8"), "model.rope_scaling_factor needs model.positions=rope"),
    "unknown norm position": (train("model.norm_position=sideways"), "model.norm_position='sideways' is not pre or post"),
    "unknown positions": (train("model.positions=absolute"),
                          "model.positions='absolute' is not one of learned, sinusoidal, rope, none"),
    "unknown attention scale": (train("model.attention_scale=half"), "model.attention_scale='half' is not sqrt or none"),
    "unknown optimizer": (train("optim.name=sgd"), "optim.name='sgd' is not one of adamw, muon, lion, adafactor"),
    "unknown schedule": (train("optim.schedule=step"), "optim.schedule='step' is not one of cosine, wsd, linear, constant"),
    "WSD decay fraction out of range": (train("optim.schedule=wsd", "optim.decay_fraction=0"),
                                        "optim.decay_fraction=0.0 is not in (0, 1]"),
    "negative z-loss": (train("optim.z_loss=-1"), "optim.z_loss=-1.0 is not a number >= 0"),
    "negative logit soft cap": (train("model.logit_softcap=-5"), "model.logit_softcap=-5.0 is not a number >= 0"),
    "more experts per token than experts": (train("model.n_experts=4", "model.experts_per_token=5"),
                                            "model.experts_per_token=5 is not in [1, model.n_experts=4]"),
    "unknown experts' matmul": (train("model.n_experts=4", "model.moe_matmul=dense"),
                                "model.moe_matmul='dense' is not one of auto, ragged_dot, tiled"),
    "dense layers without experts": (train("model.dense_layers=[0]"),
                                     "model.dense_layers needs a mixture of experts (model.n_experts > 0)"),
    "a dense layer past the last": (train("model.n_experts=4", "model.dense_layers=[0,9]"),
                                    "model.dense_layers=[0, 9] is not a list of distinct layers in [0, model.n_layer=2)"),
    "every layer dense": (train("model.n_experts=4", "model.dense_layers=[0,1]"),
                          "model.dense_layers=[0, 1] makes every layer dense: a dense model is model.n_experts=0"),
    "negative router loss": (train("optim.router_aux_loss=-1"),
                             "optim.router_aux_loss and optim.router_z_loss must be numbers >= 0"),
    "unknown window order": (train("data.order=sorted"), "data.order='sorted' is not auto, shuffled or random"),
    "unknown window alignment": (train("data.align=bos"), "data.align='bos' is not none or document"),
    "windows aligned on a tokenizer without documents": (train("data.align=document"),
                                                         "data.align=document needs a tokenizer that marks documents"),
    "bad document mask": (train("data.document_mask=maybe"), "data.document_mask='maybe' is not auto, true or false"),
    "document mask on a tokenizer without documents": (train("data.document_mask=true"),
                                                       "data.document_mask=true needs a tokenizer that marks documents"),
    "eval sets not NAME:DIR": (train("data.eval_sets=val:{data}"), "data.eval_sets='val:"),
    "eval set not prepared": (train("data.eval_sets=other:{inp}/none"), "no prepared data in", "none"),
    "best_of an unknown eval set": (train("train.best_of=milton"), "train.best_of='milton' is not val or a name in data.eval_sets"),
    "old remat flag": (train("model.remat=true"), "(what was model.remat=true is now full)"),
    "max_bad_steps 0": (train("train.max_bad_steps=0"), "max_bad_steps must be positive"),
    "checkpoint_minutes negative": (train("train.checkpoint_minutes=-1"), "train.checkpoint_minutes=-1.0 is negative"),
    "negative peak FLOP/s": (train("train.peak_flops_per_device=-1"), "train.peak_flops_per_device=-1.0 is negative"),
    "profile steps reversed": (train("train.profile=5:3"), "train.profile='5:3' is not START:END with 0 <= START < END"),
    "profile not steps": (train("train.profile=10"), "train.profile='10' is not START:END"),
    "unknown attention": (train("model.attention=flash"), "model.attention='flash' is not one of auto, cudnn, splash, xla, blocked"),
    "a GPU's attention kernel on a CPU": (train("model.attention=cudnn"),
                                         "model.attention=cudnn cannot run here: cuDNN's fused attention needs an NVIDIA GPU"),
    "negative process count": (train("distributed.num_processes=-2"), "distributed.num_processes=-2 is negative"),
    "override without =": (train("train.max_iters"), "bad override 'train.max_iters': expected section.field=value"),
    "a section set to a value": (train("train=3"), "bad override 'train=3': expected section.field=value"),
    "the same key twice": ([*train(), "train.max_iters=7"], "train.max_iters is given twice"),
    "mesh does not divide devices": (train("mesh.fsdp=3"), "mesh data=-1 x fsdp=3 x expert=1 x tensor=1 does not divide the 1 devices"),
    # train: the data
    "data not prepared": (["train", "shakespeare_char_cpu", "data.dir={inp}/none", "train.out_dir={new}"],
                          "no prepared data", "gptjax prepare"),
    "data shorter than a block": (train("data.dir={inp}/short", "train.out_dir={new}"), "fewer than one block"),
    "meta.json not JSON": (train("data.dir={inp}/meta_not_json", "train.out_dir={new}"), "meta.json is not readable JSON"),
    "meta.json incomplete": (train("data.dir={inp}/meta_incomplete", "train.out_dir={new}"),
                             "meta.json lacks 'vocab_size'"),
    "train.bin cut short": (train("data.dir={inp}/odd_bin", "train.out_dir={new}"),
                            "train.bin is not a whole number of uint16 tokens"),
    "a batch that does not split into device batches": (train("train.device_batch_size=5"),
        "train.batch_size=8 over 1 device is 8 sequences per device, not a multiple of train.device_batch_size=5",
        "(e.g. 4)"),
    "device batch and accumulation that disagree": (train("train.device_batch_size=2", "train.grad_accum_steps=2"),
        "train.device_batch_size=2 x grad_accum_steps=2 is not train.batch_size=8 / 1 device = 8: set one of the two"),
    "negative device batch": (train("train.device_batch_size=-1"), "train.device_batch_size and grad_accum_steps must be >= 0"),
    "block_size beyond max_positions": (train("model.max_positions=16"),
                                        "model.block_size=32 is longer than the model's 16 positions (model.max_positions)"),
    "fine-tuning at a longer context than the model takes": (train("train.init_from={run}", "model.block_size=64"),
        "model.block_size=64 is longer than the 32 positions", "set model.block_size to at most 32"),
    "negative loss_chunk": (train("model.loss_chunk=-1"), "model.loss_chunk=-1 is negative (0: the whole sequence at once)"),
    "unknown scan_layers": (train("model.scan_layers=sometimes"), "model.scan_layers='sometimes' is not auto, true or false"),
    "token ids beyond the vocabulary": (train("data.dir={inp}/big_ids", "train.out_dir={new}"),
                                        "batch 0 of the train split holds token id 200, not below the vocabulary size 77"),
    "meta.json's token range beyond its vocabulary": (train("data.dir={inp}/big_range", "train.out_dir={new}"),
                                                      "meta.json says its tokens reach id 200, not below its vocabulary size 77"),
    # train: the run directory
    "an existing run without --resume": (train("data.dir={data}", "train.out_dir={run}"), "already holds checkpoints", "--resume"),
    "--resume with no checkpoint": (train("--resume"), "--resume: no checkpoint"),
    "--resume with another optimizer": (train("train.out_dir={run}", "optim.name=muon", "--resume"),
                                        "was trained with optim.name=adamw, not muon", "train.init_from="),
    "--resume with another model": (train("train.out_dir={run}", "model.n_layer=3", "--resume"),
                                    "model config differs"),
    "out_dir is a file": (train("data.dir={data}", "train.out_dir={inp}/a_file"), "cannot create", "Not a directory"),
    "out_dir under /proc": (train("data.dir={data}", "train.out_dir=/proc/gptjax-run"), "cannot create /proc/gptjax-run"),
    "no room for a checkpoint": (train("model.n_layer=200", "model.n_embd=16384", "model.n_head=128"),
                                 "MiB free, a checkpoint of this run needs about"),
    "resume on other data": (["train", "shakespeare_char_cpu", *tiny("data.dir={inp}/resplit", "train.out_dir={run}"),
                              "--resume"], "is not the data this run was trained on", "data.allow_data_change=true"),
    "data.mixture malformed": (train("data.mixture={data}:heavy"), "data.mixture=", "is not DIR:WEIGHT,DIR:WEIGHT"),
    "data.mixture of two tokenizers": (train("data.mixture={data}:1,{inp}/abc:1"), "was prepared with another tokenizer than"),
    "init_from nothing": (train("train.init_from={inp}/none"), "no checkpoint in"),
    "init_from another tokenizer": (train("data.dir={inp}/abc", "train.out_dir={new}", "train.init_from={run}"),
                                    "was prepared with another tokenizer (char, 4 characters)", "(char, 77 characters)"),
    # lower
    "lower: splash at a context not a multiple of 128": (["lower", "shakespeare_char_cpu", "--platform", "tpu",
                                                          "model.attention=splash", "train.batch_size=8"],
                                                         "splash attention needs a sequence length that is a multiple of 128, not 64"),
    "lower: no devices": (["lower", "gpt2_124m", "--platform", "cuda", "--devices", "0"], "--devices=0 is not positive"),
    "lower: an unknown platform": (["lower", "gpt2_124m", "--platform", "rocm"], "argument --platform: invalid choice: 'rocm'"),
    # sweep
    "sweep: a setting without values": (SWEEP + ["--vary", "model.norm_position"],
                                        "--vary 'model.norm_position' is not section.field=V1,V2,..."),
    "sweep: a value the config refuses": (SWEEP + ["--vary", "model.norm_position=pre,sideways"],
                                          "model.norm_position='sideways' is not pre or post"),
    "sweep: the seed varied": (SWEEP + ["--vary", "train.seed=1,2"], "--vary train.seed: the sweep sets it"),
    "sweep: a setting both overridden and varied": (SWEEP + ["model.n_layer=3", "--vary", "model.n_layer=1,2"],
                                                    "model.n_layer is both an override and varied"),
    "sweep: no seeds": (SWEEP + ["--seeds", "0"], "--seeds and --parallel must be at least 1"),
    # sample
    "sample: no checkpoint": (["sample", "--checkpoint", "{inp}/none"], "no checkpoint in"),
    "sample: unknown flag": ([*SAMPLE, "--temprature", "1"], "unrecognized arguments"),
    "sample: top-k too large": ([*SAMPLE, "--top-k", "1000"], "top_k=1000 is not in [0, 77]"),
    "sample: negative temperature": ([*SAMPLE, "--temperature", "-0.5"], "temperature=-0.5 is not a number >= 0"),
    "sample: temperature nan": ([*SAMPLE, "--temperature", "nan"], "temperature=nan is not a number >= 0"),
    "sample: top-p 0": ([*SAMPLE, "--top-p", "0"], "top_p=0.0 is not in (0, 1]"),
    "sample: no such step": ([*SAMPLE, "--step", "123456"], "no checkpoint '123456'"),
    "sample: no samples": ([*SAMPLE, "--num-samples", "0"], "num_samples must be positive"),
    "sample: negative length": ([*SAMPLE, "--max-new-tokens", "-1"], "max_new_tokens non-negative"),
    "eval: unknown task": (["eval", "--checkpoint", "{run}", "--tasks", "nope_task"], "unknown task 'nope_task'"),
    "eval: no checkpoint": (["eval", "--checkpoint", "{inp}/none", "--tasks", "milton_lines"], "no checkpoint in"),
    "eval: batch size 0": (["eval", "--checkpoint", "{run}", "--tasks", "milton_lines", "--batch-size", "0"],
                           "--batch-size=0 is not positive"),
    "train: unknown eval task": (train("train.eval_tasks=nope_task"), "unknown task 'nope_task'"),
    "serve: no checkpoint": (["serve", "--checkpoint", "{inp}/none", "--port", "0"], "no checkpoint in"),
    "serve: no slots": (["serve", "--checkpoint", "{run}", "--port", "0", "--slots", "0"], "--slots=0 is not positive"),
    "serve: a port that cannot be": (["serve", "--checkpoint", "{run}", "--port", "70000"],
                                     "cannot listen on 127.0.0.1:70000"),
    "sample: prompt outside the vocabulary": ([*SAMPLE, "--prompt", "\u00e9t\u00e9"], "is not in the character vocabulary"),
    "sample: prompt file not UTF-8": ([*SAMPLE, "--prompt-file", "{inp}/latin1.txt"], "is not UTF-8 text"),
    "sample: prompt file missing": ([*SAMPLE, "--prompt-file", "{inp}/nope.txt"], "cannot read --prompt-file"),
    "sample: a model override": ([*SAMPLE, "model.n_layer=3"], "only mesh.* overrides apply here, not 'model.n_layer=3'"),
    # perplexity
    "perplexity: no checkpoint": (["perplexity", "--checkpoint", "{inp}/none", "--split", "val"], "no checkpoint in"),
    "perplexity: no such step": ([*PERPLEXITY, "--split", "val", "--step", "123456"], "no checkpoint '123456'"),
    "perplexity: batch size 0": ([*PERPLEXITY, "--split", "val", "--batch-size", "0"], "batch_size=0 is not positive"),
    "perplexity: stride 0": ([*PERPLEXITY, "--split", "val", "--stride", "0"], "stride=0 is not in [1, block_size=32]"),
    "perplexity: mesh does not divide devices": ([*PERPLEXITY, "--split", "val", "mesh.fsdp=3"],
                                                 "mesh data=-1 x fsdp=3 x expert=1 x tensor=1 does not divide the 1 devices"),
    "perplexity: text outside the vocabulary": ([*PERPLEXITY, "--text", "{inp}/french.txt"], "is not in the character vocabulary"),
    "perplexity: no such text": ([*PERPLEXITY, "--text", "{inp}/nope.txt"], "no text found"),
    "perplexity: data of another tokenizer": ([*PERPLEXITY, "--split", "val", "--data-dir", "{inp}/abc"],
                                              "was prepared with another tokenizer than the checkpoint's"),
    # explain, attention, plot
    "explain: no such block": (["explain", "--checkpoint", "{run}", "--layers", "0,5"], "--layers '0,5': the model's blocks are 0-1"),
    "attention: prompt longer than the context": (["attention", "--checkpoint", "{run}", "--prompt", "x" * 40, "--output", "{new}"],
                                                  "the prompt is 40 tokens, more than the model's context of 32"),
    "plot: not a run": (["plot", "{inp}", "--output", "{new}.png"], "no metrics.jsonl in", "not the out_dir of a run"),
    "plot: output in a missing folder": (["plot", "{run}", "--output", "{new}/loss.png"], "loss.png: No such file or directory"),
    "train: negative sample length": (train("train.sample_tokens=-1"), "train.sample_tokens=-1 is negative"),
    "train: sample prompt outside the vocabulary": (train("train.sample_prompt=été"),
                                                    "train.sample_prompt='été': character 'é' is not in the character vocabulary"),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, char_data):
  """The odd files and prepared-data folders that the cases pass."""
  d = tmp_path_factory.mktemp("inputs")
  (d / "empty.txt").write_text("  \n")
  (d / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e ".encode("latin-1") * 20)
  (d / "french.txt").write_text("\u00e9t\u00e9 \u00e0 Paris")
  (d / "a_file").write_text("not a directory")
  (d / "syntax.yaml").write_text("model:\n  n_layer: [1, 2\n")
  (d / "duplicate.yaml").write_text("model:\n  n_layer: 2\nmodel:\n  n_head: 2\n")
  (d / "list.yaml").write_text("- model\n- train\n")
  (d / "number.yaml").write_text("3\n")
  (d / "short.txt").write_text("To be, or not to be, that is the question. " * 3)
  prepare.prepare(str(d / "short.txt"), "char", str(d / "short"))
  (d / "abc.txt").write_text("abc cab bac " * 400)
  prepare.prepare(str(d / "abc.txt"), "char", str(d / "abc"))
  (d / "docs.jsonl").write_text('{"text": "one"}\n{"body": "two"}\n')
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"content": ["one", "two"]}), d / "docs.parquet")
  prepare.prepare(sources.BUILTIN_SHAKESPEARE, "char", str(d / "resplit"), val_fraction=0.2)  # the same text, other splits
  for name in ("meta_not_json", "meta_incomplete", "odd_bin", "big_ids", "big_range"):
    shutil.copytree(char_data, d / name)
  (d / "meta_not_json" / "meta.json").write_text("{not json")
  (d / "meta_incomplete" / "meta.json").write_text('{"dtype": "uint16"}')
  with open(d / "odd_bin" / "train.bin", "ab") as f:
    f.write(b"\0")  # one byte: half a uint16 token
  tokens = np.fromfile(d / "big_ids" / "train.bin", np.uint16)
  tokens[:] = 200  # written over after prepare (77 characters: ids 0..76), so every batch holds it
  tokens.tofile(d / "big_ids" / "train.bin")
  meta = json.loads((d / "big_range" / "meta.json").read_text())
  (d / "big_range" / "meta.json").write_text(json.dumps({**meta, "max_token_id": 200}))
  return d


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(tiny_run, inputs, tmp_path, case):
  args, *fragments = CASES[case]
  run, data_dir = tiny_run
  before = digest(run), digest(data_dir), digest(inputs)
  paths = {"run": run, "data": data_dir, "inp": inputs, "new": tmp_path / "new"}
  one_line_error(run_cli(*[arg.format(**paths) for arg in args]), *fragments)
  assert (digest(run), digest(data_dir), digest(inputs)) == before
  assert not (tmp_path / "new").exists() and not (tmp_path / "new.png").exists()
