"""The registry of model families, and the generic loading, saving and building that goes through it.

`from_pretrained` reads ``config.json``'s ``model_type`` to pick the family, lets it convert the state dict to
our names, then checks every name and shape against the family's own parameter tree before any weight is used.
`build(cfg, tokenizer, max_len, rng)` makes the model of a ``config.model`` block: from ``name_or_dir`` or fresh.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mltd_jax.models import gpt2, hub, t5
from mltd_jax.models.family import Family

log = logging.getLogger(__name__)

# config.json's model_type -> family. A new family is one module plus one line here.
FAMILIES: dict[str, Family] = {
  gpt2.FAMILY.model_type: gpt2.FAMILY,
  t5.FAMILY.model_type: t5.FAMILY,
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# config.model.remat_policy: "" (recompute each block whole) or a `jax.checkpoint_policies` name without arguments.
REMAT_POLICIES = (
  "",
  "nothing_saveable",
  "everything_saveable",
  "dots_saveable",
  "checkpoint_dots",
  "dots_with_no_batch_dims_saveable",
  "checkpoint_dots_with_no_batch_dims",
)


def family_named(model_type: str, where: str = "model_type") -> Family:
  if model_type not in FAMILIES:
    raise ValueError(f"{where}={model_type!r} is not supported; mltd_jax has the families {sorted(FAMILIES)}.")
  return FAMILIES[model_type]


def family_of(model) -> Family:
  """The family whose config class ``model.config`` is."""
  for family in FAMILIES.values():
    if isinstance(getattr(model, "config", None), family.config_cls):
      return family
  raise TypeError(f"{type(model).__name__} is not a model of a registered family ({sorted(FAMILIES)}).")


def state_dict_to_params(state: dict[str, np.ndarray], model, family: Family, source: Path) -> dict:
  """Map a transformers state dict onto ``model``'s param tree, checking every name and shape."""
  expected = traverse_util.flatten_dict(jax.eval_shape(model.init_params, jax.random.key(0)), sep=".")
  state = family.from_state_dict(state, model.config)
  missing = sorted(set(expected) - set(state))
  unexpected = sorted(set(state) - set(expected))
  if missing or unexpected:
    raise ValueError(
      f"{source}: parameter names do not match the config: missing {missing[:5]}"
      f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
      f"{f' and {len(unexpected) - 5} more' if len(unexpected) > 5 else ''}. The weights and config.json describe "
      "different models: check config.json's sizes (layers, heads, feed-forward kind, tied embeddings) against the "
      "weights, or use the config.json they were saved with."
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


def from_pretrained(
  name_or_dir: str | os.PathLike, *, dtype: Any = jnp.float32, allow_pickle: bool = False, remat: bool = False
):
  """Load ``(model, params)`` from a hub name or a local save_pretrained directory, for any registered family.

  Args:
    name_or_dir: e.g. ``"gpt2-medium"`` (needs a network) or a directory with config.json + model.safetensors.
    dtype: compute dtype of the model (parameters are float32).
    allow_pickle: accept ``pytorch_model.bin`` when no safetensors file exists (only for trusted files).
    remat: checkpoint every transformer block (less memory, more compute).

  Returns:
    ``(model, params)`` such that ``model.apply({'params': params}, ...)`` gives the logits.
  """
  directory = hub.resolve_dir(name_or_dir, allow_pickle)
  hf = hub.read_config(directory)
  family = family_named(hf.get("model_type"), f"{directory / hub.CONFIG_FILE}: model_type")
  model = family.model(family.from_hf_config(hf), dtype=dtype, remat=remat)
  state, source = hub.read_state_dict(directory, allow_pickle)
  return model, state_dict_to_params(state, model, family, source)


def save_pretrained(model, params: dict, out_dir: str | os.PathLike) -> Path:
  """Write ``out_dir/config.json`` and ``out_dir/model.safetensors`` that transformers loads."""
  family = family_of(model)
  flat = traverse_util.flatten_dict(jax.device_get(params), sep=".")
  return hub.write(out_dir, family.to_hf_config(model.config), family.to_state_dict(flat))


def family_for(cfg: Any) -> Family:
  """The family of a ``config.model`` block: from ``name_or_dir``'s config.json, else ``cfg.family``."""
  if not cfg.name_or_dir:
    return family_named(cfg.family, "config.model.family")
  directory = hub.resolve_dir(cfg.name_or_dir, cfg.allow_pickle)
  return family_named(hub.read_config(directory).get("model_type"), f"{directory / hub.CONFIG_FILE}: model_type")


def remat_setting(cfg: Any) -> bool | str:
  """A model's ``remat`` from ``config.model``: False, True (each block recomputed whole in the backward pass) or
  the `jax.checkpoint_policies` name of ``remat_policy`` (e.g. "dots_saveable": matmul outputs kept)."""
  policy = cfg.get("remat_policy", "")
  if policy not in REMAT_POLICIES:
    raise ValueError(f"config.model.remat_policy={policy!r} is not one of {REMAT_POLICIES}.")
  return (policy or True) if cfg.get("remat", False) else False


def build(cfg: Any, tokenizer, max_len: int, rng: jax.Array) -> tuple[Any, dict, Family]:
  """``(model, params, family)`` of a ``config.model`` block.

  From ``cfg.name_or_dir`` when set (the family is read from its config.json; ``cfg.family``, if set, must agree);
  else a fresh model of family ``cfg.family`` and size ``cfg.init`` whose vocabulary and special tokens fit
  ``tokenizer`` and whose positions cover ``max_len`` (a loaded model must take ``max_len`` too:
  `Family.max_len`).
  """
  if cfg.dtype not in DTYPES:
    raise ValueError(f"config.model.dtype={cfg.dtype!r} is not one of {sorted(DTYPES)}.")
  dtype, remat = DTYPES[cfg.dtype], remat_setting(cfg)
  if cfg.name_or_dir:
    model, params = from_pretrained(cfg.name_or_dir, dtype=dtype, allow_pickle=cfg.allow_pickle, remat=remat)
    family = family_of(model)
    if cfg.family and cfg.family != family.model_type:
      raise ValueError(
        f"config.model.family={cfg.family!r} but {cfg.name_or_dir} holds a {family.model_type!r} model; set "
        f"config.model.family={family.model_type!r} (or '')."
      )
    if model.config.vocab_size < len(tokenizer):
      raise ValueError(
        f"the tokenizer has {len(tokenizer)} tokens but {cfg.name_or_dir} has vocab_size="
        f"{model.config.vocab_size}; use the model's own tokenizer (config.data.tokenizer)."
      )
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):  # a tokenizer made for another model
      ours, theirs = getattr(tokenizer, name, None), getattr(model.config, name, None)
      allowed = set(theirs) if isinstance(theirs, (list, tuple)) else {theirs}  # T5 may list several eos ids
      if ours is not None and theirs is not None and ours not in allowed:
        log.warning(
          "the tokenizer's %s is %s but %s's config.json says %s: is config.data.tokenizer the model's own?",
          name, ours, cfg.name_or_dir, theirs,
        )  # fmt: skip
    limit = family.max_len(model.config)
    if limit is not None and max_len > limit:
      raise ValueError(
        f"the data's sequences are {max_len} tokens long (config.data.seq_len) but {cfg.name_or_dir} takes at most "
        f"{limit}; lower config.data.seq_len (config.data.truncate=True cuts longer texts)."
      )
    return model, params, family
  model, params = fresh(cfg.family, cfg.init, tokenizer, max_len, rng, dtype=dtype, dropout=cfg.dropout, remat=remat)
  return model, params, family_of(model)


def fresh(
  model_type: str,
  size: dict,
  tokenizer,
  max_len: int,
  rng: jax.Array,
  *,
  dtype: Any = jnp.float32,
  dropout: float = 0.0,
  remat: bool = False,
):
  """``(model, params)``: a randomly initialized model of family ``model_type``.

  Args:
    model_type: a key of `FAMILIES` (e.g. ``"gpt2"``).
    size: the family's config fields that set its size, e.g. ``dict(n_layer=2, n_embd=64, n_head=4)``.
    tokenizer: the vocabulary size and special tokens come from it.
    max_len: the longest sequence the model must take.
    rng: initialization key.
    dtype: compute dtype (parameters are float32).
    dropout: the family's dropout rates.
    remat: checkpoint every transformer block.
  """
  family = family_named(model_type, "config.model.family")
  model = family.model(family.fresh_config(dict(size), tokenizer, max_len, dropout), dtype=dtype, remat=remat)
  return model, model.init_params(rng)
