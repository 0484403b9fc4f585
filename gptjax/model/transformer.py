"""The decoder: token embeddings (and learned positions, GPT-2; or rotary ones inside attention,
Llama), a stack of pre-norm blocks, a final norm and an LM head, tied to the token embedding
(GPT-2) or a matrix of its own (lm_head). The config chooses between GPT-2 and the Llama / Qwen
family; the structure is the same. The textbook variants are options of the same model: post-norm
blocks (`model.norm_position=post`, the original Transformer's, with no final norm unless
`model.final_norm=true`), the paper's sinusoidal positions or none at all (`model.positions`).

Parameter names follow GPT-2 (wte, wpe, h/{ln_1, attn/{c_attn, c_proj}, ln_2, mlp/{c_fc, c_proj}},
ln_f), with one difference: the blocks' parameters are stacked, h/... [n_layer, ...]. The stack
runs as one `lax.scan` (`model.scan_layers`: compile time independent of depth) or as a Python
loop over the same stacked arrays (faster steps on CPU); the layout, and so every checkpoint, is
the same either way. A mixture of experts with dense layers among its sparse ones
(`model.dense_layers`) has two stacks, h (the sparse blocks) and h_dense, run in the layers' order,
each run of consecutive layers of one stack as one scan or loop.

Each stage's output is named with `sow` (`layers.sow`), which keeps it only under `nnx.capture`:
then the blocks run one by one and attention computes its weights explicitly, for `gptjax explain`
and `gptjax attention` (`model.forward_with_intermediates`); training and sampling keep nothing.

The model owns its inference state: `init_cache` makes the key/value cache and `decode` extends it.
Decoding loops over the blocks, each with its own cache arrays and, from `layer_params`, its own
weights: in a generation loop, slicing the stacked arrays would copy every layer's weights (and
reading a stacked cache every layer's cache) for each new token.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax import sharding
from gptjax.config import ModelConfig
from gptjax.model import sinusoidal
from gptjax.model.attention import CausalSelfAttention, KVCache, positions
from gptjax.model.documents import Documents
from gptjax.model.layers import axes, capturing, compute_dtype, float32_logits, norm, scanned, soft_cap, sow
from gptjax.model.loss import LOGITS_AXES, next_token_nll
from gptjax.model.mlp import MLP
from gptjax.model.moe import MoE

RESIDUAL_AXES = ("batch", "sequence", "embed")  # the residual stream [B, T, embd]
CACHE_AXES = ("batch", "kv_heads", "sequence", "kv")  # each layer's cache [B, kv_heads, S, head_dim]

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # weight matmuls, not attention scores
}


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, dense: bool = False, *, rngs: nnx.Rngs):
    self.ln_1 = norm(cfg, rngs=rngs)
    self.attn = CausalSelfAttention(cfg, rngs=rngs)
    self.ln_2 = norm(cfg, rngs=rngs)
    self.mlp = MoE(cfg, rngs=rngs) if cfg.n_experts and not dense else MLP(cfg, rngs=rngs)
    self.post_norm = cfg.norm_position == "post"

  def __call__(self, x_BTD, cache: KVCache | None, layer, dropout_key: jax.Array | None, prefill: bool = False,
               documents: Documents | None = None):
    """-> (output [B, T, D], the cache, the router's losses: {} for a dense MLP)."""
    attn_key, mlp_key = (None, None) if dropout_key is None else jax.random.split(dropout_key)
    x_BTD, cache = self._residual(x_BTD, self.ln_1, "ln_1", "attention_residual",
                                  lambda h_BTD: self.attn(h_BTD, cache, layer, attn_key, prefill, documents))
    x_BTD, router = self._residual(x_BTD, self.ln_2, "ln_2", "mlp_residual", self._mlp(mlp_key))
    return sharding.constrain(x_BTD, RESIDUAL_AXES), cache, router

  def _mlp(self, key):
    if isinstance(self.mlp, MoE):
      return lambda h_BTD: self.mlp(h_BTD, key)
    return lambda h_BTD: (self.mlp(h_BTD, key), {})

  def _residual(self, x_BTD, norm_layer, norm_name: str, residual_name: str, sublayer):
    """One residual sublayer, `sublayer(h) -> (output, what else it returns)`: pre-norm (GPT-2,
    Llama) x + Sublayer(Norm(x)), or post-norm (the original Transformer) Norm(x + Sublayer(x))."""
    if self.post_norm:
      out_BTD, extra = sublayer(x_BTD)
      x_BTD = x_BTD + out_BTD
      sow(self, residual_name, x_BTD)
      x_BTD = norm_layer(x_BTD)
      sow(self, norm_name, x_BTD)
      return x_BTD, extra
    normed_BTD = norm_layer(x_BTD)
    sow(self, norm_name, normed_BTD)
    out_BTD, extra = sublayer(normed_BTD)
    x_BTD = x_BTD + out_BTD
    sow(self, residual_name, x_BTD)
    return x_BTD, extra


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs, n_layer: int, dense: bool = False) -> Block:
  """n_layer Blocks as one, every parameter with a leading "layers" axis."""

  @nnx.split_rngs(splits=n_layer)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def make(rngs):
    return Block(cfg, dense, rngs=rngs)

  return make(rngs)


