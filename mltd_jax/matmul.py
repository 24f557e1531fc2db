"""Matrix products for every compute dtype: narrow inputs (bfloat16, float16) are multiplied with float32
accumulation, in the forward and in every derivative.

Why a primitive of our own: ``lax.dot_general(x_bf16, w_bf16, preferred_element_type=float32)`` is the product a CPU
with AMX (or any accelerator) runs fastest (XLA:CPU hands it to YNNPACK: 425-785 GFLOP/s on this project's 2-core Xeon
against 172-231 in float32, benchmarks/PERFORMANCE_LOG.md "Changed 2026-11-27 (session 10): bfloat16 on XLA:CPU"), but
JAX's transpose of it multiplies the float32 cotangent with the bfloat16 operand, and XLA then runs that backward
product in float32 (a bfloat16 *output*, the other choice, is slower still on XLA:CPU: 96-109 GFLOP/s). `lowp_matmul_p`
is bilinear, with transpose rules that round the cotangent to the narrow dtype for the input's gradient (the product ct
op(y)^T: the same fast form), and compute the weight's gradient x^T ct with `tn_matmul_p`, a bilinear primitive for that
form (a product contracting the token axis). XLA:CPU runs it through Eigen (no AMX; float32 faster than bfloat16 there),
so where the oneDNN custom call is available (`mltd_jax.onednn`) `tn_matmul_p` lowers to it with bfloat16 operands: 463-
906 GFLOP/s on AMX against XLA's 96-182 in float32 (`benchmarks/xla_cpu_dots.py --part onednn`), the bfloat16
second-order meta-step 1.24x faster (benchmarks/PERFORMANCE_LOG.md "Changed 2026-11-27 (session 11): oneDNN for the
weight gradients"). Both primitives' JVPs are themselves (and `sum_of_products`' is built of them), so
forward-over-reverse Hessian-vector products (the meta-step's backward) and vmap (tasks) keep the fast forms too.

Float32 on XLA:CPU with the kernel (`kernel_float32`): `matmul` binds `lowp_matmul_p` in float32 too, with
``kernel=True``, so that every float32 product runs on the kernel: the weight gradients through `tn_matmul_p`, which
XLA:CPU runs through Eigen (88 GFLOP/s on one core for the meta-step's Hessian-vector product against 135 for its other
products, YNNPACK): the float32 second-order meta-step at the peer's shapes 1.13x faster [1.10-1.17], first order 1.10x
[1.08-1.11] (in-process A/Bs, benchmarks/PERFORMANCE_LOG.md "Changed 2026-11-27 (session 14)"); and since session 15 the
forward-form products too, once the kernel cut its products into pieces for XLA's own pool threads instead of running
oneDNN's OpenMP threads beside them: 1.04x more [1.01-1.07] (the same file, "Changed 2026-11-27 (session 15)"; with
OpenMP threads the same routing had been 0.84-0.86x). The values are float32 products summed in another order (updated
variables within 1.1e-5 of XLA's after one Adam step). Narrow dtypes keep XLA's forward-form products (YNNPACK on AMX).

Only on XLA:CPU (`mixed`, `kernel_float32`): accelerators' narrow products already accumulate in float32 and their
backward products run narrow, so there, as with float64 inputs anywhere (and float32 without the kernel), `matmul`
is exactly ``lax.dot_general`` in x's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from mltd_jax import onednn


def mixed(dtype) -> bool:
  """True where `matmul` multiplies ``dtype`` inputs as narrow products summed in float32 (`lowp_matmul_p`, result
  float32): a floating dtype narrower than float32 (bfloat16, float16) on XLA:CPU (the default backend, when
  traced). `primitive` says where `matmul` binds the primitive at all (float32 too, `kernel_float32`)."""
  dtype = jnp.dtype(dtype)
  return jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4 and jax.default_backend() == "cpu"


def kernel_float32(dtype) -> bool:
  """True where `matmul` multiplies float32 inputs with `lowp_matmul_p` in float32: on XLA:CPU with the oneDNN kernel
  (`onednn.available`), so that every float32 product runs on it (``kernel=True``; weight gradients: `tn_matmul`)."""
  return jnp.dtype(dtype) == jnp.dtype(jnp.float32) and onednn.available()  # available: XLA:CPU only


def primitive(dtype) -> bool:
  """Whether `matmul` binds `lowp_matmul_p` for ``dtype`` inputs (`mixed` or `kernel_float32`), else
  ``lax.dot_general``."""
  return mixed(dtype) or kernel_float32(dtype)


def result_dtype(dtype):
  """The dtype of `matmul`'s result for ``dtype`` operands: float32 where `mixed`, else ``dtype`` (what a layer's
  keys and values are computed in, so what a decoding cache stores them in)."""
  return jnp.dtype(jnp.float32) if mixed(dtype) else jnp.dtype(dtype)


def _dimension_numbers(batch: int, transpose_y: bool):
  """x [*b, M, K] with y [*b, K, N] (or [*b, N, K] when ``transpose_y``), ``batch`` = len(b)."""
  b = tuple(range(batch))
  return ((batch + 1,), (batch + 1 if transpose_y else batch,)), (b, b)


def _impl(x, y, *, transpose_y: bool, dtype, kernel: bool):
  del kernel
  dims = _dimension_numbers(x.ndim - 2, transpose_y)
  return lax.dot_general(x.astype(dtype), y.astype(dtype), dims, preferred_element_type=jnp.float32)


def _impl_cpu(x, y, *, transpose_y: bool, dtype, kernel: bool):
  """On XLA:CPU: the oneDNN custom call where ``kernel`` (float32 products, `kernel_float32`), else XLA's dot."""
  if not kernel:
    return _impl(x, y, transpose_y=transpose_y, dtype=dtype, kernel=kernel)
  return onednn.product(x.astype(dtype), y.astype(dtype), transpose_b=transpose_y)


