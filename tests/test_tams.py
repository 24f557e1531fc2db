"""TAMS (`mltd_jax.tams`): straight-through Gumbel-softmax, the cell in GPT-2 and T5 blocks, the controller's
meta-gradient through `meta`'s prepare hook (finite differences in float64), and cached decoding with a fixed
architecture. Compiles are shared through module fixtures (one forward per variable structure)."""

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mltd_jax import decode, meta, tams
from mltd_jax.models import gpt2, t5
from mltd_jax.state import TrainState
from tests.helpers import cached_logits, lm_batch, perturbed_variables

CFG = tams.TamsConfig(width=4, hidden=8)
OP = {name: i for i, name in enumerate(CFG.ops)}
# A fixed architecture with every operation, convolutions feeding convolutions (the decoder's history compounds).
MIXED = jnp.array([OP[o] for o in ("conv5", "conv3", "glu", "conv5", "linear", "conv3", "skip", "zero", "conv5")])
ZERO = jnp.full((9,), OP["zero"])
SMALL = tams.TamsConfig(width=4, hidden=8, nodes=2, ops=("linear", "conv3", "glu", "zero", "skip"))  # 5 edges
SMALL_MIXED = jnp.array([SMALL.ops.index(o) for o in ("conv3", "glu", "linear", "skip", "conv3")])
P, N = 5, 6  # GPT-2 prompt length and new tokens


def perturb(tree, scale, seed=7):
  """Every leaf plus scale * N(0, 1) (numpy: no random-number program to compile per shape)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: x + scale * rng.standard_normal(x.shape).astype(x.dtype), tree)


def small_gpt2(layers=2):
  """``tests.helpers.tiny_gpt2``'s model, initialized in one compiled program (eager init compiles per shape)."""
  cfg = gpt2.GPT2Config(
    vocab_size=13, n_positions=16, n_embd=8, n_layer=layers, n_head=2, bos_token_id=0, eos_token_id=0
  )
  model = gpt2.GPT2LMHeadModel(dataclasses.replace(cfg, embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0))
  return model, jax.jit(model.init_params)(jax.random.key(0))


def with_cells(model, params, cfg=CFG, scale=0.0, seed=1):
  """(the model with cells, {'params', 'tams'}); ``scale`` > 0 perturbs every TAMS weight (``out`` is no longer 0)."""
  collection = tams.init(jax.random.key(seed), model, cfg)
  return tams.attach(model, cfg), {"params": params, "tams": perturb(collection, scale) if scale else collection}


@functools.partial(jax.jit, static_argnums=0)
def forward(model, variables, ids, mask):
  """Logits [b, L, V] of left-padded sequences (positions count real tokens, as in decoding)."""
  return model.apply(variables, ids, attention_mask=mask, position_ids=jnp.maximum(jnp.cumsum(mask, -1) - 1, 0))


# ---- Gumbel-softmax -------------------------------------------------------------------------------------------


def test_hard_gumbel_is_one_hot_with_the_soft_samples_gradient():
  key, tau = jax.random.key(3), 0.5
  logits = jax.random.normal(jax.random.key(0), (4, 6))
  c = jax.random.normal(jax.random.key(1), (4, 6))

  @jax.jit
  def samples_and_grads(logits):
    sample = lambda **kw: lambda x: tams.gumbel_softmax(key, x, tau, **kw)  # noqa: E731
    grad = lambda f: jax.grad(lambda x: jnp.sum(c * f(x)))(logits)  # noqa: E731
    softmax = lambda x: jax.nn.softmax(x / tau)  # noqa: E731
    outs = [sample()(logits), sample(hard=False)(logits), sample(noise=False)(logits)]
    return outs, [grad(sample()), grad(sample(hard=False)), grad(sample(noise=False)), grad(softmax)]

  (hard, soft, off), (g_hard, g_soft, g_off, g_softmax) = jax.tree.map(np.asarray, samples_and_grads(logits))
  assert set(np.unique(hard)) == {0.0, 1.0} and (hard.sum(-1) == 1).all()
  np.testing.assert_array_equal(hard.argmax(-1), soft.argmax(-1))
  np.testing.assert_allclose(g_hard, g_soft, rtol=1e-6, atol=1e-7)
  assert np.abs(g_hard).min() > 0
  # Noise off: the argmax of the logits, with the gradient of softmax(logits / tau).
  np.testing.assert_array_equal(off, jax.nn.one_hot(jnp.argmax(logits, -1), 6))
  np.testing.assert_allclose(g_off, g_softmax, rtol=1e-6)


