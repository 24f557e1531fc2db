"""Matrix products for every compute dtype: narrow inputs (bfloat16, float16) are multiplied with float32
accumulation, in the forward and in every derivative.

Why a primitive of our own: ``lax.dot_general(x_bf16, w_bf16, preferred_element_type=float32)`` is the product a
CPU with AMX (or any accelerator) runs fastest (XLA:CPU hands it to YNNPACK: 425-785 GFLOP/s on this project's
2-core Xeon against 172-231 in float32, README "Changed: bfloat16 on XLA:CPU"), but JAX's transpose of it multiplies
the float32 cotangent with the bfloat16 operand, and XLA then runs that backward product in float32 (a bfloat16
*output*, the other choice, is slower still on XLA:CPU: 96-109 GFLOP/s). `lowp_matmul_p` is bilinear, with
transpose rules that round the cotangent to the narrow dtype for the input's gradient (the product ct op(y)^T: the
same fast form), and compute the weight's gradient x^T ct in float32 (a product contracting the token axis, which
XLA:CPU runs through Eigen, where float32 is faster than bfloat16). Its JVP is the primitive itself, so
forward-over-reverse Hessian-vector products (the meta-step's backward) and vmap (tasks) keep the fast form too.

Only on XLA:CPU (`mixed`): accelerators' narrow products already accumulate in float32 and their backward products
run narrow, so there, as with float32 (or wider) inputs anywhere, `matmul` is exactly ``lax.dot_general`` in x's
dtype, as before: the finite-difference and reference tests, all in float32, and the accelerator measurements see
the same program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir


def mixed(dtype) -> bool:
  """True where `matmul` multiplies ``dtype`` inputs with `lowp_matmul_p`: a floating dtype narrower than float32
  (bfloat16, float16) on XLA:CPU (the default backend, when traced)."""
  dtype = jnp.dtype(dtype)
  return jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4 and jax.default_backend() == "cpu"


def result_dtype(dtype):
  """The dtype of `matmul`'s result for ``dtype`` operands: float32 where `mixed`, else ``dtype`` (what a layer's
  keys and values are computed in, so what a decoding cache stores them in)."""
  return jnp.dtype(jnp.float32) if mixed(dtype) else jnp.dtype(dtype)


def _dimension_numbers(batch: int, transpose_y: bool):
  """x [*b, M, K] with y [*b, K, N] (or [*b, N, K] when ``transpose_y``), ``batch`` = len(b)."""
  b = tuple(range(batch))
  return ((batch + 1,), (batch + 1 if transpose_y else batch,)), (b, b)


def _impl(x, y, *, transpose_y: bool, dtype):
  dims = _dimension_numbers(x.ndim - 2, transpose_y)
  return lax.dot_general(x.astype(dtype), y.astype(dtype), dims, preferred_element_type=jnp.float32)


def _abstract(x, y, *, transpose_y: bool, dtype):
  del dtype
  if x.ndim < 2 or y.ndim != x.ndim or x.shape[:-2] != y.shape[:-2]:
    raise ValueError(f"lowp_matmul: x {x.shape} and y {y.shape} need equal leading (batch) axes and 2 more each.")
  n, k = (y.shape[-2], y.shape[-1]) if transpose_y else (y.shape[-1], y.shape[-2])
  if k != x.shape[-1]:
    raise ValueError(f"lowp_matmul: x {x.shape} and y {y.shape} (transpose_y={transpose_y}) contract unequal axes.")
  return jax.core.ShapedArray((*x.shape[:-1], n), jnp.float32)


lowp_matmul_p = Primitive("lowp_matmul")
lowp_matmul_p.def_impl(_impl)
lowp_matmul_p.def_abstract_eval(_abstract)
mlir.register_lowering(lowp_matmul_p, mlir.lower_fun(_impl, multiple_results=False))


def _transpose_x(ct, x, y, *, transpose_y: bool, dtype):
  """d x = ct op(y)^T: the narrow product again (ct rounded to ``dtype``), in x's dtype."""
  return lowp_matmul_p.bind(ct, y, transpose_y=not transpose_y, dtype=dtype).astype(x.aval.dtype)


def _transpose_y(ct, x, y, *, transpose_y: bool, dtype):
  """d y = x^T ct (or ct^T x for y [.., N, K]) in float32, in y's dtype."""
  del dtype
  batch = x.ndim - 2
  b = tuple(range(batch))
  xf, ctf = x.astype(jnp.float32), ct.astype(jnp.float32)
  a, c = (ctf, xf) if transpose_y else (xf, ctf)
  return lax.dot_general(a, c, (((batch,), (batch,)), (b, b))).astype(y.aval.dtype)


ad.defbilinear(lowp_matmul_p, _transpose_x, _transpose_y)


def _batch(args, dims, *, transpose_y: bool, dtype):
  """vmap: a batched x against one unbatched 2-D y folds into its rows; otherwise one more leading batch axis."""
  (x, y), (bx, by) = args, dims
  bind = lambda x, y: lowp_matmul_p.bind(x, y, transpose_y=transpose_y, dtype=dtype)  # noqa: E731
  if by is None and y.ndim == 2:
    x = jnp.moveaxis(x, bx, 0)  # [B, M, K]
    out = bind(x.reshape(-1, x.shape[-1]), y)
    return out.reshape(*x.shape[:-1], out.shape[-1]), 0
  size = x.shape[bx] if bx is not None else y.shape[by]
  front = lambda a, d: jnp.broadcast_to(a, (size, *a.shape)) if d is None else jnp.moveaxis(a, d, 0)  # noqa: E731
  return bind(front(x, bx), front(y, by)), 0


batching.primitive_batchers[lowp_matmul_p] = _batch


def matmul(x: jax.Array, y: jax.Array, *, transpose_y: bool = False) -> jax.Array:
  """x [*b, M, K] @ y [*b, K, N] (y [*b, N, K] with ``transpose_y``) -> [*b, M, N].

  Computed in x's dtype: where `mixed` (bfloat16 or float16 on XLA:CPU) both operands are rounded to it and the
  products summed in float32 by `lowp_matmul_p` (every derivative alike), and the result is float32 (cast it where
  the compute dtype is wanted); otherwise a plain ``lax.dot_general`` in x's dtype, the result in x's dtype.
  """
  if not mixed(x.dtype):
    return lax.dot_general(x, y.astype(x.dtype), _dimension_numbers(x.ndim - 2, transpose_y))
  return lowp_matmul_p.bind(x, y, transpose_y=transpose_y, dtype=jnp.dtype(x.dtype))


def saveable(batched: bool = True):
  """A remat policy saving the narrow products' outputs (with ``batched`` False, only those without batch axes):
  `jax.checkpoint_policies.dots_saveable` and its kin recognise only ``dot_general`` (`layers.remat_policy`)."""

  def policy(prim, *avals, **params) -> bool:
    return prim is lowp_matmul_p and (batched or avals[0].ndim == 2)

  return policy
