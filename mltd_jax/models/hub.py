"""Loading and saving models in the Hugging Face format: config.json + model.safetensors.

`from_pretrained(name_or_dir)` takes a local directory written by ``save_pretrained`` (ours or transformers') or a
hub model name (downloaded with huggingface_hub, which needs a network). Our param trees use transformers' key
names, so a state dict maps onto them by splitting keys on "."; shapes are checked against the config before any
weight is used. Pickle checkpoints (``pytorch_model.bin``) are refused unless ``allow_pickle=True``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import traverse_util

from mltd_jax.models import gpt2

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
# State-dict entries that are buffers or tied copies, not parameters.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "lm_head.weight")


def _gpt2_from_hf(hf: dict, dtype: Any):
  fields = {f: hf[f] for f in gpt2.GPT2Config.__dataclass_fields__ if hf.get(f) is not None}
  unsupported = {k: hf[k] for k in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn") if hf.get(k)}
  if hf.get("scale_attn_weights") is False:
    unsupported["scale_attn_weights"] = False
  if unsupported:
    raise ValueError(f"GPT-2 options {unsupported} are not supported by mltd_jax's GPT-2.")
  return gpt2.GPT2LMHeadModel(gpt2.GPT2Config(**fields), dtype=dtype)


def _gpt2_to_hf(model) -> dict:
  cfg = model.config
  return {
    "model_type": "gpt2",
    "architectures": ["GPT2LMHeadModel"],
    "tie_word_embeddings": True,
    **{k: getattr(cfg, k) for k in gpt2.GPT2Config.__dataclass_fields__},
  }


# config.json's model_type -> builder of our module; our module class -> writer of config.json (T5 goes here too).
MODEL_TYPES: dict[str, Callable] = {"gpt2": _gpt2_from_hf}
HF_CONFIGS: dict[type, Callable] = {gpt2.GPT2LMHeadModel: _gpt2_to_hf}


def _resolve_dir(name_or_dir: str | os.PathLike, allow_pickle: bool) -> Path:
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
  if hf.get("model_type") not in MODEL_TYPES:
    raise ValueError(
      f"{file}: model_type={hf.get('model_type')!r} is not supported; mltd_jax loads {sorted(MODEL_TYPES)}."
    )
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
        "safetensors, or pass allow_pickle=True if you trust its source."
      )
    try:
      import torch  # only for trusted pickle checkpoints
    except ImportError as e:
      raise ImportError(f"reading {pickle} needs PyTorch: pip install torch (or convert it to safetensors).") from e

    sd = torch.load(pickle, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() for k, v in sd.items()}, pickle
  raise FileNotFoundError(f"no weights in {directory}: expected {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}.")


def state_dict_to_params(state: dict[str, np.ndarray], model, source: Path) -> dict:
  """Map a transformers state dict onto ``model``'s param tree, checking names and shapes against the config."""
  expected = traverse_util.flatten_dict(jax.eval_shape(model.init_params, jax.random.key(0)), sep=".")
  if expected and not any(k.startswith("transformer.") for k in state):
    state = {"transformer." + k: v for k, v in state.items()}  # checkpoints saved from the base model class
  missing = sorted(set(expected) - set(state))
  unexpected = sorted(k for k in set(state) - set(expected) if not k.endswith(IGNORED_SUFFIXES))
  if missing or unexpected:
    raise ValueError(
      f"{source}: parameter names do not match the config: missing {missing[:5]}"
      f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
      f"{'...' if len(unexpected) > 5 else ''}."
    )
  params = {}
  for key, shape in expected.items():
    value = np.asarray(state[key])
    if value.shape != shape.shape:
      raise ValueError(
        f"{source}: {key} has shape {value.shape} but config.json implies {shape.shape}; "
        "the weights and the config come from different models."
      )
    params[key] = jnp.asarray(value, dtype=jnp.float32)
  return traverse_util.unflatten_dict(params, sep=".")


def from_pretrained(name_or_dir: str | os.PathLike, *, dtype: Any = jnp.float32, allow_pickle: bool = False):
  """Load ``(model, params)`` from a hub name or a local save_pretrained directory.

  Args:
    name_or_dir: e.g. ``"gpt2-medium"`` (needs a network) or a directory with config.json + model.safetensors.
    dtype: compute dtype of the model (parameters are float32).
    allow_pickle: accept ``pytorch_model.bin`` when no safetensors file exists (only for trusted files).

  Returns:
    ``(model, params)`` such that ``model.apply({'params': params}, input_ids)`` gives the logits.
  """
  directory = _resolve_dir(name_or_dir, allow_pickle)
  hf = read_config(directory)
  model = MODEL_TYPES[hf["model_type"]](hf, dtype)
  state, source = read_state_dict(directory, allow_pickle)
  return model, state_dict_to_params(state, model, source)


def save_pretrained(model, params: dict, out_dir: str | os.PathLike) -> Path:
  """Write ``out_dir/config.json`` and ``out_dir/model.safetensors`` that transformers loads."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  if type(model) not in HF_CONFIGS:
    raise TypeError(f"save_pretrained supports {[c.__name__ for c in HF_CONFIGS]}, not {type(model).__name__}.")
  (out / CONFIG_FILE).write_text(json.dumps(HF_CONFIGS[type(model)](model), indent=2))
  flat = traverse_util.flatten_dict(params, sep=".")
  tensors = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in flat.items()}
  safetensors.numpy.save_file(tensors, out / SAFETENSORS_FILE, metadata={"format": "pt"})
  return out