def _abstract(x, y, *, transpose_y: bool, dtype, kernel: bool):
  del dtype, kernel
  if x.ndim < 2 or y.ndim != x.ndim or x.shape[:-2] != y.shape[:-2]:
    raise ValueError(f"lowp_matmul: x {x.shape} and y {y.shape} need equal leading (batch) axes and 2 more each.")
  n, k = (y.shape[-2], y.shape[-1]) if transpose_y else (y.shape[-1], y.shape[-2])
  if k != x.shape[-1]:
    raise ValueError(f"lowp_matmul: x {x.shape} and y {y.shape} (transpose_y={transpose_y}) contract unequal axes.")
  return jax.core.ShapedArray((*x.shape[:-1], n), jnp.float32)


lowp_matmul_p = Primitive("lowp_matmul")
lowp_matmul_p.def_impl(_impl_cpu)  # kernel=True is bound only where the default backend is XLA:CPU
lowp_matmul_p.def_abstract_eval(_abstract)
mlir.register_lowering(lowp_matmul_p, mlir.lower_fun(_impl, multiple_results=False))  # accelerators: XLA's dot
mlir.register_lowering(lowp_matmul_p, mlir.lower_fun(_impl_cpu, multiple_results=False), platform="cpu")


def _transpose_x(ct, x, y, *, transpose_y: bool, dtype, kernel: bool):
  """d x = ct op(y)^T: the narrow product again (ct rounded to ``dtype``), in x's dtype."""
  return lowp_matmul_p.bind(ct, y, transpose_y=not transpose_y, dtype=dtype, kernel=kernel).astype(x.aval.dtype)


def _transpose_y(ct, x, y, *, transpose_y: bool, dtype, kernel: bool):
  """d y = x^T ct (or ct^T x for y [.., N, K]): a product contracting the token axis (`tn_matmul_p`), in y's dtype."""
  del kernel
  a, c = (ct, x) if transpose_y else (x, ct)
  return tn_matmul(a, c, dtype).astype(y.aval.dtype)


ad.defbilinear(lowp_matmul_p, _transpose_x, _transpose_y)


def _front(x: jax.Array, axis: int | None, size: int) -> jax.Array:
  """vmap's batch axis of ``x`` moved to the front, or ``x`` broadcast along a new front axis where it has none."""
  return jnp.broadcast_to(x, (size, *x.shape)) if axis is None else jnp.moveaxis(x, axis, 0)


