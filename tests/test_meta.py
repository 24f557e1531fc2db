"""Meta-gradients through the lax.scan inner loop against a Python loop and central finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mltd_jax import meta
from mltd_jax.models import gpt2
from mltd_jax.state import TrainState
from tests.helpers import all_equations, lm_batch, perturbed_variables, tiny_gpt2

T_IN, LR = 3, 0.3


def task(seed=0, vocab=13, per_step=False):
  support = lm_batch(vocab, ((T_IN, 2, 6) if per_step else (2, 6)), seed=seed, pad_last=1)
  return {"support": support, "query": lm_batch(vocab, (2, 6), seed=seed + 100)}


def setup64(kind):
  model, params = tiny_gpt2(layers=1, dtype=jnp.float64)  # one block: every path is exercised, half the compile
  variables = perturbed_variables(model, params, kind, scale=0.1)  # smooth: central differences converge
  return model, jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), variables)


def inner(**kw):
  return meta.InnerLoop(**{"steps": T_IN, "lr": LR, "fast_regex": "^tarp/", **kw})


def loop_reference(loss_fn, variables, t, cfg: meta.InnerLoop):
  """The same meta-loss with a plain Python loop of jax.grad steps of optax's optimizer (no scan, no chunks)."""
  fast, slow = meta.split(variables, "^tarp/")
  loss = lambda f, b: meta.mean_loss(loss_fn(meta.merge(slow, f), b, None))  # noqa: E731
  tx = cfg.transform(cfg.lr)
  state = tx.init(fast)
  for i in range(cfg.steps):
    batch = jax.tree.map(lambda x: x[i], t["support"]) if cfg.per_step_support else t["support"]
    updates, state = tx.update(jax.grad(loss)(fast, batch), state, fast)
    fast = optax.apply_updates(fast, updates)
  return loss(fast, t["query"])


# Every TARP kind, both inner optimizers, remat, support chunks and per-step support, in three compilations (CI time:
# each case compiles a float64 second-order gradient and finite differences).
CASES = {  # kind, InnerLoop settings
  "kronecker-sgd-remat-chunks": ("kronecker", dict(remat=True, support_chunks=2)),
  "bilinear-sgd-remat-chunks-per-step": ("bilinear", dict(remat=True, support_chunks=2, per_step_support=True)),
  "dynamic-adam": ("dynamic", dict(optimizer="adam", lr=0.05, adam_eps_root=1e-8)),
  "bilinear-adam-remat-chunks": (
    "bilinear",
    dict(optimizer="adam", lr=0.05, adam_eps_root=1e-8, remat=True, support_chunks=2),
  ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_meta_gradient_matches_loop_and_finite_differences(case):
  kind, settings = CASES[case]
  cfg = inner(**settings)
  with jax.enable_x64(True):
    model, variables = setup64(kind)
    loss_fn = gpt2.make_loss(model)
    t = task(per_step=cfg.per_step_support)
    loss = jax.jit(lambda v: meta.task_loss(loss_fn, v, t, cfg, jax.random.key(0)))
    g_scan = jax.jit(jax.grad(loss))(variables)
    g_loop = jax.jit(jax.grad(lambda v: loop_reference(loss_fn, v, t, cfg)))(variables)
    for a, b in zip(jax.tree.leaves(g_scan), jax.tree.leaves(g_loop)):
      np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    # Central finite differences along two random directions over all variables (base and difference), with
    # Richardson extrapolation (error O(eps^4)): Adam's update g / sqrt(v) bends sharply where gradients are small.
    for seed in (0, 1):
      leaves, tree = jax.tree.flatten(variables)
      keys = jax.random.split(jax.random.key(seed), len(leaves))
      direction = tree.unflatten([jax.random.normal(k, x.shape, jnp.float64) for x, k in zip(leaves, keys)])
      shift = lambda s: jax.tree.map(lambda x, d: x + s * d, variables, direction)  # noqa: E731
      central = lambda eps: (loss(shift(eps)) - loss(shift(-eps))) / (2 * eps)  # noqa: E731
      fd = (4 * central(5e-7) - central(1e-6)) / 3
      analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(g_scan), jax.tree.leaves(direction)))
      np.testing.assert_allclose(float(analytic), float(fd), rtol=1e-6, atol=1e-9)


