"""The typed configuration: dataclasses, named YAML configs and `key=value` overrides.

A run is described by one `Config`. Named configs live in `configs/NAME.yaml` (shipped as the
package `gptjax.configs`) and hold only what differs from the defaults below. Any field can be
overridden from the command line as `section.field=value` (OmegaConf dot-list syntax); OmegaConf
checks keys and types against the dataclasses.
"""

import dataclasses
import importlib.resources
import math
import pathlib
import re

from omegaconf import DictConfig
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gptjax.errors import UserError


# Activation rematerialisation in the backward pass: nothing saved inside a block ("full"), only the
# outputs of the weight matmuls saved ("save_dots": attention scores, norms and GELUs recomputed).
REMAT_POLICIES = ("none", "full", "save_dots")
# Training attention (gptjax.model.kernels): auto, or one kernel by name.
ATTENTION_KERNELS = ("auto", "cudnn", "splash", "xla", "blocked")
POSITIONS = ("learned", "sinusoidal", "rope", "none")
MOE_MATMULS = ("auto", "ragged_dot", "tiled")
OPTIMIZERS = ("adamw", "muon", "lion", "adafactor")
SCHEDULES = ("cosine", "wsd", "linear", "constant")
DECAY_SHAPES = ("linear", "sqrt", "cosine")
SCAN_FROM_LAYERS = 16  # model.scan_layers=auto scans CPU models this deep (compile time over step time)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = 50257  # replaced by the prepared data's vocabulary size at train time
  block_size: int = 1024  # the context a run trains, evaluates and samples at
  # The most positions the model takes (a learned position table's rows; for rotary positions, the
  # max_position_embeddings an export writes); 0: block_size. An imported model's: at most this.
  max_positions: int = 0
  n_layer: int = 12
  n_head: int = 12
  n_embd: int = 768
  dropout: float = 0.0  # on embeddings and residual branches
  bias: bool = True  # biases in Dense and LayerNorm layers, as GPT-2
  layer_norm_epsilon: float = 1e-5
  dtype: str = "auto"  # compute dtype: auto (bfloat16 on accelerators, float32 on CPU), float32, bfloat16
  remat: str = "none"  # what each block recomputes in the backward pass: none, full, save_dots
  # The blocks as one lax.scan over their stacked parameters (true), or a loop over them (false):
  # scanned, compile time is flat in depth (48 layers compile 6x faster); looped, steps run 11-25%
  # faster on CPU (benchmarks/RESULTS.md). auto: scanned on accelerators, and on CPU from
  # SCAN_FROM_LAYERS layers; looped for shallower models on CPU.
  scan_layers: str = "auto"
  # Training attention (and the prompt pass of sampling): cudnn (cuDNN's fused kernel, NVIDIA GPUs,
  # bfloat16), splash (Pallas splash attention, TPUs), xla (one [T, T] masked softmax), blocked (query
  # blocks that skip the keys above the diagonal: 2x faster on CPU), or auto: cudnn on GPUs and splash
  # on TPUs where they apply, else xla; blocked on CPU (gptjax.model.kernels).
  attention: str = "auto"
  # Positions per chunk of the LM head and cross-entropy in training, evaluation and perplexity: one
  # chunk's [B, chunk, vocab] float32 logits exist at a time (gptjax.model.loss); 0: all at once.
  loss_chunk: int = 512
  # The textbook variants, one switch each (the defaults are GPT-2's): where each block normalises,
  # pre (x + Sublayer(Norm(x)): GPT-2, Llama) or post (Norm(x + Sublayer(x)): the original
  # Transformer); the final norm before the LM head, auto: with pre-norm only (a post-norm block's
  # output is normalised already); the scores' 1/sqrt(head size), sqrt or none.
  norm_position: str = "pre"
  final_norm: str = "auto"
  attention_scale: str = "sqrt"
  # Positions: learned (a position table, GPT-2), sinusoidal (the original Transformer's fixed table,
  # added to the token embeddings), rope (rotary, applied to queries and keys: Llama / Qwen), or none
  # (causal attention alone, as in NoPE studies).
  positions: str = "learned"
  rope_theta: float = 10000.0
  rope_scaling_factor: float = 0.0  # Llama 3's long-context frequency scaling (e.g. 32 for Llama 3.2); 0: none
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_context: int = 8192
  n_kv_head: int = 0  # key/value heads: fewer than n_head is grouped-query attention; 0: n_head
  head_dim: int = 0  # 0: n_embd // n_head
  norm: str = "layernorm"  # layernorm or rmsnorm
  mlp: str = "gelu"  # gelu (tanh approximation) or swiglu
  mlp_hidden: int = 0  # 0: 4 * n_embd
  tie_embeddings: bool = True  # the LM head is the token embedding (else a matrix of its own)
  qkv_bias: bool = False  # biases on the query, key and value projections even with bias=false (Qwen2)
  qk_norm: bool = False  # RMSNorm on each head's queries and keys (Qwen3)
  vocab_multiple: int = 1  # the vocabulary padded to a multiple of this; padded logits are never used
  # Gemma 2's soft cap on the logits, cap * tanh(logits / cap), part of the model (training,
  # evaluation and sampling alike); 0: none.
  logit_softcap: float = 0.0
  # Mixture of experts (gptjax.model.moe), 0 experts: a dense MLP. Otherwise every block's MLP is
  # n_experts experts (SwiGLU or GELU, as model.mlp) of expert_hidden each (0: mlp_hidden), of
  # which a router picks experts_per_token per token, their weights renormalised to sum to 1 where
  # moe_norm_topk (Qwen3-MoE's norm_topk_prob; Mixtral's always); plus a shared expert of
  # shared_expert_hidden that every token passes through (DeepSeek's; 0: none). The layers (from 0)
  # in dense_layers keep a dense MLP of mlp_hidden (Qwen3-MoE's mlp_only_layers, DeepSeek's first
  # layers), e.g. model.dense_layers=[0,1].
  n_experts: int = 0
  dense_layers: tuple[int, ...] = ()
  experts_per_token: int = 2
  expert_hidden: int = 0
  shared_expert_hidden: int = 0
  moe_norm_topk: bool = True
  # The experts' grouped matmuls: ragged_dot (jax.lax.ragged_dot, XLA's grouped matmul op, for accelerators),
  # tiled (groups padded to tiles, one batched matmul: for CPUs, where XLA computes ragged_dot as
  # every token times every expert), or auto: tiled on CPUs, ragged_dot elsewhere.
  moe_matmul: str = "auto"

  @property
  def expert_size(self) -> int:
    return self.expert_hidden or self.mlp_size

  def layer_stacks(self) -> tuple[tuple[str, int], ...]:
    """Where each layer's parameters are: (the stacked blocks, the layer's index in them). "h" holds
    the model's blocks (a mixture's sparse ones), "h_dense" the dense layers among them."""
    counts, places = {"h": 0, "h_dense": 0}, []
    for layer in range(self.n_layer):
      stack = "h_dense" if layer in self.dense_layers else "h"
      places.append((stack, counts[stack]))
      counts[stack] += 1
    return tuple(places)

  @property
  def position_limit(self) -> int:
    return self.max_positions or self.block_size

  @property
  def has_final_norm(self) -> bool:
    setting = str(self.final_norm).lower()
    return setting == "true" or (setting == "auto" and self.norm_position == "pre")

  def textbook_variants(self) -> list[str]:
    """The settings of this model that neither GPT-2 nor the Llama family has, as `model.x=y`."""
    differs = {"norm_position": self.norm_position != "pre", "final_norm": not self.has_final_norm,
               "attention_scale": self.attention_scale != "sqrt", "positions": self.positions in ("sinusoidal", "none"),
               "logit_softcap": self.logit_softcap != 0}
    return [f"model.{name}={getattr(self, name)}" for name, differ in differs.items() if differ]

  @property
  def kv_heads(self) -> int:
    return self.n_kv_head or self.n_head

  @property
  def head_size(self) -> int:
    return self.head_dim or self.n_embd // self.n_head

  @property
  def mlp_size(self) -> int:
    return self.mlp_hidden or 4 * self.n_embd

  @property
  def padded_vocab(self) -> int:
    return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple


