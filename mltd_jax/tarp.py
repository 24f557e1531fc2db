"""TARP: task-adaptive reparameterization of dense kernels (paper section 2.1, Eq. 1-3).

A targeted kernel W0 [C_in, C_out] (y = x W0 + b) becomes

    W(x) = Phi1 ⊙ W0 + Phi2(x),

with low-rank "difference" parameters that live in their own variable collection (`'tarp'`), next to the model's
`'params'`. The kinds of Phi2:

  * ``bilinear``:  Phi2 = U V^T                         (U [C_in, r], V [C_out, r]; additive-only is LoRA)
  * ``kronecker``: Phi2 = sum_k H_k ⊗ (U_k V_k^T)       (H [k, n, n], U [k, C_in/n, r], V [k, C_out/n, r])
  * ``dynamic``:   Phi2(x) = U Sigma(x) V^T, Sigma(x) [r, r] made per token from x.

Sigma(x) is by default a linear map of x to the r*r entries, as in the paper's released code:
Sigma(x) = reshape(x W_s + b_s) with ``sigma_w`` [C_in, r*r] (Gaussian) and ``sigma_b`` [r*r] (the flattened
identity), i.e. C_in * r^2 (+ r^2) parameters per layer (C_in=1024, r=32: ~1M per layer). With
``sigma_hidden`` > 0 it is instead a bottleneck MLP x -> gelu(x W1 + b1) W2 + b2 (``sigma_w1``, ``sigma_b1``,
``sigma_w2``, ``sigma_b2``), cheaper but confining Sigma(x) to a ``sigma_hidden``-dimensional subspace.

The multiplicative Phi1 is optional: by default the static Phi1 = 1 + U1 V1^T (so the all-ones start is exact).
With ``dynamic_multiplicative`` (dynamic kind only) it is the per-token Phi1(x) = 1 + U1 Sigma1(x) V1^T of Eq. 3,
with its own Sigma1 (``sigma1_w``, ``sigma1_b``, or ``sigma1_w1``... with ``sigma_hidden``); it costs r extra
matmuls of the kernel's size per token, since x (W0 ⊙ U1 S V1^T) = sum_r ((x ⊙ U1[:, r]) W0) ⊙ (S V1^T)[r].
Every "V" starts at zero, so the reparameterized model equals the base model exactly at initialization.

The kind of a layer's difference is read from its parameter names, so the model code (`models/layers.py`) calls
`dense` the same way whatever the kind, and with no difference it is the plain dense layer. Which kernels are
targeted is decided from the model's actual dense layers (``dense_paths``, from `models.layers.dense_paths`),
never from guesses about parameter names. This module imports only jax/flax and `mltd_jax.matmul`: it knows nothing
of models, data or training.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
from flax import traverse_util
from jax.ad_checkpoint import checkpoint_name
from jax.custom_derivatives import SymbolicZero

from mltd_jax import matmul

KINDS = ("bilinear", "kronecker", "dynamic")
# The checkpoint name of every `lowrank_matmul` output: a remat policy that keeps matmul outputs must also keep
# these, since `jax.checkpoint_policies.dots_saveable` and its kin do not see a matmul inside a custom derivative call
# (`models.layers.remat_policy` adds them).
LOWRANK_NAME = "tarp_lowrank_matmul"
Params = Mapping[str, Any]
Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class TarpConfig:
  """What to reparameterize and how.

  Attributes:
    kind: one of KINDS.
    rank: r, the rank of U V^T (per Kronecker term for ``kronecker``).
    targets: regex searched in the '/'-joined module path of each of the model's dense layers (e.g.
      ``attn/c_attn$``); it must not match any other module that owns parameters (embeddings, layer norms).
    multiplicative: also learn Phi1 (static 1 + U1 V1^T unless ``dynamic_multiplicative``; rank ``rank``).
    dynamic_multiplicative: with kind ``dynamic`` and ``multiplicative``, make Phi1 per token,
      Phi1(x) = 1 + U1 Sigma1(x) V1^T (Eq. 3); costs r extra matmuls of the kernel's size per token.
    kron_terms: number of Kronecker terms k.
    kron_n: size n of each H_k; must divide C_in and C_out of every target.
    sigma_hidden: 0 (default): Sigma(x) is a linear map of x to its r*r entries (C_in * r^2 parameters per
      layer, as in the paper's code); > 0: a bottleneck MLP of this hidden width (``dynamic``).
    init_scale: standard deviation of the Gaussian U (and H, Sigma weights); V starts at zero.
  """

  kind: str = "bilinear"
  rank: int = 4
  targets: str = ""
  multiplicative: bool = False
  dynamic_multiplicative: bool = False
  kron_terms: int = 2
  kron_n: int = 2
  sigma_hidden: int = 0
  init_scale: float = 0.02

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"tarp.kind={self.kind!r} is not one of {KINDS}; set config.tarp.kind to one of them.")
    integer = lambda x: isinstance(x, int) and not isinstance(x, bool)  # noqa: E731
    for name in ("rank", "kron_terms", "kron_n"):  # kron_terms 0 would be a difference that is always zero
      if not integer(getattr(self, name)) or getattr(self, name) < 1:
        raise ValueError(f"config.tarp.{name}={getattr(self, name)!r} must be an integer >= 1.")
    if not integer(self.sigma_hidden) or self.sigma_hidden < 0:
      raise ValueError(f"config.tarp.sigma_hidden={self.sigma_hidden!r} must be an integer >= 0 (0: linear Sigma(x)).")
    if not (isinstance(self.init_scale, (int, float)) and math.isfinite(self.init_scale) and self.init_scale > 0):
      raise ValueError(f"config.tarp.init_scale={self.init_scale!r} must be a finite number > 0 (U's init scale).")
    if self.dynamic_multiplicative and not (self.kind == "dynamic" and self.multiplicative):
      raise ValueError(
        "config.tarp.dynamic_multiplicative=True needs config.tarp.kind='dynamic' and "
        f"config.tarp.multiplicative=True (got kind={self.kind!r}, multiplicative={self.multiplicative})."
      )


def target_paths(params: Params, targets: str, dense_paths: Iterable[Path]) -> list[Path]:
  """The dense layers' module paths matched by the regex ``targets``, sorted.

  Args:
    params: the model's ``'params'`` tree.
    targets: regex searched (``re.search``) in each '/'-joined module path.
    dense_paths: module paths (tuples of str) of the model's `Dense` layers (`models.layers.dense_paths`).

  Returns:
    The matched dense paths, e.g. ``[('transformer', 'h', '0', 'attn', 'c_attn'), ...]``.

  Raises:
    ValueError: when ``targets`` matches no dense layer, or matches a module that owns parameters but is not a
      dense layer (an embedding, a layer norm), or a dense path has no 2-D ``weight`` in ``params``.
  """
  dense = {tuple(p) for p in dense_paths}
  owners = {path[:-1] for path in traverse_util.flatten_dict(params)}  # modules that own parameters
  if not targets:
    raise ValueError(
      'tarp.targets is empty: set config.tarp.targets to a regex over Dense module paths ("" in a config means the '
      "family's default, models.family_of(model).default_targets)."
    )
  hit = lambda p: re.search(targets, "/".join(p)) is not None  # noqa: E731
  wrong = sorted("/".join(p) for p in owners - dense if hit(p))
  if wrong:
    raise ValueError(
      f"tarp.targets={targets!r} matches modules that are not dense layers: {wrong}; "
      "fix config.tarp.targets so that it matches only dense kernels (e.g. 'attn/c_attn$')."
    )
  found = sorted(p for p in dense if hit(p))
  if not found:
    raise ValueError(
      f"tarp.targets={targets!r} matches no dense layer of the model; fix config.tarp.targets "
      f"(dense module paths look like {['/'.join(p) for p in sorted(dense)[:3]]})."
    )
  flat = traverse_util.flatten_dict(params)
  missing = ["/".join(p) for p in found if getattr(flat.get(p + ("weight",)), "ndim", 0) != 2]
  if missing:
    raise ValueError(f"dense layers {missing} have no 2-D 'weight' in params: were dense_paths made for this model?")
  return found


def _init_sigma(rng: jax.Array, c_in: int, r: int, cfg: TarpConfig, name: str) -> dict[str, jax.Array]:
  """Parameters of one Sigma(x) [r, r] (``name`` is 'sigma' or 'sigma1'), with Sigma(x) near I at init."""
  s, h, eye = cfg.init_scale, cfg.sigma_hidden, jnp.eye(r).reshape(-1)
  k1, k2 = jax.random.split(rng)
  if h == 0:  # linear: Sigma(x) = I + x W_s, Gaussian W_s
    return {f"{name}_w": s * jax.random.normal(k1, (c_in, r * r)), f"{name}_b": eye}
  return {  # MLP: Sigma(x) = I exactly at init (W2 = 0)
    f"{name}_w1": s * jax.random.normal(k2, (c_in, h)),
    f"{name}_b1": jnp.zeros((h,)),
    f"{name}_w2": jnp.zeros((h, r * r)),
    f"{name}_b2": eye,
  }


def init_layer(rng: jax.Array, c_in: int, c_out: int, cfg: TarpConfig) -> dict[str, jax.Array]:
  """Difference parameters of one [c_in, c_out] kernel; all of them give a zero difference."""
  r, s = cfg.rank, cfg.init_scale
  k_u, k_h, k_s, k_m, k_s1 = jax.random.split(rng, 5)
  if cfg.kind == "kronecker":
    n, k = cfg.kron_n, cfg.kron_terms
    if c_in % n or c_out % n:
      raise ValueError(f"tarp.kron_n={n} must divide both kernel sizes ({c_in}, {c_out}); change config.tarp.kron_n.")
    p = {
      "H": s * jax.random.normal(k_h, (k, n, n)),
      "U": s * jax.random.normal(k_u, (k, c_in // n, r)),
      "V": jnp.zeros((k, c_out // n, r)),
    }
  else:
    p = {"U": s * jax.random.normal(k_u, (c_in, r)), "V": jnp.zeros((c_out, r))}
  if cfg.kind == "dynamic":
    p.update(_init_sigma(k_s, c_in, r, cfg, "sigma"))
  if cfg.multiplicative:
    p["U1"] = s * jax.random.normal(k_m, (c_in, r))
    p["V1"] = jnp.zeros((c_out, r))
    if cfg.dynamic_multiplicative:
      p.update(_init_sigma(k_s1, c_in, r, cfg, "sigma1"))
  return p


def init(rng: jax.Array, params: Params, cfg: TarpConfig, dense_paths: Iterable[Path]) -> dict:
  """The ``'tarp'`` collection for ``params``: a tree mirroring the targeted modules' paths.

  Args:
    rng: PRNG key.
    params: the model's ``'params'`` tree; kernel shapes are read from ``params[path + ('weight',)]``.
    cfg: the TARP configuration.
    dense_paths: module paths of the model's `Dense` layers (`models.layers.dense_paths(model)`).

  Returns:
    ``{path...: {'U': ..., 'V': ..., ...}}`` for every targeted layer.

  Raises:
    ValueError: from `target_paths` when ``cfg.targets`` matches nothing or a module that is not dense.
  """
  flat = traverse_util.flatten_dict(params)
  out = {}
  for i, path in enumerate(target_paths(params, cfg.targets, dense_paths)):
    c_in, c_out = flat[path + ("weight",)].shape
    out[path] = init_layer(jax.random.fold_in(rng, i), c_in, c_out, cfg)
  return traverse_util.unflatten_dict(out)


def _has_sigma(d: Mapping[str, jax.Array], name: str) -> bool:
  return f"{name}_w" in d or f"{name}_w1" in d


def is_dynamic(d: Mapping[str, jax.Array]) -> bool:
  """Whether a layer's difference has an input-dependent additive term (the dynamic kind, either Sigma form)."""
  return _has_sigma(d, "sigma")


def static_delta(d: Mapping[str, jax.Array]) -> jax.Array | None:
  """The input-independent additive Phi2 [C_in, C_out], or None for the dynamic kind."""
  if is_dynamic(d):
    return None
  if "H" in d:  # sum_k kron(H_k, U_k V_k^T)
    low = jnp.einsum("kir,kor->kio", d["U"], d["V"])  # [k, C_in/n, C_out/n]
    k, n, _ = d["H"].shape
    blocks = jnp.einsum("kab,kio->aibo", d["H"], low)  # [n, C_in/n, n, C_out/n]
    return blocks.reshape(n * low.shape[1], n * low.shape[2])
  return d["U"] @ d["V"].T


def sigma(d: Mapping[str, jax.Array], x: jax.Array, name: str = "sigma") -> jax.Array:
  """Sigma(x) [..., r, r]: the per-token core of the dynamic kind (``name='sigma1'``: that of Phi1(x)).

  Linear (``{name}_w``, ``{name}_b``) or a bottleneck MLP (``{name}_w1`` ... ``{name}_b2``), read from the names.
  """
  r = d["U"].shape[-1]
  cast = lambda k: d[f"{name}_{k}"].astype(x.dtype)  # noqa: E731
  if f"{name}_w" in d:
    s = x @ cast("w") + cast("b")  # [..., r*r]
  else:
    s = jax.nn.gelu(x @ cast("w1") + cast("b1")) @ cast("w2") + cast("b2")  # [..., r*r]
  return s.reshape(*s.shape[:-1], r, r)


def _mm(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., C_in] @ w [C_in, C_out] as one 2-D matmul over the flattened leading axes.

  Same values as ``x @ w``, but the backward's weight gradient x^T dY then contracts one axis instead of (batch,
  tokens): XLA:CPU otherwise relayouts dY (and the fused elementwise work before it) into a transposed copy for every
  kernel, which took 35-36% of a gradient's time (benchmarks/PERFORMANCE_LOG.md). On XLA:CPU a bfloat16 x is
  multiplied with float32 accumulation and the result is float32 (`mltd_jax.matmul`); otherwise it is in x's dtype.
  """
  y = matmul.matmul(x.reshape(-1, x.shape[-1]), w)
  return y.reshape(*x.shape[:-1], w.shape[-1])


def _mm_t(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., C] @ w [M, C]^T -> [..., M] as one 2-D matmul over the flattened leading axes, w read in place (no
  transposed copy of it); dtypes as `_mm`."""
  y = matmul.matmul(x.reshape(-1, x.shape[-1]), w, transpose_y=True)
  return y.reshape(*x.shape[:-1], w.shape[0])


