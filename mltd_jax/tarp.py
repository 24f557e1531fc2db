"""TARP: task-adaptive reparameterization of dense kernels (paper section 2.1, Eq. 1-3).

A targeted kernel W0 [C_in, C_out] (y = x W0 + b) becomes

    W(x) = Phi1 ⊙ W0 + Phi2(x),

with low-rank "difference" parameters that live in their own variable collection (`'tarp'`), next to the model's
`'params'`. The kinds of Phi2:

  * ``bilinear``:  Phi2 = U V^T                         (U [C_in, r], V [C_out, r]; additive-only is LoRA)
  * ``kronecker``: Phi2 = sum_k H_k ⊗ (U_k V_k^T)       (H [k, n, n], U [k, C_in/n, r], V [k, C_out/n, r])
  * ``dynamic``:   Phi2(x) = U Sigma(x) V^T, Sigma(x) [r, r] made per token by a small MLP of x.

The multiplicative Phi1 is optional: Phi1 = 1 + U1 V1^T (so the all-ones start is exact).
Every "V" starts at zero, so the reparameterized model equals the base model exactly at initialization.

The kind of a layer's difference is read from its parameter names, so the model code (`models/layers.py`) calls
`dense` the same way whatever the kind, and with no difference it is the plain dense layer.
This module imports only jax/flax: it knows nothing of models, data or training.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import traverse_util

KINDS = ("bilinear", "kronecker", "dynamic")
Params = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class TarpConfig:
  """What to reparameterize and how.

  Attributes:
    kind: one of KINDS.
    rank: r, the rank of U V^T (per Kronecker term for ``kronecker``).
    targets: regex searched in the '/'-joined module path of each 2-D ``weight`` (e.g. ``attn/c_attn$``).
    multiplicative: also learn Phi1 = 1 + U1 V1^T (rank ``rank``).
    kron_terms: number of Kronecker terms k.
    kron_n: size n of each H_k; must divide C_in and C_out of every target.
    sigma_hidden: hidden width of the per-token MLP that makes Sigma(x) (``dynamic``).
    init_scale: standard deviation of the Gaussian U (and H, Sigma-MLP weights); V starts at zero.
  """

  kind: str = "bilinear"
  rank: int = 4
  targets: str = r"(attn/c_attn|attn/c_proj|mlp/c_fc|mlp/c_proj)$"
  multiplicative: bool = False
  kron_terms: int = 2
  kron_n: int = 2
  sigma_hidden: int = 16
  init_scale: float = 0.02

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"tarp.kind={self.kind!r} is not one of {KINDS}; set config.tarp.kind to one of them.")
    if self.rank < 1:
      raise ValueError(f"tarp.rank={self.rank} must be >= 1.")


def target_paths(params: Params, targets: str) -> list[tuple[str, ...]]:
  """Module paths (tuples) whose 2-D ``weight`` matches the regex ``targets``."""
  found = []
  for path, leaf in traverse_util.flatten_dict(params).items():
    if path[-1] == "weight" and getattr(leaf, "ndim", 0) == 2 and re.search(targets, "/".join(path[:-1])):
      found.append(path[:-1])
  return found


def init_layer(rng: jax.Array, c_in: int, c_out: int, cfg: TarpConfig) -> dict[str, jax.Array]:
  """Difference parameters of one [c_in, c_out] kernel; all of them give a zero difference."""
  r, s = cfg.rank, cfg.init_scale
  k_u, k_h, k_s, k_m = jax.random.split(rng, 4)
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
    h = cfg.sigma_hidden
    p["sigma_w1"] = s * jax.random.normal(k_s, (c_in, h))
    p["sigma_b1"] = jnp.zeros((h,))
    p["sigma_w2"] = jnp.zeros((h, r * r))
    p["sigma_b2"] = jnp.eye(r).reshape(-1)  # Sigma(x) = I at init: the dynamic kind starts as the bilinear one
  if cfg.multiplicative:
    p["U1"] = s * jax.random.normal(k_m, (c_in, r))
    p["V1"] = jnp.zeros((c_out, r))
  return p


def init(rng: jax.Array, params: Params, cfg: TarpConfig) -> dict:
  """The ``'tarp'`` collection for ``params``: a tree mirroring the targeted modules' paths.

  Raises:
    ValueError: when ``cfg.targets`` matches no kernel.
  """
  paths = target_paths(params, cfg.targets)
  if not paths:
    raise ValueError(
      f"tarp.targets={cfg.targets!r} matches no 2-D 'weight' in the model; "
      "fix config.tarp.targets (module paths look like 'transformer/h/0/attn/c_attn')."
    )
  flat = traverse_util.flatten_dict(params)
  out = {}
  for i, path in enumerate(paths):
    c_in, c_out = flat[path + ("weight",)].shape
    out[path] = init_layer(jax.random.fold_in(rng, i), c_in, c_out, cfg)
  return traverse_util.unflatten_dict(out)


def static_delta(d: Mapping[str, jax.Array]) -> jax.Array | None:
  """The input-independent additive Phi2 [C_in, C_out], or None for the dynamic kind."""
  if "sigma_w1" in d:
    return None
  if "H" in d:  # sum_k kron(H_k, U_k V_k^T)
    low = jnp.einsum("kir,kor->kio", d["U"], d["V"])  # [k, C_in/n, C_out/n]
    k, n, _ = d["H"].shape
    blocks = jnp.einsum("kab,kio->aibo", d["H"], low)  # [n, C_in/n, n, C_out/n]
    return blocks.reshape(n * low.shape[1], n * low.shape[2])
  return d["U"] @ d["V"].T


def sigma(d: Mapping[str, jax.Array], x: jax.Array) -> jax.Array:
  """Sigma(x) [..., r, r]: the per-token core of the dynamic kind."""
  r = d["U"].shape[-1]
  h = jax.nn.gelu(x @ d["sigma_w1"].astype(x.dtype) + d["sigma_b1"].astype(x.dtype))
  s = h @ d["sigma_w2"].astype(x.dtype) + d["sigma_b2"].astype(x.dtype)
  return s.reshape(*s.shape[:-1], r, r)


def dense(x: jax.Array, weight: jax.Array, d: Mapping[str, jax.Array] | None, dtype: Any) -> jax.Array:
  """x W(x) for one dense layer without its bias: x [..., C_in], weight [C_in, C_out] -> [..., C_out].

  With ``d`` None (no difference) this is exactly ``x @ weight``. The dynamic term is computed as
  ((x U) Sigma(x)) V^T, never as a per-token [C_in, C_out] matrix.
  """
  x = x.astype(dtype)
  w = weight
  if d is not None:
    if "U1" in d:
      w = w * (1.0 + d["U1"] @ d["V1"].T)
    delta = static_delta(d)
    if delta is not None:
      w = w + delta
  y = x @ w.astype(dtype)
  if d is not None and "sigma_w1" in d:
    a = x @ d["U"].astype(dtype)  # [..., r]
    b = jnp.einsum("...r,...rs->...s", a, sigma(d, x))  # [..., r]
    y = y + b @ d["V"].astype(dtype).T
  return y


def num_params(tree: Any) -> int:
  """Number of scalars in a pytree (to report the size of the difference)."""
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))