@dataclasses.dataclass(frozen=True)
class DataConfig:
  dir: str = "data/shakespeare_char"  # written by `gptjax prepare`
  mixture: str = ""  # DIR:WEIGHT,DIR:WEIGHT,...: each sequence from one of these prepared folders (replaces dir)
  allow_data_change: bool = False  # let --resume continue on data other than the checkpoint's
  # More validation sets, NAME:DIR,NAME:DIR,...: the validation split of each prepared folder (same
  # tokenizer), evaluated beside the run's own at each evaluation and reported as NAME/loss; a
  # mixture's folders are reported one by one too, each by its folder's name.
  eval_sets: str = ""
  # Documents in packed windows (gptjax.model.documents), in training and evaluation: a position
  # attends only within its own document. auto: where the tokenizer marks documents (a
  # beginning-of-sequence or end-of-text token: GPT-2's, Llama's; the char tokenizer has none).
  document_mask: str = "auto"
  # The order of the training windows (gptjax.data): shuffled (epochs of non-overlapping windows,
  # each epoch in its own permutation), random (windows drawn anywhere, with replacement: nanoGPT's,
  # and what runs saved before this setting resume with), or auto: shuffled for one folder, random
  # for a mixture. A resumed run keeps its checkpoint's order.
  order: str = "auto"
  # Where windows start: anywhere (none), or at documents (document): a window moves forward to the
  # first document start in its first block_size tokens, where there is one (Llama's way: each
  # sequence opens with its beginning-of-sequence token; a document longer than a window continues
  # in windows that do not). Needs a tokenizer that marks documents, as data.document_mask does.
  align: str = "none"
  document_positions: bool = False  # with the mask: positions (learned or rotary) restart at each document

  @property
  def eval_set_dirs(self) -> dict[str, str] | None:
    """{name: folder} of data.eval_sets, in its order; None when it is malformed."""
    parts = [part.partition(":") for part in self.eval_sets.split(",")] if self.eval_sets else []
    named = {name: folder for name, _, folder in parts}
    valid = all(re.fullmatch(r"[A-Za-z0-9_.-]+", name) and folder and name not in ("train", "val")
                for name, _, folder in parts)
    return named if valid and len(named) == len(parts) else None

  @property
  def window_order(self) -> str:
    """data.order with auto resolved: shuffled for one folder, random for a mixture."""
    return self.order if self.order != "auto" else ("random" if self.mixture else "shuffled")

  @property
  def mixture_weights(self) -> dict[str, float] | None:
    """{folder: weight} of data.mixture, in its order; None when it is unset or malformed."""
    parts = [part.rpartition(":") for part in self.mixture.split(",")] if self.mixture else []
    try:
      weights = {folder: float(weight) for folder, _, weight in parts if folder}
    except ValueError:
      return None
    return weights if len(weights) == len(parts) and all(0 < w < math.inf for w in weights.values()) else None


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  # adamw; muon (the hidden matrices orthogonalised, AdamW for embeddings, head, norms and biases);
  # lion (sign updates: a 3-10x smaller learning rate than AdamW's is usual); adafactor (factored
  # second moments, no momentum). gptjax.optim says how each is set up.
  name: str = "adamw"
  learning_rate: float = 6e-4  # peak, after warmup
  min_lr: float = 6e-5  # where the decay ends
  warmup_iters: int = 2000  # linear warmup, for every schedule
  # After warmup: cosine (to min_lr at lr_decay_iters), linear (likewise), constant (no decay), or
  # wsd (warmup-stable-decay: the peak until the last decay_fraction of lr_decay_iters, then down to
  # min_lr by decay_shape: linear, sqrt (1 - sqrt, Hagele et al. 2024) or cosine).
  schedule: str = "cosine"
  lr_decay_iters: int = 600000  # the decay ends here; min_lr afterwards
  decay_fraction: float = 0.2
  decay_shape: str = "linear"
  weight_decay: float = 0.1  # applied to matrices only
  beta1: float = 0.9
  beta2: float = 0.95
  grad_clip: float = 1.0  # global-norm clipping; 0 disables
  muon_momentum: float = 0.95  # Muon's (Nesterov) momentum
  muon_rms: float = 0.2  # Muon's updates scaled to this RMS (AdamW's), so AdamW's learning rate serves
  # PaLM's z-loss: this times the mean squared log-partition (log-sum-exp of the logits) is added to
  # the training loss, keeping the logits' normaliser near 1 (PaLM: 1e-4); logged as z_loss. 0: off.
  z_loss: float = 0.0
  # A mixture of experts' router losses, added to the training loss with these weights (logged as
  # router_balance and router_z): Switch Transformer's load-balancing loss (1 when the experts are
  # used evenly) and ST-MoE's router z-loss, each the mean over the sparse layers.
  router_aux_loss: float = 0.01
  router_z_loss: float = 0.001


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh axis sizes; -1 means all devices not used by the other axes."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  expert: int = 1  # a mixture's experts split over this many devices (and the batch, as over data)


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """Multi-process runs through jax.distributed. Left unset, JAX detects the values on SLURM,
  Open MPI, Cloud TPU and GKE (and reads JAX_COORDINATOR_ADDRESS)."""

  initialize: bool = False  # join a multi-process run (implied by coordinator_address or num_processes)
  coordinator_address: str = ""  # host:port of process 0
  num_processes: int = 0  # 0: detected
  process_id: int = -1  # -1: detected


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  out_dir: str = "out/run"
  init_from: str = ""  # a checkpoint dir to fine-tune: its architecture and weights, a fresh optimizer
  # The batch: batch_size sequences per optimizer step over all devices (tokens per step: batch_size
  # x model.block_size, whatever the device count), in grad_accum_steps micro-steps of
  # device_batch_size sequences on each of the data*fsdp*expert devices. Set either of the two (or
  # neither: the whole batch in one micro-step); the other is worked out (`micro_batches`).
  batch_size: int = 12
  device_batch_size: int = 0  # sequences per device per micro-step; 0: worked out
  grad_accum_steps: int = 0  # micro-steps per optimizer step; 0: worked out
  max_iters: int = 600000  # optimizer steps
  eval_interval: int = 2000
  eval_iters: int = 200  # batches per split for each evaluation
  log_interval: int = 10
  checkpoint_interval: int = 2000
  checkpoint_minutes: float = 0.0  # also save when this long has passed since the last save (at a log step); 0: off
  keep_checkpoints: int = 2  # latest N are kept, plus the best by validation loss
  max_bad_steps: int = 20  # stop after this many consecutive steps with a non-finite loss or gradient
  seed: int = 1337
  peak_flops_per_device: float = 0.0  # for MFU; 0 looks the device up in a table
  profile: str = ""  # START:END: a jax.profiler trace of the steps after START up to END, in out_dir/profile
  tensorboard: bool = True  # TensorBoard event files in out_dir/tensorboard
  wandb_project: str = ""  # also log to this Weights & Biases project (the wandb extra); empty: off
  # Which validation loss ranks the checkpoints (the best is kept): val (the run's own split), or
  # the NAME of one of data.eval_sets.
  best_of: str = "val"
  sample_tokens: int = 200  # at each evaluation, a sample this long goes to TensorBoard / W&B; 0: none
  sample_prompt: str = ""  # ... continuing this text (empty: from end-of-text, or a character model's first character)
  # lm-evaluation-harness tasks run at each evaluation (comma-separated names: the shipped tasks/, or
  # lm-eval's own, read offline; the eval extra), their metrics recorded beside the losses; empty: none.
  eval_tasks: str = ""
  eval_tasks_limit: int = 100  # ... on at most this many documents per task; 0: all of them

  def micro_batches(self, shards: int) -> tuple[int, int]:
    """(sequences per micro-step over all devices, micro-steps per optimizer step) on `shards`
    batch shards (data*fsdp*expert devices); a split that does not come out whole is a UserError."""
    per_device, rest = divmod(self.batch_size, shards)
    if rest:
      raise UserError(f"train.batch_size={self.batch_size} is not divisible by data*fsdp*expert={shards} devices: "
                      f"set a multiple of {shards}")
    if self.device_batch_size and self.grad_accum_steps:
      if self.device_batch_size * self.grad_accum_steps != per_device:
        raise UserError(f"train.device_batch_size={self.device_batch_size} x grad_accum_steps={self.grad_accum_steps} "
                        f"is not train.batch_size={self.batch_size} / {shards} device{'s' * (shards > 1)} = {per_device}: "
                        "set one of the two")
      return self.device_batch_size * shards, self.grad_accum_steps
    if self.device_batch_size or self.grad_accum_steps:
      given, name = ((self.device_batch_size, "device_batch_size") if self.device_batch_size
                     else (self.grad_accum_steps, "grad_accum_steps"))
      if per_device % given:
        fits = max(d for d in range(1, given + 1) if per_device % d == 0)
        raise UserError(f"train.batch_size={self.batch_size} over {shards} device{'s' * (shards > 1)} is {per_device} sequences per "
                        f"device, not a multiple of train.{name}={given}: set train.{name} to a divisor of "
                        f"{per_device} (e.g. {fits}), or train.batch_size to a multiple of {given * shards}")
      if self.device_batch_size:
        return self.device_batch_size * shards, per_device // given
      return per_device // given * shards, given
    return self.batch_size, 1

  @property
  def profile_steps(self) -> tuple[int, int] | None:
    return tuple(int(n) for n in self.profile.split(":")) if self.profile else None


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

  @property
  def tokens_per_step(self) -> int:
    """Tokens per optimizer step: the same on any number of devices."""
    return self.train.batch_size * self.model.block_size


