"""TARP: zero difference at init, the kinds' formulas against explicit references, targets, and that they adapt."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from mltd_jax import matmul, onednn, tarp
from mltd_jax.models import gpt2
from mltd_jax.models.gpt2 import DEFAULT_TARGETS, GPT2LMHeadModel
from mltd_jax.models.layers import dense_paths
from tests.helpers import all_equations, lm_batch, perturbed_variables, tiny_gpt2

KINDS = ["bilinear", "kronecker", "dynamic"]
# Every kind x multiplicative, plus the per-token Phi1(x) of Eq. 3 (with the linear and the MLP Sigma).
CASES = [dict(kind=k, multiplicative=m) for k in KINDS for m in (False, True)] + [
  dict(kind="dynamic", multiplicative=True, dynamic_multiplicative=True),
  dict(kind="dynamic", multiplicative=True, dynamic_multiplicative=True, sigma_hidden=4),
]


def _ids(case):
  return "-".join(f"{k}={v}" for k, v in case.items())


def _randomized(d, seed):
  """Every leaf of one layer's difference replaced by a standard normal draw (so no term is zero)."""
  keys = jax.random.split(jax.random.key(seed), len(d))
  return {name: jax.random.normal(k, x.shape) for (name, x), k in zip(sorted(d.items()), keys)}


def _linear_sigma(w, b, x, r):
  return (x @ w + b).reshape(*x.shape[:-1], r, r)  # [..., r, r]


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_zero_difference_at_init_is_the_base_model(case):
  model, params = tiny_gpt2()
  paths = dense_paths(model)
  diff = tarp.init(jax.random.key(3), params, tarp.TarpConfig(rank=3, targets=DEFAULT_TARGETS, **case), paths)
  ids = lm_batch(13, (2, 7))["ids"]
  base = model.apply({"params": params}, ids)
  reparam = model.apply({"params": params, "tarp": diff}, ids)
  np.testing.assert_allclose(reparam, base, atol=1e-6, rtol=0)
  # ... and the difference is really there: every targeted layer has one, with non-zero U (and Sigma weights).
  assert len(tarp.target_paths(params, DEFAULT_TARGETS, paths)) == 4 * 2
  layers = _layers(diff)
  assert len(layers) == 4 * 2
  for d in layers:
    assert float(jnp.abs(d["U"]).max()) > 0
    for name in ("sigma_w", "sigma1_w", "sigma_w1", "sigma1_w1"):
      assert name not in d or float(jnp.abs(d[name]).max()) > 0


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


def test_linear_sigma_is_the_default_and_starts_at_identity():
  d = tarp.init_layer(jax.random.key(0), 6, 4, tarp.TarpConfig(kind="dynamic", rank=3))
  assert sorted(d) == ["U", "V", "sigma_b", "sigma_w"]
  assert d["sigma_w"].shape == (6, 3 * 3)  # C_in * r^2 parameters
  np.testing.assert_array_equal(d["sigma_b"], jnp.eye(3).reshape(-1))
  assert tarp.is_dynamic(d) and tarp.static_delta(d) is None
  mlp = tarp.init_layer(jax.random.key(0), 6, 4, tarp.TarpConfig(kind="dynamic", rank=3, sigma_hidden=5))
  assert sorted(mlp) == ["U", "V", "sigma_b1", "sigma_b2", "sigma_w1", "sigma_w2"]
  assert tarp.is_dynamic(mlp) and tarp.static_delta(mlp) is None


@pytest.mark.parametrize("sigma_hidden", [0, 5])
def test_dynamic_matches_per_token_matrix(sigma_hidden):
  cfg = tarp.TarpConfig(kind="dynamic", rank=3, sigma_hidden=sigma_hidden, multiplicative=True)
  d = _randomized(tarp.init_layer(jax.random.key(0), 6, 4, cfg), seed=1)
  w0 = jax.random.normal(jax.random.key(2), (6, 4))
  x = jax.random.normal(jax.random.key(3), (2, 5, 6))
  ours = tarp.dense(x, w0, d, jnp.float32)
  if sigma_hidden:  # the MLP option, written out
    h = jax.nn.gelu(x @ d["sigma_w1"] + d["sigma_b1"])
    sig = _linear_sigma(d["sigma_w2"], d["sigma_b2"], h, 3)
  else:  # the default: linear in x
    sig = _linear_sigma(d["sigma_w"], d["sigma_b"], x, 3)  # [2, 5, 3, 3]
  w = (1 + d["U1"] @ d["V1"].T) * w0 + jnp.einsum("ir,btrs,os->btio", d["U"], sig, d["V"])  # per token W(x)
  np.testing.assert_allclose(ours, jnp.einsum("bti,btio->bto", x, w), atol=1e-4, rtol=1e-5)


