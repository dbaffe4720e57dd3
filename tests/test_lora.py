"""LoRA adapters: formulas against NumPy, invariants through the real model, checkpoints."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ds_jax import lora
from ds_jax.config import ModelConfig
from ds_jax.lora.kernel import LoraKernel
from ds_jax.models import lm

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
TOK = jax.random.randint(jax.random.key(1), (2, 8), 0, 64)


# Unoptimised XLA code compiles ~2x faster; every distinct adapter structure is a new compile,
# so the tests below share configs (ALL, QV) wherever they can.
_FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
ALL = lora.LoraConfig(target_modules="all-linear", r=4, lora_alpha=8, use_dora=True)
QV = lora.LoraConfig(target_modules=["q_proj", "v_proj"], r=2, lora_alpha=4)


@pytest.fixture(scope="module")
def base():
  """Random parameters of lm.init's structure (eval_shape: tracing lm.init is cheap, running
  it un-jitted is not)."""
  shapes = jax.eval_shape(lambda k: lm.init(CFG, k), jax.random.key(0))
  leaves, tdef = jax.tree.flatten(shapes)
  rng = np.random.default_rng(0)
  return jax.tree.unflatten(tdef, [jnp.asarray(0.2 * rng.normal(size=s.shape), s.dtype)
                                   for s in leaves])


@functools.partial(jax.jit, compiler_options=_FAST)
def _noise(tree, key, std):
  leaves, tdef = jax.tree.flatten(tree)
  flat = std * jax.random.normal(key, (sum(x.size for x in leaves),))
  out, o = [], 0
  for x in leaves:
    out.append(x + flat[o:o + x.size].reshape(x.shape))
    o += x.size
  return jax.tree.unflatten(tdef, out)


def randomize(params, seed=3, std=0.2):
  """Give the active adapter's arrays random values (B = 0 at init would hide everything)."""
  t, f = lora.split_trainable(params)
  return lora.combine(_noise(t, jax.random.key(seed), std), f)


@functools.partial(jax.jit, compiler_options=_FAST)
def _eval(params):
  return lm.apply(CFG, params, TOK)


@functools.partial(jax.jit, static_argnums=2, compiler_options=_FAST)
def _apply_rng(params, rng, train):
  return lm.Transformer(CFG).apply({"params": params}, TOK, deterministic=not train,
                                   rngs={"dropout": rng})[0]


def fwd(params, train=False, rng=None):
  return _eval(params) if rng is None else _apply_rng(params, rng, train)


# ----------------------------------------------------------------------------------------------
# Formulas at the kernel level (NumPy references).


def _kernel(cfg, w, a, b, m=None, n_batch=0):
  ad = {"lora_a": jnp.asarray(a), "lora_b": jnp.asarray(b)}
  if m is not None:
    ad["magnitude"] = jnp.asarray(m)
  return LoraKernel(base=jnp.asarray(w), adapters={"x": ad}, configs=(("x", cfg),), active="x",
                    n_batch=n_batch, n_out=w.ndim - n_batch - 1)


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_and_rslora_match_formula(rslora):
  rng = np.random.default_rng(0)
  d, h, k, r = 6, 3, 4, 2
  w, x = rng.normal(size=(d, h, k)), rng.normal(size=(5, d))
  a, b = rng.normal(size=(d, r)), rng.normal(size=(r, h, k))
  cfg = lora.LoraConfig(r=r, lora_alpha=6.0, use_rslora=rslora)
  s = 6.0 / (np.sqrt(r) if rslora else r)
  y = _kernel(cfg, w, a, b).einsum("...z,zab->...ab", jnp.asarray(x), dtype=jnp.float32)
  ref = (x @ w.reshape(d, -1) + s * x @ a @ b.reshape(r, -1)).reshape(5, h, k)
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)


