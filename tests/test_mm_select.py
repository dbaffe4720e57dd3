"""scripts/mm_select.py: the round-3/4 selection rule on fake validation runs (no training)."""

import importlib.util
import json
import os

_SPEC = importlib.util.spec_from_file_location(
    "mm_select", os.path.join(os.path.dirname(__file__), "..", "scripts", "mm_select.py"))
mm_select = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(mm_select)


def _write(root, name, seed, i2t, a2t, i2a, a2i):
  d = os.path.join(root, name, "softmax", f"seed{seed}")
  os.makedirs(d)
  with open(os.path.join(d, "eval.json"), "w") as f:
    json.dump({"zeroshot_image_text": i2t, "zeroshot_audio_text": a2t, "R@1_image_audio": i2a,
               "R@1_audio_image": a2i}, f)


def test_three_seeds_margin_guard_and_unfinished(tmp_path, capsys):
  root = str(tmp_path)
  for s in range(3):
    _write(root, "base", s, 0.96, 0.86, 0.94, 0.84)
    _write(root, "better", s, 0.96, 0.88, 0.95, 0.86)     # score +1.67: passes
    _write(root, "small", s, 0.96, 0.87, 0.94, 0.85)      # +0.67: below the 1-point margin
    _write(root, "img_drop", s, 0.94, 0.90, 0.96, 0.88)   # +3.3 but image->text -2: fails guard
  _write(root, "half", 0, 0.99, 0.99, 0.99, 0.99)         # one seed only: not judged
  assert mm_select.main(["--root", root, "--seeds", "0,1,2"]) == 0
  out = capsys.readouterr().out
  assert "| better |" in out and "| small |" in out and "| img_drop |" in out
  passing = [l for l in out.splitlines() if l.startswith("passing")][0]
  assert passing.endswith(": better")
  assert "unfinished (not judged): half (seeds finished: 0)" in out
  assert "| half |" not in out


def test_missing_base_seed_is_an_error(tmp_path, capsys):
  root = str(tmp_path)
  _write(root, "base", 0, 0.9, 0.9, 0.9, 0.9)
  assert mm_select.main(["--root", root, "--seeds", "0,1"]) == 1
  assert "base 'base' not finished" in capsys.readouterr().out
