"""`mltd_jax.matmul`: narrow products with float32 accumulation in every derivative (XLA:CPU), plain ones otherwise."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mltd_jax import matmul, onednn
from mltd_jax.models import layers

BF16 = jnp.bfloat16


def _rounded(x, y, transpose_y=False):
  """The reference: both operands rounded to bfloat16, multiplied exactly in float32."""
  y = jnp.swapaxes(y, -1, -2) if transpose_y else y
  r = lambda a: a.astype(BF16).astype(jnp.float32)  # noqa: E731
  return jnp.matmul(r(x), r(y), precision=jax.lax.Precision.HIGHEST)


def _operands(batch=(), transpose_y=False, m=12, k=8, n=6):
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (*batch, m, k))
  y = jax.random.normal(keys[1], (*batch, n, k) if transpose_y else (*batch, k, n))
  return x, y, jax.random.normal(keys[2], y.shape)


def _primitives(f, *args) -> list[str]:
  return [str(e.primitive) for e in jax.make_jaxpr(f)(*args).eqns]


def test_float32_is_the_plain_dot_and_narrow_is_the_primitive_on_cpu():
  """Without the oneDNN kernel float32 is XLA's dot (with it, `test_float32_products_on_the_kernel`)."""
  x, y, _ = _operands()
  with onednn.disabled():
    assert _primitives(lambda x, y: matmul.matmul(x, y), x, y) == ["dot_general"]
    np.testing.assert_array_equal(matmul.matmul(x, y), x @ y)
    assert not matmul.kernel_float32(jnp.float32) and not matmul.primitive(jnp.float32)
  assert matmul.mixed(BF16) and matmul.mixed(jnp.float16) and not matmul.mixed(jnp.float32)
  assert not matmul.kernel_float32(BF16) and not matmul.kernel_float32(jnp.float64)
  xb = x.astype(BF16)
  assert _primitives(lambda x, y: matmul.matmul(x, y), xb, y) == ["lowp_matmul"]
  assert matmul.matmul(xb, y).dtype == jnp.float32
  with pytest.raises(ValueError, match="contract unequal axes"):  # checked when traced
    jax.make_jaxpr(matmul.matmul)(xb, y.T)


@pytest.mark.parametrize("batch, transpose_y", [((), False), ((), True), ((3,), True), ((3,), False)])
def test_value_gradients_and_hessian_vector_products_of_the_narrow_product(batch, transpose_y):
  """Value: the rounded operands' exact product. Gradients and forward-over-reverse HVPs (the meta-step's backward):
  within bfloat16 rounding of the reference's, and equal to reverse-over-reverse (the JVP and transposes agree)."""
  x, y, v = _operands(batch, transpose_y)
  ours = lambda x, y: jnp.sum(jnp.tanh(matmul.matmul(x.astype(BF16), y, transpose_y=transpose_y)) ** 2)  # noqa: E731
  ref = lambda x, y: jnp.sum(jnp.tanh(_rounded(x, y, transpose_y)) ** 2)  # noqa: E731
  np.testing.assert_allclose(matmul.matmul(x.astype(BF16), y, transpose_y=transpose_y), _rounded(x, y, transpose_y),
                             rtol=1e-5, atol=1e-5)  # fmt: skip
  for got, want in zip(jax.grad(ours, (0, 1))(x, y), jax.grad(ref, (0, 1))(x, y)):
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-2 * float(jnp.abs(want).max()))
  fwd_rev = lambda f: jax.jvp(lambda y: jax.grad(f, 1)(x, y), (y,), (v,))[1]  # noqa: E731
  rev_rev = jax.grad(lambda y: jnp.vdot(jax.grad(ours, 1)(x, y), v))(y)
  want = fwd_rev(ref)
  np.testing.assert_allclose(fwd_rev(ours), want, rtol=0, atol=3e-2 * float(jnp.abs(want).max()))
  np.testing.assert_allclose(rev_rev, fwd_rev(ours), rtol=0, atol=3e-2 * float(jnp.abs(want).max()))