def test_first_order_differs_and_remat_and_unrolling_do_not():
  with jax.enable_x64(True):
    model, variables = setup64("bilinear")
    t, loss_fn = task(seed=3), gpt2.make_loss(model)
    grad = lambda **kw: jax.jit(jax.grad(lambda v: meta.task_loss(loss_fn, v, t, inner(**kw), jax.random.key(0))))(  # noqa: E731
      variables
    )
    exact, first, remat = grad(), grad(first_order=True), grad(remat=True)
    unrolled = grad(unroll=True), grad(unroll=True, remat=True, backward="autodiff")  # no loop left: same values
    flat = lambda g: jnp.concatenate([x.ravel() for x in jax.tree.leaves(g)])  # noqa: E731
    rel = float(jnp.linalg.norm(flat(exact) - flat(first)) / jnp.linalg.norm(flat(exact)))
    assert rel > 1e-3, rel
    for g in (remat, *unrolled):
      np.testing.assert_allclose(flat(g), flat(exact), rtol=1e-10, atol=1e-13)
  with pytest.raises(ValueError, match="InnerLoop.unroll=1 must be True or False"):
    inner(unroll=1)


def test_hvp_backward_equals_autodiff_through_the_scan():
  """`meta.sgd_adapt`'s hand-derived backward (one forward-over-reverse Hessian-vector product per step) gives the
  gradient of `jax.grad` through the scan, for every variable and for the learning rate, with the options the
  SGD path handles itself: per-step support batches, support chunks, the dynamic kind, a linear rate schedule
  (optax's schedule rounds the rates to float32, hence the tolerance; with a constant rate the SGD cases of
  `test_meta_gradient_matches_loop_and_finite_differences` check the same backward against a loop to 1e-9)."""
  with jax.enable_x64(True):
    model, variables = setup64("dynamic")
    t, loss_fn, key = task(seed=6, per_step=True), gpt2.make_loss(model), jax.random.key(0)

    def grads(backward):
      cfg = inner(backward=backward, per_step_support=True, support_chunks=2, lr_schedule="linear")

      def loss(v, lr):
        adapted, _ = meta.adapt(loss_fn, v, t["support"], cfg, key, lr=lr)
        return meta.mean_loss(loss_fn(adapted, t["query"], key))

      return jax.jit(jax.grad(loss, argnums=(0, 1)))(variables, jnp.float64(LR))

    hvp, autodiff = grads("hvp"), grads("autodiff")
  for a, b in zip(jax.tree.leaves(hvp), jax.tree.leaves(autodiff)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-11)
  assert abs(float(hvp[1])) > 1e-6  # the rate's gradient is live
  assert inner().uses_hvp and not inner(optimizer="adam").uses_hvp and not inner(backward="autodiff").uses_hvp
  with pytest.raises(ValueError, match="needs the SGD inner optimizer"):
    inner(optimizer="adam", backward="hvp")
  with pytest.raises(ValueError, match="first_order=True differentiates nothing"):
    inner(first_order=True, backward="hvp")


def test_hvp_backward_with_bfloat16_base_weights():
  """The hand-derived backward sums the slow cotangent in float32 (a bfloat16 carry would change dtype in the
  scan) and returns it in the weights' dtype, like autodiff."""

  def loss(v, b, rng):
    return jnp.mean((b["x"] @ (v["params"]["w"].astype(jnp.float32) + v["tarp"]["u"])) ** 2)

  x = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
  v = {"params": {"w": jnp.ones((3, 2), jnp.bfloat16)}, "tarp": {"u": jnp.zeros((3, 2))}}
  grads = {}
  for backward in ("hvp", "autodiff"):
    cfg = meta.InnerLoop(steps=2, lr=0.1, backward=backward)

    def outer(v_, cfg=cfg):
      adapted = meta.adapt(loss, v_, {"x": x}, cfg, jax.random.key(0))[0]
      return meta.mean_loss(loss(adapted, {"x": x}, None))

    grads[backward] = jax.grad(outer)(v)
  assert grads["hvp"]["params"]["w"].dtype == jnp.bfloat16
  for a, b in zip(jax.tree.leaves(grads["hvp"]), jax.tree.leaves(grads["autodiff"])):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-2)


