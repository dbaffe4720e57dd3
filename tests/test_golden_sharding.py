"""Golden sharding test: the compiled train step of the tiny MoE on a (data=2, expert=2, tensor=2)
mesh keeps its parameter shardings and its collectives (expert all-to-alls, data-parallel
reductions) as checked in under tests/golden/.

An edit that replicates the experts, drops expert parallelism or changes which mesh axes the
gradients are reduced over changes this fingerprint and fails here. After an intended change,
regenerate and review the diff:

  DS_JAX_UPDATE_GOLDEN=1 python -m pytest tests/test_golden_sharding.py -q
  git diff tests/golden/
"""

import collections
import json
import os
import re

import jax
import numpy as np
import pytest

from ds_jax import config as cfglib
from ds_jax import sharding as shd
from ds_jax.train import Trainer
from tests.helpers import REPO

GOLDEN = os.path.join(REPO, "tests", "golden", "tiny_moe_data2_expert2_tensor2.json")
OVERRIDES = ["mesh.data=2", "mesh.fsdp=1", "mesh.expert=2", "mesh.tensor=2", "seq_len=32",
             "batch_size=8"]
COLLECTIVES = ("all-to-all", "all-reduce", "reduce-scatter", "all-gather", "collective-permute")
_OP = re.compile(r"= .*? (" + "|".join(COLLECTIVES) + r")(?:-start)?\((.*)$")


def _iota(dims: list[int], perm: list[int] | None) -> np.ndarray:
  ids = np.arange(int(np.prod(dims))).reshape(dims)
  return ids.transpose(perm) if perm else ids


def _ints(text: str) -> list[int]:
  return [int(t) for t in re.findall(r"\d+", text)]


def replica_groups(attrs: str) -> list[list[int]]:
  """Device groups of one HLO collective, from any of XLA's three replica_groups spellings."""
  m = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", attrs)
  if m:  # explicit: {{0,2},{1,3}}
    return [_ints(g) for g in re.findall(r"\{([\d,]*)\}", m.group(1))]
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attrs)
  if m:  # iota: [groups, size] <= [dims] T(perm)
    ids = _iota(_ints(m.group(3)), _ints(m.group(4)) if m.group(4) else None)
    return ids.reshape(int(m.group(1)), int(m.group(2))).tolist()
  m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[([\d,]+)\]"
                r"(?:T\(([\d,]+)\))?\))? \{([^}]*)\}", attrs)
  if m:  # mesh: mesh['axis_0'=4,...] [device_ids=([dims]T(perm))] {'axis_0', ...}
    names = re.findall(r"'(\w+)'=\d+", m.group(1))
    sizes = [int(s) for s in re.findall(r"'\w+'=(\d+)", m.group(1))]
    ids = (_iota(_ints(m.group(2)), _ints(m.group(3)) if m.group(3) else None)
           if m.group(2) else np.arange(int(np.prod(sizes))))
    ids = ids.reshape(sizes)
    over = [names.index(a) for a in re.findall(r"'(\w+)'", m.group(4))]
    rest = [i for i in range(len(sizes)) if i not in over]
    return ids.transpose(rest + over).reshape(-1, int(np.prod([sizes[i] for i in over]))
                                              ).tolist()
  m = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", attrs)
  if m:
    return [_ints(p) for p in re.findall(r"\{(\d+,\d+)\}", m.group(1))]
  raise ValueError(f"cannot parse the device groups of: {attrs[:200]}")


def collective_fingerprint(hlo: str, mesh) -> dict[str, int]:
  """{"<op> over <mesh axes>": count} for every collective in a compiled HLO module's text."""
  coords = {int(d.id): c for c, d in np.ndenumerate(mesh.devices)}
  out = collections.Counter()
  for line in hlo.splitlines():
    m = _OP.search(line.split(", metadata=")[0])
    if not m:
      continue
    axes = set()
    for group in replica_groups(m.group(2)):
      pts = np.array([coords[i] for i in group])
      axes |= {mesh.axis_names[a] for a in range(pts.shape[1]) if len(set(pts[:, a])) > 1}
    names = "+".join(a for a in mesh.axis_names if a in axes) or "none"
    out[f"{m.group(1)} over {names}"] += 1
  return dict(sorted(out.items()))


@pytest.fixture(scope="module")
def compiled():
  cfg = cfglib.load_config(os.path.join(REPO, "experiments/tiny_moe.py:smoke"), OVERRIDES)
  mc = cfglib.validate(cfg, jax.device_count())
  mesh = shd.make_mesh(cfglib.mesh_shape(cfg, jax.device_count()))
  trainer = Trainer(cfg, mc, mesh)
  batch = {k: jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), dt, sharding=trainer.batch_sh)
           for k, dt in (("inputs", np.int32), ("targets", np.int32), ("weights", np.float32))}
  with jax.set_mesh(mesh):
    hlo = trainer.train_step.lower(trainer.abstract_state, batch).compile().as_text()
  params = {jax.tree_util.keystr(p): str(tuple(s.spec))
            for p, s in jax.tree_util.tree_flatten_with_path(trainer.param_sh)[0]}
  return {"params": params, "collectives": collective_fingerprint(hlo, mesh)}


def test_parse_replica_group_spellings():
  assert replica_groups("x, replica_groups={{0,2},{1,3}}, y") == [[0, 2], [1, 3]]
  assert replica_groups("replica_groups=[2,2]<=[2,2]T(1,0), d") == [[0, 2], [1, 3]]
  assert replica_groups("replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_0'}, u") == [
      [0, 2], [1, 3]]
  assert replica_groups("replica_groups=mesh['axis_0'=2,'axis_1'=2], device_ids=([2,2]T(1,0)) "
                        "{'axis_1'}, u") == [[0, 2], [1, 3]]


def test_matches_golden(compiled):
  if os.environ.get("DS_JAX_UPDATE_GOLDEN"):
    os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
    with open(GOLDEN, "w") as f:
      json.dump(compiled, f, indent=1, sort_keys=True)
      f.write("\n")
  with open(GOLDEN) as f:
    golden = json.load(f)
  assert compiled["params"] == golden["params"], "parameter shardings changed"
  assert compiled["collectives"] == golden["collectives"], (
      "collectives of the compiled train step changed:\n"
      f"now    {compiled['collectives']}\ngolden {golden['collectives']}")


def test_expert_parallelism_present(compiled):
  """The invariants behind the golden file, stated directly (clearer failure messages)."""
  experts = {k: v for k, v in compiled["params"].items() if "['experts']" in k}
  assert experts and all("'expert'" in v for v in experts.values()), experts
  coll = compiled["collectives"]
  assert coll.get("all-to-all over expert", 0) >= 4, coll  # dispatch + return, forward + backward
  assert not any(k.startswith("all-to-all") and k != "all-to-all over expert" for k in coll), coll
  # Data parallelism: gradients are reduced over the data axis.
  assert any(k.startswith(("all-reduce", "reduce-scatter")) and "data" in k for k in coll), coll
