"""The Llama / Qwen family in Hugging Face's layout: LlamaForCausalLM, Qwen2ForCausalLM and
Qwen3ForCausalLM config.json and tensors, and the mixtures of experts MixtralForCausalLM and
Qwen3MoeForCausalLM, to and from gptjax's model config and parameters.

Hugging Face stores each projection as torch Linear weights [out, in] per layer; gptjax stores
kernels [in, out] stacked over layers, with the head axis separate: q_proj is h/attn/q_attn
[embd, heads, head_dim], k_proj and v_proj together h/attn/kv_attn [embd, 2, kv_heads, head_dim]
(one fused c_attn [embd, 3, heads, head_dim] when there are as many key/value heads as query
heads), o_proj h/attn/c_proj [heads, head_dim, embd], gate_proj and up_proj together h/mlp/c_fc
[embd, 2, hidden]. Both rotate query/key halves the same way, so no permutation is needed. A
mixture's router (gate [experts, embd]) is h/mlp/router [embd, experts], and each expert's three
projections (Mixtral's w1, w3, w2; Qwen3-MoE's gate_proj, up_proj, down_proj) are stacked over the
experts: h/mlp/c_fc [experts, embd, 2, hidden], h/mlp/c_proj [experts, hidden, embd].
"""

import jax
import numpy as np
from flax import traverse_util

from gptjax import config as config_lib
from gptjax.errors import UserError

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                 "MixtralForCausalLM": "mixtral", "Qwen3MoeForCausalLM": "qwen3_moe"}
# Each expert's gate, up and down projections, by family: the names under model.layers.i.
EXPERT_NAMES = {"mixtral": ("block_sparse_moe.gate", "block_sparse_moe.experts.{}.", ("w1", "w3", "w2")),
                "qwen3_moe": ("mlp.gate", "mlp.experts.{}.", ("gate_proj", "up_proj", "down_proj"))}


def _rope(hf: dict) -> dict:
  """rope_theta and Llama 3 scaling, from transformers 5's rope_parameters or the older fields."""
  rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  rope.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind not in ("default", "llama3"):
    raise UserError(f"rope_type={kind!r} is not supported (default and llama3 are)")
  return rope | {"rope_type": kind}


def _unless(value: int | None, derived: int) -> int:
  """A config value as gptjax stores it: 0 where it is what gptjax would derive anyway."""
  return 0 if value in (None, derived) else value