def _sum_of_products(a1: jax.Array, b1: jax.Array, a2: jax.Array, b2: jax.Array) -> jax.Array:
  """a1 [..., r] b1 [C, r]^T + a2 [..., r] b2 [C, r]^T: one product (`matmul.sum_of_products`) where `matmul` binds its
  own primitive (XLA:CPU), else the two dots and their sum, for XLA to fuse as it likes (accelerators, float64)."""
  if matmul.primitive(a1.dtype):
    flat = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731  the leading axes folded into rows, as `_mm`
    return matmul.sum_of_products(flat(a1), b1, flat(a2), b2).reshape(*a1.shape[:-1], b1.shape[0])
  return _mm_t(a1, b1) + _mm_t(a2, b2)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def _effective_matmul(x: jax.Array, w: jax.Array, u: jax.Array, v: jax.Array, transpose: bool) -> jax.Array:
  """x [..., ·] @ W_eff (or W_eff^T with ``transpose``), W_eff = w + u v^T: one dense product, derivatives thin.

  W_eff is summed in the parameters' dtype and cast to x's (the compute dtype). The JVP rule keeps every low-rank
  term factored, (x du) v^T + (x u) dv^T (with ``transpose``: (x v) du^T + (x dv) u^T), so no derivative multiplies
  by a dense [C_in, C_out] tangent of W_eff, the two terms one product where both are present on XLA:CPU
  (`matmul.sum_of_products`: the second-order meta-step 1.021x [0.991-1.054], session 18); the input's own term is
  this product again (dx W_eff), so a forward-mode pass (the Hessian-vector products' tangent pass) computes one
  dense product per layer for it, not dx w + (dx u) v^T. Under reverse mode JAX transposes that term as the plain
  dx W_eff (W_eff then a constant): `lowrank_matmul` gives its own input cotangent through this function instead, so
  forward-over-reverse stays thin.
  """
  weight = (w + u @ v.T).astype(x.dtype)
  return _mm_t(x, weight) if transpose else _mm(x, weight)


