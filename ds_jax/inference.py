"""The seed's inference API: `model = ds_jax.load(path, quant=None | "int4", adapter=None | name)`,
`model.infer(prompt, max_tokens=256, temperature=0.7) -> str`.

`path` may be
  * a ds_jax training workdir (`config.json` + orbax `checkpoints/<step>/`): the newest step's
    parameters (`load_params`);
  * a packed quantized export of `ds-jax quantize` (`config.json` + `quant.json` +
    `model.safetensors`): PackedKernel leaves, int8/int4 matmuls;
  * a Hugging Face model directory (`config.json` with `model_type` + safetensors), converted by
    `ds_jax.convert.hf.load_pretrained`, with its `tokenizer.json` when present.
`quant="int4"` quantizes float weights on load (round-to-nearest, group 128 or per-channel when 128
does not divide). `adapter=name` loads a saved LoRA adapter (`<path>/adapters/<name>`, `<path>/<name>`
or `name` itself as a directory). The returned `Model` also has the PEFT-style methods of
`ds_jax.lora.AdapterMixin` (`model.add_adapter("fin", LoRAAdapter(...))`, `set_adapter`, ...).
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Sequence

import jax
import numpy as np

from ds_jax.config import ModelConfig, model_config
from ds_jax.generate import generate
from ds_jax.lora import AdapterMixin


def _usage(msg: str) -> Exception:
  from ds_jax.cli import UsageError
  return UsageError(msg)


def latest_step_dir(workdir: str) -> tuple[int, str]:
  """(step, directory of its item) of the newest complete orbax checkpoint of a workdir."""
  root = os.path.join(workdir, "checkpoints")
  steps = sorted((int(d) for d in (os.listdir(root) if os.path.isdir(root) else [])
                  if d.isdigit()), reverse=True)
  for step in steps:
    item = os.path.join(root, str(step), "default")
    if os.path.isdir(item):
      return step, item
  raise _usage(f"{workdir} has no checkpoint under checkpoints/")


def load_params(workdir: str) -> Any:
  """The trained parameters of a workdir's newest checkpoint, as host numpy arrays.

  Reads only the "params" subtree of the saved TrainState {step, params, opt_state, frozen,
  skipped} (orbax partial restore from the checkpoint's own tree metadata), so neither the
  optimizer state nor the config's mesh is needed.
  """
  import orbax.checkpoint as ocp
  _, item = latest_step_dir(workdir)
  ckptr = ocp.PyTreeCheckpointer()
  tree = ckptr.metadata(item).item_metadata.tree
  if tree.get("frozen"):
    raise _usage(f"{workdir} holds adapters over a frozen base; save the adapter and load it "
                 f"with adapter=... over the base instead")
  want = {"params": tree["params"]}
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), want)
  out = ckptr.restore(item, args=ocp.args.PyTreeRestore(item=want, restore_args=args,
                                                        partial_restore=True))
  return out["params"]


def _tokenizer(cfg: dict, path: str):
  from ds_jax.data.tokenizer import get_tokenizer
  data = cfg.get("data", {})
  name, tok_path = data.get("tokenizer", "byte"), data.get("tokenizer_path", "")
  if name == "hf" and not tok_path and os.path.exists(os.path.join(path, "tokenizer.json")):
    tok_path = path
  return get_tokenizer(name, tok_path)


def _read_json(path: str) -> Optional[dict]:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _find_adapter(path: str, name: str) -> str:
  for d in (os.path.join(path, "adapters", name), os.path.join(path, name), name):
    if os.path.exists(os.path.join(d, "adapter_config.json")):
      return d
  raise _usage(f"no adapter {name!r}: looked for adapter_config.json in "
               f"{os.path.join(path, 'adapters', name)}, {os.path.join(path, name)} and {name}")


def int4_params(params: Any, group_size: int = 128) -> Any:
  """Round-to-nearest int4 packed kernels (group `group_size` when it divides every quantized
  contraction axis, else per-channel)."""
  from ds_jax import quant
  try:
    return quant.quantize_params(params, quant.quant_config(bits=4, group_size=group_size))
  except ValueError:
    return quant.quantize_params(params, quant.quant_config(bits=4, group_size=0))


class Model(AdapterMixin):
  """A model config, its parameters (any kernels: float, packed int, LoRA) and a tokenizer."""

  def __init__(self, mc: ModelConfig, params: Any, tokenizer: Any, source: str = ""):
    self.mc, self.params, self.tokenizer, self.source = mc, params, tokenizer, source
    self.rng = jax.random.key(0)

  def __repr__(self) -> str:
    return (f"Model({self.mc.model_type}, {self.mc.num_hidden_layers} layers, "
            f"{self.mc.attention_type}, source={self.source!r})")

  def infer_batch(self, prompts: Sequence[str], max_tokens: int = 256, temperature: float = 0.7,
                  top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> list[str]:
    """The continuations of several prompts (decoded together, stopping at EOS)."""
    tok = self.tokenizer
    ids = [[tok.bos_id] + list(tok.encode(p)) for p in prompts]
    out = generate(self.mc, self.params, ids, max_tokens, temperature=temperature, top_k=top_k,
                   top_p=top_p, stop_ids=[tok.eos_id], seed=seed, pad_id=tok.pad_id)
    return [tok.decode(s) for s in out.sequences()]

  def infer(self, prompt: str, max_tokens: int = 256, temperature: float = 0.7, top_k: int = 0,
            top_p: float = 1.0, seed: int = 0) -> str:
    """The continuation of `prompt` (temperature 0: greedy)."""
    return self.infer_batch([prompt], max_tokens, temperature, top_k, top_p, seed)[0]


def load(path: str, quant: Optional[str] = None, adapter: Optional[str] = None) -> Model:
  """A `Model` from a ds_jax workdir, a packed export or a Hugging Face directory (see module)."""
  if quant not in (None, "int4"):
    raise _usage(f"quant must be None or 'int4'; got {quant!r}")
  cfg = _read_json(os.path.join(path, "config.json"))
  if cfg is None:
    raise _usage(f"{path}: no config.json (not a ds_jax workdir, export or HF directory)")
  packed = os.path.exists(os.path.join(path, "quant.json"))
  if "model" in cfg:  # a ds_jax experiment config: workdir or packed export
    mc = model_config(cfg["model"])
    if packed:
      from ds_jax.quant import load_packed
      params, _ = load_packed(path)
    else:
      params = load_params(path)
    tokenizer = _tokenizer(cfg, path)
  elif "model_type" in cfg:
    from ds_jax.convert.hf import load_pretrained, load_tokenizer
    mc, params = load_pretrained(path)
    tokenizer = load_tokenizer(path)
    if tokenizer is None:
      from ds_jax.data.tokenizer import ByteTokenizer
      tokenizer = ByteTokenizer()
  else:
    raise _usage(f"{path}/config.json is neither a ds_jax config nor a Hugging Face config")
  params = jax.tree.map(jax.numpy.asarray, params)
  if quant == "int4" and not packed:
    params = int4_params(params)
  model = Model(mc, params, tokenizer, source=os.path.abspath(path))
  if adapter:
    model.load_adapter(_find_adapter(path, adapter), adapter)
  return model