def test_first_order_is_fomaml():
  """With first_order the meta-gradient of the difference is the query gradient at the adapted point (FOMAML)."""
  with jax.enable_x64(True):
    model, variables = setup64("bilinear")
    t, loss_fn, key = task(seed=4), gpt2.make_loss(model), jax.random.key(0)
    g = jax.jit(jax.grad(lambda v: meta.task_loss(loss_fn, v, t, inner(first_order=True), key)))(variables)
    adapted, _ = meta.adapt(loss_fn, variables, t["support"], inner(), key)
    ref = jax.grad(lambda v: meta.mean_loss(loss_fn(v, t["query"], key)))(adapted)
    for a, b in zip(jax.tree.leaves(g["tarp"]), jax.tree.leaves(ref["tarp"])):
      np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_adaptation_strictly_lowers_the_support_loss():
  model, params = tiny_gpt2(d=16)
  variables = perturbed_variables(model, params, "bilinear", scale=0.0)  # zero difference: U random, V = 0
  loss_fn, t = gpt2.make_loss(model), task(seed=7)
  support_loss = lambda v: meta.mean_loss(loss_fn(v, t["support"], None))  # noqa: E731
  adapted, seen = meta.adapt(loss_fn, variables, t["support"], inner(steps=5, lr=0.5), jax.random.key(0), support_loss)
  curve = np.concatenate([[support_loss(variables)], np.asarray(seen)])
  assert np.all(np.diff(curve) < 0), curve  # every step lowers it
  np.testing.assert_allclose(curve[-1], support_loss(adapted), rtol=1e-6)
  # only the difference moved
  same = jax.tree.map(lambda a, b: bool(np.all(a == b)), variables["params"], adapted["params"])
  assert all(jax.tree.leaves(same))


def test_meta_step_updates_base_and_difference_and_lowers_query_loss():
  model, params = tiny_gpt2(d=16)
  variables = perturbed_variables(model, params, "bilinear", scale=0.0)
  tx = optax.adam(3e-3)
  step = jax.jit(meta.make_meta_step(gpt2.make_loss(model), tx, inner(lr=0.5, remat=True)), donate_argnums=0)
  batch = jax.tree.map(lambda *x: np.stack(x), task(0), task(1))  # two tasks
  state = TrainState.create(variables, tx)
  before = jax.tree.map(np.array, state.variables)
  losses_seen = []
  for _ in range(15):
    state, metrics = step(state, batch, jax.random.key(0))
    losses_seen.append(float(metrics["query_loss"]))
  assert int(state.step) == 15
  assert losses_seen[-1] < losses_seen[0]
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), before, jax.tree.map(np.array, state.variables))
  assert all(jax.tree.leaves(changed["params"])) and all(jax.tree.leaves(changed["tarp"]))


def test_adam_inner_optimizer_needs_eps_root_to_be_differentiable():
  model, params = tiny_gpt2(layers=1)
  # From the zero-initialized difference some gradients are exactly zero (V's partners while V = 0): Adam's sqrt
  # must stay differentiable there.
  variables = perturbed_variables(model, params, "dynamic", scale=0.0)
  loss_fn = gpt2.make_loss(model)

  def grad(eps_root):
    cfg = inner(optimizer="adam", lr=1e-3, adam_eps_root=eps_root)
    return jax.jit(jax.grad(lambda v: meta.task_loss(loss_fn, v, task(), cfg, jax.random.key(0))))(variables)

  g = grad(1e-8)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g))
  assert float(jnp.abs(g["tarp"]["transformer"]["h"]["0"]["mlp"]["c_fc"]["V"]).max()) > 0
  assert not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(grad(0.0)))