def _effective_matmul_jvp(transpose, primals, tangents):
  x, w, u, v = primals
  dx, dw, du, dv = (None if isinstance(t, SymbolicZero) else t for t in tangents)
  y = _effective_matmul(x, w, u, v, transpose)
  c = lambda a: a.astype(x.dtype)  # noqa: E731  the compute dtype
  terms = [] if dx is None else [_effective_matmul(dx, w, u, v, transpose)]
  if dw is not None:
    terms.append(_mm_t(x, c(dw)) if transpose else _mm(x, c(dw)))
  # the low-rank terms (x du) v^T and (x u) dv^T (with ``transpose``: x (v du^T + dv u^T)), as (left, right) pairs
  low = []
  if du is not None:
    low.append((_mm(x, c(v)), du) if transpose else (_mm(x, c(du)), v))
  if dv is not None:
    low.append((_mm(x, c(dv)), u) if transpose else (_mm(x, c(u)), dv))
  if len(low) == 2:  # one product writing [N, C_out] instead of two and their sum
    (a1, b1), (a2, b2) = low
    terms.append(_sum_of_products(c(a1), c(b1), c(a2), c(b2)))
  elif low:
    terms.append(_mm_t(c(low[0][0]), c(low[0][1])))
  return y, (sum(terms[1:], terms[0]) if terms else jnp.zeros_like(y))


