"""The family registry: build from a config block (fresh or from a directory), save/load through the family."""

import logging
import re

import jax
import ml_collections
import numpy as np
import pytest

from mltd_jax import models
from mltd_jax.data import word_level_tokenizer
from mltd_jax.models import gpt2, registry


def model_config(**kw):
  fields = dict(
    name_or_dir="",
    family="gpt2",
    allow_pickle=False,
    dtype="float32",
    dropout=0.0,
    remat=False,
    init=dict(n_layer=1, n_embd=8, n_head=2, n_inner=16, n_positions=8),
  )
  return ml_collections.ConfigDict({**fields, **kw})


def test_build_fresh_then_from_its_directory(tmp_path):
  tok = word_level_tokenizer(["a", "b", "c"])
  model, params, family = models.build(model_config(), tok, max_len=12, rng=jax.random.key(0))
  assert family is gpt2.FAMILY and models.family_of(model) is gpt2.FAMILY
  assert model.config.vocab_size == len(tok) and model.config.n_positions == 12  # max(max_len, init.n_positions)
  assert model.config.bos_token_id == tok.bos_token_id and model.config.eos_token_id == tok.eos_token_id
  models.save_pretrained(model, params, tmp_path / "m")
  loaded, loaded_params, family2 = models.build(
    model_config(name_or_dir=str(tmp_path / "m")), tok, max_len=12, rng=jax.random.key(1)
  )
  assert family2 is gpt2.FAMILY and loaded.config == model.config
  ids = np.array([[1, 4, 5, 6]])
  np.testing.assert_array_equal(
    model.apply({"params": params}, ids), loaded.apply({"params": loaded_params}, ids)
  )  # the directory's weights, not the new key's


class _Tokens:
  """A stand-in tokenizer of ``n`` tokens with the special-token ids ``ids`` (e.g. eos_token_id=3)."""

  def __init__(self, n, **ids):
    self.__dict__.update(ids)
    self.n = n

  def __len__(self):
    return self.n


def test_build_errors_name_the_field(tmp_path, caplog):
  tok = word_level_tokenizer(["a"])
  with pytest.raises(ValueError, match=r"config.model.family='t6' is not supported.*\['gpt2', 't5'\]"):
    models.build(model_config(family="t6"), tok, 8, jax.random.key(0))
  with pytest.raises(ValueError, match="config.model.dtype"):
    models.build(model_config(dtype="int8"), tok, 8, jax.random.key(0))
  with pytest.raises(ValueError, match=r"config.model.init has fields \['n_layers'\]"):
    models.build(model_config(init=dict(n_layers=1)), tok, 8, jax.random.key(0))
  model, params, _ = models.build(model_config(), tok, 8, jax.random.key(0))
  models.save_pretrained(model, params, tmp_path / "m")
  big = word_level_tokenizer([f"w{i}" for i in range(20)])
  with pytest.raises(ValueError, match="the tokenizer has 24 tokens but .* vocab_size=5"):
    models.build(model_config(name_or_dir=str(tmp_path / "m")), big, 8, jax.random.key(0))
  other = _Tokens(1, eos_token_id=model.config.eos_token_id + 1)  # another model's tokenizer
  with caplog.at_level(logging.WARNING, logger="mltd_jax.models.registry"):
    models.build(model_config(name_or_dir=str(tmp_path / "m")), other, 8, jax.random.key(0))
  assert f"the tokenizer's eos_token_id is {model.config.eos_token_id + 1}" in caplog.text
  n = model.config.n_positions  # the loss feeds a causal LM all but the last token: n + 1 tokens fit
  models.build(model_config(name_or_dir=str(tmp_path / "m")), tok, n + 1, jax.random.key(0))
  with pytest.raises(ValueError, match=rf"sequences are {n + 2} tokens long \(config.data.seq_len\).* at most {n + 1}"):
    models.build(model_config(name_or_dir=str(tmp_path / "m")), tok, n + 2, jax.random.key(0))


def test_every_registered_family_is_complete():
  for name, family in registry.FAMILIES.items():
    assert family.model_type == name and family.encoder
    model = family.model(family.fresh_config({}, word_level_tokenizer(["a"]), 8, 0.0))
    assert models.family_of(model) is family
    paths = models.dense_paths(model)
    assert paths and any(re.search(family.default_targets, "/".join(p)) for p in paths)