def test_float32_products_on_the_kernel():
  """Float32 on XLA:CPU with the kernel: `matmul` binds the primitive in float32 and every product runs on the kernel
  (forward, input gradient, weight gradient `tn_matmul`, and their derivatives); values and gradients equal the
  plain dot's to float32 rounding (summed in another order), and so do forward-over-reverse HVPs."""
  if not onednn.available():
    pytest.skip("no oneDNN kernel here: " + str(onednn._load()))
  x, y, v = _operands((3,))
  assert matmul.kernel_float32(jnp.float32) and matmul.primitive(jnp.float32)
  loss = lambda x, y: jnp.sum(jnp.tanh(matmul.matmul(x, y)) ** 2)  # noqa: E731
  grad = lambda x, y: jax.grad(loss, (0, 1))(x, y)  # noqa: E731
  prims = _primitives(grad, x, y)
  assert prims.count("lowp_matmul") == 2 and prims.count("tn_matmul") == 1 and "dot_general" not in prims
  text = jax.jit(grad).lower(x, y).as_text()
  assert text.count(onednn.TARGET) == 3 and "dot_general" not in text  # forward, input and weight gradients
  hvp_text = jax.jit(lambda y: jax.jvp(lambda y: jax.grad(loss, 1)(x, y), (y,), (v,))[1]).lower(y).as_text()
  assert onednn.TARGET in hvp_text and "dot_general" not in hvp_text
  with onednn.disabled():
    want_value, want_grad = matmul.matmul(x, y), jax.jit(lambda x, y: jax.grad(loss, (0, 1))(x, y))(x, y)
    want_hvp = jax.jvp(lambda y: jax.grad(loss, 1)(x, y), (y,), (v,))[1]
  assert matmul.matmul(x, y).dtype == jnp.float32
  np.testing.assert_allclose(matmul.matmul(x, y), want_value, rtol=1e-5, atol=1e-5 * float(jnp.abs(want_value).max()))
  for got, want in zip(jax.jit(grad)(x, y), want_grad):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
  got_hvp = jax.jvp(lambda y: jax.grad(loss, 1)(x, y), (y,), (v,))[1]
  np.testing.assert_allclose(got_hvp, want_hvp, rtol=1e-5, atol=1e-5 * float(jnp.abs(want_hvp).max()))


def test_the_backward_products_stay_narrow():
  """The gradient w.r.t. x is the narrow product again (the fast form on XLA:CPU); the weight's is `tn_matmul`."""
  x, y, _ = _operands()
  grad = lambda x, y: jax.grad(lambda x, y: jnp.sum(matmul.matmul(x.astype(BF16), y) ** 2), (0, 1))(x, y)  # noqa: E731
  prims = _primitives(grad, x, y)
  assert prims.count("lowp_matmul") == 2 and prims.count("tn_matmul") == 1 and "dot_general" not in prims
  # bfloat16's forward-form products stay XLA's (AMX: kernel=False), in the HVP's tangent products too
  v = jnp.ones_like(y)
  hvp = lambda x, y: jax.jvp(lambda y: grad(x, y)[1], (y,), (v,))[1]  # noqa: E731
  for f in (grad, hvp):
    eqns = [e for e in jax.make_jaxpr(f)(x, y).eqns if str(e.primitive) in ("lowp_matmul", "tn_matmul")]
    assert eqns and all(not e.params["kernel"] for e in eqns if str(e.primitive) == "lowp_matmul")
    assert all(e.params["kernel"] == onednn.available() for e in eqns if str(e.primitive) == "tn_matmul")


