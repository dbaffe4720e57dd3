"""ds_jax: pure-JAX DeepSeek-style MoE language models, tri-modal alignment, int4 and LoRA.

`ds_jax.load(workdir_or_hf_dir, quant=None | "int4", adapter=None | name)` returns a model with
`.infer(prompt, max_tokens=256, temperature=0.7) -> str` (see `ds_jax.inference`).
"""

__version__ = "0.1.0"


def __getattr__(name):  # lazy: `import ds_jax` stays cheap for the CLI's argument checks
  if name == "load":
    from ds_jax.inference import load
    return load
  raise AttributeError(f"module 'ds_jax' has no attribute {name!r}")