def test_dynamic_multiplicative_matches_per_token_matrix():
  cfg = tarp.TarpConfig(kind="dynamic", rank=3, multiplicative=True, dynamic_multiplicative=True)
  d = tarp.init_layer(jax.random.key(0), 6, 4, cfg)
  assert sorted(d) == ["U", "U1", "V", "V1", "sigma1_b", "sigma1_w", "sigma_b", "sigma_w"]
  np.testing.assert_array_equal(d["sigma1_b"], jnp.eye(3).reshape(-1))
  d = _randomized(d, seed=1)
  w0 = jax.random.normal(jax.random.key(2), (6, 4))
  x = jax.random.normal(jax.random.key(3), (2, 5, 6))
  ours = tarp.dense(x, w0, d, jnp.float32)
  s = _linear_sigma(d["sigma_w"], d["sigma_b"], x, 3)  # [2, 5, 3, 3]
  s1 = _linear_sigma(d["sigma1_w"], d["sigma1_b"], x, 3)  # [2, 5, 3, 3]
  phi1 = 1 + jnp.einsum("ir,btrs,os->btio", d["U1"], s1, d["V1"])  # [2, 5, 6, 4]
  w = phi1 * w0 + jnp.einsum("ir,btrs,os->btio", d["U"], s, d["V"])  # per token W(x)
  np.testing.assert_allclose(ours, jnp.einsum("bti,btio->bto", x, w), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kind,multiplicative", [("bilinear", True), ("kronecker", True), ("dynamic", False)])
def test_dynamic_multiplicative_needs_dynamic_and_multiplicative(kind, multiplicative):
  with pytest.raises(ValueError, match=re.escape("config.tarp.dynamic_multiplicative")):
    tarp.TarpConfig(kind=kind, multiplicative=multiplicative, dynamic_multiplicative=True)


@pytest.mark.parametrize("remat", [False, True])
def test_dense_paths_are_the_gpt2_dense_layers(remat):
  model, params = tiny_gpt2(layers=1)
  model = GPT2LMHeadModel(model.config, remat=remat)
  assert dense_paths(model) == [
    ("transformer", "h", "0", "attn", "c_attn"),
    ("transformer", "h", "0", "attn", "c_proj"),
    ("transformer", "h", "0", "mlp", "c_fc"),
    ("transformer", "h", "0", "mlp", "c_proj"),
  ]
  flat = traverse_util.flatten_dict(params)
  for path in dense_paths(model):  # the recorded paths are where the kernels live in 'params'
    assert flat[path + ("weight",)].ndim == 2


def test_targets_that_match_nothing_name_the_field():
  model, params = tiny_gpt2()
  with pytest.raises(ValueError, match="tarp.targets"):
    tarp.init(jax.random.key(0), params, tarp.TarpConfig(targets="nothing_here"), dense_paths(model))
  with pytest.raises(ValueError, match="tarp.kind"):
    tarp.TarpConfig(kind="sparse")
  bad = dict(rank=2.5, kron_terms=0, kron_n=0, sigma_hidden=-1, init_scale=0.0)
  for field, value in bad.items():  # a zero-term Kronecker difference would silently never change anything
    with pytest.raises(ValueError, match=re.escape(f"config.tarp.{field}={value!r}")):
      tarp.TarpConfig(kind="kronecker", **{field: value})


@pytest.mark.parametrize("targets,path", [("wte", "transformer/wte"), (r"h/0/ln_1$", "transformer/h/0/ln_1")])
def test_targets_that_match_a_non_dense_module_raise(targets, path):
  model, params = tiny_gpt2()
  paths = dense_paths(model)
  with pytest.raises(ValueError, match=re.escape(path)) as err:
    tarp.init(jax.random.key(0), params, tarp.TarpConfig(targets=targets), paths)
  assert "config.tarp.targets" in str(err.value)
  with pytest.raises(ValueError, match=re.escape(path)):
    tarp.target_paths(params, targets, paths)


def test_perturbed_variables_change_every_leaf_and_the_model():
  model, params = tiny_gpt2()
  ids = lm_batch(13, (2, 7))["ids"]
  for kind in KINDS:
    at_init = perturbed_variables(model, params, kind, scale=0.0)
    variables = perturbed_variables(model, params, kind)
    for a, b in zip(jax.tree.leaves(at_init["tarp"]), jax.tree.leaves(variables["tarp"])):
      assert float(jnp.abs(a - b).min()) > 0
    assert float(jnp.abs(model.apply(variables, ids) - model.apply({"params": params}, ids)).max()) > 1e-3


def _lm_loss(model, params, diff, ids):
  logits = model.apply({"params": params, "tarp": diff}, ids)  # [b, t, vocab]
  return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


@pytest.mark.parametrize("case", [dict(kind=k) for k in KINDS] + [CASES[-2]], ids=_ids)
def test_each_kind_reduces_the_support_loss(case):
  """Five plain gradient-descent steps (lr 0.3) on the difference alone lower the loss at every step."""
  model, params = tiny_gpt2(d=16)
  diff = tarp.init(
    jax.random.key(0),
    params,
    tarp.TarpConfig(rank=4, init_scale=0.3, targets=DEFAULT_TARGETS, **case),
    dense_paths(model),
  )
  start = diff
  ids = jnp.asarray(lm_batch(13, (4, 10), seed=5)["ids"])
  value_and_grad = jax.jit(jax.value_and_grad(lambda t: _lm_loss(model, params, t, ids)))
  losses = []
  for _ in range(5):
    loss, grad = value_and_grad(diff)
    losses.append(float(loss))
    diff = jax.tree.map(lambda p, g: p - 0.3 * g, diff, grad)
  losses.append(float(value_and_grad(diff)[0]))
  assert all(b < a for a, b in zip(losses, losses[1:])), losses
  # Every difference parameter got a gradient on the way (U, H, Sigma's and Phi1's only once V, V1 left zero).
  for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(diff)):
    assert float(jnp.abs(a - b).max()) > 0