@pytest.mark.parametrize("kernel", [True, False], ids=["onednn", "xla"])
@pytest.mark.parametrize("dtype", [BF16, jnp.float32], ids=["bfloat16", "float32"])
def test_weight_gradient_product_values_and_derivatives(kernel, dtype):
  """`tn_matmul` (a^T c over the token axis): through the oneDNN kernel in bfloat16 (operands rounded) and float32,
  without it XLA's float32 dot; the value within the operands' rounding of the exact product; gradients and
  forward-over-reverse HVPs equal to reverse-over-reverse (its JVP and transposes agree) and to the reference's."""
  if kernel and not onednn.available():
    pytest.skip("no oneDNN kernel here: " + str(onednn._load()))
  keys = jax.random.split(jax.random.key(1), 3)
  a, c = jax.random.normal(keys[0], (3, 40, 6)), jax.random.normal(keys[1], (3, 40, 5))
  narrow = kernel and dtype == BF16
  r = (lambda t: t.astype(BF16).astype(jnp.float32)) if narrow else (lambda t: t)  # noqa: E731
  ref = lambda a, c: jnp.einsum("bkm,bkn->bmn", r(a), r(c), precision=jax.lax.Precision.HIGHEST)  # noqa: E731
  with contextlib.nullcontext() if kernel else onednn.disabled():
    f = jax.jit(lambda a, c: matmul.tn_matmul(a, c, dtype))
    assert (onednn.TARGET in f.lower(a, c).as_text()) == kernel
    np.testing.assert_allclose(f(a, c), ref(a, c), rtol=1e-5, atol=1e-4)
    ours = lambda a, c: jnp.sum(jnp.tanh(matmul.tn_matmul(a, c, dtype)) ** 2)  # noqa: E731
    want = lambda a, c: jnp.sum(jnp.tanh(ref(a, c)) ** 2)  # noqa: E731
    tol = 2e-2 if narrow else 1e-4
    for got, w in zip(jax.grad(ours, (0, 1))(a, c), jax.grad(want, (0, 1))(a, c)):
      np.testing.assert_allclose(got, w, rtol=0, atol=tol * float(jnp.abs(w).max()))
    v = jax.random.normal(keys[2], c.shape)
    fwd_rev = jax.jvp(lambda c: jax.grad(ours, 1)(a, c), (c,), (v,))[1]
    rev_rev = jax.grad(lambda c: jnp.vdot(jax.grad(ours, 1)(a, c), v))(c)
    np.testing.assert_allclose(rev_rev, fwd_rev, rtol=0, atol=tol * float(jnp.abs(fwd_rev).max()))


@pytest.mark.parametrize("dtype", [BF16, jnp.float32], ids=["bfloat16", "float32"])
@pytest.mark.parametrize("axes", [(0, None), (None, 0), (0, 0), (1, 0)])
def test_weight_gradient_product_vmap_matches_one_at_a_time(axes, dtype):
  """vmap of `tn_matmul` (through the kernel where it is available): a batched operand against a shared one, both
  batched, and a batch axis not in front."""
  keys = jax.random.split(jax.random.key(2), 2)
  a, c = jax.random.normal(keys[0], (3, 40, 6), dtype), jax.random.normal(keys[1], (3, 40, 5), dtype)
  args = [a if axes[0] is not None else a[0], c if axes[1] is not None else c[0]]
  if axes[0] == 1:
    args[0] = jnp.moveaxis(a, 0, 1)
  f = lambda a, c: matmul.tn_matmul(a, c, dtype)  # noqa: E731
  got = jax.vmap(f, axes)(*args)
  for i in range(3):
    ai = args[0] if axes[0] is None else jnp.take(args[0], i, axes[0])
    ci = args[1] if axes[1] is None else args[1][i]
    np.testing.assert_allclose(got[i], f(ai, ci), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [BF16, jnp.float32], ids=["bfloat16", "float32"])
@pytest.mark.parametrize("axes", [(0, None), (None, 0), (0, 0), (1, 0)])
def test_vmap_matches_one_example_at_a_time(axes, dtype):
  """Tasks vmapped: a batched x against a shared 2-D y folds into rows; a batched y adds a batch axis (float32: the
  primitive where `matmul.kernel_float32`, else XLA's dot)."""
  x, y, _ = _operands((3,))
  x, y = x.astype(dtype), y.astype(dtype)
  args = [x if axes[0] is not None else x[0], y if axes[1] is not None else y[0]]
  if axes[0] == 1:
    args[0] = jnp.moveaxis(x, 0, 1)
  f = lambda x, y: jnp.tanh(matmul.matmul(x, y))  # noqa: E731
  got = jax.vmap(f, axes)(*args)
  for i in range(3):
    xi = args[0] if axes[0] is None else jnp.take(args[0], i, axes[0])
    yi = args[1] if axes[1] is None else args[1][i]
    np.testing.assert_array_equal(got[i], f(xi, yi))


