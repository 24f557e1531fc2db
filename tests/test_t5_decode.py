"""Decoding (`mltd_jax.decode`) with our T5: the cached decoder against the full forward at every target position,
greedy and beam search against transformers' ``T5ForConditionalGeneration.generate`` on the same weights with
right-padded sources, and a folded static TARP difference against the unfolded one."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mltd_jax import decode, models, tarp
from mltd_jax.models import t5
from tests.helpers import cached_logits, perturbed_variables

N, PAD = 10, 2  # N: max_new_tokens; PAD: written after EOS (not T5's pad 0: transformers' beam search skips 0)
# 8 buckets up to distance 12: the logarithmic buckets are used within N target positions.
SIZE = dict(
  vocab_size=40,
  d_model=16,
  d_kv=8,
  d_ff=24,
  num_heads=2,
  num_layers=2,
  num_decoder_layers=2,
  relative_attention_num_buckets=8,
  relative_attention_max_distance=12,
  pad_token_id=0,
  decoder_start_token_id=0,
)
# EOS: a token this seed's model emits greedily, so that some rows end early and others never.
VARIANTS = {
  "original": dict(feed_forward_proj="relu", tie_word_embeddings=True, eos_token_id=14),
  "v1_1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, eos_token_id=13),
}


@functools.cache
def hf_and_ours(name, root):
  """transformers' random T5 of variant ``name`` and ours loaded from its save_pretrained directory."""
  torch.manual_seed(0)
  hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**SIZE, **VARIANTS[name])).eval()
  with torch.no_grad():  # x2 projections: next tokens depend on the source and the prefix, not one token forever
    for n, p in hf.named_parameters():
      if "layer_norm" in n:
        p.add_(0.1 * torch.randn_like(p))
      elif p.ndim == 2 and "shared" not in n and "relative" not in n:
        p.mul_(2.0)
    if name == "v1_1":  # transformers 5 ties lm_head even when asked not to; untie it as Flan-T5 checkpoints are
      hf.lm_head.weight = torch.nn.Parameter(torch.randn_like(hf.shared.weight))
  hf.save_pretrained(root / name, safe_serialization=True)
  model, params = models.from_pretrained(root / name)
  assert models.family_of(model) is t5.FAMILY
  return hf, model, params


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return tmp_path_factory.mktemp("t5")


def sources(b=4, s=7, seed=0):
  """Right-padded sources [b, s] (pad 0): row 1 has 2 pads, row 2 has 3."""
  ids = np.random.default_rng(seed).integers(3, SIZE["vocab_size"], (b, s)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 5:] = mask[2, 4:] = 0
  return np.where(mask == 1, ids, 0), mask


def hf_generate(hf, ids, mask, **kw):
  """transformers' new tokens [b, N]: without the decoder start token, padded with PAD to N tokens."""
  with torch.no_grad():
    out = hf.generate(
      torch.tensor(ids.astype(np.int64)),
      attention_mask=torch.tensor(mask),
      do_sample=False,
      max_new_tokens=N,
      pad_token_id=PAD,
      **kw,
    ).numpy()
  assert (out[:, 0] == SIZE["decoder_start_token_id"]).all()
  out = out[:, 1:]
  return np.pad(out, ((0, 0), (0, N - out.shape[1])), constant_values=PAD)