def model_config_from_hf(hf: dict, source: str) -> config_lib.ModelConfig:
  """The gptjax model of a Llama, Qwen2 or Qwen3 config.json, after checking what gptjax computes."""
  family = ARCHITECTURES[hf["architectures"][0]]
  checks = [
      (hf.get("hidden_act", "silu") == "silu", f"hidden_act={hf.get('hidden_act')!r} (gptjax's SwiGLU uses silu)"),
      (not hf.get("mlp_bias", False), "mlp_bias=true"),
      (family == "qwen2" or not hf.get("attention_bias", False), "attention_bias=true"),
      (not hf.get("use_sliding_window", False) and (family != "mixtral" or hf.get("sliding_window") is None),
       "sliding-window attention"),
  ]
  for ok, what in checks:
    if not ok:
      raise UserError(f"{source}: {what} is not supported")
  rope = _rope(hf)
  scaled = rope["rope_type"] == "llama3"
  try:
    cfg = config_lib.ModelConfig(
        vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"], n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"],
        n_kv_head=_unless(hf.get("num_key_value_heads"), hf["num_attention_heads"]),
        head_dim=_unless(hf.get("head_dim"), hf["hidden_size"] // hf["num_attention_heads"]),
        mlp_hidden=hf["intermediate_size"], layer_norm_epsilon=hf["rms_norm_eps"],
        dropout=0.0, bias=False, positions="rope", rope_theta=float(rope["rope_theta"]),
        rope_scaling_factor=float(rope["factor"]) if scaled else 0.0,
        rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        rope_original_context=int(rope.get("original_max_position_embeddings", 8192)),
        norm="rmsnorm", mlp="swiglu", tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2", qk_norm=family in ("qwen3", "qwen3_moe"), **_experts_from_hf(hf, family, source))
  except KeyError as e:
    raise UserError(f"{source}: no {e.args[0]}") from None
  return config_lib.validate(config_lib.Config(model=cfg)).model


def _experts_from_hf(hf: dict, family: str, source: str) -> dict:
  """A mixture's ModelConfig fields; none for a dense family member."""
  if family == "mixtral":
    return dict(n_experts=hf["num_local_experts"], experts_per_token=hf["num_experts_per_tok"],
                expert_hidden=hf["intermediate_size"], moe_norm_topk=True)
  experts = hf.get("num_experts", hf.get("num_local_experts"))  # the hub's name, transformers 5's
  if family == "qwen3_moe" and experts:
    step = hf.get("decoder_sparse_step", 1)  # layer i is sparse where (i + 1) % step == 0, unless listed
    if not isinstance(step, int) or step < 1:
      raise UserError(f"{source}: decoder_sparse_step={step!r} is not a positive whole number")
    dense = sorted(set(hf.get("mlp_only_layers") or ()) | {i for i in range(hf["num_hidden_layers"]) if (i + 1) % step})
    if len(dense) >= hf["num_hidden_layers"]:
      raise UserError(f"{source}: no sparse layer (mlp_only_layers={hf.get('mlp_only_layers')}, decoder_sparse_step={step}): "
                      "a Qwen3-MoE whose every MLP is dense is not supported")
    return dict(n_experts=experts, experts_per_token=hf["num_experts_per_tok"], dense_layers=tuple(dense),
                expert_hidden=hf["moe_intermediate_size"], moe_norm_topk=bool(hf.get("norm_topk_prob", False)))
  return {}


def _experts_to_hf(cfg: config_lib.ModelConfig) -> tuple[str, dict]:
  """(the family, its config.json fields) of a mixture of experts."""
  if cfg.shared_expert_hidden:
    raise UserError("model.shared_expert_hidden: neither Mixtral nor Qwen3-MoE has a shared expert, so Hugging "
                    "Face cannot hold this model; the checkpoint works with every gptjax command")
  if not cfg.qk_norm:
    if cfg.qkv_bias or not cfg.moe_norm_topk or cfg.dense_layers:
      raise UserError("a mixture without q/k norm exports as Mixtral, which has no q/k/v biases, no dense layers "
                      "(model.dense_layers) and always renormalises the chosen experts' weights (model.moe_norm_topk=true)")
    return "mixtral", {"num_local_experts": cfg.n_experts, "num_experts_per_tok": cfg.experts_per_token,
                       "intermediate_size": cfg.expert_size, "sliding_window": None}
  return "qwen3_moe", {"num_experts": cfg.n_experts, "num_experts_per_tok": cfg.experts_per_token,
                       "moe_intermediate_size": cfg.expert_size, "norm_topk_prob": cfg.moe_norm_topk,
                       "decoder_sparse_step": 1, "mlp_only_layers": list(cfg.dense_layers)}


def hf_config(cfg: config_lib.ModelConfig) -> dict:
  """The config.json of the family member that computes what `cfg` does."""
  if cfg.positions != "rope" or cfg.norm != "rmsnorm" or cfg.mlp != "swiglu" or cfg.bias:
    raise UserError("only a model with rotary positions, RMSNorm, SwiGLU and no biases (but q/k/v's) "
                    "exports as Llama or Qwen")
  if cfg.qk_norm and cfg.qkv_bias:
    raise UserError("model.qkv_bias=true with model.qk_norm=true exports as no family member: Qwen2 has the "
                    "q/k/v biases without the norm, Qwen3 the norm without the biases")
  family = "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama"
  family, experts = _experts_to_hf(cfg) if cfg.n_experts else (family, {})
  architecture = {name: kind for kind, name in ARCHITECTURES.items()}[family]
  rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling_factor:
    rope |= {"rope_type": "llama3", "factor": cfg.rope_scaling_factor, "low_freq_factor": cfg.rope_low_freq_factor,
             "high_freq_factor": cfg.rope_high_freq_factor, "original_max_position_embeddings": cfg.rope_original_context}
  return {
      "architectures": [architecture], "model_type": family, "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.n_embd, "intermediate_size": cfg.mlp_size, "num_hidden_layers": cfg.n_layer,
      "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_size,
      "max_position_embeddings": cfg.position_limit, "rms_norm_eps": cfg.layer_norm_epsilon, "hidden_act": "silu",
      "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "rope_parameters": rope,
      "rope_theta": cfg.rope_theta, "torch_dtype": "float32", **experts,
  }


def _linear_in(weight: np.ndarray, *out_shape: int) -> np.ndarray:
  """A torch Linear weight [out, in] -> a kernel [in, *out_shape]."""
  return weight.T.reshape(weight.shape[1], *out_shape)


def _experts_in(take, prefix: str, cfg: config_lib.ModelConfig, family: str) -> dict:
  """One layer's router and experts, from Hugging Face's per-expert tensors."""
  D, F, E = cfg.n_embd, cfg.expert_size, cfg.n_experts
  router, expert, (gate, up, down) = EXPERT_NAMES[family]
  each = [prefix + expert.format(j) for j in range(E)]
  return {("mlp", "router", "kernel"): take(prefix + router + ".weight", (E, D)).T,
          ("mlp", "c_fc", "kernel"): np.stack([np.stack([take(e + f"{gate}.weight", (F, D)).T,
                                                         take(e + f"{up}.weight", (F, D)).T], axis=1) for e in each]),
          ("mlp", "c_proj", "kernel"): np.stack([take(e + f"{down}.weight", (D, F)).T for e in each])}


def _experts_out(get, prefix: str, cfg: config_lib.ModelConfig, family: str) -> dict:
  """One layer's router and experts as Hugging Face's per-expert tensors."""
  router, expert, (gate, up, down) = EXPERT_NAMES[family]
  fc, proj = get("mlp", "c_fc", "kernel"), get("mlp", "c_proj", "kernel")
  tensors = {prefix + router + ".weight": get("mlp", "router", "kernel").T}
  for j in range(cfg.n_experts):
    e = prefix + expert.format(j)
    tensors |= {e + f"{gate}.weight": fc[j, :, 0].T, e + f"{up}.weight": fc[j, :, 1].T, e + f"{down}.weight": proj[j].T}
  return tensors


def params_from_hf(tensors: dict[str, np.ndarray], cfg: config_lib.ModelConfig, source: str,
                   family: str = "llama") -> dict:
  """Hugging Face tensors -> gptjax parameters (float32), checking names and shapes."""
  tensors = {name: np.asarray(value, np.float32) for name, value in tensors.items()
             if not name.endswith("rotary_emb.inv_freq")}

  def take(name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in tensors:
      raise UserError(f"{source}: missing tensor {name}; the directory is incomplete or its config does not match")
    value = tensors.pop(name)
    if value.shape != shape:
      raise UserError(f"{source}: {name} has shape {value.shape} but config.json implies {shape}")
    return value

  D, H, G, K, F = cfg.n_embd, cfg.n_head, cfg.kv_heads, cfg.head_size, cfg.mlp_size
  pad = ((0, cfg.padded_vocab - cfg.vocab_size), (0, 0))
  flat = {("wte", "embedding"): np.pad(take("model.embed_tokens.weight", (cfg.vocab_size, D)), pad),
          ("ln_f", "scale"): take("model.norm.weight", (D,))}
  if not cfg.tie_embeddings:
    flat[("lm_head", "kernel")] = np.pad(take("lm_head.weight", (cfg.vocab_size, D)), pad).T
  layers = []
  for i, (stack, _) in enumerate(cfg.layer_stacks()):
    p = f"model.layers.{i}."
    q = _linear_in(take(p + "self_attn.q_proj.weight", (H * K, D)), H, K)
    k = _linear_in(take(p + "self_attn.k_proj.weight", (G * K, D)), G, K)
    v = _linear_in(take(p + "self_attn.v_proj.weight", (G * K, D)), G, K)
    layer = {("ln_1", "scale"): take(p + "input_layernorm.weight", (D,)),
             ("ln_2", "scale"): take(p + "post_attention_layernorm.weight", (D,)),
             ("attn", "c_proj", "kernel"): take(p + "self_attn.o_proj.weight", (D, H * K)).T.reshape(H, K, D),
             **(_experts_in(take, p, cfg, family) if stack == "h" and cfg.n_experts else {
                 ("mlp", "c_fc", "kernel"): np.stack([take(p + "mlp.gate_proj.weight", (F, D)).T,
                                                      take(p + "mlp.up_proj.weight", (F, D)).T], axis=1),
                 ("mlp", "c_proj", "kernel"): take(p + "mlp.down_proj.weight", (D, F)).T})}
    if cfg.qkv_bias:
      qb, kb, vb = (take(p + f"self_attn.{n}_proj.bias", (h * K,)).reshape(h, K) for n, h in (("q", H), ("k", G), ("v", G)))
    if G == H:
      layer[("attn", "c_attn", "kernel")] = np.stack([q, k, v], axis=1)
      if cfg.qkv_bias:
        layer[("attn", "c_attn", "bias")] = np.stack([qb, kb, vb])
    else:
      layer[("attn", "q_attn", "kernel")], layer[("attn", "kv_attn", "kernel")] = q, np.stack([k, v], axis=1)
      if cfg.qkv_bias:
        layer[("attn", "q_attn", "bias")], layer[("attn", "kv_attn", "bias")] = qb, np.stack([kb, vb])
    if cfg.qk_norm:
      layer[("attn", "q_norm", "scale")] = take(p + "self_attn.q_norm.weight", (K,))
      layer[("attn", "k_norm", "scale")] = take(p + "self_attn.k_norm.weight", (K,))
    layers.append((stack, layer))
  if cfg.tie_embeddings:
    tensors.pop("lm_head.weight", None)  # a tied head may be stored as a copy
  if tensors:
    unexpected = sorted(tensors)
    raise UserError(f"{source}: unexpected tensors ({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})")
  for stack in {stack for stack, _ in layers}:
    same = [layer for kind, layer in layers if kind == stack]
    flat |= {(stack, *path): np.stack([layer[path] for layer in same]) for path in same[0]}
  return traverse_util.unflatten_dict(flat)


def params_to_hf(params, cfg: config_lib.ModelConfig) -> dict[str, np.ndarray]:
  """gptjax parameters -> the Hugging Face state dict (float32 numpy arrays)."""
  flat = {path: np.asarray(value, np.float32) for path, value in traverse_util.flatten_dict(jax.device_get(params)).items()}
  D, H, G, K, V = cfg.n_embd, cfg.n_head, cfg.kv_heads, cfg.head_size, cfg.vocab_size
  family = ARCHITECTURES[hf_config(cfg)["architectures"][0]]
  tensors = {"model.embed_tokens.weight": flat[("wte", "embedding")][:V], "model.norm.weight": flat[("ln_f", "scale")]}
  if not cfg.tie_embeddings:
    tensors["lm_head.weight"] = flat[("lm_head", "kernel")][:, :V].T
  for i, (stack, index) in enumerate(cfg.layer_stacks()):
    get = lambda *path: flat[(stack, *path)][index]  # noqa: E731
    p = f"model.layers.{i}."
    fused = G == H
    q = get("attn", "c_attn", "kernel")[:, 0] if fused else get("attn", "q_attn", "kernel")
    kv = get("attn", "c_attn", "kernel")[:, 1:] if fused else get("attn", "kv_attn", "kernel")
    tensors |= {p + "input_layernorm.weight": get("ln_1", "scale"), p + "post_attention_layernorm.weight": get("ln_2", "scale"),
                p + "self_attn.q_proj.weight": q.reshape(D, H * K).T, p + "self_attn.k_proj.weight": kv[:, 0].reshape(D, G * K).T,
                p + "self_attn.v_proj.weight": kv[:, 1].reshape(D, G * K).T,
                p + "self_attn.o_proj.weight": get("attn", "c_proj", "kernel").reshape(H * K, D).T,
                **(_experts_out(get, p, cfg, family) if stack == "h" and cfg.n_experts else {
                    p + "mlp.gate_proj.weight": get("mlp", "c_fc", "kernel")[:, 0].T,
                    p + "mlp.up_proj.weight": get("mlp", "c_fc", "kernel")[:, 1].T,
                    p + "mlp.down_proj.weight": get("mlp", "c_proj", "kernel").T})}
    if cfg.qkv_bias:
      qb = get("attn", "c_attn", "bias")[0] if fused else get("attn", "q_attn", "bias")
      kvb = get("attn", "c_attn", "bias")[1:] if fused else get("attn", "kv_attn", "bias")
      tensors |= {p + "self_attn.q_proj.bias": qb.reshape(-1), p + "self_attn.k_proj.bias": kvb[0].reshape(-1),
                  p + "self_attn.v_proj.bias": kvb[1].reshape(-1)}
    if cfg.qk_norm:
      tensors |= {p + "self_attn.q_norm.weight": get("attn", "q_norm", "scale"),
                  p + "self_attn.k_norm.weight": get("attn", "k_norm", "scale")}
  return {name: np.ascontiguousarray(value) for name, value in tensors.items()}