def named_config_path(name: str) -> pathlib.Path:
  """A YAML path as given, or the shipped config called `name`."""
  path = pathlib.Path(name)
  if path.suffix in (".yaml", ".yml"):
    if not path.is_file():
      raise UserError(f"config file {name} does not exist")
    return path
  shipped = importlib.resources.files("gptjax.configs") / f"{name}.yaml"
  if not shipped.is_file():
    names = sorted(p.name[:-5] for p in importlib.resources.files("gptjax.configs").iterdir()
                   if p.name.endswith(".yaml"))
    raise UserError(f"unknown config {name!r}; named configs: {', '.join(names)}")
  return pathlib.Path(str(shipped))


def _one_line(e: OmegaConfBaseException) -> str:
  message = str(e).splitlines()[0]
  key = getattr(e, "full_key", None)
  return f"{key}: {message}" if key and key not in message else message


def _merge(*sources) -> Config:
  try:
    merged = OmegaConf.merge(OmegaConf.structured(Config), *sources)
    return validate(OmegaConf.to_object(merged))
  except OmegaConfBaseException as e:
    raise UserError(f"bad config: {_one_line(e)}") from None


def _field_type(key: str):
  """The declared type of `section.field`, or None where there is no such field."""
  section, _, field = key.partition(".")
  sections = {f.name: f.type for f in dataclasses.fields(Config)}
  fields = {f.name: f.type for f in dataclasses.fields(sections[section])} if section in sections else {}
  return fields.get(field)


