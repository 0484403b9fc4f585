"""Lower a config's steps for a GPU or TPU without one: what would run there, read from here.

    gptjax lower gpt2_124m --platform cuda --devices 8
    gptjax lower llama3_2_1b --platform tpu --devices 8 mesh.fsdp=8 model.vocab_size=128256

The train step, sampling's prefill (the prompt pass) and one decode step are lowered for the
platform (`jax.jit(...).trace(...).lower(lowering_platforms=...)`) over a mesh of N devices laid
out as the config's `mesh.*` says, with the config's dtype (`auto`: bfloat16 off the CPU) and
attention kernel; nothing lowered for the platform is compiled here. Each step's StableHLO goes to OUT/NAME.mlir, and a summary says which attention
kernels each step calls (their custom calls), whether any softmax over [T, T] scores remains, the
matmuls' input and output dtypes, the collectives XLA's SPMD partitioner inserts (read from the same
steps compiled for this machine's CPU devices, XLA's attention standing in for a fused kernel), and
how each parameter is split over the mesh.

The mesh is made of this machine's CPU devices (N of them are simulated): a sharded step must be
traced over real devices. cuDNN's attention asks the installed cuDNN for its version while
tracing; without a GPU, `_cudnn_version_answered` answers, only while lowering.
"""

import argparse
import collections
import contextlib
import os
import pathlib
import re

from gptjax.errors import UserError

CUDNN_VERSION_ASSUMED = 90800  # cuDNN 9.8: any 9.x with flash attention lowers to the same custom calls


@contextlib.contextmanager
def _cudnn_version_answered():
  """While lowering for cuda on a machine without cuDNN: JAX's cuDNN attention checks the installed
  cuDNN's version at trace time (`check_cudnn_version` in jax._src.cudnn.fused_attention_stablehlo,
  a private module) and fails without one. Here it is answered with CUDNN_VERSION_ASSUMED; the
  lowered module is never compiled or run on this machine."""
  try:
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention  # noqa: PLC0415
    original = cudnn_attention.check_cudnn_version
    original()
    yield  # a real cuDNN answers for itself
    return
  except (ImportError, AttributeError):
    yield  # another JAX layout: lowering reports what it meets
    return
  except RuntimeError:
    pass
  cudnn_attention.check_cudnn_version = lambda: CUDNN_VERSION_ASSUMED
  try:
    yield
  finally:
    cudnn_attention.check_cudnn_version = original


