"""Decoding (`mltd_jax.decode`) on a tiny random GPT-2: the key/value cache against the full forward, greedy and
beam search against transformers' ``generate`` on the same weights, and TARP differences (folded or per token)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from mltd_jax import decode, models, tarp
from tests.helpers import cached_logits, perturbed_variables

VOCAB, PAD, N = 50, 3, 10  # N: max_new_tokens
EOS = 30  # a token this seed's model emits: row 1 ends at once, row 2 after 8 tokens, the others never


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
  cfg = transformers.GPT2Config(
    vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=EOS
  )
  cfg.pad_token_id = PAD
  torch.manual_seed(0)
  hf = transformers.GPT2LMHeadModel(cfg).eval()
  with torch.no_grad():  # peaked next-token distributions (x5 kernels), so float noise cannot flip an argmax
    for name, p in hf.named_parameters():
      if "ln_" in name:
        p.add_(0.1 * torch.randn_like(p))
      elif p.ndim == 2:
        p.mul_(5.0)
  path = tmp_path_factory.mktemp("gpt2")
  hf.save_pretrained(path, safe_serialization=True)
  model, params = models.from_pretrained(path)
  return hf, model, params


def prompts(b=4, p=6, seed=0):
  """Left-padded prompts [b, p]: row 1 has 2 pads, row 2 has 4."""
  ids = np.random.default_rng(seed).integers(4, VOCAB, (b, p))
  mask = np.ones_like(ids)
  mask[1, :2] = mask[2, :4] = 0
  return np.where(mask == 1, ids, PAD), mask


def hf_generate(hf, ids, mask, **kw):
  """transformers' new tokens [b, N], padded with PAD where it stopped early (it crops to the longest row)."""
  with torch.no_grad():
    out = hf.generate(
      torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False, max_new_tokens=N, **kw
    ).numpy()[:, ids.shape[1] :]
  return np.pad(out, ((0, 0), (0, N - out.shape[1])), constant_values=PAD)


@pytest.mark.parametrize("kind, dtype", [(None, jnp.float32), ("dynamic", jnp.float32), (None, jnp.bfloat16)])
def test_cache_matches_full_forward_at_every_position(hf_and_ours, kind, dtype):
  """bfloat16 too: the cache keeps keys and values in the dtype the layers make them (float32 on XLA:CPU, where
  only the products' operands are bfloat16: `mltd_jax.matmul`)."""
  _, model, params = hf_and_ours
  model = model.clone(dtype=dtype)
  variables = {"params": params} if kind is None else perturbed_variables(model, params, kind)
  ids, mask = prompts()
  new = np.random.default_rng(1).integers(0, VOCAB, (ids.shape[0], 5))
  got = np.asarray(cached_logits(model, variables, ids, mask, new, slots=new.shape[1] + 1))  # [b, 6, V]
  full_ids, full_mask = np.concatenate([ids, new], 1), np.concatenate([mask, np.ones_like(new)], 1)
  pos = np.maximum(np.cumsum(full_mask, 1) - 1, 0)
  ref = np.asarray(model.apply(variables, full_ids, attention_mask=full_mask, position_ids=pos))
  # bfloat16 operands: the two paths sum in different orders, so an operand's rounding can flip (~1e-2 here)
  atol = 1e-4 if dtype == jnp.float32 else 5e-2
  np.testing.assert_allclose(got, ref[:, ids.shape[1] - 1 :], atol=atol, rtol=1e-5)


def test_greedy_matches_transformers_and_compiles_once(hf_and_ours):
  hf, model, params = hf_and_ours
  ids, mask = prompts()
  ref = hf_generate(hf, ids, mask, num_beams=1, eos_token_id=EOS, pad_token_id=PAD)
  ours = decode.generate(model, {"params": params}, ids, mask, max_new_tokens=N, eos_token_id=EOS, pad_token_id=PAD)
  assert ours.shape == (4, N) and ours.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(ours), ref)
  ended = (ref == EOS).any(1)
  assert ended.any() and not ended.all(), "the EOS rule is not exercised: pick another EOS for this seed"
  assert (ref[1] == [EOS] + [PAD] * (N - 1)).all()  # padding after EOS
  compiled = decode._greedy._cache_size()
  other = jax.tree.map(lambda x: x * 1.01, params)  # same shapes: no new compile
  decode.generate(model, {"params": other}, ids, mask, max_new_tokens=N, eos_token_id=EOS, pad_token_id=PAD)
  assert decode._greedy._cache_size() == compiled


@pytest.mark.parametrize(
  "length_penalty,early_stopping,ends", [(1.0, False, True), (0.5, True, True), (2.0, "never", False)]
)
def test_beam_search_matches_transformers(hf_and_ours, length_penalty, early_stopping, ends):
  """``ends``: whether some best hypothesis ends with EOS (a length penalty of 2 favours the unfinished ones)."""
  hf, model, params = hf_and_ours
  ids, mask = prompts()
  kw = dict(num_beams=3, length_penalty=length_penalty, early_stopping=early_stopping, eos_token_id=EOS)
  ref = hf_generate(hf, ids, mask, pad_token_id=PAD, **kw)
  ours = decode.generate(model, {"params": params}, ids, mask, max_new_tokens=N, pad_token_id=PAD, **kw)
  np.testing.assert_array_equal(np.asarray(ours), ref)
  assert (ref == EOS).any() == ends


