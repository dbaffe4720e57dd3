"""ds_jax: pure-JAX DeepSeek-style MoE language models, tri-modal alignment, int4 and LoRA."""

__version__ = "0.1.0"
