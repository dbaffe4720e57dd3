"""Invalid configurations and inputs through the CLI: one line naming the field or file and what
is allowed, exit code 2, no traceback, and an existing workdir left untouched.

Most cases run in-process (`ds_jax.cli.main` with capsys; nothing compiles before validation);
one runs the real command in a subprocess to check the exit code and stderr end to end.
"""

import json
import os

import pytest

from ds_jax import cli
from ds_jax.checkpoint import write_config
from ds_jax.config import load_config
from tests.helpers import run_cli

MOE = "experiments/tiny_moe.py:smoke"
LM = "experiments/tiny_lm.py:smoke"

# (experiment, overrides, text that must appear in the one line)
CASES = [
    (MOE, ["model.num_experts_per_tok=9"], ["model.num_experts_per_tok", "n_routed_experts=8"]),
    (MOE, ["model.n_routed_experts=6", "mesh.data=2", "mesh.expert=4"],
     ["model.n_routed_experts", "mesh.expert"]),
    (LM, ["model.hidden_size=130"], ["model.hidden_size", "num_attention_heads"]),
    (LM, ["model.num_key_value_heads=3"], ["model.num_key_value_heads", "must divide"]),
    (MOE, ["mesh.data=3"], ["config.mesh", "device count 8"]),
    (MOE, ["mesh.data=-1", "mesh.expert=-1"], ["mesh.expert", "at most one"]),
    (MOE, ["mesh.expert=0"], ["mesh.expert", "positive"]),
    (MOE, ["mesh.data=1", "mesh.tensor=8"], ["mesh.tensor", "num_attention_heads"]),
    (MOE, ["model.topk_method=group_limited_greedy", "model.n_group=4", "model.topk_group=5"],
     ["model.topk_group", "n_group=4"]),
    (MOE, ["model.n_group=3"], ["model.n_group", "divide n_routed_experts"]),
    (MOE, ["model.topk_method=noaux_tc"], ["model.scoring_func", "sigmoid"]),
    (MOE, ["model.scoring_func=relu"], ["model.scoring_func", "softmax, sigmoid"]),
    (MOE, ["model.max_devices_per_token=3", "mesh.data=4", "mesh.expert=2"],
     ["model.max_devices_per_token", "mesh.expert=2"]),
    (MOE, ["model.n_routed_expert=4"], ["model.n_routed_expert", "n_routed_experts"]),
    (MOE, ["model.n_routed_experts=eight"], ["model.n_routed_experts", "expected an int"]),
    (MOE, ["model.norm_topk_prob=maybe"], ["model.norm_topk_prob", "bool"]),
    (MOE, ["model=3"], ["model", "is a section"]),
    (MOE, ["optimizer.learning_rate=-1e-3"], ["optimizer.learning_rate", "> 0"]),
    (MOE, ["optimizer.min_lr_ratio=2"], ["optimizer.min_lr_ratio", "[0, 1]"]),
    (MOE, ["optimizer.schedule=triangle"], ["optimizer.schedule", "cosine"]),
    (MOE, ["optimizer.accumulation_steps=3"], ["optimizer.accumulation_steps", "batch_size"]),
    (MOE, ["batch_size=6"], ["batch_size", "divisible"]),
    (MOE, ["steps=0"], ["steps", "> 0"]),
    (MOE, ["seq_len=4096"], ["seq_len", "max_position_embeddings", "rope_scaling"]),
    (MOE, ["model.kv_lora_rank=0"], ["model.kv_lora_rank", "> 0"]),
    (MOE, ["model.qk_rope_head_dim=15"], ["model.qk_rope_head_dim", "even"]),
    (MOE, ["model.dtype=float16"], ["model.dtype", "bfloat16"]),
    (MOE, ["model.vocab_size=100"], ["model.vocab_size", "259"]),
    (MOE, ["data.tokenizer=sentencepiece"], ["data.tokenizer", "byte"]),
    (MOE, ["data.source=files", "data.path=/nonexistent/corpus/*.txt"],
     ["data.path", "/nonexistent/corpus"]),
    (MOE, ["checkpoint.keep=0"], ["checkpoint.keep", "> 0"]),
]