def load_config(name: str | None = None, overrides: list[str] = ()) -> Config:
  """Defaults, then the named config or YAML file, then `section.field=value` overrides."""
  sources = []
  if name:
    path = named_config_path(name)
    try:
      sources.append(OmegaConf.load(path))
    except Exception as e:  # YAML syntax errors, duplicate keys: several libraries' types
      mark = getattr(e, "problem_mark", None)  # PyYAML's: what and where
      what = f"{e.problem} at line {mark.line + 1}" if mark and getattr(e, "problem", None) else str(e).splitlines()[0]
      raise UserError(f"cannot read config {path}: {what}") from None
    if not isinstance(sources[-1], DictConfig):
      raise UserError(f"config {path} holds a list, not a mapping of sections (model:, train:, ...)")
  given = {}
  for item in overrides:
    key = item.split("=")[0]
    if "=" not in item or "." not in key:  # `train=3` would replace the whole section
      raise UserError(f"bad override {item!r}: expected section.field=value")
    if key in given:
      raise UserError(f"{key} is given twice: {given[key]!r} and {item!r}")
    given[key] = item
  # Text fields take the text as given: YAML would read train.profile=2:4 as the number 124.
  text, typed = {}, []  # text: {section: {field: value}}
  for key, item in given.items():
    if _field_type(key) is str:
      section, field = key.split(".", 1)
      text.setdefault(section, {})[field] = item.split("=", 1)[1]
    else:
      typed.append(item)
  try:
    sources += [OmegaConf.from_dotlist(typed), OmegaConf.create(text)]
  except OmegaConfBaseException as e:
    raise UserError(f"bad override: {_one_line(e)}") from None
  return _merge(*sources)