def test_task_chunks_give_the_same_meta_gradient():
  """The gradient of the mapped mean (any task_chunk) and `meta_value_and_grad`'s per-chunk gradients summed in its
  loop (chunks of 1, of 2 with a remainder of one task, all three at once, and two groups of two tasks) agree."""
  model, params = tiny_gpt2(layers=1)
  variables = perturbed_variables(model, params, "bilinear", scale=0.1)
  batch = jax.tree.map(lambda *x: np.stack(x), task(0), task(1), task(2))
  loss_fn, key = gpt2.make_loss(model), jax.random.key(0)
  grad = lambda chunk: jax.jit(  # noqa: E731
    jax.value_and_grad(lambda v: meta.meta_loss(loss_fn, v, batch, inner(), key, task_chunk=chunk), has_aux=True)
  )(variables)
  (loss, per_task), vmapped = grad(0)

  def same(out, tol=1e-4):
    (l, p), g = out
    np.testing.assert_allclose(l, loss, rtol=1e-6)
    np.testing.assert_allclose(p, per_task, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(vmapped), jax.tree.leaves(g)):
      np.testing.assert_allclose(a, b, rtol=tol, atol=1e-7)

  for chunk in (1, 2):
    same(grad(chunk))
  for chunk in (0, 1, 2):
    same(jax.jit(lambda v: meta.meta_value_and_grad(loss_fn, v, batch, inner(), key, task_chunk=chunk))(variables))
  four = jax.tree.map(lambda *x: np.stack(x), task(0), task(1), task(2), task(3))
  (loss, per_task), vmapped = jax.jit(jax.value_and_grad(
    lambda v: meta.meta_loss(loss_fn, v, four, inner(), key), has_aux=True))(variables)
  same(jax.jit(lambda v: meta.meta_value_and_grad(loss_fn, v, four, inner(), key, 1, task_groups=2))(variables))


def test_a_chunk_of_tasks_is_differentiated_before_the_next_runs():
  """`make_meta_step` with task_chunk 1 keeps one task's residuals, not every task's: XLA's temporaries for eight
  tasks stay near those for one (1.06x; the gradient of the mapped mean needed 4.6x as much for eight at these shapes,
  since its backward ran after every task's forward)."""
  model, params = tiny_gpt2(layers=1, d=32, positions=64)
  variables = perturbed_variables(model, params, "bilinear", scale=0.1)
  tx = optax.sgd(0.1)
  state = TrainState.create(variables, tx)

  def temps(n):
    batch = {
      "support": lm_batch(13, (n, 2, 48), seed=1),
      "query": lm_batch(13, (n, 2, 48), seed=2),
    }
    step = jax.jit(meta.make_meta_step(gpt2.make_loss(model), tx, inner(), task_chunk=1))
    return step.lower(state, batch, jax.random.key(0)).compile().memory_analysis().temp_size_in_bytes

  one, eight = temps(1), temps(8)
  assert eight < 1.5 * one, (one, eight)


def test_one_task_at_a_time_adds_no_axis_of_size_one():
  """task_chunk 1 maps task by task: no vmap over a batch of one (on XLA:CPU a leading axis of size 1 on the step's
  arrays made YNNPACK's reductions several times slower), one group of tasks is not vmapped either, and neither is
  a single task."""

  def shapes(jaxpr):
    return (v.aval.shape for eqn in all_equations(jaxpr) for v in eqn.outvars)

  x = jnp.ones((4, 16, 8))
  jaxpr = jax.make_jaxpr(lambda x: meta.map_tasks(lambda t: jnp.sum(t * t, axis=-1).sum(), x, 1))(x)
  seen = list(shapes(jaxpr.jaxpr))
  assert (16,) in seen and not [s for s in seen if s[:1] == (1,)], seen
  one_task = jax.make_jaxpr(lambda x: meta.map_tasks(lambda t: jnp.sum(t * t, axis=-1).sum(), x, 0))(x[:1])
  seen = list(shapes(one_task.jaxpr))  # a single task, even where tasks are vmapped: only its result gets the axis
  assert (16,) in seen and not [s for s in seen if len(s) > 1 and s[0] == 1], seen


