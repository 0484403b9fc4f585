"""gptjax: GPT-style decoder-only language models in JAX/Flax."""