_effective_matmul.defjvp(_effective_matmul_jvp, symbolic_zeros=True)


@jax.custom_vjp
def lowrank_matmul(x: jax.Array, w: jax.Array, u: jax.Array, v: jax.Array) -> jax.Array:
  """x [..., C_in] @ (w + u v^T): a bilinear difference's layer, one fused matmul, derivatives kept low rank.

  The value is ``x @ (w + u @ v.T).astype(x.dtype)`` (w [C_in, C_out], u [C_in, r], v [C_out, r] in the parameters'
  dtype, summed before the cast to the compute dtype of x, as the unfactored layer does). Autodiff of that
  expression would reach u and v through the dense dW = x^T dY [C_in, C_out] (dU = dW v): a matmul the size of the
  layer's forward. Here the reverse mode gives (w, u, v) their cotangents from `_effective_matmul`'s thin JVP rule,
  transposed: x^T dY (only where w is differentiated: the rule sees symbolic zeros, and the inner gradients, w.r.t.
  the difference alone, never trace it), and the thin x^T (dY v)
  and dY^T (x u); and the input's cotangent as one dense product with the effective weight, dY W_eff^T
  (`_effective_matmul` with ``transpose``), rather than dY w^T + (dY v) u^T: a thin product writing [N, C_in] and its
  sum less per layer (x may have leading axes, flattened into N as `_mm` does). Both
  are `_effective_matmul` calls, so a derivative of this backward (the meta-step's forward-over-reverse
  Hessian-vector products) follows the thin rule too, and reverse-over-reverse transposes it; forward mode alone
  (jvp of this function, not of its gradient) is not defined, as for any custom VJP.
  """
  return _effective_matmul(x, w, u, v, False)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _Perturbed:
  """Which of (x, w, u, v) a reverse pass differentiates: static, carried from the forward to the backward rule."""

  flags: tuple[bool, bool, bool, bool]


