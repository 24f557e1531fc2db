"""Layers named like transformers' PyTorch modules, so a state dict maps onto the param tree by its key names.

`Dense` is the one place where the TARP difference enters a model: it reads its own entry of the ``'tarp'``
variable collection (if the caller passed one) and lets `mltd_jax.tarp.dense` apply it. Model code is therefore
the same for every TARP kind, and with no ``'tarp'`` collection it is the plain model.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mltd_jax import tarp

Init = Callable[..., jax.Array]


def normal(std: float) -> Init:
  return nn.initializers.normal(stddev=std)


def wide(dtype: Any) -> Any:
  """The precision for softmax, layer norm and logits: float32, or float64 when computing in float64."""
  return jnp.promote_types(dtype, jnp.float32)


class Dense(nn.Module):
  """y = x W + b, W stored as ``weight`` [in, out] (the layout of GPT-2's Conv1D), plus the TARP difference."""

  features: int
  use_bias: bool = True
  dtype: Any = jnp.float32
  weight_init: Init = normal(0.02)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    weight = self.param("weight", self.weight_init, (x.shape[-1], self.features))
    difference = self.variables.get("tarp")  # this layer's entry of the 'tarp' collection, if any
    y = tarp.dense(x, weight, difference, self.dtype)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
    return y


def dense_paths(model: nn.Module) -> list[tuple[str, ...]]:
  """Module paths of every `Dense` layer that ``model`` calls, e.g. ``('transformer', 'h', '0', 'attn', 'c_attn')``.

  Found by tracing ``model.init_params`` (abstractly, with `jax.eval_shape`: nothing is computed or allocated)
  and recording each `Dense.__call__`, so they are the model's real dense layers, whatever their names; the
  paths are those of the layers' entries in ``'params'`` (and in the ``'tarp'`` collection), also under
  `nn.remat`. The model's family module must define ``init_params(rng)``.

  Args:
    model: a linen model with an ``init_params(rng) -> params`` method.

  Returns:
    The paths, sorted and without duplicates (a layer called twice is listed once).
  """
  found = set()

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, Dense) and context.method_name == "__call__":
      found.add(tuple(context.module.scope.path))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(model.init_params, jax.random.key(0))
  return sorted(found)


class Embed(nn.Module):
  """Token or position embedding; ``weight`` [num, features]; `attend` gives tied output logits in float32."""

  num: int
  features: int
  dtype: Any = jnp.float32
  std: float = 0.02

  def setup(self):
    self.weight = self.param("weight", normal(self.std), (self.num, self.features))

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.weight, ids, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    dt = wide(self.dtype)
    return jnp.einsum("...d,vd->...v", x.astype(dt), self.weight.astype(dt))


class LayerNorm(nn.Module):
  """LayerNorm with transformers' names (``weight``, ``bias``), computed in float32 (or wider)."""

  eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    weight = self.param("weight", nn.initializers.ones, (d,))
    bias = self.param("bias", nn.initializers.zeros, (d,))
    xw = x.astype(wide(self.dtype))
    mean = xw.mean(-1, keepdims=True)
    var = jnp.square(xw - mean).mean(-1, keepdims=True)
    y = (xw - mean) * jax.lax.rsqrt(var + self.eps) * weight + bias
    return y.astype(self.dtype)


class RMSNorm(nn.Module):
  """T5's layer norm (``T5LayerNorm``): x / sqrt(mean(x^2) + eps) * weight, no mean, no bias; float32 (or wider).

  The mean of squares is taken in float32 even for bfloat16 activations, where its sum would lose precision.
  """

  eps: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    weight = self.param("weight", nn.initializers.ones, (x.shape[-1],))
    xw = x.astype(wide(self.dtype))
    y = xw * jax.lax.rsqrt(jnp.square(xw).mean(-1, keepdims=True) + self.eps) * weight
    return y.astype(self.dtype)


def fold_for_decoding(variables: dict) -> dict:
  """``variables`` with the static parts of a ``'tarp'`` difference folded into the kernels (`tarp.fold`), once.

  The families' ``prepare_decode``: decoding then pays nothing per token for static kinds, and the dynamic kind
  keeps only its per-token terms. Without a ``'tarp'`` collection the variables are returned as they are.
  """
  if "tarp" not in variables:
    return variables
  params, left = tarp.fold(variables["params"], variables["tarp"])
  rest = {k: v for k, v in variables.items() if k not in ("params", "tarp")}
  return {**rest, "params": params, **({"tarp": left} if left else {})}


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "relu": jax.nn.relu,
  "silu": jax.nn.silu,
  "swish": jax.nn.silu,
  "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}