def test_gumbel_choices_at_tau_one_follow_softmax():
  logits = jnp.array([1.0, 0.0, -1.0, 2.0, 0.5, -0.5])
  n = 20_000
  draws = jax.jit(jax.vmap(lambda k: tams.gumbel_softmax(k, logits, 1.0)))(jax.random.split(jax.random.key(0), n))
  counts = np.asarray(draws).sum(0)
  expected = n * np.asarray(jax.nn.softmax(logits))
  chi2 = float(((counts - expected) ** 2 / expected).sum())
  assert chi2 < 25.7, (chi2, counts, expected)  # 5 degrees of freedom: P(chi2 > 25.7) = 1e-4
  uniform = np.full(6, n / 6)
  assert float(((counts - uniform) ** 2 / uniform).sum()) > 1000  # the test can tell distributions apart


def test_tau_schedules_config_checks_and_summary():
  cfg = tams.TamsConfig(tau=(10.0, 0.1, "exponential"), anneal_steps=100)
  np.testing.assert_allclose([float(tams.tau_at(cfg, s)) for s in (0, 50, 100, 500)], [10.0, 1.0, 0.1, 0.1], 1e-5)
  lin = tams.TamsConfig(tau=[2.0, 1.0, "linear"], anneal_steps=10)
  assert lin.tau == (2.0, 1.0, "linear") and float(tams.tau_at(lin, 5)) == 1.5
  with pytest.raises(ValueError, match=r"config.tams.ops=\('conv7',\)"):
    tams.TamsConfig(ops=("conv7",))
  with pytest.raises(ValueError, match="config.tams.tau="):
    tams.TamsConfig(tau=(1.0, 0.0, "linear"))
  with pytest.raises(ValueError, match=r"config.tams.width=True must be an integer >= 1"):
    tams.TamsConfig(width=True)  # a bool is not read as 1
  logits = np.zeros((9, 6))
  logits[:, 3] = np.log(3.0)  # glu: probability 3/8 on every edge
  summary = tams.arch_summary(logits, CFG.ops)
  assert list(summary)[:3] == ["0->2", "1->2", "0->3"] and len(summary) == 9
  op, p, h = summary["3->4"]
  assert op == "glu" and p == pytest.approx(3 / 8)
  assert h == pytest.approx(-(3 / 8) * np.log(3 / 8) - 5 * (1 / 8) * np.log(1 / 8))


# ---- the cell in GPT-2 ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm():
  """A tiny GPT-2, its TAMS version, fresh and trained (non-zero W_out) cells, and left-padded sequences [3, P + N]."""
  model, params = small_gpt2()
  m, fresh = with_cells(model, params)
  _, trained = with_cells(model, params, scale=1.0)
  ids = np.random.default_rng(0).integers(1, 13, (3, P + N)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, :2] = mask[2, :4] = 0  # left padding: the cells' nodes are zero there
  plain = forward(model, {"params": params}, ids, mask)
  return types.SimpleNamespace(**locals())


def test_cells_are_in_layer_order():
  """`tams.cell_paths` (the order of per-layer alphas, metric names and eval.json's per-layer architectures) puts
  block 2 before block 10: cell c is layer c, also past ten layers."""
  collection = {"h": {str(i): {"mlp": {"cell": {"in_a": 0.0}}} for i in range(12)}, "controller": {"w": 0.0}}
  assert [p[1] for p in tams.cell_paths(collection)] == [str(i) for i in range(12)]
  nested = [("decoder", "block", "10"), ("encoder", "block", "2"), ("decoder", "block", "9")]
  assert sorted(nested, key=tams._layer_order) == [nested[2], nested[0], nested[1]]


