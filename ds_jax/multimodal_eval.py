"""Evaluation of a tri-modal model: Recall@1/5 in six directions, zero-shot per modality, plots,
and the `ds-jax zero-shot` command for folder-per-class audio / image data.

All embeddings are computed one modality at a time (`ds_jax.models.multimodal.encode`), so no
query ever sees its candidates. Hits are class-level: the digits set pairs items by class.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ds_jax.data import audio as A
from ds_jax.data import multimodal as D
from ds_jax.models import multimodal as mm
from ds_jax.models.encoders import tokenize_bytes

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


def embed(cfg: mm.MultimodalConfig, params: Any, modality: str, x: np.ndarray,
          batch: int = 256) -> np.ndarray:
  """Normalised embeddings of one modality in batches; audio is given as 16 kHz waveforms."""
  fn = _encoder(cfg, modality)
  out = [np.asarray(fn(params, jnp.asarray(x[i:i + batch]))) for i in range(0, len(x), batch)]
  return np.concatenate(out)


_ENCODERS: dict = {}


def _encoder(cfg, modality):
  key = (cfg, modality)
  if key not in _ENCODERS:
    def f(params, x):
      if modality == "audio":
        x = mm.audio_features(cfg, x)
      return mm.encode(cfg, params, modality, x)
    _ENCODERS[key] = jax.jit(f)
  return _ENCODERS[key]


def class_text_embeddings(cfg, params, class_prompts: Sequence[Sequence[str]],
                          text_len: int = 32) -> np.ndarray:
  """[C, E]: each class's prompt embeddings averaged, then renormalised (CLIP prompt ensemble)."""
  flat = [p for ps in class_prompts for p in ps]
  z = embed(cfg, params, "text", tokenize_bytes(flat, text_len))
  out, i = [], 0
  for ps in class_prompts:
    m = z[i:i + len(ps)].mean(0)
    out.append(m / np.linalg.norm(m))
    i += len(ps)
  return np.stack(out)


def recall_at_k(q_NxE: np.ndarray, q_labels: np.ndarray, g_MxE: np.ndarray,
                g_labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict:
  """Fraction of queries with a same-class item among their top-k gallery neighbours."""
  sim = q_NxE @ g_MxE.T
  top = np.argsort(-sim, axis=1)[:, :max(ks)]
  hit = g_labels[top] == q_labels[:, None]
  return {k: float(np.mean(hit[:, :k].any(1))) for k in ks}


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n: int = 10) -> np.ndarray:
  m = np.zeros((n, n), np.int64)
  np.add.at(m, (y_true, y_pred), 1)
  return m


def test_embeddings(cfg, params, data: D.DigitTri, text_len: int = 32) -> dict:
  texts = [t for c in range(10) for t in D.class_texts(c)]
  t_labels = np.repeat(np.arange(10), len(D.TEMPLATES))
  return {
      "image": (embed(cfg, params, "image", data.images), data.image_labels),
      "audio": (embed(cfg, params, "audio", data.audio), data.speech.labels),
      "text": (embed(cfg, params, "text", tokenize_bytes(texts, text_len)), t_labels),
      "prompts": class_text_embeddings(cfg, params, [D.class_texts(c) for c in range(10)],
                                       text_len)}


def evaluate(cfg, params, data: D.DigitTri, text_len: int = 32, return_raw: bool = False) -> dict:
  """Zero-shot accuracy (image / audio vs averaged class prompts) and R@1/5 in six directions."""
  e = test_embeddings(cfg, params, data, text_len)
  out: dict = {}
  raw = {}
  for m in ("image", "audio"):
    z, y = e[m]
    pred = np.argmax(z @ e["prompts"].T, 1)
    out[f"zeroshot_{m}_text"] = float(np.mean(pred == y))
    raw[m] = (y, pred)
  for a in ("image", "audio", "text"):
    for b in ("image", "audio", "text"):
      if a != b:
        r = recall_at_k(*e[a], *e[b])
        out[f"R@1_{a}_{b}"], out[f"R@5_{a}_{b}"] = r[1], r[5]
  if return_raw:
    return out, e, raw
  return out