def _batch(args, dims, *, transpose_y: bool, dtype, kernel: bool):
  """vmap: a batched x against one unbatched 2-D y folds into its rows; otherwise one more leading batch axis."""
  (x, y), (bx, by) = args, dims
  bind = lambda x, y: lowp_matmul_p.bind(x, y, transpose_y=transpose_y, dtype=dtype, kernel=kernel)  # noqa: E731
  if by is None and y.ndim == 2:
    x = jnp.moveaxis(x, bx, 0)  # [B, M, K]
    out = bind(x.reshape(-1, x.shape[-1]), y)
    return out.reshape(*x.shape[:-1], out.shape[-1]), 0
  size = x.shape[bx] if bx is not None else y.shape[by]
  return bind(_front(x, bx, size), _front(y, by, size)), 0


batching.primitive_batchers[lowp_matmul_p] = _batch


def _tn_xla(a, c, *, dtype, kernel: bool):
  """a [*b, K, M], c [*b, K, N] -> a^T c [*b, M, N], operands rounded to ``dtype``, float32 sums and result."""
  del kernel
  b = tuple(range(a.ndim - 2))
  dims = (((a.ndim - 2,), (c.ndim - 2,)), (b, b))
  return lax.dot_general(a.astype(dtype), c.astype(dtype), dims, preferred_element_type=jnp.float32)


def _tn_cpu(a, c, *, dtype, kernel: bool):
  """On XLA:CPU: the oneDNN custom call where ``kernel`` (the same value), else XLA's dot."""
  if not kernel:
    return _tn_xla(a, c, dtype=dtype, kernel=kernel)
  return onednn.product(a.astype(dtype), c.astype(dtype), transpose_a=True)


def _tn_abstract(a, c, *, dtype, kernel: bool):
  del dtype, kernel
  if a.ndim < 2 or c.ndim != a.ndim or a.shape[:-1] != c.shape[:-1]:
    raise ValueError(f"tn_matmul: a {a.shape} and c {c.shape} need equal axes but the last (batch..., K).")
  return jax.core.ShapedArray((*a.shape[:-2], a.shape[-1], c.shape[-1]), jnp.float32)


tn_matmul_p = Primitive("tn_matmul")
tn_matmul_p.def_impl(_tn_cpu)  # kernel=True is bound only where the default backend is XLA:CPU
tn_matmul_p.def_abstract_eval(_tn_abstract)
mlir.register_lowering(tn_matmul_p, mlir.lower_fun(_tn_xla, multiple_results=False))  # accelerators: XLA's dot
mlir.register_lowering(tn_matmul_p, mlir.lower_fun(_tn_cpu, multiple_results=False), platform="cpu")


def _forward_kernel(dtype, kernel: bool) -> bool:
  """Whether a forward-form product derived from a `tn_matmul_p` on the kernel goes to it too: float32 only (narrow
  forward-form products stay XLA's, which runs them on AMX)."""
  return kernel and jnp.dtype(dtype) == jnp.dtype(jnp.float32)


def _tn_transpose_a(ct, a, c, *, dtype, kernel: bool):
  """d a = c ct^T [*b, K, M]: a product of the forward's form (`lowp_matmul_p`)."""
  bound = lowp_matmul_p.bind(c, ct, transpose_y=True, dtype=dtype, kernel=_forward_kernel(dtype, kernel))
  return bound.astype(a.aval.dtype)


def _tn_transpose_c(ct, a, c, *, dtype, kernel: bool):
  """d c = a ct [*b, K, N]: a product of the forward's form."""
  bound = lowp_matmul_p.bind(a, ct, transpose_y=False, dtype=dtype, kernel=_forward_kernel(dtype, kernel))
  return bound.astype(c.aval.dtype)


ad.defbilinear(tn_matmul_p, _tn_transpose_a, _tn_transpose_c)


