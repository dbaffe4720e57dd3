"""Streaming conversion: peak RSS of HF -> ds_jax (and back) on a synthetic multi-shard checkpoint
stays within 1.5x the largest shard plus the output (scripts/bench_convert_memory.py)."""

from __future__ import annotations

import importlib.util
import os

import pytest

from tests.helpers import REPO


@pytest.mark.slow  # writes ~190 MB and runs three converter subprocesses
def test_peak_rss_within_budget(tmp_path):
  spec = importlib.util.spec_from_file_location(
      "bench_convert_memory", os.path.join(REPO, "scripts", "bench_convert_memory.py"))
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  results = {r["mode"]: r for r in bench.main(["--experts", "16", "--shard-mb", "40",
                                               "--dir", str(tmp_path)])}
  assert results["load"]["shards"] > 1
  assert results["load"]["within_budget"], results["load"]
  assert results["save"]["within_budget"], results["save"]
  # Device arrays: one extra copy of the largest ds_jax parameter while it is transferred.
  jx = results["load_jax"]
  assert jx["peak_above_baseline_mb"] <= jx["output_mb"] + 2 * jx["largest_shard_mb"], jx