def test_support_chunks_give_the_same_meta_gradient_with_unequal_token_counts():
  with jax.enable_x64(True):
    model, variables = setup64("dynamic")
    t, loss_fn = task(seed=5), gpt2.make_loss(model)
    t["support"]["mask"][1, 3:] = 0  # unequal token counts per chunk: the mean must still be over all tokens
    grad = lambda chunks: jax.jit(  # noqa: E731
      jax.grad(lambda v: meta.task_loss(loss_fn, v, t, inner(remat=True, support_chunks=chunks), jax.random.key(0)))
    )(variables)
    for a, b in zip(jax.tree.leaves(grad(1)), jax.tree.leaves(grad(2))):
      np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("optimizer", "rmsprop", "config.meta.inner_optimizer='rmsprop' is not one of"),
    ("steps", 0, "config.meta.inner_steps=0 must be an integer >= 1"),
    ("lr", float("nan"), "config.meta.inner_lr=nan must be a finite number"),
    ("support_chunks", 0, "config.meta.support_chunks=0"),
    ("support_chunks", True, "config.meta.support_chunks=True must be an integer >= 1"),  # not read as 1
    ("fast_regex", "(", "config.meta.fast_params='(' is not a valid regex"),
    ("backward", "newton", "config.meta.inner_backward='newton' is not one of"),
  ],
)
def test_inner_loop_validates_and_names_the_config_field(field, value, message):
  from mltd_jax import train
  from tests.test_main import tiny_config

  cfg = tiny_config().meta
  cfg[train.META_FIELDS[field]] = value
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    train.meta_inner(cfg)


def test_adam_without_eps_root_in_second_order_meta_training_is_refused():
  from mltd_jax import train
  from tests.test_main import tiny_config

  cfg = tiny_config().meta
  cfg.inner_optimizer, cfg.inner_adam_eps_root = "adam", 0.0
  with pytest.raises(ValueError, match="config.meta.inner_adam_eps_root=0"):
    train.meta_inner(cfg)
  cfg.first_order = True  # nothing is differentiated through Adam: allowed, and eps_root is not applied
  assert train.meta_inner(cfg).first_order


def test_fast_regex_that_matches_nothing_is_an_error():
  model, params = tiny_gpt2()
  with pytest.raises(ValueError, match=r"fast_regex='\^nope/' matches no variable"):
    meta.adapt(gpt2.make_loss(model), {"params": params}, task()["support"], inner(fast_regex="^nope/"), None)


def test_every_alternative_of_a_fast_regex_must_match():
  """A regex's top-level alternatives (inside a whole (?:...) group too, as TAMS's `with_cells` writes them) are
  each checked: a typo beside an alternative that matches is an error, not a narrower adaptation."""
  assert meta.alternatives("(?:^tarp/|ln_)|^tams/(?!controller/)") == ["^tarp/", "ln_", "^tams/(?!controller/)"]
  assert meta.alternatives("^(?:tarp|params)/") == ["^(?:tarp|params)/"]
  assert meta.alternatives("[]|]a|b") == ["[]|]a", "b"] and meta.alternatives(r"a\|b|(?:c)d") == [r"a\|b", "(?:c)d"]
  variables = {"params": {"ln_f": {"scale": 1.0}, "h": {"w": 2.0}}, "tarp": {"u": 3.0}}
  fast, slow = meta.split(variables, "(?:^tarp/|ln_)", "config.meta.fast_params")
  assert set(fast) == {"tarp/u", "params/ln_f/scale"} and set(slow) == {"params/h/w"}
  with pytest.raises(ValueError, match=r"config.meta.fast_params='\(\?:\^trap/\)\|ln_': its alternative '\^trap/'"):
    meta.split(variables, "(?:^trap/)|ln_", "config.meta.fast_params")
  assert len(meta.split(variables, "(?i)LN_|TARP")[0]) == 2  # a leading flag applies to every alternative
  assert len(meta.split(variables, "(?x) tarp/ | ln_  # not|split")[0]) == 2  # verbose: not split