@pytest.mark.parametrize("dtype", [BF16, jnp.float32], ids=["bfloat16", "float32"])
def test_dot_saving_remat_policies_keep_the_narrow_products(dtype):
  """`layers.remat_policy('dots_saveable')` saves the primitive's outputs ('dots_with_no_batch_dims_saveable': 2-D
  only), as it saves ``dot_general``'s: bfloat16's, and float32's where it binds the primitive (`kernel_float32`)."""
  if not matmul.primitive(dtype):
    pytest.skip(f"{jnp.dtype(dtype)} products are XLA's dot here (no oneDNN kernel)")
  x, y, _ = _operands()
  f = lambda x, y: jnp.sum(jnp.sin(matmul.matmul(x.astype(dtype), y)))  # noqa: E731
  for name, saved in [("dots_saveable", True), ("nothing_saveable", False)]:
    g = jax.checkpoint(f, policy=layers.remat_policy(name))
    # the forward's product, once more when not saved (remat's recomputation), and the x gradient's
    jaxpr = str(jax.make_jaxpr(jax.grad(g, (0, 1)))(x, y))
    assert jaxpr.count("lowp_matmul") == (2 if saved else 3), (name, jaxpr)
  policy = matmul.saveable(batched=False)
  for prim in (matmul.lowp_matmul_p, matmul.pair_p):  # `sum_of_products` replaces two products in the JVP rules
    assert policy(prim, jax.core.ShapedArray((4, 3), BF16))
    assert not policy(prim, jax.core.ShapedArray((2, 4, 3), BF16))


def _two_products(a1, b1, a2, b2):
  """The reference for `matmul.sum_of_products`: a1 b1^T + a2 b2^T as two products and their sum."""
  return matmul.matmul(a1, b1, transpose_y=True) + matmul.matmul(a2, b2, transpose_y=True)