def reference_cell(weights, alpha, h, spec, causal, mask):
  """The cell written out in numpy (float64), edge by edge and position by position: node 0 = h in_a, node 1 =
  h in_b, node j = sum over i < j of the mixture alpha[edge (i, j)] of the operations on node i (zero on padding),
  output = mean of the intermediate nodes @ out."""
  w = jax.tree.map(lambda a: np.asarray(a, np.float64), weights)
  gelu = lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))  # noqa: E731

  def conv(x, kernel, bias, k):  # x [b, t, w]; kernel [k, w, w]: position t reads t-k+1..t (causal) or is centered
    first = -(k - 1) if causal else -((k - 1) // 2)
    y = np.zeros_like(x) + bias
    for t in range(x.shape[1]):
      for j in range(k):
        if 0 <= t + first + j < x.shape[1]:
          y[:, t] += x[:, t + first + j] @ kernel[j]
    return gelu(y)

  def op(name, e, x):
    if name == "linear":
      return gelu(x @ w["linear"]["w"][e] + w["linear"]["b"][e])
    if name in ("conv3", "conv5"):
      return conv(x, w[name]["w"][e], w[name]["b"][e], int(name[-1]))
    if name == "glu":
      a, g = np.split(x @ w["glu"]["w"][e] + w["glu"]["b"][e], 2, axis=-1)
      return a / (1 + np.exp(-g))
    return {"zero": 0 * x, "skip": x}[name]

  m = np.asarray(mask, np.float64)[..., None]
  h = np.asarray(h, np.float64)
  nodes = [h @ w["in_a"] * m, h @ w["in_b"] * m]
  for j in range(2, 2 + spec.nodes):
    total = 0.0
    for i in range(j):
      e = spec.edges.index((i, j))
      mix = np.eye(len(spec.ops))[int(alpha[e])] if np.ndim(alpha) == 1 else np.asarray(alpha[e], np.float64)
      total = total + sum(mix[o] * op(name, e, nodes[i]) for o, name in enumerate(spec.ops) if mix[o])
    nodes.append(total * m)
  return np.mean(nodes[2:], axis=0) @ w["out"]


@pytest.mark.parametrize("causal", [True, False])
def test_cell_matches_a_numpy_reference(causal):
  """`tams.cell` against `reference_cell` with every weight random (out and the biases too): a fixed architecture
  using every operation (integer alpha) and a soft mixture of all of them, with padding."""
  spec = CFG.spec
  weights = perturb(tams._draw(jax.random.key(0), tams.cell_layout(8, CFG)), 0.3)
  rng = np.random.default_rng(0)
  h = rng.standard_normal((2, 7, 8)).astype(np.float32)
  mask = np.ones((2, 7), np.float32)
  mask[1, 5:] = 0
  soft = jax.nn.softmax(jnp.asarray(rng.standard_normal((len(spec.edges), len(spec.ops))), jnp.float32))
  for alpha in (MIXED, soft):
    got, _ = tams.cell(weights, alpha, h, spec, causal=causal, token_mask=mask)
    want = reference_cell(weights, np.asarray(alpha), h, spec, causal, mask)
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_fresh_cells_and_all_zero_edges_leave_the_model_unchanged(lm):
  sampled = tams.with_arch(lm.fresh, tams.gumbel_softmax(jax.random.key(0), jnp.zeros((9, 6)), 1.0))
  np.testing.assert_array_equal(forward(lm.m, sampled, lm.ids, lm.mask), lm.plain)  # W_out = 0 at init
  zero = tams.with_arch(lm.trained, jax.nn.one_hot(ZERO, 6))
  np.testing.assert_array_equal(forward(lm.m, zero, lm.ids, lm.mask), lm.plain)  # zero edges: the plain block
  mixed = forward(lm.m, tams.with_arch(lm.trained, jax.nn.one_hot(MIXED, 6)), lm.ids, lm.mask)
  assert float(jnp.abs(mixed - lm.plain).max()) > 1e-2
  np.testing.assert_array_equal(forward(lm.m, {"params": lm.params}, lm.ids, lm.mask), lm.plain)  # no 'tams'
  with pytest.raises(ValueError, match=r"tams.attach"):
    jax.eval_shape(lm.model.apply, zero, lm.ids)


def test_fixed_architecture_equals_the_soft_path_with_one_hot_alpha(lm):
  arch = tams.discretize(jax.random.normal(jax.random.key(2), (2, 9, 6)))  # per layer: [cells, edges, ops]
  assert arch.shape == (2, 9) and arch.dtype == jnp.int32
  fixed = forward(lm.m, tams.with_arch(lm.trained, arch, per_layer=True), lm.ids, lm.mask)
  soft = forward(lm.m, tams.with_arch(lm.trained, jax.nn.one_hot(arch, 6), per_layer=True), lm.ids, lm.mask)
  np.testing.assert_allclose(fixed, soft, rtol=1e-6, atol=1e-6)
  assert float(jnp.abs(fixed - lm.plain).max()) > 1e-2
  # The cells never read padded positions: other pad ids change no real token's logits.
  other = np.where(lm.mask == 1, lm.ids, 5)
  again = forward(lm.m, tams.with_arch(lm.trained, arch, per_layer=True), other, lm.mask)
  np.testing.assert_allclose(np.where(lm.mask[..., None] == 1, again, 0), np.where(lm.mask[..., None] == 1, fixed, 0))


def test_gpt2_cached_greedy_decoding_equals_uncached_argmax(lm):
  def uncached(variables):  # the full forward over [prompt, generated, right padding], one token at a time
    buf, buf_mask = lm.ids.copy(), lm.mask.copy()
    buf_mask[:, P:] = 0
    for i in range(N):
      buf[:, P + i] = np.asarray(forward(lm.m, variables, buf, buf_mask))[:, P - 1 + i].argmax(-1)
      buf_mask[:, P + i] = 1
    return buf[:, P:]

  fixed = tams.with_arch(lm.trained, MIXED)
  got = np.asarray(decode.generate(lm.m, fixed, lm.ids[:, :P], lm.mask[:, :P], max_new_tokens=N))
  want = uncached(fixed)
  np.testing.assert_array_equal(got, want)
  plain = uncached(tams.with_arch(lm.trained, ZERO))  # the same compiled forward, no cell
  assert (plain != want).any(), "the cells do not change the greedy tokens: the test would not see a cache bug"


# ---- meta-learning: the controller through the prepare hook ------------------------------------------------------


@pytest.fixture(scope="module")
def meta_case():
  """One exact second-order meta-step (float64, SGD at rate 1 so the update is the gradient) with TAMS, noise off,
  per-layer alpha, through `meta.make_meta_step`'s prepare; a probe added to alpha exposes the query loss's
  gradient with respect to alpha. Also the task adapted from its prepared variables, and its query loss."""
  cfg = dataclasses.replace(SMALL, noise=False, tau=(0.7, 0.7, "constant"), per_layer=True)
  inner = meta.InnerLoop(steps=1, lr=0.3, fast_regex="^tarp/|" + tams.FAST_REGEX)  # 1 step: compiles in 2/3 the time
  with jax.enable_x64(True):
    model, params = small_gpt2(layers=1)
    model = model.clone(dtype=jnp.float64)
    m, cells = with_cells(model, params, cfg, scale=0.3)
    x0 = {
      **perturbed_variables(model, params, "bilinear", scale=0.1),
      "tams": cells["tams"],
      "probe": jnp.zeros((5, 5)),
    }
    x0 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), x0)
    support, query = lm_batch(13, (2, 6), seed=5, pad_last=1), lm_batch(13, (2, 6), seed=14)
    batch = {"support": jax.tree.map(lambda x: x[None], support), "query": jax.tree.map(lambda x: x[None], query)}
    prepare = tams.make_prepare(cfg, gpt2.FAMILY.embedding, gpt2.FAMILY.task_tokens)

    def probed(v, s, rng, step):  # TAMS' prepare, then the probe added to every cell's alpha
      out = prepare({k: x for k, x in v.items() if k != "probe"}, s, rng, step)
      return {**out, "arch": jax.tree.map(lambda a: a + v["probe"], out["arch"])}

    loss_fn, key = gpt2.make_loss(m), jax.random.key(0)

    @jax.jit
    def run(x):  # the task adapted from its prepared variables, and its query loss
      prepared = probed(x, support, key, 0)
      adapted = meta.adapt(loss_fn, prepared, support, inner, key)[0]
      return prepared, adapted, meta.mean_loss(loss_fn(adapted, query, key))

    tx = optax.sgd(1.0)
    step = jax.jit(meta.make_meta_step(loss_fn, tx, inner, prepare=probed))
    meta_step = lambda x: step(TrainState.create(x, tx), batch, key)  # noqa: E731
    state, metrics = meta_step(x0)
    grads = jax.tree.map(lambda a, b: a - b, x0, state.variables)
    prepared, adapted, loss = run(x0)
    z = tams.task_embedding(gpt2.FAMILY.embedding(x0["params"]), *gpt2.FAMILY.task_tokens(support))
    soft = lambda c: jax.nn.softmax(tams.controller(c, z, cfg) / tams.tau_at(cfg, 0))  # noqa: E731
    (pulled,) = jax.jit(lambda c, g: jax.vjp(soft, c)[1](g))(x0["tams"]["controller"], grads["probe"][None])
  out = jax.tree.map(np.asarray, dict(x0=x0, grads=grads, loss=loss, prepared=prepared, adapted=adapted, pulled=pulled))
  meta_loss = lambda x: float(meta_step(x)[1]["query_loss"])  # noqa: E731
  return types.SimpleNamespace(**out, query_loss=np.asarray(metrics["query_loss"]), meta_loss=meta_loss)