def layer_runs(cfg: ModelConfig) -> list[tuple[str, int, int, int]]:
  """The layers as runs of consecutive ones in the same stack: (stack, first layer, first index in
  the stack, length)."""
  runs = []
  for layer, (stack, index) in enumerate(cfg.layer_stacks()):
    if runs and runs[-1][0] == stack:
      runs[-1] = (*runs[-1][:3], runs[-1][3] + 1)
    else:
      runs.append((stack, layer, index, 1))
  return runs


class GPT(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype = compute_dtype(cfg)
    self.wte = nnx.Embed(cfg.padded_vocab, cfg.n_embd, dtype=dtype, embedding_init=nnx.initializers.normal(0.02),
                         embedding_metadata=axes("vocab", "embed"), rngs=rngs)
    if cfg.positions == "learned":
      self.wpe = nnx.Embed(cfg.position_limit, cfg.n_embd, dtype=dtype, embedding_init=nnx.initializers.normal(0.02),
                           embedding_metadata=axes(None, "embed"), rngs=rngs)
    self.h = _stacked_blocks(cfg, rngs, cfg.n_layer - len(cfg.dense_layers))
    if cfg.dense_layers:
      self.h_dense = _stacked_blocks(cfg, rngs, len(cfg.dense_layers), dense=True)
    if cfg.has_final_norm:
      self.ln_f = norm(cfg, rngs=rngs)
    if not cfg.tie_embeddings:
      self.lm_head = nnx.Linear(cfg.n_embd, cfg.padded_vocab, use_bias=False, dtype=dtype,
                                kernel_init=nnx.initializers.normal(0.02), kernel_metadata=axes("embed", "vocab"),
                                rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout)

  def __call__(self, tokens_BT, *, dropout_key: jax.Array | None = None):
    """tokens: int [B, T] -> logits float32 [B, T, vocab]. Dropout only when given a key."""
    x_BTD, _, _ = self._forward(tokens_BT, None, dropout_key)
    return self._logits(x_BTD)

  def nll(self, tokens_BT, targets_BT, *, dropout_key: jax.Array | None = None, documents: Documents | None = None):
    """The next-token cross-entropy [B, T] (float32) of `targets` after `tokens` (`losses`)."""
    return self.losses(tokens_BT, targets_BT, dropout_key=dropout_key, documents=documents)[0]

  def losses(self, tokens_BT, targets_BT, *, dropout_key: jax.Array | None = None, documents: Documents | None = None):
    """(the next-token cross-entropy [B, T], the log-partition [B, T]; float32; and a mixture of
    experts' router losses, each the mean over the layers: {} for dense MLPs), from the head and
    the loss computed in chunks of model.loss_chunk positions (`loss.next_token_nll`): the
    whole [B, T, vocab] logits never exist. Dropout only when given a key. With `documents`, each
    position attends within its own document (and counts its position from its start, where they
    say so)."""
    x_BTD, _, router = self._forward(tokens_BT, None, dropout_key, documents=documents)
    dtype = compute_dtype(self.cfg)
    table_VD = sharding.constrain(self._head_table(), ("vocab", None))  # gathered over fsdp once, not per chunk
    nll_BT, log_partition_BT = next_token_nll(x_BTD.astype(dtype), table_VD.astype(dtype), targets_BT,
                                              vocab_size=self.cfg.vocab_size, chunk=self.cfg.loss_chunk,
                                              softcap=self.cfg.logit_softcap)
    return nll_BT, log_partition_BT, router

  def init_cache(self, batch: int, length: int | None = None, per_row: bool = False) -> KVCache:
    """An empty cache for `length` positions (default: the whole context, block_size); `per_row`:
    each row keeps its own length (`KVCache`)."""
    cfg = self.cfg
    empty = sharding.constrain(jnp.zeros((batch, cfg.kv_heads, length or cfg.block_size, cfg.head_size),
                                         compute_dtype(cfg)), CACHE_AXES)
    return KVCache((empty,) * cfg.n_layer, (empty,) * cfg.n_layer, jnp.zeros((batch,) if per_row else (), jnp.int32))

  def layer_params(self) -> list[nnx.State]:
    """Each block's parameters, sliced out of its stack. A generation loop takes them from outside
    (`decode(..., layers=)`): sliced inside it, every layer's weights are copied for each token."""
    stacks = {name: nnx.state(getattr(self, name)) for name in {stack for stack, _ in self.cfg.layer_stacks()}}
    return [jax.tree.map(lambda x: x[i], stacks[stack]) for stack, i in self.cfg.layer_stacks()]

  def _layer_graphdefs(self) -> list:
    """Each layer's block structure (its stack's), to merge with its parameters."""
    graphdefs = {stack: nnx.graphdef(getattr(self, stack)) for stack, _ in self.cfg.layer_stacks()}
    return [graphdefs[stack] for stack, _ in self.cfg.layer_stacks()]

  def prefill(self, tokens_BT, cache_length: int, layers: list[nnx.State] | None = None):
    """A prompt [B, T] -> (the next token's logits [B, vocab], a cache of `cache_length` positions
    holding the prompt's keys and values). The prompt attends with the training kernel
    (`model.attention`), as `__call__` does; `decode` then extends the cache."""
    return self.decode(tokens_BT, self.init_cache(tokens_BT.shape[0], cache_length), layers, prefill=True)

  def decode(self, tokens_BT, cache: KVCache, layers: list[nnx.State] | None = None, prefill: bool = False):
    """tokens [B, T] continue the cached sequence -> (the next token's logits [B, vocab], the
    extended cache). Only the last position goes through the LM head. The caller keeps
    cache.length + T within the cache and block_size (`gptjax.sample` restarts the cache before)."""
    x_B1D, cache, _ = self._forward(tokens_BT, cache, None, layers, prefill)
    return self._logits(x_B1D)[:, 0], cache.replace(length=cache.length + tokens_BT.shape[1])

  def _forward(self, tokens_BT, cache: KVCache | None, dropout_key, layers=None, prefill: bool = False,
               documents: Documents | None = None):
    """-> (the final norm's output [B, T, embd] without a cache, or of the last position [B, 1, embd]
    with one; the cache; the router's losses, as `losses` says)."""
    cfg = self.cfg
    start = 0 if cache is None else cache.length
    embed_key, blocks_key = (None, None) if dropout_key is None else jax.random.split(dropout_key)
    table_VD = sharding.constrain(self.wte.embedding[...], ("vocab", None))  # gathered over fsdp for the lookup
    x_BTD = jnp.take(table_VD, tokens_BT, axis=0).astype(compute_dtype(cfg))
    sow(self, "token_embeddings", x_BTD)
    if cfg.positions in ("learned", "sinusoidal"):  # rotary positions are applied inside attention
      at = positions(start, tokens_BT.shape[1])  # [T], or [B, T] for rows of their own lengths
      at = at if documents is None or documents.positions_BT is None else documents.positions_BT  # per document
      table = self.wpe(at) if cfg.positions == "learned" else \
          sinusoidal.table(at, cfg.n_embd).astype(x_BTD.dtype)  # [(B,) T, embd]
      sow(self, "position_embeddings", table)
      x_BTD = x_BTD + table
      sow(self, "embeddings", x_BTD)
    x_BTD = self.dropout(x_BTD, deterministic=embed_key is None, rngs=embed_key)
    x_BTD = sharding.constrain(x_BTD, RESIDUAL_AXES)
    layer_keys = None if blocks_key is None else jax.random.split(blocks_key, cfg.n_layer)
    router = {}
    if cache is None:
      x_BTD, router = self._blocks(x_BTD, layer_keys, documents)
    else:  # generation: blocks unrolled, each with its own weights and cache; the next token's logits only
      for i, (graphdef, params) in enumerate(zip(self._layer_graphdefs(), layers or self.layer_params())):
        x_BTD, cache, _ = nnx.merge(graphdef, params)(x_BTD, cache, i, None, prefill)
      x_BTD = x_BTD[:, -1:]
    if cfg.has_final_norm:
      x_BTD = self.ln_f(x_BTD)
      sow(self, "ln_f", x_BTD)
    return x_BTD, cache, router

  def _logits(self, x_BTD):
    """The LM head: [B, T, embd] -> float32 logits [B, T, vocab]; the matmul's inputs in the compute
    dtype, its accumulation and output in float32 (a bfloat16 output would round every logit),
    soft-capped where the model is (`model.logit_softcap`).
    Padded vocabulary rows get the lowest logit: never sampled, never part of a softmax."""
    cfg, dtype = self.cfg, compute_dtype(self.cfg)
    logits_BTV = soft_cap(float32_logits(x_BTD.astype(dtype), self._head_table().astype(dtype)), cfg.logit_softcap)
    if cfg.padded_vocab > cfg.vocab_size:
      logits_BTV = jnp.where(jnp.arange(cfg.padded_vocab) < cfg.vocab_size, logits_BTV, jnp.finfo(jnp.float32).min)
    sow(self, "logits", logits_BTV)
    return sharding.constrain(logits_BTV, LOGITS_AXES)

  def _head_table(self):
    """The LM head's [padded vocab, embd] table: the token embedding (tied) or lm_head's kernel."""
    return self.wte.embedding[...] if self.cfg.tie_embeddings else self.lm_head.kernel[...].T

  def _blocks(self, x_BTD, layer_keys, documents: Documents | None):
    """Runs the stacked blocks in order (training and evaluation); layer_keys (or None) has a
    leading layer axis. -> (the output, the router's losses averaged over the sparse layers)."""
    if capturing(self):
      return self._blocks_captured(x_BTD), {}
    routers = []
    for stack, first, index, length in layer_runs(self.cfg):
      graphdef, stacked = nnx.split(getattr(self, stack))
      if length < jax.tree.leaves(stacked)[0].shape[0]:  # a run of part of its stack
        stacked = jax.tree.map(lambda x: x[index:index + length], stacked)
      keys = None if layer_keys is None else layer_keys[first:first + length]
      x_BTD, router_L = self._run(graphdef, stacked, x_BTD, keys, documents, length)
      routers += [router_L] if router_L else []  # a dense MLP's: {}
    if not routers:
      return x_BTD, {}
    return x_BTD, jax.tree.map(lambda *values: jnp.mean(jnp.concatenate(values), axis=0), *routers)

  def _run(self, graphdef, stacked, x_BTD, layer_keys, documents: Documents | None, length: int):
    """`length` blocks of one stack (`stacked`, each parameter [length, ...]) in order, scanned or
    looped -> (the output, each layer's router losses [length])."""

    def layer(x_BTD, per_layer):
      params, key = per_layer
      x_BTD, _, router = nnx.merge(graphdef, params)(x_BTD, None, None, key, documents=documents)
      return x_BTD, router

    scan = scanned(self.cfg)
    if self.cfg.remat != "none":
      layer = jax.checkpoint(layer, policy=REMAT_POLICIES[self.cfg.remat], prevent_cse=not scan)
    if scan:
      return jax.lax.scan(layer, x_BTD, (stacked, layer_keys))
    # unrolled: unstack each array once (its gradient is one stack, not `length` padded slices)
    leaves, treedef = jax.tree.flatten((stacked, layer_keys))
    unstacked = [jnp.unstack(leaf) for leaf in leaves]
    routers = []
    for i in range(length):
      x_BTD, router = layer(x_BTD, treedef.unflatten([layers[i] for layers in unstacked]))
      routers.append(router)
    return x_BTD, jax.tree.map(lambda *values: jnp.stack(values), *routers)

  def _blocks_captured(self, x_BTD):
    """The blocks one by one, each under `nnx.capture`; their intermediates are kept as this
    model's `blocks`, a tuple with one nested dict per layer (for `gptjax explain` and `attention`)."""
    splits = {name: nnx.split(getattr(self, name), nnx.Param, ...) for name in {s for s, _ in self.cfg.layer_stacks()}}
    for i, (stack, index) in enumerate(self.cfg.layer_stacks()):
      graphdef, stacked, rest = splits[stack]
      block = nnx.merge(graphdef, jax.tree.map(lambda x: x[index], stacked), rest)
      (x_BTD, _, _), intermediates = nnx.capture(block, nnx.Intermediate)(x_BTD, None, i, None)
      sow(self, "blocks", jax.tree.map(lambda kept: kept[0], nnx.to_pure_dict(intermediates),
                                        is_leaf=lambda x: isinstance(x, tuple)))  # sow keeps (value,)
    return x_BTD