def _lower_sampling(cfg, mesh, platform: str, batch: int, prompt_length: int):
  """(prefill, decode) lowered: the prompt [batch, prompt_length] into a cache of block_size
  positions, and one token over that cache."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from gptjax import model as model_lib  # noqa: PLC0415
  from gptjax import sharding  # noqa: PLC0415
  from gptjax.model import transformer  # noqa: PLC0415

  m = cfg.model
  shapes, names = model_lib.abstract_params(m)
  shardings = sharding.param_shardings(shapes, names, mesh)
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
  rows = sharding.rows_sharding(mesh)
  cache_sharding = jax.sharding.NamedSharding(mesh, sharding.fit(
      sharding.logical_to_spec(transformer.CACHE_AXES), (batch, m.kv_heads, m.block_size, m.head_size), mesh))
  layer_cache = jax.ShapeDtypeStruct((batch, m.kv_heads, m.block_size, m.head_size), model_lib.compute_dtype(m),
                                     sharding=cache_sharding)
  cache = model_lib.KVCache((layer_cache,) * m.n_layer, (layer_cache,) * m.n_layer,
                            jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh)))

  def prefill(params, prompt):
    model = model_lib.bind(m, params)
    return model.prefill(prompt, m.block_size, model.layer_params())

  def decode(params, cache, token):
    model = model_lib.bind(m, params)
    return model.decode(token, cache, model.layer_params())

  with jax.set_mesh(mesh):
    prompt = jax.ShapeDtypeStruct((batch, prompt_length), jnp.int32, sharding=rows)
    token = jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=rows)
    return (jax.jit(prefill).trace(params, prompt).lower(lowering_platforms=(platform,)),
            jax.jit(decode).trace(params, cache, token).lower(lowering_platforms=(platform,)))


def _partitioned(cfg, mesh, dtype: str, batch: int, prompt_length: int, document_start: int | None = None) -> dict[str, str]:
  """{step: optimized HLO} of the same steps compiled for this machine's CPU devices, with XLA's
  attention in place of a fused kernel and the target's dtype: where XLA's SPMD partitioner puts
  the collectives that the shardings imply (the same partitioner compiles for GPUs and TPUs)."""
  import dataclasses  # noqa: PLC0415

  from gptjax import optim  # noqa: PLC0415
  from gptjax import steps as steps_lib  # noqa: PLC0415
  twin = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention="xla", dtype=dtype))
  tx, schedule = optim.make_optimizer(twin.optim, twin.model), optim.lr_schedule(twin.optim)
  train_step = steps_lib.lower_steps(twin, tx, schedule, mesh, document_start=document_start)[0]
  prefill, decode = _lower_sampling(twin, mesh, "cpu", batch, prompt_length)
  return {name: lowered.compile().as_text()
          for name, lowered in (("train_step", train_step), ("prefill", prefill), ("decode", decode))}


def lower(cfg, platform: str, devices, out_dir: str, prompt_length: int | None = None,
          partition: bool = True, document_start: int | None = None) -> dict:
  """Lowers `cfg`'s steps for `platform` over a mesh of `devices` (with document masking where
  `document_start` names the token opening each document); writes OUT_DIR/{train_step,
  prefill, decode}.mlir and returns {"attention": the start-up line, "texts": {step: StableHLO},
  "partitioned": {step: the CPU twin's optimized HLO} (with `partition`), "params": [(name, shape,
  spec)], "mesh": the mesh}."""
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import traverse_util  # noqa: PLC0415

  from gptjax import model as model_lib  # noqa: PLC0415
  from gptjax import optim  # noqa: PLC0415
  from gptjax import sharding  # noqa: PLC0415
  from gptjax import steps as steps_lib  # noqa: PLC0415
  from gptjax.model import kernels  # noqa: PLC0415

  mesh = sharding.make_mesh(cfg.mesh, devices)
  shards = sharding.batch_shards(mesh)
  cfg.train.micro_batches(shards)  # a batch the mesh cannot split stops here
  prompt_length = prompt_length or max(1, cfg.model.block_size // 2)
  if not 0 < prompt_length <= cfg.model.block_size:
    raise UserError(f"--prompt-length={prompt_length} is not in [1, block_size={cfg.model.block_size}]")
  with model_lib.lowering_for(platform), (_cudnn_version_answered() if platform == "cuda" else contextlib.nullcontext()):
    attention = kernels.report(cfg.model, cfg.model.block_size)
    tx, schedule = optim.make_optimizer(cfg.optim, cfg.model), optim.lr_schedule(cfg.optim)
    train_step, _, abstract, state_shardings = steps_lib.lower_steps(cfg, tx, schedule, mesh, platform, document_start)
    prefill, decode = _lower_sampling(cfg, mesh, platform, shards, prompt_length)
    dtype = jnp.dtype(model_lib.compute_dtype(cfg.model)).name
  texts = {"train_step": train_step.as_text(), "prefill": prefill.as_text(), "decode": decode.as_text()}
  partitioned = _partitioned(cfg, mesh, dtype, shards, prompt_length, document_start) if partition else {}
  out = pathlib.Path(out_dir)
  try:
    out.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
      (out / f"{name}.mlir").write_text(text)
  except OSError as e:
    raise UserError(f"cannot write the lowered modules to {out_dir}: {e.strerror}") from None
  shardings = traverse_util.flatten_dict(state_shardings.params)
  params = [("/".join(path), x.shape, shardings[path].spec)  # in the order of the module's arguments: jax sorts keys
            for path, x in sorted(traverse_util.flatten_dict(abstract.params).items())]
  unsplit = sharding.unsplit_report(*model_lib.abstract_params(cfg.model), mesh)
  return {"attention": attention, "texts": texts, "partitioned": partitioned, "params": params, "mesh": mesh,
          "unsplit": unsplit}


def custom_calls(text: str) -> collections.Counter:
  """The custom calls in a module by target (a Mosaic kernel by its kernel name)."""
  found = collections.Counter()
  for line in text.splitlines():
    target = re.search(r"custom_call @([\w$.]+)", line)
    if target and target.group(1) != "Sharding" and not target.group(1).startswith("SPMD"):
      kernel = re.search(r'kernel_name = \\?"([^"\\]+)', line)
      found[kernel.group(1) if target.group(1) == "tpu_custom_call" and kernel else target.group(1)] += 1
  return found


def square_softmaxes(text: str, T: int) -> int:
  """How many exponentials run over scores whose last two dimensions are [T, T]: XLA's softmax
  over attention scores, which a fused kernel never writes out."""
  return len(re.findall(rf"stablehlo\.exponential [^\n]*tensor<(?:\d+x)*{T}x{T}xf\d+>", text))


def matmul_dtypes(text: str) -> collections.Counter:
  """The dot_generals by (left input, right input -> output) element type, e.g. 'bf16 x bf16 -> f32';
  the grouped matmuls (a mixture's experts: chlo.ragged_dot) as 'grouped bf16 x bf16 -> bf16'."""
  found = collections.Counter()
  for op, lhs, rhs, out in re.findall(r"(stablehlo\.dot_general|\"chlo\.ragged_dot\")[^\n]*: "
                                      r"\(tensor<([^>]*)>, tensor<([^>]*)>(?:, tensor<[^>]*>)?\) -> tensor<([^>]*)>", text):
    kind = "grouped " if "ragged" in op else ""
    found[f"{kind}{lhs.split('x')[-1]} x {rhs.split('x')[-1]} -> {out.split('x')[-1]}"] += 1
  return found


def grouped_matmuls(text: str) -> list[tuple[str, str]]:
  """Each grouped matmul's (rows, groups' matrices) types, e.g. ('2048x128xbf16', '2x128x192xbf16')."""
  return re.findall(r'"chlo\.ragged_dot"[^\n]*: \(tensor<([^>]*)>, tensor<([^>]*)>, tensor<[^>]*>\)', text)


def module_collectives(text: str) -> collections.Counter:
  """The collectives a module holds itself (a shard_map's), by kind and device groups, e.g.
  ('all_gather', '[[0, 2, 4, 6], [1, 3, 5, 7]]'); the partitioner's come only at compile time."""
  return collections.Counter(re.findall(r'"stablehlo\.(all_gather|reduce_scatter|all_to_all|all_reduce)"\([^\n]*?'
                                        r'replica_groups = dense<(\[\[[^>]*\]\])>', text))


def collectives(hlo: str) -> collections.Counter:
  """The collectives in a compiled (partitioned) HLO module, by kind: all-reduce, all-gather, ..."""
  kinds = re.findall(r"\b(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(", hlo)
  return collections.Counter(kinds)


def argument_shardings(text: str) -> list[tuple[tuple[str, ...], ...]]:
  """Each argument of the module's main function: the mesh axes that split each of its dimensions
  (Shardy's `sdy.sharding`; no annotation: whole)."""
  signature = re.search(r"func\.func public @main\((.*?)\) ->", text, re.S).group(1)
  shardings = []
  for argument in re.split(r"%arg\d+: ", signature)[1:]:
    rank = len(re.match(r"tensor<([^>]*)>", argument).group(1).split("x")) - 1
    annotation = re.search(r"#sdy\.sharding<@\w+, \[(.*?)\]", argument)
    dims = re.findall(r"\{([^}]*)\}", annotation.group(1)) if annotation else [""] * rank
    shardings.append(tuple(tuple(re.findall(r'"(\w+)"', dim)) for dim in dims))
  return shardings


def _counts(counter: collections.Counter) -> str:
  return ", ".join(f"{name} x{n}" for name, n in sorted(counter.items())) or "none"


def summary(cfg, platform: str, lowered: dict, out_dir: str) -> str:
  """The table a user reads: per step its kernels, [T, T] softmaxes, matmul dtypes and collectives;
  then each parameter's split."""
  mesh, T = lowered["mesh"], cfg.model.block_size
  lines = [f"gptjax lower: {platform}, {mesh.size} devices, mesh {dict(mesh.shape)}",
           lowered["attention"], "",
           "| step | custom calls (attention kernels) | softmax over [T, T] | matmuls | collectives in the module "
           "(shard_map) | collectives (partitioned) |",
           "|---|---|---|---|---|---|"]
  for name, text in lowered["texts"].items():
    partitioned = lowered["partitioned"].get(name)
    explicit = collections.Counter({f"{kind} over {groups}": n for (kind, groups), n in module_collectives(text).items()})
    lines.append(f"| {name} ({out_dir}/{name}.mlir) | {_counts(custom_calls(text))} | {square_softmaxes(text, T)} "
                 f"| {_counts(matmul_dtypes(text))} | {_counts(explicit)} "
                 f"| {'-' if partitioned is None else _counts(collectives(partitioned))} |")
  lines += ["", "Collectives: XLA's SPMD partitioner, compiling the same steps for this mesh of CPU devices with XLA's",
            "attention in place of a fused kernel (the lowered modules hold shardings; collectives come at compile time).",
            "", "parameters (float32), split over the mesh:"]
  width = max(len(name) for name, _, _ in lowered["params"])
  for name, shape, spec in lowered["params"]:
    lines.append(f"  {name:<{width}}  {list(shape)}  {tuple(spec) if any(spec) else 'replicated'}")
  return "\n".join([*lines, *lowered["unsplit"]])


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="gptjax lower", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("config", help="a named config (configs/NAME.yaml) or a YAML file")
  parser.add_argument("overrides", nargs="*", help="section.field=value, e.g. mesh.fsdp=8 model.dtype=float32")
  parser.add_argument("--platform", required=True, choices=["cuda", "tpu"], help="the hardware to lower for")
  parser.add_argument("--devices", type=int, default=8, help="devices in the mesh (simulated here)")
  parser.add_argument("--prompt-length", type=int, default=None, help="prefill's prompt (default: block_size // 2)")
  parser.add_argument("--out", default=None, help="where the .mlir files go (default: lowered/CONFIG-PLATFORM)")
  parser.add_argument("--document-start", type=int, default=None,
                      help="lower the train step with document masking, each document opened by this token id")
  parser.add_argument("--no-collectives", action="store_true",
                      help="skip compiling the steps for this machine's CPUs to count the collectives")
  args = parser.parse_intermixed_args(argv)
  if args.devices < 1:
    raise UserError(f"--devices={args.devices} is not positive")
  # Before JAX starts its backend: this process's mesh is made of simulated CPU devices.
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}"
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax  # noqa: PLC0415

  from gptjax import config as config_lib  # noqa: PLC0415
  cfg = config_lib.load_config(args.config, args.overrides)
  devices = jax.devices("cpu")
  if len(devices) < args.devices:
    raise UserError(f"--devices={args.devices}: this process has only {len(devices)} CPU devices")
  out_dir = args.out or os.path.join("lowered", f"{pathlib.Path(args.config).stem}-{args.platform}")
  lowered = lower(cfg, args.platform, devices[:args.devices], out_dir, args.prompt_length, not args.no_collectives,
                  args.document_start)
  print(summary(cfg, args.platform, lowered, out_dir))