def test_controller_gets_meta_gradients_and_is_not_adapted(meta_case):
  c = meta_case
  assert float(c.query_loss) == pytest.approx(float(c.loss), rel=1e-12)  # the step adapted the same prepared task
  controller = c.grads["tams"]["controller"]
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(c.grads))
  assert np.abs(controller["w2"]).max() > 1e-6
  for a, b in zip(jax.tree.leaves(controller), jax.tree.leaves(c.pulled)):
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-13)
  assert c.prepared["arch"]["transformer"]["h"]["0"]["tams"]["alpha"].shape == (5, 5)
  jax.tree.map(np.testing.assert_array_equal, c.adapted["tams"]["controller"], c.x0["tams"]["controller"])
  jax.tree.map(np.testing.assert_array_equal, c.adapted["arch"], c.prepared["arch"])
  cell = lambda v: v["tams"]["transformer"]["h"]["0"]["tams"]["out"]  # noqa: E731
  assert np.abs(cell(c.adapted) - cell(c.x0)).max() > 0  # the cells' weights do adapt


def test_second_order_meta_gradient_with_tams_matches_finite_differences(meta_case):
  """Along directions that leave the controller alone (with noise off its argmax stays put, so the meta-loss is
  smooth there), central differences with Richardson extrapolation match the meta-step's exact gradient of every
  variable, the probe on alpha included."""
  c = meta_case
  with jax.enable_x64(True):
    for seed in (0, 1):
      leaves, tree = jax.tree.flatten(c.x0)
      rng = np.random.default_rng(seed)
      direction = tree.unflatten([rng.standard_normal(x.shape) for x in leaves])
      direction["tams"]["controller"] = jax.tree.map(np.zeros_like, direction["tams"]["controller"])
      shift = lambda s: jax.tree.map(lambda x, d: x + s * d, c.x0, direction)  # noqa: E731
      central = lambda eps: (c.meta_loss(shift(eps)) - c.meta_loss(shift(-eps))) / (2 * eps)  # noqa: E731
      fd = (4 * central(5e-7) - central(1e-6)) / 3
      analytic = sum(np.vdot(g, d) for g, d in zip(jax.tree.leaves(c.grads), jax.tree.leaves(direction)))
      np.testing.assert_allclose(float(analytic), float(fd), rtol=1e-6, atol=1e-9)