def test_dora_matches_formula_and_merge():
  rng = np.random.default_rng(1)
  d, f, r = 7, 5, 3
  w, x = rng.normal(size=(d, f)), rng.normal(size=(4, d))
  a, b = rng.normal(size=(d, r)), rng.normal(size=(r, f))
  m = rng.uniform(0.5, 2.0, size=(f,))
  cfg = lora.LoraConfig(r=r, lora_alpha=2.0, use_dora=True)
  k = _kernel(cfg, w, a, b, m)
  y = k.einsum("bz,za->ba", jnp.asarray(x), dtype=jnp.float32)
  wc = w + (2.0 / r) * a @ b
  ref = x @ (m[None, :] * wc / np.linalg.norm(wc, axis=0, keepdims=True))  # PEFT: ||.|| per out
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
  merged = lora.merge({"p": {"kernel": k}})["p"]["kernel"]
  np.testing.assert_allclose(np.linalg.norm(np.asarray(merged.base), axis=0), m, rtol=1e-5)
  back = lora.unmerge({"p": {"kernel": merged}})["p"]["kernel"]
  np.testing.assert_allclose(np.asarray(back.base), w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eq", ["ecd,edf->ecf", "nd,edf->enf"])
def test_expert_kernels_one_adapter_per_expert(eq):
  rng = np.random.default_rng(2)
  e, d, f, r = 3, 4, 5, 2
  w = rng.normal(size=(e, d, f))
  a, b = rng.normal(size=(e, d, r)), rng.normal(size=(e, r, f))
  k = _kernel(lora.LoraConfig(r=r, lora_alpha=r), w, a, b, n_batch=1)
  x = rng.normal(size=(e, 6, d) if eq.startswith("e") else (6, d))
  y = np.asarray(k.einsum(eq, jnp.asarray(x), dtype=jnp.float32))
  for i in range(e):
    xi = x[i] if x.ndim == 3 else x
    np.testing.assert_allclose(y[i], xi @ (w[i] + a[i] @ b[i]), rtol=1e-5, atol=1e-5)


def test_transposed_use_of_kernel_mla_absorption():
  """MLA absorbs kv_b_proj as 'bthe,che->bthc': the adapter must follow the same algebra."""
  rng = np.random.default_rng(3)
  c, h, e, r = 5, 2, 3, 2
  w, a, b = rng.normal(size=(c, h, e)), rng.normal(size=(c, r)), rng.normal(size=(r, h, e))
  for dora in (False, True):
    cfg = lora.LoraConfig(r=r, lora_alpha=r, use_dora=dora)
    m = rng.uniform(0.5, 2, size=(h, e)) if dora else None
    k = _kernel(cfg, w, a, b, m)
    x = rng.normal(size=(1, 4, h, e))
    y = k.einsum("bthe,che->bthc", jnp.asarray(x), dtype=jnp.float32)
    wm = np.asarray(k.merged_weight("x")[0])
    np.testing.assert_allclose(np.asarray(y), np.einsum("bthe,che->bthc", x, wm), rtol=1e-5,
                               atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Through the model.


def test_zero_init_b_keeps_outputs(base):
  p = lora.add_adapter(base, "a", ALL, jax.random.key(2))  # DoRA: m = ||W|| keeps W too
  np.testing.assert_allclose(fwd(p), fwd(base), rtol=1e-5, atol=1e-5)
  kernels = lora.lora_kernels(p)
  assert len(kernels) == 7 and "lm_head/kernel" not in kernels  # PEFT: no output layer
  assert isinstance(p["layers_0"]["block"]["mlp"]["down_proj"]["kernel"], LoraKernel)


def test_gaussian_init_statistics_and_pissa(base):
  p = lora.add_adapter(base, "g", lora.LoraConfig(target_modules=["gate_proj"], r=16),
                       jax.random.key(0))
  ad = p["layers_0"]["block"]["mlp"]["gate_proj"]["kernel"].adapters["g"]
  assert ad["lora_a"].shape == (2, 32, 16) and ad["lora_b"].shape == (2, 16, 48)
  assert abs(float(jnp.std(ad["lora_a"])) - 1 / 16) < 0.01 and not ad["lora_b"].any()
  cfg = lora.LoraConfig(target_modules=["q_proj"], r=3, lora_alpha=6, init="pissa")
  p = lora.add_adapter(base, "p", cfg, jax.random.key(0))
  k = p["layers_0"]["block"]["self_attn"]["q_proj"]["kernel"]
  w = np.asarray(base["layers_0"]["block"]["self_attn"]["q_proj"]["kernel"]).reshape(2, 32, -1)
  u, s, vh = np.linalg.svd(w, full_matrices=False)
  top = np.einsum("lik,lk,lkj->lij", u[..., :3], s[..., :3], vh[..., :3, :])
  np.testing.assert_allclose(np.asarray(k.delta("p")).reshape(top.shape), top, atol=1e-5)
  np.testing.assert_allclose(np.asarray(k.base).reshape(w.shape) + top, w, atol=1e-5)


@pytest.mark.parametrize("cfg", [QV, ALL], ids=["lora", "dora"])
def test_merged_equals_unmerged_and_unload(base, cfg):
  p = randomize(lora.add_adapter(base, "a", cfg, jax.random.key(2)))
  y = fwd(p)
  assert float(jnp.abs(y - fwd(base)).max()) > 1e-2  # the adapter does something
  np.testing.assert_allclose(fwd(lora.merge(p)), y, rtol=1e-4, atol=1e-4)
  plain = lora.merge_and_unload(p)
  assert jax.tree.structure(plain) == jax.tree.structure(base)
  np.testing.assert_allclose(fwd(plain), y, rtol=1e-4, atol=1e-4)
  back = lora.unmerge(lora.merge(p))
  for x0, x1 in zip(jax.tree.leaves(p), jax.tree.leaves(back)):
    np.testing.assert_allclose(x1, x0, rtol=1e-4, atol=1e-5)


def test_dropout_only_in_training(base):
  cfg = dataclasses.replace(QV, lora_dropout=0.5)
  p = randomize(lora.add_adapter(base, "a", cfg, jax.random.key(2)))
  y_eval = fwd(p, False, jax.random.key(5))
  np.testing.assert_array_equal(fwd(p, False, jax.random.key(6)), y_eval)
  y1, y2 = fwd(p, True, jax.random.key(5)), fwd(p, True, jax.random.key(6))
  assert float(jnp.abs(y1 - y2).max()) > 1e-3 and float(jnp.abs(y1 - y_eval).max()) > 1e-3
  np.testing.assert_array_equal(fwd(p, True, jax.random.key(5)), y1)  # reproducible
  # Dropout acts on the adapter input only: the base path is the same in training.
  q = lora.combine(*lora.split_trainable(lora.add_adapter(base, "a", cfg, jax.random.key(2))))
  np.testing.assert_allclose(fwd(q, True, jax.random.key(5)), fwd(base), rtol=1e-5, atol=1e-6)


def test_named_adapters_coexist_switch_delete(base):
  law = lora.LoraConfig(target_modules=["up_proj"], r=3, lora_alpha=6)
  pa = randomize(lora.add_adapter(base, "a", QV, jax.random.key(1)), seed=1)
  p = randomize(lora.add_adapter(pa, "law", law, jax.random.key(2)), seed=2)
  assert lora.adapter_names(p) == ["a", "law"] and lora.active_adapter(p) == "law"
  # Switching back to "a" reproduces the model that only ever had "a"; None is the base.
  np.testing.assert_allclose(fwd(lora.set_adapter(p, "a")), fwd(pa), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(fwd(lora.set_adapter(p, None)), fwd(base), rtol=1e-5, atol=1e-6)
  # "law" is active in p: its kernel adds law's delta, q_proj runs plain.
  up = p["layers_0"]["block"]["mlp"]["up_proj"]["kernel"]
  x = jax.random.normal(jax.random.key(0), (3, 32))
  ref = x @ (base["layers_0"]["block"]["mlp"]["up_proj"]["kernel"][1] + up.delta("law")[1])
  sliced = jax.tree.map(lambda a: a[1], up)
  np.testing.assert_allclose(sliced.einsum("...z,za->...a", x, dtype=jnp.float32), ref,
                             rtol=1e-5, atol=1e-5)
  assert p["layers_0"]["block"]["self_attn"]["q_proj"]["kernel"].active is None
  only_law = lora.delete_adapter(p, "a")
  assert lora.adapter_names(only_law) == ["law"]
  assert not isinstance(only_law["layers_0"]["block"]["self_attn"]["q_proj"]["kernel"],
                        LoraKernel)
  gone = lora.delete_adapter(only_law, "law")
  assert jax.tree.structure(gone) == jax.tree.structure(base)
  with pytest.raises(ValueError, match="already exists"):
    lora.add_adapter(p, "a", QV, jax.random.key(1))
  with pytest.raises(ValueError, match="unmerge"):
    lora.set_adapter(lora.merge(p), "a")


def test_target_matching_regex_exclude_and_errors(base):
  tgt = lambda c: sorted(lora.lora_kernels(lora.add_adapter(base, "a", c, jax.random.key(0))))
  assert tgt(lora.LoraConfig(target_modules=r".*layers_0/.*/(q|v)_proj")) == [
      "layers_0/block/self_attn/q_proj/kernel", "layers_0/block/self_attn/v_proj/kernel"]
  allk = tgt(lora.LoraConfig(target_modules="all-linear", exclude_modules=["o_proj"]))
  assert len(allk) == 6 and not any("o_proj" in k for k in allk)
  with pytest.raises(ValueError, match="matched no weight"):
    tgt(lora.LoraConfig(target_modules=["kv_a_proj_with_mqa"]))
  c = lora.LoRAAdapter(target_modules=["q_proj", "v_proj"], r=64, lora_alpha=32, dropout=0.1)
  assert (c.r, c.lora_alpha, c.lora_dropout, c.scale) == (64, 32, 0.1, 0.5)
  moe_paths = {"layers_1": {"block": {"mlp": {
      "gate": {"kernel": jnp.zeros((2, 8, 4))},
      "experts": {"gate_proj": jnp.zeros((2, 4, 8, 6)), "down_proj": jnp.zeros((2, 4, 6, 8))},
      "shared_experts": {"up_proj": {"kernel": jnp.zeros((2, 8, 6))}}}}}}
  for spec, want in [("all-linear", 3), (["experts"], 2), (["up_proj"], 1)]:
    got = lora.add_adapter(moe_paths, "e", lora.LoraConfig(target_modules=spec, r=2),
                           jax.random.key(0))
    assert len(lora.lora_kernels(got)) == want, spec
  k = got["layers_1"]["block"]["mlp"]["shared_experts"]["up_proj"]["kernel"]
  assert k.n_batch == 0
  e = lora.add_adapter(moe_paths, "e", lora.LoraConfig(target_modules=["experts"], r=2),
                       jax.random.key(0))["layers_1"]["block"]["mlp"]["experts"]["down_proj"]
  assert (e.n_batch, e.adapters["e"]["lora_a"].shape, e.adapters["e"]["lora_b"].shape) == (
      1, (2, 4, 6, 2), (2, 4, 2, 8))


def test_trainable_partition_grads_and_frozen_base(base):
  p = lora.add_adapter(base, "a", QV, jax.random.key(2))
  trainable, frozen = lora.split_trainable(p)
  n_lora = sum(x.size for x in jax.tree.leaves(trainable))
  assert n_lora == lora.count_trainable(p) == 2 * (32 * 2 + 2 * 4 * 8) + 2 * (32 * 2 + 2 * 2 * 8)
  tx = optax.adam(1e-2)
  opt = tx.init(trainable)
  assert sum(x.size for x in jax.tree.leaves(opt)) == 2 * n_lora + 1  # mu, nu, count

  def loss(t):
    logits = lm.apply(CFG, lora.combine(t, frozen), TOK)
    return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  @functools.partial(jax.jit, compiler_options=_FAST)
  def step(t, opt):
    l, g = jax.value_and_grad(loss)(t)
    upd, opt = tx.update(g, opt, t)
    return optax.apply_updates(t, upd), opt, l, g
  t = trainable
  for _ in range(3):
    t, opt, l, g = step(t, opt)
  assert jax.tree.structure(g) == jax.tree.structure(trainable)
  assert all(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(g)[1::2])  # grads on B
  assert float(step(t, opt)[2]) < float(step(trainable, tx.init(trainable))[2])
  new = lora.combine(t, frozen)
  for x0, x1 in zip(jax.tree.leaves(lora.unload(p)), jax.tree.leaves(lora.unload(new))):
    np.testing.assert_array_equal(x0, x1)  # bit-identical base
  rep = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("data",)),
                                  jax.sharding.PartitionSpec())
  t_sh, f_sh = lora.partition_shardings(jax.tree.map(lambda _: rep, base), t, frozen, rep)
  assert jax.tree.structure(jax.device_put(frozen, f_sh)) == jax.tree.structure(frozen)
  assert jax.tree.structure(t_sh) == jax.tree.structure(t)
  mask = lora.trainable_mask(new)
  assert sum(jax.tree.leaves(mask)) == 4  # A and B of q and v (one scanned segment)
  assert len(jax.tree.leaves(mask)) == len(jax.tree.leaves(new))


def test_save_load_round_trip(base, tmp_path):
  p = randomize(lora.add_adapter(base, "a", ALL, jax.random.key(2)))
  sizes = lora.save_adapter(str(tmp_path / "a"), p, "a")
  q = lora.load_adapter(str(tmp_path / "a"), base)
  for x0, x1 in zip(jax.tree.leaves(p), jax.tree.leaves(q)):
    np.testing.assert_array_equal(x0, x1)
  assert jax.tree.structure(p) == jax.tree.structure(q)  # same configs, names, layout
  assert sizes["adapter_model.safetensors"] < 0.5 * lora.tree_bytes(base)
  q2 = lora.load_adapter(str(tmp_path / "a"), q, name="a2", activate=False)
  assert lora.adapter_names(q2) == ["a", "a2"] and lora.active_adapter(q2) == "a"
  with pytest.raises(ValueError, match="shape"):
    lora.load_adapter(str(tmp_path / "a"), jax.tree.map(lambda x: x[..., :1], base))


class _Model(lora.AdapterMixin):
  def __init__(self, params):
    self.params = params


def test_seed_facade(base, tmp_path):
  model = _Model(base)
  model.add_adapter("financial_domain", lora.LoRAAdapter(target_modules=["q_proj", "v_proj"],
                                                         r=64, lora_alpha=32, dropout=0.1))
  assert model.active_adapter == "financial_domain" and model.adapters == ["financial_domain"]
  k = model.params["layers_0"]["block"]["self_attn"]["v_proj"]["kernel"]
  assert k.adapters["financial_domain"]["lora_a"].shape == (2, 32, 64)
  assert model.num_trainable_parameters()["trainable"] == 2 * 64 * (32 + 32) + 2 * 64 * (32 + 16)
  model.save_adapter(str(tmp_path / "f"))
  model.disable_adapters()
  assert model.active_adapter is None
  model.delete_adapter("financial_domain")
  model.load_adapter(str(tmp_path / "f"))
  assert model.active_adapter == "financial_domain"
  model.merge_and_unload()
  assert jax.tree.structure(model.params) == jax.tree.structure(base)


# ----------------------------------------------------------------------------------------------
# QLoRA on the packed int4 base, and the MoE / MLA model.


def test_qlora_on_packed_int4_base_and_requantized_merge():
  from ds_jax.quant.config import quant_config
  from ds_jax.quant.matmul import PackedKernel
  from ds_jax.quant.pack import quantize_params
  w = np.random.default_rng(4).normal(size=(2, 32, 4, 8)).astype(np.float32)  # [L, D, H, K]
  q = quantize_params({"layers_0": {"q_proj": {"kernel": jnp.asarray(w)}}},
                      quant_config(bits=4, group_size=16), backend="dequant", act_bits=0)
  k0 = q["layers_0"]["q_proj"]["kernel"]
  assert isinstance(k0, PackedKernel) and k0.bits == 4
  cfg = lora.LoraConfig(target_modules=["q_proj"], r=2, lora_alpha=2)
  p = randomize(lora.add_adapter(q, "a", cfg, jax.random.key(0)), std=0.5)
  k = p["layers_0"]["q_proj"]["kernel"]
  assert isinstance(k.base, PackedKernel)  # the 4-bit base stays packed
  x = jax.random.normal(jax.random.key(1), (3, 32))
  ad = k.adapters["a"]
  y = jax.tree.map(lambda a: a[1], k).einsum("...z,zab->...ab", x, dtype=jnp.float32)
  deq = np.asarray(k0.dequantize())
  ref = (x @ deq[1].reshape(32, -1) + x @ ad["lora_a"][1] @ ad["lora_b"][1].reshape(2, -1))
  np.testing.assert_allclose(y.reshape(3, -1), ref, rtol=1e-4, atol=1e-4)
  # Gradients reach the adapters through the packed base; the base has no trainable leaf.
  t, f = lora.split_trainable(p)
  layer1 = lambda t: jax.tree.map(lambda a: a[1], lora.combine(t, f)["layers_0"]["q_proj"][
      "kernel"])
  g = jax.grad(lambda t: jnp.sum(layer1(t).einsum("...z,zab->...ab", x, dtype=jnp.float32)
                                 ** 2))(t)
  assert float(jnp.abs(g["layers_0"]["q_proj"]["kernel"]["lora_b"]).max()) > 0
  merged, report = lora.merge_and_requantize(p)
  mk = merged["layers_0"]["q_proj"]["kernel"]
  assert isinstance(mk, PackedKernel) and mk.bits == 4 and mk.scale.shape == k0.scale.shape
  target = deq + np.asarray(k.delta("a"))
  err = np.linalg.norm(np.asarray(mk.dequantize()) - target) / np.linalg.norm(target)
  rep = report["layers_0/q_proj/kernel"]
  assert 0 < rep["rel_weight"] < 0.2 and abs(rep["rel_weight"] - err) < 1e-5 * max(err, 1)
  assert rep["rel_update"] > rep["rel_weight"]  # the update is smaller than the weight


MOE = ModelConfig(model_type="deepseek_v2", vocab_size=64, hidden_size=32, intermediate_size=48,
                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                  attention_type="mla", kv_lora_rank=8, q_lora_rank=8, qk_nope_head_dim=8,
                  qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4, n_shared_experts=1,
                  num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1)


@pytest.mark.slow
@pytest.mark.parametrize("matmul", ["padded_einsum", "dense_mask"])
def test_moe_mla_model_per_expert_adapters(matmul):
  mc = MOE.replace(moe_matmul=matmul)
  params = lm.init(mc, jax.random.key(0))
  f = jax.jit(lambda p: lm.apply(mc, p, TOK))
  y0 = f(params)
  cfg = lora.LoraConfig(target_modules="all-linear", r=2, lora_alpha=4)
  p = lora.add_adapter(params, "a", cfg, jax.random.key(1))
  names = set(lora.lora_kernels(p))
  assert "layers_1/block/mlp/experts/gate_proj" in names
  assert "layers_0/block/self_attn/kv_a_proj_with_mqa/kernel" in names
  assert "layers_1/block/mlp/gate/kernel" not in names  # the router stays plain
  ek = p["layers_1"]["block"]["mlp"]["experts"]["down_proj"]
  assert ek.adapters["a"]["lora_a"].shape == (1, 4, 16, 2)  # [L, E, F, r]: one per expert
  np.testing.assert_allclose(f(p), y0, rtol=1e-5, atol=1e-5)
  p = randomize(p, std=0.5)
  y = f(p)
  assert float(jnp.abs(y - y0).max()) > 1e-3
  np.testing.assert_allclose(f(lora.merge_and_unload(p)), y, rtol=1e-4, atol=1e-4)
  # Only expert 0's adapter changes: the merged weights differ on expert 0 alone.
  t, fr = lora.split_trainable(p)
  t2 = jax.tree.map(lambda x: x, t)
  b = t2["layers_1"]["block"]["mlp"]["experts"]["down_proj"]["lora_b"]
  t2["layers_1"]["block"]["mlp"]["experts"]["down_proj"]["lora_b"] = b.at[:, 0].add(1.0)
  w1 = lora.merge_and_unload(p)["layers_1"]["block"]["mlp"]["experts"]["down_proj"]
  w2 = lora.merge_and_unload(lora.combine(t2, fr))["layers_1"]["block"]["mlp"]["experts"][
      "down_proj"]
  diff = np.abs(np.asarray(w1 - w2)).reshape(1, 4, -1).max(-1)[0]
  assert diff[0] > 0 and not diff[1:].any()


def _lora_sweep_module():
  import importlib.util
  import os
  path = os.path.join(os.path.dirname(__file__), "..", "scripts", "lora_sweep.py")
  spec = importlib.util.spec_from_file_location("lora_sweep", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_lora_sweep_split_and_trainable_fraction():
  """The issue-7 experiment: train/dev/test pieces are disjoint and cover the domain; r = 8 on
  every linear layer but the routed experts is <= 1% of the model's parameters."""
  from ds_jax.config import model_config
  s = _lora_sweep_module()
  docs = {"a": "x" * 5000, "b": "y" * 700, "c": "".join(map(chr, range(65, 91))) * 200}
  train, dev, test = s.split_pieces(docs, piece=512)
  assert sorted("".join(train + dev + test)) == sorted("".join(docs.values()))
  assert sum(map(len, train + dev + test)) == sum(map(len, docs.values()))
  assert len(test) == round(0.2 * len(train + dev + test)) and dev and train
  assert s.split_pieces(docs, piece=512) == (train, dev, test)  # fixed, seed-independent
  cfg, _ = s.load_experiment("adapt")
  shapes = jax.eval_shape(lambda k: lm.init(model_config(cfg.model), k), jax.random.key(0))
  adapted = jax.eval_shape(  # abstract: tracing add_adapter is enough to count
      lambda p: lora.add_adapter(p, "a", lora.LoraConfig(r=8, **s.TARGETS[s.MAIN_TARGET]),
                                 jax.random.key(0)), shapes)
  kernels = lora.lora_kernels(adapted)
  n_total = sum(x.size for x in jax.tree.leaves(shapes))
  n_adapter = sum(x.size for k in kernels.values() for x in jax.tree.leaves(k.adapters))
  assert n_total == 7_755_776 and n_adapter == 67_584  # the numbers in docs/lora.md
  assert n_adapter / n_total <= 0.01
  assert not any("/experts/" in p for p in kernels)
  assert any("shared_experts" in p for p in kernels) and any("o_proj" in p for p in kernels)
  # The expert-shared variant: one A, B per routed-expert weight (+ per-expert gains), 0.30%.
  trainable = jax.eval_shape(lambda p: lora.split_trainable(lora.add_adapter(
      p, "a", lora.LoraConfig(r=8, **s.TARGETS["experts-shared"]), jax.random.key(0)))[0],
      shapes)
  assert sum(x.size for x in jax.tree.leaves(trainable)) == 3 * 3 * (8 * (128 + 192) + 32)
  assert trainable["layers_1"]["block"]["mlp"]["experts"]["up_proj"]["lora_a"].shape == (3, 128, 8)
  # Round-3 variants (docs/lora.md): the counts in the docs, all <= 1%; `parts` adds one adapter
  # made of several configs (DoRA's per-expert magnitude only on down_proj).
  lc = cfg.lora
  counts = {t: sum(x.size for x in jax.tree.leaves(jax.eval_shape(
      lambda p: s.adapter_partition(p, lc, dict(r=8, **s.TARGETS[t]), 0)[0], shapes)))
      for t in ("experts-shared-dora", "attn+experts-shared-dora-down",
                "all-but-experts+lm_head")}
  assert counts == {"experts-shared-dora": 3 * 3 * 8 * (128 + 192) + 3 * 32 * (192 + 192 + 128),
                    "attn+experts-shared-dora-down": 64_512,
                    "all-but-experts+lm_head": 67_584 + 8 * (128 + 259)}
  assert max(counts.values()) / n_total <= 0.01


def _assert_expert_outputs(k, x, weight, tol):
  """Both expert equations of a stacked expert kernel k [S, E, D, F], per layer s and expert e,
  equal x_e @ weight(s, e)."""
  for s in range(k.shape[0]):
    ks = jax.tree.map(lambda v: v[s], k)
    y1 = np.asarray(ks.einsum("ecd,edf->ecf", x, dtype=jnp.float32))
    y2 = np.asarray(ks.einsum("nd,edf->enf", x[0], dtype=jnp.float32))
    for e in range(x.shape[0]):
      we = weight(s, e)
      np.testing.assert_allclose(y1[e], np.asarray(x[e]) @ we, rtol=tol, atol=tol)
      np.testing.assert_allclose(y2[e], np.asarray(x[0]) @ we, rtol=tol, atol=tol)


def test_shared_expert_adapter():
  """expert_mode="shared": one A, B per stacked expert weight added to every expert (with
  per-expert gains g_e, ΔW_e = s·A·diag(g_e)·B); formula per expert, trainable count, tied gradient, zero-B identity,
  merge == unmerged, save / load round trip storing one copy."""
  import tempfile
  rng = np.random.default_rng(5)
  s_, e_, d, f, r = 2, 3, 4, 5, 2
  w = rng.normal(size=(s_, e_, d, f)).astype(np.float32)
  params = {"layers_1": {"mlp": {"experts": {"down_proj": jnp.asarray(w)},
                                 "o_proj": {"kernel": jnp.zeros((s_, d, f))}}}}
  cfg = lora.LoraConfig(target_modules="all-linear", r=r, lora_alpha=4, expert_mode="shared",
                        expert_scale="rank")
  p = lora.add_adapter(params, "s", cfg, jax.random.key(0))
  k = p["layers_1"]["mlp"]["experts"]["down_proj"]
  x = jnp.asarray(rng.normal(size=(e_, 6, d)), jnp.float32)
  k0 = jax.tree.map(lambda v: v[0], k)
  np.testing.assert_array_equal(k0.einsum("ecd,edf->ecf", x, dtype=jnp.float32),
                                jnp.einsum("ecd,edf->ecf", x, w[0]))  # B = 0: identity
  t, fr = lora.split_trainable(p)
  te = t["layers_1"]["mlp"]["experts"]["down_proj"]
  assert te["lora_a"].shape == (s_, d, r) and te["lora_b"].shape == (s_, r, f)
  assert te["expert_scale"].shape == (s_, e_, r)
  # shared: S·r·(D+F) + S·E·r (gains) per expert weight; o_proj per weight as usual.
  assert lora.count_params(p)["trainable"] == 2 * (s_ * r * (d + f)) + s_ * e_ * r
  t = _noise(t, jax.random.key(1), 0.5)
  p2 = lora.combine(t, fr)
  a, b, g = (np.asarray(t["layers_1"]["mlp"]["experts"]["down_proj"][n])
             for n in ("lora_a", "lora_b", "expert_scale"))
  k2 = p2["layers_1"]["mlp"]["experts"]["down_proj"]
  _assert_expert_outputs(  # scale = alpha / r = 2
      k2, x, lambda s, e: w[s, e] + 2.0 * a[s] @ np.diag(g[s, e]) @ b[s], 1e-5)
  merged = lora.merge(p2)["layers_1"]["mlp"]["experts"]["down_proj"]
  np.testing.assert_allclose(  # merged == unmerged
      jax.tree.map(lambda v: v[1], merged).einsum("ecd,edf->ecf", x, dtype=jnp.float32),
      jax.tree.map(lambda v: v[1], k2).einsum("ecd,edf->ecf", x, dtype=jnp.float32),
      rtol=1e-5, atol=1e-5)

  def loss(t):
    kk = jax.tree.map(lambda v: v[0], lora.combine(t, fr)["layers_1"]["mlp"]["experts"][
        "down_proj"])
    return jnp.sum(kk.einsum("ecd,edf->ecf", x, dtype=jnp.float32) ** 2)
  gr = jax.grad(loss)(t)["layers_1"]["mlp"]["experts"]["down_proj"]
  # The gradient of the shared A is the sum of the per-expert gradients.
  def per_expert(a_e):
    out = 0.0
    for e in range(e_):
      we = w[0, e] + 2.0 * a_e[e] @ jnp.diag(g[0, e]) @ b[0]
      out = out + jnp.sum((x[e] @ we) ** 2)
    return out
  ga = jax.grad(per_expert)(jnp.broadcast_to(jnp.asarray(a[0]), (e_, d, r)))
  np.testing.assert_allclose(gr["lora_a"][0], ga.sum(0), rtol=1e-4, atol=1e-4)
  with tempfile.TemporaryDirectory() as tmp:
    lora.save_adapter(tmp, p2, "s")
    from safetensors.numpy import load_file
    saved = load_file(f"{tmp}/adapter_model.safetensors")
    assert saved["layers_1/mlp/experts/down_proj.lora_a"].shape == (s_, d, r)  # one copy
    q = lora.load_adapter(tmp, params)
  for u, v in zip(jax.tree.leaves(q), jax.tree.leaves(p2)):
    np.testing.assert_array_equal(u, v)
  with pytest.raises(ValueError, match="shared"):
    lora.trainable_mask(p2)
  with pytest.raises(ValueError, match="expert_mode"):
    lora.LoraConfig(expert_mode="tied")
  with pytest.raises(ValueError, match="expert_scale"):
    lora.LoraConfig(expert_scale="expert")  # needs expert_mode="shared"


def test_shared_expert_dora_in_parts():
  """Tied expert A, B with DoRA: the magnitude stays per expert (E·F trainable per weight) and
  every expert computes x·m_e·(W_e + sAB)/||W_e + sAB||_col; an adapter added in two parts
  (different LoraConfigs on disjoint weights, as the sweep's `parts`) saves each kernel's own
  config and loads back bit-exactly."""
  import tempfile
  rng = np.random.default_rng(7)
  s_, e_, d, f, r = 2, 3, 4, 5, 2
  w = rng.normal(size=(s_, e_, d, f)).astype(np.float32)
  wo = rng.normal(size=(s_, d, f)).astype(np.float32)
  params = {"layers_1": {"mlp": {"experts": {"down_proj": jnp.asarray(w)},
                                 "o_proj": {"kernel": jnp.asarray(wo)}}}}
  p = lora.add_adapter(params, "a", lora.LoraConfig(
      target_modules=["experts"], r=r, lora_alpha=4, expert_mode="shared", use_dora=True),
      jax.random.key(0))
  p = lora.add_adapter(p, "a", lora.LoraConfig(target_modules=["o_proj"], r=r, lora_alpha=4),
                       jax.random.key(1))
  x = jnp.asarray(rng.normal(size=(e_, 6, d)), jnp.float32)
  k0 = jax.tree.map(lambda v: v[0], p["layers_1"]["mlp"]["experts"]["down_proj"])
  np.testing.assert_allclose(k0.einsum("ecd,edf->ecf", x, dtype=jnp.float32),
                             jnp.einsum("ecd,edf->ecf", x, w[0]), rtol=1e-5, atol=1e-5)
  t, fr = lora.split_trainable(p)
  te = t["layers_1"]["mlp"]["experts"]["down_proj"]
  assert te["lora_a"].shape == (s_, d, r) and te["magnitude"].shape == (s_, e_, f)
  assert lora.count_params(p)["trainable"] == 2 * s_ * r * (d + f) + s_ * e_ * f
  t = _noise(t, jax.random.key(2), 0.5)
  p2 = lora.combine(t, fr)
  a, b, m = (np.asarray(t["layers_1"]["mlp"]["experts"]["down_proj"][n])
             for n in ("lora_a", "lora_b", "magnitude"))
  k2 = p2["layers_1"]["mlp"]["experts"]["down_proj"]

  def dora(s, e):  # m_e · (W_e + sAB) / ||W_e + sAB||_col, scale = alpha / r = 2
    wc = w[s, e] + 2.0 * a[s] @ b[s]
    return m[s, e] * wc / np.linalg.norm(wc, axis=0)
  _assert_expert_outputs(k2, x, dora, 1e-4)
  with tempfile.TemporaryDirectory() as tmp:
    lora.save_adapter(tmp, p2, "a")
    q = lora.load_adapter(tmp, params)
  ko = q["layers_1"]["mlp"]["o_proj"]["kernel"]
  assert not ko.config("a").use_dora and ko.config("a").expert_mode == "per_expert"
  assert q["layers_1"]["mlp"]["experts"]["down_proj"].config("a").use_dora
  for u, v in zip(jax.tree.leaves(q), jax.tree.leaves(p2)):
    np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("mode", ["per_expert", "shared"])
def test_count_params_on_abstract_full_size_model(mode):
  """Counting an adapter on a full-size model without allocating it (jax.eval_shape), for both
  expert modes: equal to r·(D+F) summed by hand over DeepSeek-V2-Lite's linear layers."""
  from ds_jax import config as cfglib
  from ds_jax.analysis.params import abstract_params
  mc = cfglib.model_config(cfglib.load_config("experiments/deepseek_v2_lite.py").model)
  params = abstract_params(mc)
  cfg = lora.LoraConfig(target_modules="all-linear", r=8, lora_alpha=16, expert_mode=mode)
  p = jax.eval_shape(lambda q: lora.add_adapter(q, "a", cfg, jax.random.key(0)), params)
  c = lora.count_params(p)
  d, h = mc.hidden_size, mc.num_attention_heads
  attn = ((d, h * (mc.qk_nope_head_dim + mc.qk_rope_head_dim)),
          (d, mc.kv_lora_rank + mc.qk_rope_head_dim),
          (mc.kv_lora_rank, h * (mc.qk_nope_head_dim + mc.v_head_dim)), (h * mc.v_head_dim, d))
  mlp = lambda f: 2 * (d + f) + (f + d)  # gate, up (D -> F), down (F -> D): r·(D+F) each
  n_moe = mc.num_hidden_layers - mc.first_k_dense_replace
  experts = mc.n_routed_experts if mode == "per_expert" else 1
  per_r = (mc.num_hidden_layers * sum(i + o for i, o in attn)
           + mc.first_k_dense_replace * mlp(mc.intermediate_size)
           + n_moe * mlp(mc.n_shared_experts * mc.moe_intermediate_size)
           + n_moe * experts * mlp(mc.moe_intermediate_size))
  assert c["trainable"] == 8 * per_r
  assert c["base"] == sum(a.size for a in jax.tree.leaves(params))
  if mode == "per_expert":  # r = 8 on every linear layer, one adapter per routed expert: < 1%
    assert 0.009 < c["trainable"] / c["base"] < 0.0095


@pytest.mark.slow
@pytest.mark.parametrize("matmul", ["auto", "dense_mask"])
def test_moe_mla_model_shared_expert_adapter(matmul):
  """expert_mode="shared" through the MoE dispatch (the experts' gather sees A, B broadcast over
  experts): zero-B identity, merged == unmerged, and every expert gets the same ΔW."""
  mc = MOE.replace(moe_matmul=matmul)
  params = lm.init(mc, jax.random.key(0))
  f = jax.jit(lambda p: lm.apply(mc, p, TOK))
  y0 = f(params)
  cfg = lora.LoraConfig(target_modules=["experts"], r=2, lora_alpha=4, expert_mode="shared",
                        expert_scale="expert")
  p = lora.add_adapter(params, "a", cfg, jax.random.key(1))
  np.testing.assert_allclose(f(p), y0, rtol=1e-5, atol=1e-5)
  assert lora.count_params(p)["trainable"] == 3 * (2 * (32 + 16) + 4)  # gate, up, down
  p = randomize(p, std=0.5)
  y = f(p)
  assert float(jnp.abs(y - y0).max()) > 1e-3
  np.testing.assert_allclose(f(lora.merge_and_unload(p)), y, rtol=1e-4, atol=1e-4)
  t, _ = lora.split_trainable(p)
  g = t["layers_1"]["block"]["mlp"]["experts"]["down_proj"]["expert_scale"]  # [L, E, 1]
  w0 = params["layers_1"]["block"]["mlp"]["experts"]["down_proj"]
  dw = lora.merge_and_unload(p)["layers_1"]["block"]["mlp"]["experts"]["down_proj"] - w0
  dw = np.asarray(dw / g[..., None])  # ΔW_e / g_e: the same for every expert
  np.testing.assert_allclose(dw, np.broadcast_to(dw[:, :1], dw.shape), rtol=1e-4, atol=1e-5)