def test_fold_gives_the_same_logits_and_leaves_only_dynamic_terms():
  """Folding the static parts into the kernels (before decoding) changes no output, for every case at once."""
  model, params = tiny_gpt2()
  ids = lm_batch(13, (2, 7))["ids"]
  for case in CASES:
    variables = perturbed_variables(model, params, **case)
    params_f, left = tarp.fold(variables["params"], variables["tarp"])
    folded = model.apply({"params": params_f, **({"tarp": left} if left else {})}, ids)
    np.testing.assert_allclose(folded, model.apply(variables, ids), atol=1e-5, rtol=0, err_msg=str(case))
    names = {k[-1] for k in traverse_util.flatten_dict(left)}
    if case["kind"] != "dynamic":
      assert left == {}, case
    else:  # the per-token terms stay; the static Phi1 (U1, V1 without Sigma1) is folded
      assert {"U", "V"} <= names and (("U1" in names) == case.get("dynamic_multiplicative", False)), (case, names)


def _cubic_of(mm):
  """A scalar of x @ (w + u v^T) with non-zero third derivatives, so second order terms all show up."""
  c = jax.random.normal(jax.random.key(9), (5, 4))
  return lambda x, w, u, v: jnp.sum(jnp.sin(mm(x, w, u, v)) * c)


@pytest.mark.parametrize("argnums", [(0, 1, 2, 3), (0, 2, 3), (2, 3), (1, 2), (0,)], ids=str)
def test_lowrank_matmul_derivatives_equal_the_plain_product(argnums):
  """`tarp.lowrank_matmul` keeps its derivatives low rank; values, gradients and Hessians (forward-over-reverse and
  reverse-over-reverse) equal those of the plain x @ (w + u v^T), with and without a tangent for w."""
  keys = jax.random.split(jax.random.key(0), 4)
  args = [jax.random.normal(k, s) for k, s in zip(keys, [(5, 6), (6, 4), (6, 3), (4, 3)])]
  ours, plain = _cubic_of(tarp.lowrank_matmul), _cubic_of(lambda x, w, u, v: x @ (w + u @ v.T))
  np.testing.assert_allclose(ours(*args), plain(*args), rtol=1e-6)
  for transform in (jax.grad, jax.hessian, lambda f, argnums: jax.jacrev(jax.grad(f, argnums), argnums)):
    got, want = (jax.jit(transform(f, argnums=argnums))(*args) for f in (ours, plain))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