def validate(cfg: Config) -> Config:
  """Checks that types alone cannot express."""
  m, t, o, d = cfg.model, cfg.train, cfg.optim, cfg.distributed
  checks = [
      (not cfg.data.eval_sets or cfg.data.eval_set_dirs,
       f"data.eval_sets={cfg.data.eval_sets!r} is not NAME:DIR,NAME:DIR,... with distinct names of letters, digits, "
       "'_', '-' or '.' (not train or val)"),
      (t.best_of == "val" or t.best_of in (cfg.data.eval_set_dirs or {}),
       f"train.best_of={t.best_of!r} is not val or a name in data.eval_sets"),
      (cfg.data.order in ("auto", "shuffled", "random"), f"data.order={cfg.data.order!r} is not auto, shuffled or random"),
      (cfg.data.order != "shuffled" or not cfg.data.mixture,
       "data.order=shuffled walks one folder; a data.mixture draws at random (data.order=random or auto)"),
      (cfg.data.align in ("none", "document"), f"data.align={cfg.data.align!r} is not none or document"),
      (str(cfg.data.document_mask).lower() in ("auto", "true", "false"),
       f"data.document_mask={cfg.data.document_mask!r} is not auto, true or false"),
      (not cfg.data.mixture or cfg.data.mixture_weights,
       f"data.mixture={cfg.data.mixture!r} is not DIR:WEIGHT,DIR:WEIGHT,... with distinct folders and positive weights"),
      (min(m.vocab_size, m.block_size, m.n_layer, m.n_head, m.n_embd) > 0,
       "model.vocab_size, block_size, n_layer, n_head and n_embd must be positive"),
      (m.n_head <= 0 or m.head_dim or m.n_embd % m.n_head == 0,
       f"model.n_embd={m.n_embd} is not divisible by model.n_head={m.n_head} (or set model.head_dim)"),
      (m.loss_chunk >= 0, f"model.loss_chunk={m.loss_chunk} is negative (0: the whole sequence at once)"),
      (0 <= m.logit_softcap < math.inf, f"model.logit_softcap={m.logit_softcap} is not a number >= 0 (0: no cap)"),
      (m.max_positions >= 0, f"model.max_positions={m.max_positions} is negative (0: model.block_size)"),
      (m.block_size <= m.position_limit,
       f"model.block_size={m.block_size} is longer than the model's {m.max_positions} positions (model.max_positions)"),
      (min(m.n_kv_head, m.head_dim, m.mlp_hidden) >= 0 and m.vocab_multiple > 0,
       "model.n_kv_head, head_dim and mlp_hidden must be >= 0 (0: derived) and vocab_multiple positive"),
      (m.n_head <= 0 or m.n_head % m.kv_heads == 0,
       f"model.n_head={m.n_head} is not a multiple of model.n_kv_head={m.n_kv_head}"),
      (m.positions in POSITIONS, f"model.positions={m.positions!r} is not one of {', '.join(POSITIONS)}"),
      (m.norm_position in ("pre", "post"), f"model.norm_position={m.norm_position!r} is not pre or post"),
      (str(m.final_norm).lower() in ("auto", "true", "false"), f"model.final_norm={m.final_norm!r} is not auto, true or false"),
      (m.attention_scale in ("sqrt", "none"), f"model.attention_scale={m.attention_scale!r} is not sqrt or none"),
      (m.positions != "sinusoidal" or m.n_embd % 2 == 0, "sinusoidal positions need an even model.n_embd (sin and cos pairs)"),
      (m.norm in ("layernorm", "rmsnorm"), f"model.norm={m.norm!r} is not layernorm or rmsnorm"),
      (m.mlp in ("gelu", "swiglu"), f"model.mlp={m.mlp!r} is not gelu or swiglu"),
      (m.n_experts == 0 or 0 < m.experts_per_token <= m.n_experts,
       f"model.experts_per_token={m.experts_per_token} is not in [1, model.n_experts={m.n_experts}]"),
      (not m.dense_layers or m.n_experts, "model.dense_layers needs a mixture of experts (model.n_experts > 0)"),
      (len(set(m.dense_layers)) == len(m.dense_layers) and all(0 <= i < m.n_layer for i in m.dense_layers),
       f"model.dense_layers={list(m.dense_layers)} is not a list of distinct layers in [0, model.n_layer={m.n_layer})"),
      (len(m.dense_layers) < m.n_layer,
       f"model.dense_layers={list(m.dense_layers)} makes every layer dense: a dense model is model.n_experts=0"),
      (m.moe_matmul in MOE_MATMULS, f"model.moe_matmul={m.moe_matmul!r} is not one of {', '.join(MOE_MATMULS)}"),
      (min(m.n_experts, m.expert_hidden, m.shared_expert_hidden) >= 0,
       "model.n_experts, expert_hidden and shared_expert_hidden must be >= 0 (0: dense, derived, none)"),
      (m.positions == "rope" or not m.rope_scaling_factor, "model.rope_scaling_factor needs model.positions=rope"),
      (m.rope_theta > 0 and m.rope_scaling_factor >= 0 and m.rope_high_freq_factor > m.rope_low_freq_factor > 0,
       "model.rope_theta must be positive, rope_scaling_factor >= 0 and rope_high_freq_factor > rope_low_freq_factor > 0"),
      (m.positions != "rope" or m.n_head <= 0 or m.head_size % 2 == 0,
       "rotary positions need an even head dimension"),
      (0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout} is not in [0, 1)"),
      (m.attention in ATTENTION_KERNELS, f"model.attention={m.attention!r} is not one of {', '.join(ATTENTION_KERNELS)}"),
      (str(m.scan_layers).lower() in ("auto", "true", "false"), f"model.scan_layers={m.scan_layers!r} is not auto, true or false"),
      (m.dtype in ("auto", "float32", "bfloat16"), f"model.dtype={m.dtype!r} is not auto, float32 or bfloat16"),
      (m.remat in REMAT_POLICIES, f"model.remat={m.remat!r} is not one of {', '.join(REMAT_POLICIES)} "
                                  "(what was model.remat=true is now full)"),
      (min(t.batch_size, t.eval_iters, t.log_interval) > 0,
       "train.batch_size, eval_iters and log_interval must be positive"),
      (min(t.device_batch_size, t.grad_accum_steps) >= 0,
       "train.device_batch_size and grad_accum_steps must be >= 0 (0: worked out)"),
      (min(t.eval_interval, t.checkpoint_interval, t.keep_checkpoints, t.max_bad_steps) > 0,
       "train.eval_interval, checkpoint_interval, keep_checkpoints and max_bad_steps must be positive"),
      (t.max_iters >= 0, f"train.max_iters={t.max_iters} is negative"),
      (t.peak_flops_per_device >= 0, f"train.peak_flops_per_device={t.peak_flops_per_device} is negative (0 looks it up)"),
      (t.checkpoint_minutes >= 0, f"train.checkpoint_minutes={t.checkpoint_minutes} is negative (0 turns it off)"),
      (t.sample_tokens >= 0, f"train.sample_tokens={t.sample_tokens} is negative (0 turns it off)"),
      (t.eval_tasks_limit >= 0, f"train.eval_tasks_limit={t.eval_tasks_limit} is negative (0: every document)"),
      (not t.profile or (re.fullmatch(r"\d+:\d+", t.profile) and t.profile_steps[0] < t.profile_steps[1]),
       f"train.profile={t.profile!r} is not START:END with 0 <= START < END (steps, e.g. 100:105)"),
      (o.learning_rate > 0 and 0 <= o.min_lr <= o.learning_rate,
       "optim.learning_rate must be positive and optim.min_lr in [0, learning_rate]"),
      (o.warmup_iters >= 0 and o.lr_decay_iters > o.warmup_iters,
       "optim.lr_decay_iters must be larger than optim.warmup_iters >= 0"),
      (o.grad_clip >= 0 and o.weight_decay >= 0, "optim.grad_clip and weight_decay must be >= 0"),
      (o.name in OPTIMIZERS, f"optim.name={o.name!r} is not one of {', '.join(OPTIMIZERS)}"),
      (o.schedule in SCHEDULES, f"optim.schedule={o.schedule!r} is not one of {', '.join(SCHEDULES)}"),
      (o.decay_shape in DECAY_SHAPES, f"optim.decay_shape={o.decay_shape!r} is not one of {', '.join(DECAY_SHAPES)}"),
      (0 < o.decay_fraction <= 1, f"optim.decay_fraction={o.decay_fraction} is not in (0, 1]"),
      (0 <= o.muon_momentum < 1 and o.muon_rms > 0, "optim.muon_momentum must be in [0, 1) and optim.muon_rms positive"),
      (0 <= o.z_loss < math.inf, f"optim.z_loss={o.z_loss} is not a number >= 0 (0 turns it off)"),
      (0 <= o.router_aux_loss < math.inf and 0 <= o.router_z_loss < math.inf,
       "optim.router_aux_loss and optim.router_z_loss must be numbers >= 0 (0 turns each off)"),
      (all(s == -1 or s > 0 for s in dataclasses.astuple(cfg.mesh)), "mesh axis sizes must be positive or -1"),
      (d.num_processes >= 0, f"distributed.num_processes={d.num_processes} is negative (0 means detected)"),
      (d.num_processes == 0 or d.process_id < d.num_processes,
       f"distributed.process_id={d.process_id} is not below distributed.num_processes={d.num_processes}"),
  ]
  for ok, message in checks:
    if not ok:
      raise UserError(message)
  return cfg


def to_yaml(cfg: Config) -> str:
  return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
  return dataclasses.asdict(cfg)


def from_dict(values: dict) -> Config:
  """A saved config; one saved before train.device_batch_size (when train.batch_size was the
  micro-batch and grad_accum_steps its count) or before data.order is read in today's terms."""
  train = values.get("train", {})
  if "train" in values and "device_batch_size" not in train and "grad_accum_steps" in train:
    values = {**values, "train": {**train, "batch_size": train["batch_size"] * train["grad_accum_steps"]}}
  if "data" in values and "order" not in values["data"]:  # saved before data.order: windows drawn at random
    values = {**values, "data": {**values["data"], "order": "random"}}
  return _merge(OmegaConf.create(values))