def _snapshot(root) -> dict:
  """path -> (mtime_ns, bytes) of every file under root."""
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      p = os.path.join(d, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, root)] = (os.stat(p).st_mtime_ns, fh.read())
  return out


@pytest.fixture(scope="module")
def existing_workdir(tmp_path_factory):
  """A workdir of the tiny MoE with a (stand-in) checkpoint, which no failed run may touch."""
  w = tmp_path_factory.mktemp("existing")
  write_config(str(w), load_config(MOE).to_dict())
  os.makedirs(w / "checkpoints" / "10" / "default")
  (w / "checkpoints" / "10" / "default" / "data").write_bytes(b"\x00" * 64)
  (w / "metrics.jsonl").write_text(json.dumps({"step": 10, "loss": 3.0}) + "\n")
  return w


def _one_line_error(capsys, rc):
  cap = capsys.readouterr()
  lines = cap.err.strip().splitlines()
  assert rc == 2, cap.err
  assert len(lines) == 1 and lines[0].startswith("error: "), cap.err
  assert "Traceback" not in cap.err + cap.out
  return lines[0]


@pytest.mark.parametrize("exp,overrides,expect", CASES,
                         ids=[",".join(c[1]) for c in CASES])
def test_invalid_config(exp, overrides, expect, capsys, existing_workdir):
  before = _snapshot(existing_workdir)
  rc = cli.main(["train", "--config", exp, *[f"--config.{o}" for o in overrides],
                 "--workdir", str(existing_workdir), "--no-progress"])
  line = _one_line_error(capsys, rc)
  for text in expect:
    assert text in line, line
  assert _snapshot(existing_workdir) == before


@pytest.mark.parametrize("argv,expect", [
    (["train", "--config", "experiments/no_such_experiment.py", "--workdir", "W"],
     ["no_such_experiment.py"]),
    (["train", "--config", "experiments/tiny_moe.py:huge", "--workdir", "W"], ["huge", "smoke"]),
    (["train", "--config", MOE], ["--workdir"]),
    (["train", "--config", MOE, "--workdir", "W", "--config.model.hidden_size"],
     ["model.hidden_size", "value"]),
    (["trian", "--config", MOE], ["trian", "train"]),
    (["eval", "--workdir", "{tmp}"], ["config.json"]),
])
def test_invalid_command_line(argv, expect, capsys, tmp_path):
  argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
  line = _one_line_error(capsys, cli.main(argv))
  for text in expect:
    assert text in line, line


def test_data_directory_without_text(capsys, tmp_path):
  """An existing but empty data directory is refused up front, not by a traceback later."""
  empty = tmp_path / "corpus"
  empty.mkdir()
  rc = cli.main(["train", "--config", MOE, "--config.data.source=files",
                 f"--config.data.path={empty}", "--workdir", str(tmp_path / "w"), "--no-progress"])
  line = _one_line_error(capsys, rc)
  assert "data.path" in line and str(empty) in line
  assert not (tmp_path / "w").exists()


def _other_model_workdir(tmp_path):
  w = tmp_path / "other"
  cfg = load_config(LM)  # a dense model: the MoE run below must refuse to resume it
  write_config(str(w), cfg.to_dict())
  os.makedirs(w / "checkpoints" / "20" / "default")
  (w / "checkpoints" / "20" / "default" / "data").write_bytes(b"\x01" * 64)
  return w


def test_workdir_of_another_model_in_process(capsys, tmp_path):
  w = _other_model_workdir(tmp_path)
  before = _snapshot(w)
  rc = cli.main(["train", "--config", MOE, "--workdir", str(w), "--no-progress"])
  line = _one_line_error(capsys, rc)
  assert str(w) in line and "another model" in line and "model." in line
  assert _snapshot(w) == before


def test_workdir_of_another_model_subprocess(tmp_path):
  w = _other_model_workdir(tmp_path)
  before = _snapshot(w)
  r = run_cli(["train", "--config", MOE, "--workdir", str(w), "--no-progress"])
  assert r.returncode == 2, r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
  assert "another model" in lines[0] and "--workdir" in lines[0]
  assert _snapshot(w) == before