# ---- a second "family": a two-layer MLP regression model with its own loss, through the same meta code ---------


def mlp_loss(variables, batch, rng):
  """Mean squared error of a 2-layer MLP whose output layer has a 'fast' additive head; ``rng`` adds label noise
  of zero variance when ``batch["noise"]`` is 0 (it only shows that every task gets its own key)."""
  p, f = variables["params"], variables["fast"]
  h = jnp.tanh(batch["x"] @ p["w1"] + p["b1"])  # [N, H]
  y = h @ (p["w2"] + f["w2"]) + p["b2"] + f["b2"]  # [N, 1]
  noise = batch["noise"][0] * jax.random.normal(rng, ())
  return jnp.mean((y[:, 0] - batch["y"]) ** 2) + noise


def regression_tasks(n_tasks, seed, shots=10):
  """Tasks y = a sin(x + phase): amplitude and phase per task (the MAML sinusoid family)."""
  rng = np.random.default_rng(seed)

  def examples(a, ph):
    x = rng.uniform(-5, 5, (shots, 1)).astype(np.float32)
    return {"x": x, "y": (a * np.sin(x[:, 0] + ph)).astype(np.float32), "noise": np.zeros(shots, np.float32)}

  tasks = []
  for _ in range(n_tasks):
    a, ph = rng.uniform(0.5, 2.0), rng.uniform(0, np.pi)
    tasks.append({"support": examples(a, ph), "query": examples(a, ph)})
  return jax.tree.map(lambda *x: np.stack(x), *tasks)


def test_a_second_family_meta_trains_without_changes_to_meta():
  keys = jax.random.split(jax.random.key(0), 3)
  variables = {
    "params": {
      "w1": jax.random.normal(keys[0], (1, 32)),
      "b1": jax.random.normal(keys[1], (32,)),
      "w2": 0.1 * jax.random.normal(keys[2], (32, 1)),
      "b2": jnp.zeros((1,)),
    },
    "fast": {"w2": jnp.zeros((32, 1)), "b2": jnp.zeros((1,))},
  }
  cfg = meta.InnerLoop(steps=3, lr=0.02, fast_regex="^fast/")
  tx = optax.adam(3e-3)
  step = jax.jit(meta.make_meta_step(mlp_loss, tx, cfg), donate_argnums=0)
  held_out = regression_tasks(16, seed=99)
  evaluate = jax.jit(lambda v: meta.meta_loss(mlp_loss, v, held_out, cfg, jax.random.key(1))[0])
  before = float(evaluate(variables))
  state = TrainState.create(variables, tx)
  for i in range(150):
    state, _ = step(state, regression_tasks(8, seed=i), jax.random.key(2))
  after = float(evaluate(state.variables))
  assert after < 0.7 * before, (before, after)

  # Each task of a meta-batch gets its own key: with label noise on, identical tasks get different losses.
  same = jax.tree.map(lambda x: np.repeat(x[:1], 4, axis=0), regression_tasks(1, seed=5))
  same["query"]["noise"][:] = 1.0
  _, per_task = meta.meta_loss(mlp_loss, state.variables, same, cfg, jax.random.key(3))
  assert len(set(np.asarray(per_task).round(6).tolist())) == 4


def test_linear_lr_schedule_decays_to_zero_over_the_steps():
  inner = meta.InnerLoop(steps=4, lr=1.0, lr_schedule="linear")
  tx = inner.transform(jnp.float32(2.0))  # a traced rate works too
  state, updates = tx.init(jnp.zeros(())), []
  for _ in range(4):
    u, state = tx.update(jnp.ones(()), state)
    updates.append(float(u))
  assert updates == [-2.0, -1.5, -1.0, -0.5]
  with pytest.raises(ValueError, match="lr_schedule"):
    meta.InnerLoop(steps=1, lr=1.0, lr_schedule="cosine")