def plot(e: dict, raw: dict, out_dir: str) -> list[str]:
  """Confusion matrices (zero-shot) and a 2-D PCA projection of all test embeddings."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  paths = []
  fig, axes = plt.subplots(1, 2, figsize=(9, 4))
  for ax, m in zip(axes, ("image", "audio")):
    y, p = raw[m]
    cm = confusion(y, p)
    ax.imshow(cm, cmap="Blues")
    for i in range(10):
      for j in range(10):
        if cm[i, j]:
          ax.text(j, i, cm[i, j], ha="center", va="center", fontsize=6)
    ax.set(title=f"{m} -> text zero-shot ({np.mean(y == p):.1%})", xlabel="predicted",
           ylabel="true", xticks=range(10), yticks=range(10))
  paths.append(os.path.join(out_dir, "confusion.png"))
  fig.tight_layout()
  fig.savefig(paths[-1], dpi=120)
  plt.close(fig)
  zs = np.concatenate([e[m][0] for m in ("image", "audio", "text")])
  mu = zs.mean(0)
  _, _, vt = np.linalg.svd(zs - mu, full_matrices=False)
  fig, ax = plt.subplots(figsize=(6, 6))
  for m, marker in (("image", "o"), ("audio", "^"), ("text", "*")):
    z, y = e[m]
    xy = (z - mu) @ vt[:2].T
    ax.scatter(xy[:, 0], xy[:, 1], c=y, cmap="tab10", marker=marker, s=12 if m != "text" else 60,
               alpha=0.6, label=m, vmin=0, vmax=9)
  ax.legend()
  ax.set_title("test embeddings, PCA (colour = digit)")
  paths.append(os.path.join(out_dir, "projection.png"))
  fig.savefig(paths[-1], dpi=120)
  plt.close(fig)
  return paths


# ----------------------------------------------------------------------------------------------
# Folder-per-class zero-shot: `ds-jax zero-shot --workdir W --modality audio --data-dir DIR`.


def folder_digit(name: str) -> Optional[int]:
  """The digit a class folder names ("7" or "seven"), else None."""
  key = name.strip().lower()
  if key.isdigit() and int(key) < 10:
    return int(key)
  return D.WORDS.index(key) if key in D.WORDS else None


def label_prompts(name: str) -> list[str]:
  """Prompts for a class folder: the digit templates for "7" / "seven", else templates on name."""
  d = folder_digit(name)
  if d is not None:
    return D.class_texts(d)
  key = name.strip().lower()
  return [t.format(w=key, d=key) for t in D.TEMPLATES]


def same_prompt_folders(classes: Sequence[str]) -> list[list[str]]:
  """Groups of class folders that get the same prompts ("3" and "three"): indistinguishable."""
  groups: dict = {}
  for c in classes:
    d = folder_digit(c)
    groups.setdefault(d if d is not None else c.strip().lower(), []).append(c)
  return [g for g in groups.values() if len(g) > 1]


def load_image(path: str, size: int) -> np.ndarray:
  """Any image -> [size, size, 1] in [0, 1], bright ink on dark, cropped to the ink, squared."""
  from PIL import Image
  with Image.open(path) as im:
    x = np.asarray(im.convert("L"), np.float32) / 255.0
  if x.mean() > 0.5:  # dark ink on a light background
    x = 1.0 - x
  ys, xs = np.nonzero(x > 0.2 * x.max())
  if len(ys):
    x = x[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
  h, w = x.shape
  s = max(h, w)
  pad = np.zeros((s, s), np.float32)
  pad[(s - h) // 2:(s - h) // 2 + h, (s - w) // 2:(s - w) // 2 + w] = x
  img = Image.fromarray((pad * 255).astype(np.uint8)).resize((size, size), Image.BOX)
  x = np.asarray(img, np.float32)
  return (x / max(x.max(), 1e-6))[..., None]


def load_clip(path: str) -> np.ndarray:
  """Any WAV (rate, channels) -> centred 1 s 16 kHz mono clip with silence trimmed."""
  return A.place(A.trim_silence(A.load_audio(path)), D.CLIP_SAMPLES)


def zero_shot_folder(cfg: mm.MultimodalConfig, params: Any, modality: str, data_dir: str,
                     text_len: int = 32) -> dict:
  """Classify DIR/<label>/* against the label names' text prompts; bad files are listed."""
  classes = sorted(d for d in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, d)))
  if not classes:
    raise ValueError(f"{data_dir} has no class folders (expected DIR/<label>/files)")
  exts = (".wav",) if modality == "audio" else IMAGE_EXTS
  protos = class_text_embeddings(cfg, params, [label_prompts(c) for c in classes], text_len)
  files, xs, unreadable = [], [], []
  for ci, c in enumerate(classes):
    for name in sorted(os.listdir(os.path.join(data_dir, c))):
      path = os.path.join(data_dir, c, name)
      if not name.lower().endswith(exts):
        continue
      try:
        xs.append(load_clip(path) if modality == "audio" else load_image(path,
                                                                         cfg.image.image_size))
        files.append((path, ci))
      except Exception as e:  # any decoder error: report, skip, go on
        unreadable.append({"file": path, "error": f"{type(e).__name__}: {e}"})
  per_file = []
  if xs:
    z = embed(cfg, params, modality, np.stack(xs))
    sims = z @ protos.T
    for (path, ci), s in zip(files, sims):
      pi = int(np.argmax(s))
      per_file.append({"file": path, "label": classes[ci], "predicted": classes[pi],
                       "correct": pi == ci, "scores": [round(float(v), 4) for v in s]})
  correct = sum(r["correct"] for r in per_file)
  return {"modality": modality, "classes": classes, "num_files": len(per_file),
          "accuracy": correct / len(per_file) if per_file else None,
          "same_prompt_folders": same_prompt_folders(classes),
          "unreadable": unreadable, "files": per_file}


def zero_shot_cli(argv: Sequence[str]) -> int:
  from ds_jax.cli import UsageError
  from ds_jax.multimodal_train import restore_params
  p = argparse.ArgumentParser(prog="ds-jax zero-shot", description=zero_shot_folder.__doc__)
  p.add_argument("--workdir", required=True)
  p.add_argument("--modality", required=True, choices=("audio", "image"))
  p.add_argument("--data-dir", required=True)
  p.add_argument("--output", default="", help="JSON path (default W/zero_shot_<modality>.json)")
  a = p.parse_args(list(argv))
  if not os.path.isdir(a.data_dir):
    raise UsageError(f"--data-dir {a.data_dir!r} is not a directory")
  try:
    c, cfg, params = restore_params(a.workdir)
  except FileNotFoundError as e:
    raise UsageError(str(e)) from None
  try:
    res = zero_shot_folder(cfg, params, a.modality, a.data_dir, c.text_len)
  except ValueError as e:
    raise UsageError(str(e)) from None
  out = a.output or os.path.join(a.workdir, f"zero_shot_{a.modality}.json")
  with open(out, "w") as f:
    json.dump(res, f, indent=1)
  for u in res["unreadable"]:
    print(f"skipped unreadable {u['file']}: {u['error']}")
  for g in res["same_prompt_folders"]:
    print(f"warning: folders {', '.join(g)} get the same text prompts (one class, split in two)")
  acc = res["accuracy"]
  print(f"{a.modality} zero-shot over {res['num_files']} files in {len(res['classes'])} classes: "
        f"accuracy {'n/a' if acc is None else f'{acc:.4f}'}; per-file results in {out}")
  return 0
