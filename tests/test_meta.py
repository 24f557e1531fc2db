"""Meta-gradients through the lax.scan inner loop against a Python loop and central finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mltd_jax import losses, meta
from mltd_jax.state import TrainState
from tests.helpers import lm_batch, perturbed_variables, tiny_gpt2

KINDS = ["bilinear", "kronecker", "dynamic"]
T_IN, LR = 3, 0.3


def task(seed=0, vocab=13):
  support = lm_batch(vocab, (T_IN, 2, 6), seed=seed, pad_last=1)
  return {"support": support, "query": lm_batch(vocab, (2, 6), seed=seed + 100)}


def setup64(kind):
  model, params = tiny_gpt2(dtype=jnp.float64)
  variables = perturbed_variables(params, kind, scale=0.1)  # a smooth regime, where central differences converge
  return model, jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), variables)


def loop_reference(apply_fn, variables, t, fast_regex="^tarp/"):
  """The same meta-loss with a plain Python loop of jax.grad steps."""
  fast, slow = meta.split(variables, fast_regex)
  loss = lambda f, b: losses.lm_loss(apply_fn, meta.merge(slow, f), b)  # noqa: E731
  for i in range(T_IN):
    g = jax.grad(loss)(fast, jax.tree.map(lambda x: x[i], t["support"]))
    fast = jax.tree.map(lambda p, gi: p - LR * gi, fast, g)
  return loss(fast, t["query"])


def scan_loss(apply_fn, variables, t, **kw):
  return meta.task_query_loss(apply_fn, variables, t, fast_regex="^tarp/", inner_lr=LR, **kw)


@pytest.mark.parametrize("kind", KINDS)
def test_meta_gradient_matches_loop_and_finite_differences(kind):
  with jax.enable_x64(True):
    model, variables = setup64(kind)
    t = task()
    loss = jax.jit(lambda v: scan_loss(model.apply, v, t))
    g_scan = jax.jit(jax.grad(loss))(variables)
    g_loop = jax.jit(jax.grad(lambda v: loop_reference(model.apply, v, t)))(variables)
    for a, b in zip(jax.tree.leaves(g_scan), jax.tree.leaves(g_loop)):
      np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    # Central finite differences along two random directions over all variables (base and difference).
    for seed in (0, 1):
      leaves, tree = jax.tree.flatten(variables)
      keys = jax.random.split(jax.random.key(seed), len(leaves))
      direction = tree.unflatten([jax.random.normal(k, x.shape, jnp.float64) for x, k in zip(leaves, keys)])
      eps = 1e-6
      shift = lambda s: jax.tree.map(lambda x, d: x + s * eps * d, variables, direction)  # noqa: E731
      fd = (loss(shift(1)) - loss(shift(-1))) / (2 * eps)
      analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(g_scan), jax.tree.leaves(direction)))
      np.testing.assert_allclose(float(analytic), float(fd), rtol=1e-6, atol=1e-9)


def test_first_order_differs_and_remat_does_not():
  with jax.enable_x64(True):
    model, variables = setup64("bilinear")
    t = task(seed=3)
    grad = lambda **kw: jax.jit(jax.grad(lambda v: scan_loss(model.apply, v, t, **kw)))(variables)  # noqa: E731
    exact, first, remat = grad(), grad(first_order=True), grad(remat=True)
    flat = lambda g: jnp.concatenate([x.ravel() for x in jax.tree.leaves(g)])  # noqa: E731
    rel = float(jnp.linalg.norm(flat(exact) - flat(first)) / jnp.linalg.norm(flat(exact)))
    assert rel > 1e-3, rel
    np.testing.assert_allclose(flat(remat), flat(exact), rtol=1e-10, atol=1e-13)


def test_first_order_is_fomaml():
  """With first_order the meta-gradient is the query gradient at the adapted point (FOMAML)."""
  with jax.enable_x64(True):
    model, variables = setup64("bilinear")
    t = task(seed=4)
    g = jax.jit(jax.grad(lambda v: scan_loss(model.apply, v, t, first_order=True)))(variables)
    fast, slow = meta.split(variables, "^tarp/")
    loss = lambda f, b: losses.lm_loss(model.apply, meta.merge(slow, f), b)  # noqa: E731
    adapted = meta.inner_loop(loss, fast, t["support"], LR)
    ref = jax.grad(lambda v: losses.lm_loss(model.apply, v, t["query"]))(meta.merge(slow, adapted))
    # The difference's gradient: same as at the adapted point.
    for a, b in zip(jax.tree.leaves(g["tarp"]), jax.tree.leaves(ref["tarp"])):
      np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_meta_step_updates_base_and_difference_and_lowers_query_loss():
  model, params = tiny_gpt2(d=16)
  variables = perturbed_variables(params, "bilinear", scale=0.0)
  tx = optax.adam(3e-3)
  step = meta.make_meta_step(model.apply, tx, fast_regex="^tarp/", inner_lr=0.5, remat=True)
  batch = jax.tree.map(lambda *x: np.stack(x), task(0), task(1))  # two tasks
  state = TrainState.create(variables, tx, jax.random.key(0))
  before = jax.tree.map(np.array, state.variables)
  losses_seen = []
  for i in range(15):
    state, metrics = step(state, batch, jax.random.key(i))
    losses_seen.append(float(metrics["query_loss"]))
  assert int(state.step) == 15
  assert losses_seen[-1] < losses_seen[0]
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), before, jax.tree.map(np.array, state.variables))
  assert all(jax.tree.leaves(changed["params"])) and all(jax.tree.leaves(changed["tarp"]))


def test_adapt_eval_columns():
  model, params = tiny_gpt2(d=16)
  variables = perturbed_variables(params, "bilinear", scale=0.0)
  tasks = jax.tree.map(lambda *x: np.stack(x), task(0), task(1), task(2))
  query = tasks.pop("query")
  focus = {**query, "weights": np.zeros_like(query["mask"])}
  focus["weights"][..., 3] = 1
  tasks["eval"] = {"query": query, "focus": focus}
  evaluate = meta.make_adapt_eval(model.apply, "^tarp/", adapt_steps=4)
  result = evaluate(variables, tasks, 0.5)
  out = np.asarray(result["query"])
  assert out.shape == (3, 5) and result["focus"].shape == (3, 5)
  assert np.all(out[:, -1] < out[:, 0] + 0.5) and not np.allclose(result["focus"], out)
  for i in range(3):
    q = jax.tree.map(lambda x: x[i], query)
    np.testing.assert_allclose(out[i, 0], losses.lm_loss(model.apply, variables, q), rtol=1e-5)
    f = jax.tree.map(lambda x: x[i], focus)
    np.testing.assert_allclose(result["focus"][i, 0], losses.lm_loss(model.apply, variables, f), rtol=1e-5)
  zero_lr = np.asarray(evaluate(variables, tasks, 0.0)["query"])
  np.testing.assert_allclose(zero_lr, np.repeat(zero_lr[:, :1], 5, axis=1), rtol=1e-6)


def test_adam_inner_optimizer_is_differentiable():
  model, params = tiny_gpt2()
  # From the zero-initialized difference some gradients are exactly zero (sigma_w2 while V = 0): Adam's sqrt must
  # stay differentiable there.
  variables = perturbed_variables(params, "dynamic", scale=0.0)
  g = jax.jit(jax.grad(lambda v: scan_loss(model.apply, v, task(), optimizer="adam")))(variables)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g))
  assert float(jnp.abs(g["tarp"]["transformer"]["h"]["0"]["mlp"]["c_fc"]["V"]).max()) > 0


def test_task_chunks_give_the_same_meta_gradient():
  model, params = tiny_gpt2()
  variables = perturbed_variables(params, "bilinear", scale=0.1)
  batch = jax.tree.map(lambda *x: np.stack(x), task(0), task(1), task(2))
  grad = lambda chunk: jax.jit(  # noqa: E731
    jax.grad(lambda v: meta.meta_loss(model.apply, v, batch, task_chunk=chunk, fast_regex="^tarp/", inner_lr=LR)[0])
  )(variables)
  for a, b in zip(jax.tree.leaves(grad(None)), jax.tree.leaves(grad(2))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_support_chunks_give_the_same_meta_gradient():
  with jax.enable_x64(True):
    model, variables = setup64("dynamic")
    t = task(seed=5)
    t["support"]["mask"][:, 1, 3:] = 0  # unequal token counts per chunk: the mean must still be over all tokens
    grad = lambda chunks: jax.jit(  # noqa: E731
      jax.grad(lambda v: scan_loss(model.apply, v, t, remat=True, support_chunks=chunks))
    )(variables)
    for a, b in zip(jax.tree.leaves(grad(1)), jax.tree.leaves(grad(2))):
      np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