# ---- T5 ---------------------------------------------------------------------------------------------------------


def test_t5_cached_decoder_equals_the_full_forward_with_tams():
  cfg = t5.T5Config(
    vocab_size=20, d_model=8, d_kv=4, d_ff=8, num_heads=2, num_layers=1, num_decoder_layers=1, dropout_rate=0.0,
    relative_attention_num_buckets=4, relative_attention_max_distance=8, eos_token_id=1,
  )  # fmt: skip
  model = t5.T5ForConditionalGeneration(cfg)
  m, variables = with_cells(model, jax.jit(model.init_params)(jax.random.key(0)), SMALL, 1.0)
  variables = tams.with_arch(variables, SMALL_MIXED)
  rng = np.random.default_rng(1)
  src = rng.integers(2, 20, (2, 6)).astype(np.int32)
  src_mask = np.ones_like(src)
  src_mask[1, 4:] = 0  # right padding: the encoder's centered convolutions must not read it
  new = rng.integers(2, 20, (2, 5)).astype(np.int32)
  got = cached_logits(m, variables, src, src_mask, new, slots=new.shape[1] + 1)  # [b, 6, V]
  dec = np.concatenate([np.zeros((2, 1), np.int32), new], 1)  # the start token (pad, 0), then the new tokens
  full = jax.jit(lambda v, s: m.apply(v, s, dec, attention_mask=src_mask))
  ref = full(variables, src)
  np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
  zero = tams.with_arch(variables, jnp.full((5,), SMALL.ops.index("zero")))  # the same compiled forward, no cell
  assert float(jnp.abs(ref - full(zero, src)).max()) > 1e-2
  np.testing.assert_allclose(full(variables, np.where(src_mask == 1, src, 7)), ref, atol=1e-6)  # padding unread


# ---- the training pipeline ----------------------------------------------------------------------------------------


