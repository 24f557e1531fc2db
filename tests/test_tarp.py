"""TARP: zero difference at init, the kinds' formulas against explicit references, and that they adapt."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mltd_jax import losses, meta, tarp
from tests.helpers import lm_batch, tiny_gpt2

KINDS = ["bilinear", "kronecker", "dynamic"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("multiplicative", [False, True])
def test_zero_difference_at_init_is_the_base_model(kind, multiplicative):
  model, params = tiny_gpt2()
  diff = tarp.init(jax.random.key(3), params, tarp.TarpConfig(kind=kind, rank=3, multiplicative=multiplicative))
  ids = lm_batch(13, (2, 7))["ids"]
  base = model.apply({"params": params}, ids)
  reparam = model.apply({"params": params, "tarp": diff}, ids)
  np.testing.assert_allclose(reparam, base, atol=1e-6, rtol=0)
  # ... and the difference is really there: every targeted layer has one, with non-zero U.
  assert len(tarp.target_paths(params, tarp.TarpConfig().targets)) == 4 * 2
  assert all(float(jnp.abs(d["U"]).max()) > 0 for d in _layers(diff))


def _layers(diff):
  out = []

  def walk(t):
    if "U" in t:
      out.append(t)
    else:
      for v in t.values():
        walk(v)

  walk(diff)
  return out


def test_kronecker_matches_jnp_kron():
  rng = jax.random.key(0)
  d = tarp.init_layer(rng, 6, 10, tarp.TarpConfig(kind="kronecker", rank=2, kron_terms=3, kron_n=2))
  d["V"] = jax.random.normal(jax.random.key(1), d["V"].shape)
  ref = sum(jnp.kron(d["H"][k], d["U"][k] @ d["V"][k].T) for k in range(3))
  np.testing.assert_allclose(tarp.static_delta(d), ref, atol=1e-6)


def test_dynamic_matches_per_token_matrix():
  cfg = tarp.TarpConfig(kind="dynamic", rank=3, sigma_hidden=5, multiplicative=True)
  d = tarp.init_layer(jax.random.key(0), 6, 4, cfg)
  keys = jax.random.split(jax.random.key(1), 3)
  d["V"] = jax.random.normal(keys[0], d["V"].shape)
  d["V1"] = jax.random.normal(keys[1], d["V1"].shape)
  d["sigma_w2"] = jax.random.normal(keys[2], d["sigma_w2"].shape)
  w0 = jax.random.normal(jax.random.key(2), (6, 4))
  x = jax.random.normal(jax.random.key(3), (2, 5, 6))
  ours = tarp.dense(x, w0, d, jnp.float32)
  sig = tarp.sigma(d, x)  # [2, 5, 3, 3]
  w = (1 + d["U1"] @ d["V1"].T) * w0 + jnp.einsum("ir,btrs,os->btio", d["U"], sig, d["V"])  # per token W(x)
  np.testing.assert_allclose(ours, jnp.einsum("bti,btio->bto", x, w), atol=1e-5)


def test_targets_that_match_nothing_name_the_field():
  _, params = tiny_gpt2()
  with pytest.raises(ValueError, match="tarp.targets"):
    tarp.init(jax.random.key(0), params, tarp.TarpConfig(targets="nothing_here"))
  with pytest.raises(ValueError, match="tarp.kind"):
    tarp.TarpConfig(kind="sparse")


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_reduces_the_support_loss(kind):
  model, params = tiny_gpt2(d=16)
  diff = tarp.init(jax.random.key(0), params, tarp.TarpConfig(kind=kind, rank=4, init_scale=0.3))
  batch = lm_batch(13, (4, 10), seed=5)
  variables = {"params": params, "tarp": diff}
  fast, slow = meta.split(variables, "^tarp/")
  loss = lambda f, b: losses.lm_loss(model.apply, meta.merge(slow, f), b)  # noqa: E731
  steps = jax.tree.map(lambda x: np.broadcast_to(x, (5, *x.shape)), batch)
  adapted = meta.inner_loop(loss, fast, steps, 2.0)
  before, after = float(loss(fast, batch)), float(loss(adapted, batch))
  assert after < before - 0.05, (before, after)
