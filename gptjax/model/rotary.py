"""Rotary position embeddings (RoFormer; Llama's "rotate half" layout): each head's query and key
dimensions come in pairs (i, i + head_dim / 2) rotated by the position times a frequency, so that
attention scores depend on relative positions. Llama 3 stretches the low frequencies for long
contexts (`model.rope_scaling_factor`)."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.config import ModelConfig


def inverse_frequencies(cfg: ModelConfig) -> np.ndarray:
  """[head_dim / 2] float32: theta^(-2i / head_dim), with Llama 3's scaling where configured."""
  dim = cfg.head_size
  inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
  if not cfg.rope_scaling_factor:
    return inv_freq.astype(np.float32)
  factor, context = cfg.rope_scaling_factor, cfg.rope_original_context
  low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
  wavelength = 2 * math.pi / inv_freq
  scaled = np.where(wavelength > context / low, inv_freq / factor, inv_freq)  # long wavelengths: slowed down
  smooth = (context / wavelength - low) / (high - low)
  between = (wavelength >= context / high) & (wavelength <= context / low)  # in between: interpolated
  scaled = np.where(between, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
  return scaled.astype(np.float32)


def rotate(x_BTHK: jax.Array, positions: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Queries or keys [B, T, heads, head_dim] at `positions` ([T], or [B, T]: each row's own),
  rotated; computed in float32."""
  angles = positions.astype(jnp.float32)[..., None] * inverse_frequencies(cfg)  # [(B,) T, head_dim / 2]
  cos, sin = jnp.cos(angles)[..., None, :], jnp.sin(angles)[..., None, :]  # a heads axis
  x1, x2 = jnp.split(x_BTHK.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_BTHK.dtype)