def test_bilinear_dense_uses_the_low_rank_product_and_saves_the_dense_weight_gradient():
  """An additive bilinear layer goes through `lowrank_matmul`: its gradient w.r.t. (U, V) has no [C_in, C_out]
  matmul (XLA's FLOP count drops by that matmul) and equals the plain layer's."""
  n, c_in, c_out, r = 64, 32, 48, 2
  keys = jax.random.split(jax.random.key(1), 4)
  x, w = jax.random.normal(keys[0], (2, n // 2, c_in)), jax.random.normal(keys[1], (c_in, c_out))
  d = {"U": jax.random.normal(keys[2], (c_in, r)), "V": jax.random.normal(keys[3], (c_out, r))}
  loss = lambda d, f: jnp.sum(jnp.tanh(f(x, w, d)))  # noqa: E731
  plain = lambda x, w, d: x @ (w + d["U"] @ d["V"].T)  # noqa: E731
  ours = lambda x, w, d: tarp.dense(x, w, d, jnp.float32)  # noqa: E731
  np.testing.assert_allclose(ours(x, w, d), plain(x, w, d), rtol=1e-5, atol=1e-5)
  g_ours, g_plain = jax.grad(loss)(d, ours), jax.grad(loss)(d, plain)
  for k in d:
    np.testing.assert_allclose(g_ours[k], g_plain[k], rtol=1e-4, atol=1e-4)
  def flops(f):  # with the oneDNN kernel off: XLA does not count a custom call (the float32 weight gradients')
    with onednn.disabled():
      return jax.jit(jax.grad(loss), static_argnums=1).lower(d, f).compile().cost_analysis()["flops"]

  assert flops(plain) - flops(ours) >= 0.75 * 2 * n * c_in * c_out  # the dense dW = x^T dY is gone (thin ops added)


def test_lowrank_matmul_traces_the_dense_weight_gradient_only_where_w_is_differentiated():
  """The custom VJP's symbolic zeros: a gradient w.r.t. (u, v) alone (the inner loop's) traces no x^T dY [C_in, C_out]
  product at all (not merely one XLA drops under jit: eager calls would compute it); one w.r.t. w traces it."""
  n, c_in, c_out, r = 64, 32, 48, 2
  keys = jax.random.split(jax.random.key(3), 4)
  x, w, u, v = (jax.random.normal(k, s) for k, s in zip(keys, [(n, c_in), (c_in, c_out), (c_in, r), (c_out, r)]))

  def dense_grads(fn, *args) -> int:  # products contracting the n tokens into a [C_in, C_out] result
    return sum(
      bool(eqn.outvars) and eqn.outvars[0].aval.shape == (c_in, c_out)
      and any(n in getattr(a.aval, "shape", ()) for a in eqn.invars)
      for eqn in all_equations(jax.make_jaxpr(fn)(*args))
    )  # fmt: skip

  loss = lambda x, w, u, v: jnp.sum(jnp.tanh(tarp.lowrank_matmul(x, w, u, v)))  # noqa: E731
  assert dense_grads(jax.grad(loss, (2, 3)), x, w, u, v) == 0
  assert dense_grads(jax.grad(loss, (0, 2, 3)), x, w, u, v) == 0
  assert dense_grads(jax.grad(loss, (1, 2, 3)), x, w, u, v) == 1


def test_lowrank_matmul_input_cotangent_is_one_dense_product_and_its_hessian_vector_product_stays_thin():
  """The input's cotangent is dY W_eff^T, the plain expression's own count (no thin dY v, (dY v) u^T and their sum
  beside dY w^T); a forward-over-reverse Hessian-vector product along (u, v) (the meta-step's form) stays thin:
  at least two dense products fewer than the plain expression's, which multiplies by W_eff's dense tangent."""
  n, c_in, c_out, r = 64, 32, 48, 2
  keys = jax.random.split(jax.random.key(1), 4)
  args = [jax.random.normal(k, s) for k, s in zip(keys, [(n, c_in), (c_in, c_out), (c_in, r), (c_out, r)])]
  plain = lambda x, w, u, v: x @ (w + u @ v.T)  # noqa: E731
  loss = lambda f: lambda x, w, u, v: jnp.sum(jnp.tanh(f(x, w, u, v)))  # noqa: E731

  def hvp(f):
    full = jax.grad(loss(f), (0, 1, 2, 3))
    return lambda x, w, u, v: jax.jvp(lambda u, v: full(x, w, u, v), (u, v), (u, v))[1]

  def flops(fn):  # with the oneDNN kernel off: XLA does not count a custom call
    with onednn.disabled():
      return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]

  assert flops(jax.grad(loss(tarp.lowrank_matmul))) <= flops(jax.grad(loss(plain)))
  assert flops(hvp(plain)) - flops(hvp(tarp.lowrank_matmul)) >= 2 * 2 * n * c_in * c_out
  for a, b in zip(jax.jit(hvp(tarp.lowrank_matmul))(*args), jax.jit(hvp(plain))(*args), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))
  # where `matmul` binds its own primitive (bfloat16 on XLA:CPU; float32 too with the kernel) the rule's two
  # low-rank terms are one product
  narrow = [args[0].astype(jnp.bfloat16), *args[1:]]
  if matmul.primitive(jnp.bfloat16):
    assert "sum_of_two_products" in str(jax.make_jaxpr(hvp(tarp.lowrank_matmul))(*narrow))
  # leading axes on x: the forward and every derivative flatten them
  x3 = args[0].reshape(2, n // 2, c_in)
  got, want = (jax.grad(loss(f), (0, 2))(x3, *args[1:]) for f in (tarp.lowrank_matmul, plain))
  for a, b in zip(got, want, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))
  # the same through the Hessian-vector product in bfloat16, where the rule's pair is `matmul`'s primitive on any CPU
  x3 = x3.astype(jnp.bfloat16)
  plain16 = lambda x, w, u, v: x @ (w + u @ v.T).astype(x.dtype)  # noqa: E731
  got, want = (jax.jit(hvp(f))(x3, *args[1:]) for f in (tarp.lowrank_matmul, plain16))
  for a, b in zip(got, want, strict=True):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    np.testing.assert_allclose(a, b, rtol=0.1, atol=0.05 * float(jnp.abs(b).max()))