@pytest.mark.parametrize("name,kind", [("original", None), ("v1_1", None), ("v1_1", "dynamic")])
def test_cache_matches_full_forward_at_every_position(root, name, kind):
  _, model, params = hf_and_ours(name, root)
  variables = {"params": params}
  if kind is not None:  # per-token TARP everywhere, cross-attention keys/values included
    variables = perturbed_variables(model, params, kind, scale=0.1, targets=t5.DEFAULT_TARGETS)
  ids, mask = sources()
  new = np.random.default_rng(1).integers(0, SIZE["vocab_size"], (ids.shape[0], N - 1)).astype(np.int32)
  got = np.asarray(cached_logits(model, variables, ids, mask, new, slots=new.shape[1] + 1))  # start + n  # [b, N, V]
  target = np.concatenate([np.zeros_like(new[:, :1]), new], 1)  # decoder_start_token_id, then the new tokens
  ref = np.asarray(jax.jit(model.apply)(variables, ids, target, mask))  # [b, N, V]
  np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
  cache = jax.eval_shape(lambda v: model.init_decode(v, ids, mask, N)[1], variables)
  assert all(x.shape[0] == ids.shape[0] for x in jax.tree.leaves(cache))  # batch-leading: beams can gather it


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_greedy_matches_transformers_with_right_padded_sources(root, name):
  hf, model, params = hf_and_ours(name, root)
  eos = VARIANTS[name]["eos_token_id"]
  ids, mask = sources()
  ref = hf_generate(hf, ids, mask, num_beams=1, eos_token_id=eos)
  ours = decode.generate(model, {"params": params}, ids, mask, max_new_tokens=N, eos_token_id=eos, pad_token_id=PAD)
  assert ours.shape == (4, N) and ours.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(ours), ref)
  ended = (ref == eos).any(1)
  assert ended.any() and not ended.all(), "the EOS rule is not exercised: pick another EOS for this seed"
  assert len(np.unique(ref)) > 4  # the model does not emit one token forever
  unmasked = decode.generate(
    model, {"params": params}, ids, np.ones_like(mask), max_new_tokens=N, eos_token_id=eos, pad_token_id=PAD
  )
  assert (np.asarray(unmasked)[1:3] != ref[1:3]).any()  # the padded rows' pads are masked, not read


@pytest.mark.parametrize(
  "name,length_penalty,early_stopping", [("original", 1.0, False), ("v1_1", 1.0, False), ("v1_1", 0.5, True)]
)
def test_beam_search_matches_transformers(root, name, length_penalty, early_stopping):
  hf, model, params = hf_and_ours(name, root)
  eos = VARIANTS[name]["eos_token_id"]
  ids, mask = sources()
  kw = dict(num_beams=3, length_penalty=length_penalty, early_stopping=early_stopping, eos_token_id=eos)
  ref = hf_generate(hf, ids, mask, **kw)
  ours = decode.generate(model, {"params": params}, ids, mask, max_new_tokens=N, pad_token_id=PAD, **kw)
  np.testing.assert_array_equal(np.asarray(ours), ref)
  assert (ref == eos).any()  # some best hypothesis ended with EOS


def test_folded_static_difference_decodes_the_same_tokens(root):
  _, model, params = hf_and_ours("v1_1", root)
  variables = perturbed_variables(model, params, "bilinear", multiplicative=True, scale=0.1, targets=t5.DEFAULT_TARGETS)
  folded, left = tarp.fold(variables["params"], variables["tarp"])
  assert not left  # static kinds fold completely
  ids, mask = sources()
  target = np.random.default_rng(2).integers(0, SIZE["vocab_size"], (ids.shape[0], N)).astype(np.int32)
  want = np.asarray(jax.jit(model.apply)(variables, ids, target, mask))  # the difference applied, in full
  got = np.asarray(jax.jit(model.apply)({"params": folded}, ids, target, mask))
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())  # the fold is the same model (2e-5 off)
  kw = dict(max_new_tokens=N, eos_token_id=VARIANTS["v1_1"]["eos_token_id"], pad_token_id=PAD)
  for num_beams in (1, 3):
    a = decode.generate(model, variables, ids, mask, num_beams=num_beams, **kw)
    b = decode.generate(model, {"params": folded}, ids, mask, num_beams=num_beams, **kw)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  base = decode.generate(model, {"params": params}, ids, mask, num_beams=3, **kw)
  assert (np.asarray(a) != np.asarray(base)).any()  # the difference changes what is decoded
