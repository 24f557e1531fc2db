"""Linear stand-ins for GPT-2's nonlinearities: what their elementwise work costs in a step (issue #11's limit).

Inside ``linear(parts)`` the benchmark's GPT-2 traces with each named nonlinearity replaced by a linear map of the
same shapes and parameters, cheap enough to cost next to nothing:

* ``layer_norm``: ``x * weight + bias`` (no mean, no variance: no reductions, no rsqrt);
* ``gelu``: every activation of `mltd_jax.models.layers.ACTIVATIONS` as ``x / 2``;
* ``attention_softmax``: ``jax.nn.softmax(s)`` as ``s / T`` where ``s`` is not masked (0 where it is): one select;
* ``token_loss``: `mltd_jax.losses.token_nll` as ``5e-4 * sum(z^2) - z[target]`` per token (still quadratic, so the
  second-order step keeps every term).

Every matrix product and its derivatives stay the same (`check`: the two steps' product FLOPs are equal, every
requested stand-in was called while tracing, the replaced transcendental functions are gone), and the tensors
between the products keep their shapes (the nonlinearities' saved residuals go). The time a stand-in step saves is
what making those nonlinearities' elementwise work nearly free would save with everything else as it is: a measure
of what faster implementations of them (hand-fused kernels with their JVP and transpose rules) could give, not a
bound on every implementation (a kernel that fused the softmax into the attention products, or the cross-entropy
into the LM head's, never writing the scores or logits, could save more). The arithmetic is not the model's: for
timing only (`ab_meta_step.py` ``standins=...``, `meta_step.py` ``--standins``).
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator

PARTS = ("layer_norm", "gelu", "attention_softmax", "token_loss")
# Each part's transcendental functions: none of them may be left in a step traced with that stand-in.
_GONE = {"layer_norm": ("rsqrt",), "gelu": ("tanh", "erf", "logistic"), "attention_softmax": (), "token_loss": ("log",)}
_TRANSCENDENTAL = ("exp", "log", "rsqrt", "tanh", "erf", "logistic")


def parse(value: str) -> tuple[str, ...]:
  """``all`` or comma-separated names of `PARTS` -> those names, in `PARTS`' order."""
  names = PARTS if value == "all" else tuple(v.strip() for v in value.split(",") if v.strip())
  unknown = sorted(set(names) - set(PARTS))
  if unknown or not names:
    raise SystemExit(f"standins={value!r}: expected 'all' or names among {', '.join(PARTS)}; unknown {unknown}")
  return tuple(p for p in PARTS if p in names)


def _linear_norm(calls: collections.Counter):
  import flax.linen as nn
  import jax.numpy as jnp

  class LinearNorm(nn.Module):
    """`layers.LayerNorm`'s fields and parameters, without the normalization."""

    eps: float = 1e-5
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
      calls["layer_norm"] += 1
      d = x.shape[-1]
      weight = self.param("weight", nn.initializers.ones, (d,))
      bias = self.param("bias", nn.initializers.zeros, (d,))
      return (x * weight + bias).astype(self.dtype)

  return LinearNorm


def _stand_ins(calls: collections.Counter) -> dict:
  """The function stand-ins, each counting its calls in ``calls`` under its part's name."""
  import jax.numpy as jnp

  def half(x):
    calls["gelu"] += 1
    return x * 0.5

  def scaled_scores(s, axis=-1):
    calls["attention_softmax"] += 1
    return jnp.where(s > jnp.finfo(s.dtype).min, s, 0.0) / s.shape[axis]  # the model masks with the dtype's min

  def quadratic_nll(logits, targets, weights):
    calls["token_loss"] += 1
    hit = targets[..., None] == jnp.arange(logits.shape[-1])
    nll = 5e-4 * (logits * logits).sum(-1) - jnp.where(hit, logits, 0.0).sum(-1)
    w = weights.astype(logits.dtype)
    return (nll * w).sum(), w.sum()

  return {"gelu": half, "attention_softmax": scaled_scores, "token_loss": quadratic_nll}


@contextlib.contextmanager
def linear(parts: tuple[str, ...]) -> Iterator[collections.Counter]:
  """Trace GPT-2 with the named nonlinearities replaced (module attributes swapped, restored on exit); yields a
  Counter of each stand-in's calls while tracing (for `check`). Trace a function object made for the purpose: JAX
  reuses the jaxpr of a function it traced before, and then no stand-in is called."""
  import jax

  from mltd_jax import losses
  from mltd_jax.models import gpt2, layers

  saved = (gpt2.LayerNorm, dict(layers.ACTIVATIONS), jax.nn.softmax, losses.token_nll)
  calls: collections.Counter = collections.Counter()
  fns = _stand_ins(calls)
  try:
    if "layer_norm" in parts:
      gpt2.LayerNorm = _linear_norm(calls)
    if "gelu" in parts:
      layers.ACTIVATIONS.update({name: fns["gelu"] for name in layers.ACTIVATIONS})
    if "attention_softmax" in parts:
      jax.nn.softmax = fns["attention_softmax"]
    if "token_loss" in parts:
      losses.token_nll = fns["token_loss"]
    yield calls
  finally:
    gpt2.LayerNorm, jax.nn.softmax, losses.token_nll = saved[0], saved[2], saved[3]
    layers.ACTIVATIONS.clear()
    layers.ACTIVATIONS.update(saved[1])


def primitive_counts(jaxpr) -> collections.Counter:
  """How many equations of each primitive a closed jaxpr holds, nested jaxprs (scan, custom rules) included."""
  from meta_step import subjaxprs  # this directory's script

  counts: collections.Counter = collections.Counter()

  def walk(jx):
    for eqn in jx.eqns:
      counts[eqn.primitive.name] += 1
      for value in eqn.params.values():
        for sub in subjaxprs(value):
          walk(sub)

  walk(jaxpr.jaxpr)
  return counts


def check(base, standin, parts: tuple[str, ...], calls: collections.Counter) -> dict:
  """Stop unless the stand-in step (a closed jaxpr, traced inside `linear`, whose Counter is ``calls``) has the base
  step's product FLOPs, called every requested stand-in, and lost the replaced parts' transcendental functions
  (fewer ``exp`` for the softmaxes); returns the counts compared."""
  from meta_step import jaxpr_product_flops  # this directory's script

  flops = jaxpr_product_flops(base), jaxpr_product_flops(standin)
  if flops[0] != flops[1]:
    raise SystemExit(f"standins={','.join(parts)}: the products changed ({flops[0]:.4g} -> {flops[1]:.4g} FLOPs)")
  before, after = primitive_counts(base), primitive_counts(standin)
  left = {p: after[p] for part in parts for p in _GONE[part] if after[p]}
  fewer_exp = after["exp"] < before["exp"] or not {"attention_softmax", "token_loss"} & set(parts)
  uncalled = [part for part in parts if not calls[part]]
  if left or not fewer_exp or uncalled:
    raise SystemExit(f"standins={','.join(parts)}: the stand-ins did not take: never called {uncalled}, left "
                     f"{left}, exp {before['exp']} -> {after['exp']} (does gpt2 still call layers.LayerNorm, "
                     "ACTIVATIONS, jax.nn.softmax, losses.token_nll? was the function traced before?)")  # fmt: skip
  return {
    "product_flops": flops[0],
    "calls": {part: calls[part] for part in parts},
    "transcendental": {p: [before[p], after[p]] for p in _TRANSCENDENTAL if before[p] or after[p]},
  }
