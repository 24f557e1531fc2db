"""`mltd_jax.onednn`: the oneDNN custom call against numpy, its errors, and how it says why it is unavailable."""

import os
import re
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mltd_jax import onednn

# The kernel must build and load wherever a C++ compiler is, on XLA:CPU with the kernel not turned off, and on a CPU
# with native bfloat16 (`kernel_here` skips the others, saying why): only those conditions skip. Without the oneDNN
# wheels (requirements.txt) the assertion fails, with the reason.
needs_kernel = pytest.mark.skipif(
  (shutil.which("c++") is None and shutil.which("g++") is None)
  or not onednn.WHEELS_HERE
  or jax.default_backend() != "cpu"
  or os.environ.get(onednn.ENV, "1") == "0",
  reason="no C++ compiler, no oneDNN wheels for this platform, not XLA:CPU, or the kernel turned off",
)


def kernel_here() -> None:
  """Skip on a CPU the kernel is not for (`onednn.UnsupportedCPU`); elsewhere the kernel must be available."""
  if onednn.unsupported_cpu():
    pytest.skip(str(onednn._load()))
  assert onednn.available(), onednn._load()


def _product_and_numpy(b, m, k, n, transpose_a, transpose_b, dtype, seed):
  """`onednn.product` of random operands of ``dtype`` (a [*b, M, K] or [*b, K, M], c [*b, K, N] or [*b, N, K]) and
  numpy's float32 product of the same (rounded) operands."""
  rng = np.random.default_rng(seed)
  a = rng.standard_normal((*b, k, m) if transpose_a else (*b, m, k), np.float32)
  c = rng.standard_normal((*b, n, k) if transpose_b else (*b, k, n), np.float32)
  a, c = np.asarray(jnp.asarray(a, dtype).astype(jnp.float32)), np.asarray(jnp.asarray(c, dtype).astype(jnp.float32))
  got = jax.jit(lambda a, c: onednn.product(a, c, transpose_a=transpose_a, transpose_b=transpose_b))(
    jnp.asarray(a, dtype), jnp.asarray(c, dtype)
  )
  want = (np.swapaxes(a, -1, -2) if transpose_a else a) @ (np.swapaxes(c, -1, -2) if transpose_b else c)
  return got, want


@needs_kernel
@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_product_matches_numpy(transpose_a, transpose_b, dtype):
  kernel_here()
  b, m, n = (2, 3), 7, 5
  got, want = _product_and_numpy(b, m, 33, n, transpose_a, transpose_b, dtype, seed=0)
  assert got.dtype == jnp.float32 and got.shape == (*b, m, n)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)  # the operands are exact in dtype: float32 sums


@needs_kernel
@pytest.mark.parametrize(
  "b,m,k,n",
  [((), 508, 256, 72), ((), 40, 256, 508), ((16,), 127, 64, 127), ((5,), 100, 96, 100)],
  ids=["rows", "columns", "batch", "batch-uneven"],
)
@pytest.mark.parametrize("transpose_a,transpose_b", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_products_cut_into_pieces_match_numpy(b, m, k, n, transpose_a, transpose_b, dtype):
  """Products of 1 MFLOP or more are cut into pieces for XLA's pool threads (rows of the result where it has more
  rows than columns, else columns, or batch entries); leading dimensions and offsets of every piece are right. XLA's
  pool has a thread per core: on one core nothing is cut (CI's machines have 2; 5 batch entries cut unevenly for 2,
  3 or 4 threads)."""
  kernel_here()
  assert 2 * np.prod(b, dtype=int) * m * k * n >= 1e6  # two pieces of the kernel's kMinPieceFlops (0.5e6) or more
  got, want = _product_and_numpy(b, m, k, n, transpose_a, transpose_b, dtype, seed=1)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)


