"""scripts/quant_quality.py: paired gap recovery, table; the whole protocol on a smoke config."""

import importlib.util
import json
import os

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def _script():
  spec = importlib.util.spec_from_file_location(
      "quant_quality", os.path.join(ROOT, "scripts", "quant_quality.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _rows():
  # seed 0: gap 0.2, QAT at 10.05 -> 75%; seed 1: gap 0.1, QAT worse than PTQ -> -50%.
  rows = []
  for seed, (f, p, q) in enumerate([(10.0, 10.2, 10.05), (9.0, 9.1, 9.15)]):
    rows += [dict(seed=seed, method="float32", ppl=f, losses=[1.0] * 12),
             dict(seed=seed, method="PTQ W4 g128", ppl=p, packed_ppl=p),
             dict(seed=seed, method="QAT W4 g128", ppl=q, packed_ppl=q, losses=[1.0] * 12)]
  return rows


def test_recovery_is_paired_per_seed():
  qq = _script()
  rec = qq.recoveries(_rows(), "QAT W4 g128")
  assert rec == pytest.approx([0.75, -0.5])
  t = qq.table(_rows())
  assert "75.0%, -50.0%" in t and "| 12.5% |" in t  # mean of the per-seed recoveries


def test_experiment_variants():
  qq = _script()
  ft = qq.experiment("qat_lsq,finetune")
  assert ft.quant.enabled and ft.quant.calibration == "lsq" and ft.quant.start_step == 0
  # phase 2: every arm decays the same lr to 0 over the same steps, no warmup
  assert ft.optimizer.schedule == "cosine" and ft.optimizer.min_lr_ratio == 0.0
  assert ft.optimizer.warmup_steps == 0 and ft.steps == 300
  fl = qq.experiment("float,finetune")
  assert not fl.quant.enabled and fl.optimizer.to_dict() == ft.optimizer.to_dict()
  assert qq.experiment("qat_mse,finetune").quant.calibration == "mse"
  assert qq.experiment("qat,finetune").quant.calibration == "absmax"
  w4a8 = qq.experiment("qat_w4a8,finetune").quant
  assert w4a8.calibration == "mse" and w4a8.act_bits == 8
  old = qq.experiment("qat,finetune,steps=100,schedule=constant")  # the earlier protocol
  assert old.steps == 100 and old.optimizer.schedule == "constant"
  with pytest.raises(ValueError):
    qq.experiment("qat,finetune,schedule=wsd")
  with pytest.raises(ValueError):
    qq.experiment("qat,finetune,lr=1")


@pytest.mark.slow
def test_smoke_protocol(tmp_path, monkeypatch):
  qq = _script()
  monkeypatch.setattr("sys.argv", ["quant_quality.py", "--smoke", "--seeds", "0",
                                   "--out", str(tmp_path)])
  qq.main()
  rows = [json.loads(x) for x in open(tmp_path / "results.jsonl")]
  by = {r["method"]: r for r in rows}
  for m in ("PTQ W4 g128", "PTQ W4 g128 MSE", "QAT W4 g128 MSE", "QAT W4 g128 absmax",
            "QAT W4A8 g128 MSE", "QAT W4 g128 LSQ"):
    assert by[m]["packed_ppl"] == pytest.approx(by[m]["ppl"], rel=1e-4)
  # phase 2 starts every variant from the same weights and batch: only fake quant differs
  assert by["QAT W4 g128 MSE"]["first_loss"] != by["float32"]["first_loss"]
  assert abs(by["QAT W4 g128 MSE"]["first_loss"] - by["float32"]["first_loss"]) < 0.1
  assert (tmp_path / "ppl.png").exists()