def test_lowrank_matmul_in_bfloat16_sums_the_difference_in_the_parameters_dtype():
  """bfloat16 compute with float32 parameters: the same value as the unfactored layer (w + u v^T summed in float32,
  then cast), and float32 gradients for U, V close to the plain expression's."""
  keys = jax.random.split(jax.random.key(2), 4)
  x = jax.random.normal(keys[0], (16, 32)).astype(jnp.bfloat16)
  w, u, v = (jax.random.normal(k, s) for k, s in zip(keys[1:], [(32, 24), (32, 4), (24, 4)]))
  # the product of the bfloat16 operands, summed in float32: the result on XLA:CPU (`mltd_jax.matmul`), else rounded
  out = jnp.float32 if matmul.mixed(x.dtype) else x.dtype
  plain = lambda x, w, u, v: jax.lax.dot(x, (w + u @ v.T).astype(x.dtype), preferred_element_type=out)  # noqa: E731
  np.testing.assert_array_equal(tarp.lowrank_matmul(x, w, u, v), plain(x, w, u, v))
  loss = lambda f: lambda u, v: jnp.sum(f(x, w, u, v).astype(jnp.float32) ** 2)  # noqa: E731
  got, want = jax.grad(loss(tarp.lowrank_matmul), (0, 1))(u, v), jax.grad(loss(plain), (0, 1))(u, v)
  for a, b in zip(got, want):
    assert a.dtype == jnp.float32
    np.testing.assert_allclose(a, b, rtol=0.05, atol=0.05 * float(jnp.abs(b).max()))


def test_dot_saving_remat_policies_keep_the_low_rank_layers_outputs():
  """`dots_saveable` (and its kin, `layers.DOT_POLICIES`) does not see the matmul inside `lowrank_matmul`'s
  custom VJP call; `layers.remat_policy` adds its checkpoint name, so remat with it recomputes little (XLA FLOPs)."""
  cfg = dict(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, embd_pdrop=0.0, resid_pdrop=0.0)
  ids = jax.random.randint(jax.random.key(3), (4, 32), 0, 64)

  def flops(remat):
    model = GPT2LMHeadModel(gpt2.GPT2Config(**cfg, attn_pdrop=0.0), remat=remat)
    params = model.init_params(jax.random.key(0))
    tcfg = tarp.TarpConfig(kind="bilinear", rank=4, targets=DEFAULT_TARGETS)
    diff = jax.tree.map(lambda a: a + 0.01, tarp.init(jax.random.key(1), params, tcfg, dense_paths(model)))
    loss = lambda d: jnp.std(model.apply({"params": params, "tarp": d}, ids))  # noqa: E731
    with onednn.disabled():  # XLA does not count a custom call (the oneDNN kernel's weight gradients)
      return jax.jit(jax.grad(loss)).lower(diff).compile().cost_analysis()["flops"]

  assert flops("dots_saveable") < 1.1 * flops(False)  # before the name: 1.26x (the layers' matmuls recomputed)