@needs_kernel
def test_products_in_flight_at_once_do_not_share_a_scratchpad():
  """XLA:CPU runs independent thunks concurrently: each product needs its own scratch memory (oneDNN's default mode
  shares one, and these products came out wrong, relative errors above 1)."""
  kernel_here()
  rng = np.random.default_rng(0)
  shapes = [((508, 4096), (508, 256)), ((508, 256), (508, 1024)), ((508, 1024), (508, 256)), ((508, 256), (508, 8))]
  xs = [jnp.asarray(rng.standard_normal(s), jnp.bfloat16) for s, _ in shapes * 3]
  gs = [jnp.asarray(rng.standard_normal(s), jnp.bfloat16) for _, s in shapes * 3]
  # x * 1 and g * 1: each call's operands are made in the same program, so nothing orders the products
  f = jax.jit(lambda xs, gs: [onednn.product(x * 1, g * 1, transpose_a=True) for x, g in zip(xs, gs)])
  want = [np.asarray(x, np.float32).T @ np.asarray(g, np.float32) for x, g in zip(xs, gs)]
  for _ in range(10):
    for got, w in zip(f(xs, gs), want):
      np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-3)


@needs_kernel
def test_unsupported_operands_are_an_error_naming_the_kernel():
  kernel_here()
  x = jnp.ones((4, 3), jnp.float16)
  with pytest.raises(Exception, match="onednn_matmul: operands must be float32 or bfloat16"):
    jax.block_until_ready(onednn.product(x, x, transpose_a=True))


def test_off_by_environment_and_inside_disabled(monkeypatch):
  monkeypatch.setenv(onednn.ENV, "0")
  assert not onednn.available()
  monkeypatch.delenv(onednn.ENV)
  with onednn.disabled():
    assert not onednn.available()


def test_build_errors_say_what_is_missing_and_the_fix(monkeypatch, tmp_path):
  monkeypatch.setattr(sys, "prefix", str(tmp_path))  # an environment without the oneDNN wheels
  with pytest.raises(onednn.Unavailable, match=r"dnnl\.hpp is missing; pip install onednn-cpu-gomp"):
    onednn.build(tmp_path / "k.so")
  monkeypatch.undo()
  try:
    onednn._prefix()
  except onednn.Unavailable:
    pytest.skip("the oneDNN wheels are not installed here")
  monkeypatch.setenv("CXX", "false")  # a compiler that fails
  with pytest.raises(onednn.Unavailable, match="failed"):
    onednn.build(tmp_path / "k.so")
  assert list(tmp_path.iterdir()) == []  # no partial file left behind
  (tmp_path / "file").write_text("")
  with pytest.raises(onednn.Unavailable, match=r"cannot write into .*file/sub.*set MLTD_JAX_CACHE"):
    onednn.build(tmp_path / "file" / "sub" / "k.so")


@needs_kernel
def test_a_library_cut_short_is_rebuilt_not_loaded(tmp_path):
  """A built library records its size; a copy cut short (loading it can kill the process) is not intact."""
  kernel_here()
  path = onednn.build(tmp_path / "k.so")
  assert onednn._intact(path)
  path.write_bytes(path.read_bytes()[:1000])
  assert not onednn._intact(path)


@needs_kernel
def test_an_empty_sum_is_zero():
  """K = 0: every entry of the result is an empty sum (oneDNN itself would leave the buffer unwritten)."""
  kernel_here()
  a, c = jnp.ones((2, 0, 3), jnp.bfloat16), jnp.ones((2, 0, 4), jnp.bfloat16)
  np.testing.assert_array_equal(jax.jit(lambda a, c: onednn.product(a, c, transpose_a=True))(a, c), np.zeros((2, 3, 4)))


@needs_kernel
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_a_thin_result_of_a_transposed_product_is_computed_transposed(dtype):
  """a^T c with at most `onednn.THIN` result columns (x^T (dY V)) runs as (c^T a)^T in float32, the faster form here
  (the kernel called with c first, its small result transposed by XLA); bfloat16 keeps the plain call. Both equal
  numpy's product."""
  kernel_here()
  m, k, n = 300, 508, onednn.THIN
  for b in ((), (2,)):
    got, want = _product_and_numpy(b, m, k, n, True, False, dtype, seed=2)
    assert got.shape == (*b, m, n)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)
  a, c = jnp.zeros((k, m), dtype), jnp.zeros((k, n), dtype)
  text = jax.jit(lambda a, c: onednn.product(a, c, transpose_a=True)).lower(a, c).as_text()
  first = re.search(rf"{onednn.TARGET}\(.*? : \(tensor<(\d+)x(\d+)x", text)  # the first operand's shape
  assert first, text[:2000]
  swapped = (int(first.group(1)), int(first.group(2))) == (k, n)
  assert swapped == (dtype == jnp.float32), first.group(0)[:300]


