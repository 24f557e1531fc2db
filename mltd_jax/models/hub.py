"""File I/O of the Hugging Face format: config.json + model.safetensors (single or sharded), nothing model-specific.

`resolve_dir(name_or_dir)` takes a local directory written by ``save_pretrained`` (ours or transformers') or a hub
model name (downloaded with huggingface_hub, which needs a network). Pickle checkpoints (``pytorch_model.bin``)
are refused unless ``allow_pickle=True``. Which family a directory holds and how its tensors map onto a param
tree is `mltd_jax.models.registry`'s business.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import safetensors.numpy

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"


def resolve_dir(name_or_dir: str | os.PathLike, allow_pickle: bool) -> Path:
  path = Path(name_or_dir).expanduser()
  if path.is_dir():
    return path
  if path.exists() or str(name_or_dir).startswith((".", "/", "~")):
    raise FileNotFoundError(
      f"{path} is not a directory: pass a directory written by save_pretrained "
      "(config.json + model.safetensors) or a hub model name."
    )
  import huggingface_hub  # only needed online

  patterns = [CONFIG_FILE, "*.safetensors", SAFETENSORS_INDEX] + ([PICKLE_FILE] if allow_pickle else [])
  try:
    return Path(huggingface_hub.snapshot_download(str(name_or_dir), allow_patterns=patterns))
  except Exception as e:  # network, unknown name, gated model: say what was tried
    raise OSError(
      f"could not download {name_or_dir!r} from the Hugging Face hub ({type(e).__name__}: {e}); "
      "on an offline machine pass a local directory written by save_pretrained."
    ) from e


def read_config(directory: Path) -> dict:
  """config.json of a model directory, with errors that name the file."""
  file = directory / CONFIG_FILE
  if not file.is_file():
    raise FileNotFoundError(f"{file} not found: a model directory needs config.json (write one with save_pretrained).")
  try:
    hf = json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{file} is not valid JSON: {e}") from e
  if not isinstance(hf, dict):
    raise ValueError(f"{file} must hold a JSON object.")
  return hf


def read_state_dict(directory: Path, allow_pickle: bool = False) -> tuple[dict[str, np.ndarray], Path]:
  """All tensors of a model directory as numpy arrays, and the file they came from."""
  single, index = directory / SAFETENSORS_FILE, directory / SAFETENSORS_INDEX
  if single.is_file():
    return safetensors.numpy.load_file(single), single
  if index.is_file():
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    state = {}
    for shard in shards:
      state.update(safetensors.numpy.load_file(directory / shard))
    return state, index
  pickle = directory / PICKLE_FILE
  if pickle.is_file():
    if not allow_pickle:
      raise ValueError(
        f"{pickle} is a pickle checkpoint, which can run arbitrary code when loaded; convert it to "
        "safetensors, or pass allow_pickle=True (--config.model.allow_pickle=True) if you trust its source."
      )
    try:
      import torch  # only for trusted pickle checkpoints
    except ImportError as e:
      raise ImportError(f"reading {pickle} needs PyTorch: pip install torch (or convert it to safetensors).") from e

    sd = torch.load(pickle, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() for k, v in sd.items()}, pickle
  raise FileNotFoundError(f"no weights in {directory}: expected {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}.")


def write(out_dir: str | os.PathLike, hf_config: dict, tensors: dict[str, np.ndarray]) -> Path:
  """Write ``out_dir/config.json`` and ``out_dir/model.safetensors`` (float32, contiguous)."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2))
  tensors = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in tensors.items()}
  safetensors.numpy.save_file(tensors, out / SAFETENSORS_FILE, metadata={"format": "pt"})
  return out