def _lowrank_matmul_fwd(x, w, u, v):
  perturbed = _Perturbed(tuple(a.perturbed for a in (x, w, u, v)))
  x, w, u, v = (a.value for a in (x, w, u, v))
  return _effective_matmul(x, w, u, v, False), (x, w, u, v, perturbed)


def _lowrank_matmul_bwd(residuals, ct):
  """Cotangents only for the inputs being differentiated (symbolic zeros): the inner loop's gradients, w.r.t. the
  difference only, then never trace the dense x^T dY of w (which JAX's dead-code pass removes under jit, but eager
  calls would compute)."""
  x, w, u, v, perturbed = residuals
  if isinstance(ct, SymbolicZero):  # JAX's contract under symbolic_zeros (a single output's is never one in practice)
    return None, None, None, None
  dx = _effective_matmul(ct.astype(x.dtype), w, u, v, True).astype(x.dtype) if perturbed.flags[0] else None
  params, wanted = (w, u, v), perturbed.flags[1:]
  if not any(wanted):
    return dx, None, None, None

  def product(*chosen):  # x @ W_eff as a function of the differentiated ones among (w, u, v)
    given = iter(chosen)
    return _effective_matmul(x, *(next(given) if want else p for p, want in zip(params, wanted)), False)

  _, pullback = jax.vjp(product, *(p for p, want in zip(params, wanted) if want))
  given = iter(pullback(ct))
  return (dx, *(next(given) if want else None for want in wanted))