@needs_kernel
def test_materialized_cotangent_is_the_identity_with_its_cotangent_through_the_call():
  """`onednn.materialized_cotangent`: the value is x; gradients, both Hessian forms and vmapped gradients equal the
  plain function's to the bit; the cotangent (not the forward value) goes through the identity custom call, which
  XLA:CPU cannot fuse; inside `onednn.disabled` it is x itself."""
  x = jnp.asarray(np.random.default_rng(0).standard_normal((6, 5)), jnp.float32)
  ours = lambda x: jnp.sum(jnp.sin(onednn.materialized_cotangent(x * 2.0)) ** 2)  # noqa: E731
  plain = lambda x: jnp.sum(jnp.sin(x * 2.0) ** 2)  # noqa: E731
  assert float(ours(x)) == float(plain(x))
  hvp = lambda f: lambda x: jax.jvp(jax.grad(f), (x,), (jnp.cos(x),))[1]  # noqa: E731  the meta-step's form
  for transform in (jax.grad, jax.hessian, hvp, lambda f: jax.vmap(jax.grad(f))):
    np.testing.assert_array_equal(jax.jit(transform(ours))(x), jax.jit(transform(plain))(x))
  call = f'custom_call_target="{onednn.MATERIALIZE}"'
  assert call in jax.jit(jax.grad(ours)).lower(x).compile().as_text()
  assert call in jax.jit(hvp(ours)).lower(x).compile().as_text()
  assert call not in jax.jit(ours).lower(x).compile().as_text()
  with onednn.disabled():
    assert onednn.materialized_cotangent(x) is x


@needs_kernel
def test_a_float32_gpt2_gradient_materializes_each_sublayers_residual_cotangent():
  """GPT-2's float32 blocks pass their residual stream through `onednn.materialized_cotangent` (two per block, in the
  compiled gradient); a bfloat16 model does not (measured slower there)."""
  from mltd_jax.models import gpt2
  from tests.helpers import lm_batch, tiny_gpt2

  batch = lm_batch(13, (2, 7))
  call = f'custom_call_target="{onednn.MATERIALIZE}"'
  for dtype, remat, want in ((jnp.float32, False, 2 * 2), (jnp.float32, True, 2 * 2), (jnp.bfloat16, False, 0)):
    model, params = tiny_gpt2(layers=2, dtype=dtype)
    model = model.clone(remat=remat)  # remat: every block a jax.checkpoint
    loss = lambda p: gpt2.make_loss(model)({"params": p}, batch, jax.random.key(0))[0]  # noqa: E731
    assert jax.jit(jax.grad(loss)).lower(params).compile().as_text().count(call) == want, (dtype, remat)
  # the Hessian-vector products' form (forward over reverse) materializes the cotangents' tangents as well
  model, params = tiny_gpt2(layers=2)
  loss = lambda p: gpt2.make_loss(model)({"params": p}, batch, jax.random.key(0))[0]  # noqa: E731
  hvp = lambda p: jax.jvp(jax.grad(loss), (p,), (p,))[1]  # noqa: E731
  assert jax.jit(hvp).lower(params).compile().as_text().count(call) > 2 * 2


def test_without_the_kernel_a_gpt2_gradient_has_no_cotangent_barrier():
  """Inside `onednn.disabled` (as where the kernel cannot load) the barrier is not even traced."""
  from mltd_jax.models import gpt2
  from tests.helpers import lm_batch, tiny_gpt2

  model, params = tiny_gpt2(layers=2)
  batch = lm_batch(13, (2, 7))
  loss = lambda p: gpt2.make_loss(model)({"params": p}, batch, jax.random.key(0))[0]  # noqa: E731
  with onednn.disabled():
    assert "mltd_cotangent_barrier" not in str(jax.make_jaxpr(jax.grad(loss))(params))
  if onednn.available():  # and with the kernel, it is
    assert "mltd_cotangent_barrier" in str(jax.make_jaxpr(jax.grad(loss))(params))