def _tn_batch(args, dims, *, dtype, kernel: bool):
  """vmap: one more leading batch axis (an unbatched operand broadcast)."""
  (a, c), (ba, bc) = args, dims
  size = a.shape[ba] if ba is not None else c.shape[bc]
  return tn_matmul_p.bind(_front(a, ba, size), _front(c, bc, size), dtype=dtype, kernel=kernel), 0


batching.primitive_batchers[tn_matmul_p] = _tn_batch


def tn_matmul(a: jax.Array, c: jax.Array, dtype) -> jax.Array:
  """a [*b, K, M]^T @ c [*b, K, N] -> [*b, M, N] float32: a weight gradient's form (contracting the token axis).

  For bfloat16 or float32 with the oneDNN kernel (`mltd_jax.onednn`: XLA:CPU), computed by it with operands of that
  dtype (AMX kernels for bfloat16); otherwise XLA's float32 dot of the widened operands (Eigen runs this form faster
  in float32 than in bfloat16). Differentiable at any order (`tn_matmul_p`). Used for the weight gradients of the
  products `matmul` binds to `lowp_matmul_p` (`primitive`). With float32 the kernel was no faster in session 11
  (0.97-0.99x of XLA's, all four tasks vmapped), and 1.13x since one task at a time (module docstring). Its
  derivatives' forward-form products go to the kernel too where it is float32 (`_forward_kernel`).
  """
  dtype = jnp.dtype(dtype)
  kernel = dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)) and onednn.available()
  return tn_matmul_p.bind(a, c, dtype=dtype if kernel else jnp.dtype(jnp.float32), kernel=kernel)


def matmul(x: jax.Array, y: jax.Array, *, transpose_y: bool = False) -> jax.Array:
  """x [*b, M, K] @ y [*b, K, N] (y [*b, N, K] with ``transpose_y``) -> [*b, M, N].

  Computed in x's dtype: where `mixed` (bfloat16 or float16 on XLA:CPU) both operands are rounded to it and the
  products summed in float32 by `lowp_matmul_p` (every derivative alike), and the result is float32 (cast it where
  the compute dtype is wanted); where `kernel_float32`, the same primitive in float32 (every product, and every
  derivative's, on the oneDNN kernel); otherwise a plain ``lax.dot_general`` in x's dtype, the result in x's dtype.
  """
  if not primitive(x.dtype):
    return lax.dot_general(x, y.astype(x.dtype), _dimension_numbers(x.ndim - 2, transpose_y))
  dtype = jnp.dtype(x.dtype)
  return lowp_matmul_p.bind(x, y, transpose_y=transpose_y, dtype=dtype, kernel=kernel_float32(dtype))


def saveable(batched: bool = True):
  """A remat policy saving the outputs of the products `matmul` binds to its primitive (narrow ones, and float32
  ones where `kernel_float32`; `sum_of_products` too; with ``batched`` False, only those without batch axes):
  `jax.checkpoint_policies`' ``dots_saveable`` and its kin recognise only ``dot_general`` (`layers.remat_policy`)."""

  def policy(prim, *avals, **params) -> bool:
    return (prim is lowp_matmul_p or prim is pair_p) and (batched or avals[0].ndim == 2)

  return policy


def _pair_impl(a1, b1, a2, b2):
  """a1 b1^T + a2 b2^T as one `matmul` over the concatenated thin axis (operands in a1's dtype)."""
  a = jnp.concatenate([a1, a2.astype(a1.dtype)], -1)
  b = jnp.concatenate([b1.astype(a1.dtype), b2.astype(a1.dtype)], -1)
  return matmul(a, b, transpose_y=True)


def _pair_abstract(a1, b1, a2, b2):
  lead = a1.shape[:-2]
  if not (a1.ndim >= 2 and all(x.ndim == a1.ndim and x.shape[:-2] == lead for x in (b1, a2, b2))
          and a1.shape[-2] == a2.shape[-2] and b1.shape[-2] == b2.shape[-2]
          and a1.shape[-1] == b1.shape[-1] and a2.shape[-1] == b2.shape[-1]):
    raise ValueError(f"sum_of_products: a1 {a1.shape} b1 {b1.shape} a2 {a2.shape} b2 {b2.shape} do not make "
                     "a1 [*b, N, r1] b1 [*b, C, r1] a2 [*b, N, r2] b2 [*b, C, r2].")
  return jax.core.ShapedArray((*a1.shape[:-1], b1.shape[-2]), result_dtype(a1.dtype))