@pytest.mark.parametrize("length_penalty", [0.6, 1.0, 1.2])
def test_length_penalized_scores_round_like_transformers(length_penalty):
  """Beam scores / length ** penalty to the last bit of torch's float32 division by a Python float (on CPU)."""
  scores = -np.abs(np.random.default_rng(0).normal(5, 3, (4, 64))).astype(np.float32)
  f = jax.jit(lambda s, i: decode._penalized(s, i, 32, length_penalty))
  for length in range(1, 33):
    want = (torch.tensor(scores) / (length**length_penalty)).numpy()
    np.testing.assert_array_equal(np.asarray(f(scores, jnp.int32(length))), want)


def test_folded_static_difference_decodes_the_same_tokens(hf_and_ours):
  _, model, params = hf_and_ours
  variables = perturbed_variables(model, params, "bilinear", multiplicative=True, scale=0.1)
  folded, left = tarp.fold(variables["params"], variables["tarp"])
  assert not left  # static kinds fold completely
  prepared = model.prepare_decode(variables)  # what generate decodes with: folded once, no per-token difference
  assert set(prepared) == {"params"}
  for x, y in zip(jax.tree.leaves(prepared["params"]), jax.tree.leaves(folded)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  ids, mask = prompts()
  pos, real = np.maximum(np.cumsum(mask, 1) - 1, 0), mask.astype(bool)
  want = np.asarray(model.apply(variables, ids, attention_mask=mask, position_ids=pos))[real]  # the difference applied
  got = np.asarray(model.apply({"params": folded}, ids, attention_mask=mask, position_ids=pos))[real]
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())  # the fold is the same model
  kw = dict(max_new_tokens=N, eos_token_id=EOS, pad_token_id=PAD)
  for num_beams in (1, 3):
    a = decode.generate(model, variables, ids, mask, num_beams=num_beams, **kw)
    b = decode.generate(model, {"params": folded}, ids, mask, num_beams=num_beams, **kw)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  base = decode.generate(model, {"params": params}, ids, mask, num_beams=3, **kw)
  assert (np.asarray(a) != np.asarray(base)).any()  # the difference changes what is decoded


def test_dynamic_difference_decodes_per_token(hf_and_ours):
  """Greedy decoding with a dynamic difference (and a static Phi1, folded) equals argmax over full forwards."""
  _, model, params = hf_and_ours
  variables = perturbed_variables(model, params, "dynamic", multiplicative=True, scale=0.1)
  folded, left = tarp.fold(variables["params"], variables["tarp"])
  names = {key[-1] for key in traverse_util.flatten_dict(left)}
  assert "sigma_w" in names and "U1" not in names  # Phi1 folded, the per-token terms left
  ids, mask = prompts()
  ours = decode.generate(model, variables, ids, mask, max_new_tokens=N)  # no EOS: N tokens per row
  np.testing.assert_array_equal(
    np.asarray(decode.generate(model, {"params": folded, "tarp": left}, ids, mask, max_new_tokens=N)),
    np.asarray(ours),
  )
  forward = jax.jit(lambda v, x, m, p: model.apply(v, x, attention_mask=m, position_ids=p))
  seq, seq_mask = np.concatenate([ids, np.zeros((4, N), int)], 1), np.concatenate([mask, np.ones((4, N), int)], 1)
  pos = np.maximum(np.cumsum(seq_mask, 1) - 1, 0)
  p = ids.shape[1]
  for i in range(N):  # one fixed-shape forward per token; causal attention ignores the zeros to the right
    seq[:, p + i] = np.asarray(forward(variables, seq, seq_mask, pos))[:, p + i - 1].argmax(-1)
  np.testing.assert_array_equal(np.asarray(ours), seq[:, p:])


def test_bad_arguments_are_refused(hf_and_ours):
  _, model, params = hf_and_ours
  ids, mask = prompts()
  with pytest.raises(ValueError, match="pad prompts on the left"):
    decode.generate(model, {"params": params}, ids, mask[:, ::-1], max_new_tokens=2)
  with pytest.raises(ValueError, match="n_positions"):  # 6 + 28 = n_positions + 2
    decode.generate(model, {"params": params}, ids, mask, max_new_tokens=28)


def test_greedy_to_the_last_position_matches_transformers(hf_and_ours):
  """Prompt + new tokens = n_positions + 1, greedy and beam search: the last token is never fed, so its position is
  never needed (transformers allows it; the cache holds P + N - 1 slots)."""
  hf, model, params = hf_and_ours
  ids, mask = prompts()
  n = hf.config.n_positions + 1 - ids.shape[1]
  for beams in (1, 3):
    with torch.no_grad():
      ref = hf.generate(
        torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False, max_new_tokens=n, num_beams=beams,
        eos_token_id=EOS, pad_token_id=PAD,
      ).numpy()[:, ids.shape[1] :]
    ref = np.pad(ref, ((0, 0), (0, n - ref.shape[1])), constant_values=PAD)  # transformers crops to the longest row
    assert not np.isin(ref[0], [EOS, PAD]).any()  # row 0 reaches the last position
    kw = dict(num_beams=beams, max_new_tokens=n, eos_token_id=EOS, pad_token_id=PAD)
    np.testing.assert_array_equal(np.asarray(decode.generate(model, {"params": params}, ids, mask, **kw)), ref)