@pytest.mark.parametrize("dtype", [jnp.float32, BF16], ids=["float32", "bfloat16"])
def test_sum_of_products_equals_two_products_at_every_order_and_under_vmap(dtype):
  """`matmul.sum_of_products` (a1 b1^T + a2 b2^T as one product): the value, and the gradient, forward-over-reverse
  and reverse-over-reverse Hessians, of a function using it as a JVP uses it (a tangent in one factor of each term:
  a1 and b2), equal those of the two products; vmap over a leading axis; the tangent term of a term with two
  tangents is itself one such product."""
  keys = jax.random.split(jax.random.key(4), 5)
  n, c, r = 9, 7, 3
  a1, a2 = (jax.random.normal(k, (n, r)) for k in keys[:2])
  b1, b2 = (jax.random.normal(k, (c, r)) for k in keys[2:4])
  w = jax.random.normal(keys[4], (n, c))
  cast = lambda *xs: [x.astype(dtype) for x in xs]  # noqa: E731

  def scalar(f):  # a1 and b2 carry the variables, as in the JVP rule's (x du) v^T + (x u) dv^T
    return lambda p, q: jnp.sum(jnp.sin(f(*cast(p * a1, b1, a2, q * b2)).astype(jnp.float32)) * w)

  got, want = matmul.sum_of_products(*cast(a1, b1, a2, b2)), _two_products(*cast(a1, b1, a2, b2))
  assert got.dtype == want.dtype == matmul.result_dtype(dtype)
  tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
  np.testing.assert_allclose(got, want, **tol)
  p, q = jnp.ones((n, r)), jnp.ones((c, r))
  for transform in (jax.grad, jax.hessian, lambda f, argnums: jax.jacrev(jax.grad(f, argnums), argnums)):
    ours, ref = (jax.jit(transform(scalar(f), argnums=(0, 1)))(p, q) for f in (matmul.sum_of_products, _two_products))
    for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):  # bfloat16: sums in other orders
      loose = dict(rtol=1e-2, atol=1e-2 * float(jnp.abs(y).max()))
      np.testing.assert_allclose(x, y, **(tol if dtype == jnp.float32 else loose))
  batched = jax.vmap(matmul.sum_of_products, in_axes=(0, None, 0, None))(*cast(jnp.stack([a1, -a1]), b1,
                                                                               jnp.stack([a2, a2]), b2))
  np.testing.assert_allclose(batched[1], _two_products(*cast(-a1, b1, a2, b2)), **tol)
  jvp_prims = _primitives(lambda a1, b1: jax.jvp(matmul.sum_of_products, (a1, b1, a2, b2), (a1, b1, a2, b2))[1], a1, b1)
  assert jvp_prims.count("sum_of_two_products") == 3  # the primal, and each term's two-tangent product
  tangents = cast(w[:, :r], b1 * 0.5, a2[::-1], -b2)  # a tangent on every operand: both terms two-tangent
  got, want = (jax.jvp(f, cast(a1, b1, a2, b2), tangents)[1] for f in (matmul.sum_of_products, _two_products))
  np.testing.assert_allclose(got, want, **tol)
  # operands of two dtypes (a2, b2 float32): the tangent products are computed in a1's dtype, as the primal
  mixed = (*cast(a1, b1), a2, b2)
  eqns = jax.make_jaxpr(lambda *p: jax.jvp(matmul.sum_of_products, p, p)[1])(*mixed).eqns
  assert {str(e.invars[0].aval.dtype) for e in eqns if str(e.primitive) == "sum_of_two_products"} == {
    jnp.dtype(dtype).name}


@pytest.mark.parametrize("dtype", [jnp.float32, BF16], ids=["float32", "bfloat16"])
def test_sum_of_products_transposes_term_by_term(dtype):
  """Where each term has one linear factor (a1 and b2, or b1 and a2) the transpose is each factor's product with the
  cotangent, as for the two products; a term with no linear factor (affine) or two (not linear) is an error."""
  keys = jax.random.split(jax.random.key(5), 5)
  a1, a2, ct = (jax.random.normal(k, s) for k, s in zip(keys[:3], [(9, 3), (9, 2), (9, 7)]))
  b1, b2 = jax.random.normal(keys[3], (7, 3)), jax.random.normal(keys[4], (7, 2))
  a1, b1, a2, b2 = (x.astype(dtype) for x in (a1, b1, a2, b2))
  ct = ct.astype(matmul.result_dtype(dtype))

  for linear in ((0, 3), (1, 2)):
    def lin(f):
      return lambda x, y: f(*[(x, y)[linear.index(i)] if i in linear else v for i, v in enumerate((a1, b1, a2, b2))])

    primals = [(a1, b1, a2, b2)[i] for i in linear]
    got = jax.linear_transpose(lin(matmul.sum_of_products), *primals)(ct)
    want = jax.linear_transpose(lin(_two_products), *primals)(ct)
    for x, y in zip(got, want, strict=True):
      assert x.dtype == y.dtype == dtype
      np.testing.assert_allclose(x.astype(jnp.float32), y.astype(jnp.float32), rtol=1e-5, atol=1e-5)
  with pytest.raises(NotImplementedError, match="exactly one linear factor"):
    jax.linear_transpose(lambda a1: matmul.sum_of_products(a1, b1, a2, b2), a1)(ct)
  # a symbolic zero cotangent (JAX's transposes may pass one) gives no cotangents
  undefined = lambda x: jax.interpreters.ad.UndefinedPrimal(jax.core.ShapedArray(x.shape, x.dtype))  # noqa: E731
  zero = jax.interpreters.ad.Zero(jax.core.ShapedArray(ct.shape, ct.dtype))
  assert matmul._pair_transpose(zero, undefined(a1), b1, a2, undefined(b2)) == [None] * 4