def test_train_and_evaluate_with_tams(tmp_path):
  """configs/multidomain_lm.py:tiny shrunk (2 + 2 steps, first order, 2 eval tasks, one rate), TAMS on with a
  5-edge cell of 4 operations: the step metrics carry each edge's choice, entropy and probabilities, the plot is
  written, eval.json has every test task's fixed architecture and the parameter overhead."""
  from mltd_jax import train
  from tests.test_main import metrics, tiny_config

  cfg = tiny_config()
  cfg.pretrain.steps, cfg.meta.steps, cfg.log_every = 2, 2, 1
  cfg.meta.first_order, cfg.meta.inner_steps = True, 1  # the cheapest meta step to compile
  cfg.eval.adapt_steps, cfg.data.facts.num_eval_tasks = 1, 2
  cfg.eval.methods, cfg.eval.lr_grid, cfg.eval.select_by = {"tarp": "^tarp/"}, {"default": (0.3,)}, ("query",)
  cfg.tams.enabled, cfg.tams.overhead_steps, cfg.tams.nodes = True, 0, 2  # no timing: one compile fewer
  cfg.tams.ops = ops = ("linear", "conv3", "zero", "skip")
  cfg.model.init.n_layer = 1  # one block, one cell
  result = train.train_and_evaluate(cfg, tmp_path)

  assert result["methods"]["tarp"]["fast_params"] == "(?:^tarp/)|" + tams.FAST_REGEX  # the cells adapt too
  t = result["tams"]
  assert t["ops"] == list(ops) and t["edges"] == ["0->2", "1->2", "0->3", "1->3", "2->3"]
  assert [x["name"] for x in t["tasks"]] == [
    x["name"] for x in result["methods"]["tarp"]["selections"]["query"]["tasks"]
  ]
  assert all(list(x["arch"]) == t["edges"] and set(x["arch"].values()) <= set(ops) for x in t["tasks"])
  over = t["overhead"]
  d, w, h, edges = 64, 8, 32, 5  # :tiny's d_model, config.tams.width and hidden; one cell
  cell = 3 * d * w + edges * (w * w + w) + edges * (3 * w * w + w)  # in_a, in_b, out; linear; conv3
  assert over["tams_params"] == cell + (d * h + h + h * edges * len(ops) + edges * len(ops))  # + controller
  assert over["param_overhead"] == pytest.approx(over["tams_params"] / over["base_params"])
  assert "step_seconds_tams" not in over  # config.tams.overhead_steps=0

  rows = [r for r in metrics(tmp_path) if "meta/query_loss" in r]
  assert [r["step"] for r in rows] == [1, 2]
  # The run reopened (`runs.open_run`): with the test task's fixed architecture (run.prepare) its unadapted query
  # loss is eval.json's; the cells adapt with the method's variables.
  from mltd_jax import runs
  from mltd_jax.data import episodes

  opened = runs.open_run(tmp_path)
  assert opened.fast_regex("^tarp/") == result["methods"]["tarp"]["fast_params"]
  task, scored = opened.source.eval_tasks("test")[0], result["methods"]["tarp"]["selections"]["query"]["tasks"][0]
  arrays = episodes.task_arrays(opened.encoder, task)
  variables = opened.prepare(opened.variables, arrays["support"], jax.random.key(0), None)
  loss = float(meta.mean_loss(opened.loss_fn(variables, arrays["query"], None)))
  assert scored["name"] == task.name and loss == pytest.approx(scored["query_loss"][0], rel=1e-5)
  assert runs.open_run(tmp_path, phase="pretrain").prepare is None  # pretraining had no cells
  cfg.eval.methods = {"all": "."}  # would adapt the controller and the architecture: refused before any compute
  with pytest.raises(ValueError, match=r"config.eval.methods\['all'\]='\.' matches \['tams/controller/"):
    train.train_and_evaluate(cfg, tmp_path / "refused")
  assert not (tmp_path / "refused" / "checkpoints").exists()
  for r in rows:
    for e in range(5):
      p = np.array([r[f"meta/tams/edge{e}_p_{op}"] for op in ops])
      assert p.sum() == pytest.approx(1.0, abs=1e-5)
      assert r[f"meta/tams/edge{e}_op"] == int(p.argmax())
      assert r[f"meta/tams/edge{e}_entropy"] == pytest.approx(-(p * np.log(p)).sum(), rel=1e-4)
  png = (tmp_path / "tams_ops.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