pair_p = Primitive("sum_of_two_products")
pair_p.def_impl(_pair_impl)
pair_p.def_abstract_eval(_pair_abstract)
mlir.register_lowering(pair_p, mlir.lower_fun(_pair_impl, multiple_results=False))


def _pair_jvp(primals, tangents):
  """d(a b^T) = da b^T + a db^T for each term; a term with both tangents is itself one `sum_of_products`."""
  y = pair_p.bind(*primals)
  dtype = primals[0].dtype  # the primal's operands are all in a1's dtype
  terms = []
  for a, b, da, db in ((primals[0], primals[1], tangents[0], tangents[1]),
                       (primals[2], primals[3], tangents[2], tangents[3])):
    zero_a, zero_b = type(da) is ad.Zero, type(db) is ad.Zero
    if not zero_a and not zero_b:
      terms.append(pair_p.bind(da.astype(dtype), b, a.astype(dtype), db))
    elif not zero_a:
      terms.append(matmul(da.astype(dtype), b.astype(dtype), transpose_y=True))
    elif not zero_b:
      terms.append(matmul(a.astype(dtype), db.astype(dtype), transpose_y=True))
  if not terms:  # JAX does not call a JVP rule without a tangent; a zero one all the same
    return y, jnp.zeros_like(y)
  return y, sum(terms[1:], terms[0]).astype(y.dtype)


ad.primitive_jvps[pair_p] = _pair_jvp


def _pair_transpose(ct, a1, b1, a2, b2):
  """Linear in one factor of each term (a JVP's tangent terms): d a = ct b (the product's own dtype rule: ct in the
  compute dtype), d b = ct^T a (`tn_matmul`'s form)."""
  if type(ct) is ad.Zero:
    return [None] * 4
  out = []
  for a, b in ((a1, b1), (a2, b2)):
    linear_a, linear_b = ad.is_undefined_primal(a), ad.is_undefined_primal(b)
    if linear_a == linear_b:
      raise NotImplementedError("sum_of_products is transposed only where each term has exactly one linear factor")
    if linear_a:
      dtype = a.aval.dtype
      out += [matmul(ct.astype(dtype), b.astype(dtype)).astype(dtype), None]
    else:
      dtype = b.aval.dtype
      if primitive(a.dtype):
        d_b = tn_matmul(ct.astype(a.dtype), a, a.dtype)
      else:
        d_b = jnp.einsum("...nc,...nr->...cr", ct.astype(a.dtype), a)
      out += [None, d_b.astype(dtype)]
  return out


ad.primitive_transposes[pair_p] = _pair_transpose


def _pair_batch(args, dims):
  """vmap: one more leading batch axis on every operand (an unbatched one broadcast)."""
  size = next(x.shape[d] for x, d in zip(args, dims) if d is not None)
  return pair_p.bind(*(_front(x, d, size) for x, d in zip(args, dims))), 0


batching.primitive_batchers[pair_p] = _pair_batch


def sum_of_products(a1: jax.Array, b1: jax.Array, a2: jax.Array, b2: jax.Array) -> jax.Array:
  """a1 b1^T + a2 b2^T (a1 [*b, N, r1], b1 [*b, C, r1], a2 [*b, N, r2], b2 [*b, C, r2] -> [*b, N, C]) as one product
  over the concatenated thin axis: one [N, C] output written instead of two and their sum.

  For a low-rank layer's tangent (x du) v^T + (x u) dv^T (`tarp`'s JVP rules), where each term has one tangent
  factor: a concatenation of the two terms' factors would put tangents in both operands of one product, which JAX
  cannot transpose; this primitive transposes term by term. Computed in a1's dtype by `matmul` (the oneDNN kernel for
  float32 on XLA:CPU), differentiable at any order, batched by vmap.
  """
  return pair_p.bind(a1, b1, a2, b2)