lowrank_matmul.defvjp(_lowrank_matmul_fwd, _lowrank_matmul_bwd, symbolic_zeros=True)


def dense(x: jax.Array, weight: jax.Array, d: Mapping[str, jax.Array] | None, dtype: Any) -> jax.Array:
  """x W(x) for one dense layer without its bias: x [..., C_in], weight [C_in, C_out] -> [..., C_out].

  With ``d`` None (no difference) this is exactly ``x @ weight``; an additive bilinear difference (U, V only) goes
  through `lowrank_matmul`, whose derivatives stay low rank. The dynamic terms are never computed as a
  per-token [C_in, C_out] matrix: the additive one as ((x U) Sigma(x)) V^T, the multiplicative one as
  sum_r ((x ⊙ U1[:, r]) W0) ⊙ (Sigma1(x) V1^T)[r].
  """
  x = x.astype(dtype)
  if d is None:
    return _mm(x, weight.astype(dtype))
  if set(d) == {"U", "V"}:  # bilinear, additive only: derivatives kept low rank
    y = checkpoint_name(lowrank_matmul(x.reshape(-1, x.shape[-1]), weight, d["U"], d["V"]), LOWRANK_NAME)
    return y.reshape(*x.shape[:-1], y.shape[-1])
  w = weight
  dynamic_phi1 = _has_sigma(d, "sigma1")
  if "U1" in d and not dynamic_phi1:
    w = w * (1.0 + d["U1"] @ d["V1"].T)
  delta = static_delta(d)
  if delta is not None:
    w = w + delta
  y = _mm(x, w.astype(dtype))  # [..., C_out]
  if dynamic_phi1:  # x (W0 ⊙ U1 S1(x) V1^T), per token
    z = jnp.einsum("...i,ir,io->...ro", x, d["U1"].astype(dtype), weight.astype(dtype))  # [..., r, C_out]
    y = y + jnp.einsum("...ro,...rs,os->...o", z, sigma(d, x, "sigma1"), d["V1"].astype(dtype))
  if is_dynamic(d):
    a = x @ d["U"].astype(dtype)  # [..., r]
    b = jnp.einsum("...r,...rs->...s", a, sigma(d, x))  # [..., r]
    y = y + b @ d["V"].astype(dtype).T
  return y


def fold(params: Params, difference: Params) -> tuple[dict, dict]:
  """Fold every input-independent part of a difference into its kernels, once (e.g. before decoding).

  Each targeted kernel W0 becomes ``Phi1 ⊙ W0 + Phi2`` for the static parts (the static Phi1 = 1 + U1 V1^T, and
  the bilinear or Kronecker Phi2), so a decoder computes one plain matmul per token for those layers. The dynamic
  terms (Sigma(x), Sigma1(x)) depend on each token and stay in the difference.

  Args:
    params: the base model's ``'params'``.
    difference: the ``'tarp'`` collection for ``params``.

  Returns:
    (params with folded kernels, the difference that is left: only the dynamic layers' per-token terms; empty when
    every layer was static). ``apply({'params': p, 'tarp': left})`` (or without 'tarp' when ``left`` is empty)
    gives the same outputs as ``apply({'params': params, 'tarp': difference})``.
  """
  flat = traverse_util.flatten_dict(params)
  layers: dict[Path, dict] = {}
  for key, value in traverse_util.flatten_dict(difference).items():
    layers.setdefault(key[:-1], {})[key[-1]] = value
  left = {}
  for path, d in layers.items():
    if path + ("weight",) not in flat:
      raise ValueError(f"the difference has a layer {'/'.join(path)} that params has no 'weight' for.")
    w = flat[path + ("weight",)]
    if "U1" in d and not _has_sigma(d, "sigma1"):
      w = w * (1.0 + d.pop("U1") @ d.pop("V1").T)
    delta = static_delta(d)
    if delta is not None:
      w, d = w + delta, {}
    flat[path + ("weight",)] = w
    if d:
      left.update({path + (k,): v for k, v in d.items()})
  return traverse_util.unflatten_dict(flat), traverse_util.unflatten_dict(left)


def num_params(tree: Any) -> int:
  """Number of scalars in a pytree (to report the size of the difference)."""
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))
