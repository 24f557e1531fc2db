"""Layers named like transformers' PyTorch modules, so a state dict maps onto the param tree by its key names.

`Dense` is the one place where the TARP difference enters a model: it reads its own entry of the ``'tarp'``
variable collection (if the caller passed one) and lets `mltd_jax.tarp.dense` apply it. Model code is therefore
the same for every TARP kind, and with no ``'tarp'`` collection it is the plain model. `ffn_cell` is the same kind
of hook for TAMS (`mltd_jax.tams`): the FFN sublayers call it, and without TAMS cells it adds nothing.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mltd_jax import matmul, tams, tarp

Init = Callable[..., jax.Array]


def normal(std: float) -> Init:
  return nn.initializers.normal(stddev=std)


# The `jax.checkpoint_policies` that keep matmul outputs: with them, `remat_policy` also keeps the bilinear TARP
# layers' outputs, which come out of a custom VJP call (`tarp.lowrank_matmul`) that these policies do not see, and
# the products `mltd_jax.matmul` binds to a primitive of its own (bfloat16 on XLA:CPU, and float32 there with the
# oneDNN kernel: `matmul.saveable`).
DOT_POLICIES = (
  "dots_saveable",
  "checkpoint_dots",
  "dots_with_no_batch_dims_saveable",
  "checkpoint_dots_with_no_batch_dims",
)


def remat_policy(remat: Any) -> Callable | None:
  """The policy of a block's ``nn.remat`` for ``remat`` (a `jax.checkpoint_policies` name, or True/False: None)."""
  if not isinstance(remat, str):
    return None
  policy = getattr(jax.checkpoint_policies, remat)
  if remat in DOT_POLICIES:
    keep = jax.checkpoint_policies.save_only_these_names(tarp.LOWRANK_NAME)
    policy = jax.checkpoint_policies.save_from_both_policies(policy, keep)
    narrow = matmul.saveable(batched="no_batch_dims" not in remat)
    policy = jax.checkpoint_policies.save_from_both_policies(policy, narrow)
  return policy


def wide(dtype: Any) -> Any:
  """The precision for softmax, layer norm and logits: float32, or float64 when computing in float64."""
  return jnp.promote_types(dtype, jnp.float32)


def heads_first(x: jax.Array) -> jax.Array:
  """[b, t, h, hd] -> [b * h, t, hd]: one batch axis, each head's rows contiguous (attention's two products).

  With (batch, head) as a single batch dimension XLA:CPU's batched matmuls need fewer relayouts: forward+backward
  of one GPT-2 layer's attention at the peer's shapes (4 x 4 sequences of 127 tokens, 4 heads of 64) took 12.0 ms
  against 15.5 ms with the batch and head axes apart (benchmarks/PERFORMANCE_LOG.md).
  """
  return x.transpose(0, 2, 1, 3).reshape(-1, x.shape[1], x.shape[3])


def heads_last(x: jax.Array, batch: int) -> jax.Array:
  """[b * h, t, hd] -> [b, t, h * hd]: `heads_first`'s inverse, the heads joined again for the output projection."""
  _, t, hd = x.shape
  return x.reshape(batch, -1, t, hd).transpose(0, 2, 1, 3).reshape(batch, t, -1)


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
      # in y's dtype: the compute dtype, or float32 where `matmul.mixed` (XLA:CPU, bfloat16: y is the product's
      # float32 sum; the bias gradient, a sum over every token, then stays float32: bfloat16 ran in slow reductions)
      y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(y.dtype)
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
    """x [..., features] @ weight^T -> [..., num] in float32: on XLA:CPU a narrow compute dtype's inputs (x and the
    table rounded to it) summed in float32 (`mltd_jax.matmul.mixed`), otherwise float32 (or wider) throughout, by
    `mltd_jax.matmul.matmul` where it binds its primitive (`matmul.primitive`: the table's gradient on oneDNN)."""
    if matmul.primitive(self.dtype):
      y = matmul.matmul(x.reshape(-1, x.shape[-1]).astype(self.dtype), self.weight, transpose_y=True)
      return y.reshape(*x.shape[:-1], self.num)
    dt = wide(self.dtype)
    return jnp.einsum("...d,vd->...v", x.astype(dt), self.weight.astype(dt))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, weight: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  """(x - mean) / sqrt(var + eps) * weight + bias over the last axis, with a backward written out.

  x [..., d]; weight, bias [d]; eps a Python float (static). For the cotangent g of the output, with
  x_hat = (x - mean) * r, r = 1 / sqrt(var + eps) and h = g * weight: dx = r * (h - mean(h) - x_hat * mean(h * x_hat)),
  dweight = sum(g * x_hat), dbias = sum(g) over the leading axes, from the saved x_hat and r. The backward is plain
  JAX, so higher orders differentiate it in turn (forward-over-reverse, as `mltd_jax.meta`'s Hessian-vector products,
  and reverse-over-reverse). The same values as JAX's derived backward up to the order of float32 sums; why: on
  XLA:CPU the meta-step ran 2-6% faster with it at the median (bfloat16 clearly, float32 within its range of
  noise; README, issue #11, session 20). Being a custom VJP, it takes forward-mode autodiff only through a gradient
  (``jax.jvp`` of ``jax.grad``), not directly, as `tarp.lowrank_matmul`.
  """
  return _layer_norm_fwd(x, weight, bias, eps)[0]


def _layer_norm_fwd(x, weight, bias, eps):
  centred = x - x.mean(-1, keepdims=True)
  r = jax.lax.rsqrt(jnp.square(centred).mean(-1, keepdims=True) + eps)
  x_hat = centred * r
  return x_hat * weight + bias, (x_hat, r, weight, bias)


def _layer_norm_bwd(eps, residuals, g):
  x_hat, r, weight, bias = residuals
  h = g * weight
  dx = r * (h - h.mean(-1, keepdims=True) - x_hat * (h * x_hat).mean(-1, keepdims=True))
  rows = (-1, x_hat.shape[-1])
  dweight = (g * x_hat).reshape(rows).sum(0).astype(weight.dtype)
  return dx.astype(x_hat.dtype), dweight, g.reshape(rows).sum(0).astype(bias.dtype)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
  """LayerNorm with transformers' names (``weight``, ``bias``), computed in float32 (or wider) by `layer_norm`
  (a custom VJP: forward-mode autodiff only through a gradient)."""

  eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    weight = self.param("weight", nn.initializers.ones, (d,))
    bias = self.param("bias", nn.initializers.zeros, (d,))
    return layer_norm(x.astype(wide(self.dtype)), weight, bias, self.eps).astype(self.dtype)


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


def token_mask(mask: jax.Array, length: int, offset: Any = 0) -> jax.Array:
  """Which of ``length`` query positions are real tokens, bool [b or 1, length], read from an attention mask.

  A token is real when the mask lets it attend to its own key slot; query i sits at slot ``offset + i`` (a cached
  decoder's write index; 0 for a full sequence). ``mask`` is bool [b or 1, 1, length or 1, slots].
  """
  rows = jnp.broadcast_to(mask[:, 0], (mask.shape[0], length, mask.shape[-1]))  # [b, length, slots]
  slots = jnp.broadcast_to((offset + jnp.arange(length))[None, :, None], (mask.shape[0], length, 1))
  return jnp.take_along_axis(rows, slots, axis=-1)[..., 0]


def ffn_cell(
  module: nn.Module, h: jax.Array, mask: jax.Array, index: Any, causal: bool, cache: dict | None = None
) -> tuple[jax.Array | None, dict | None]:
  """The TAMS cell of ``module``'s FFN sublayer (a child named ``tams``; call it from ``module``'s compact method).

  Args:
    module: the calling module; its ``tams`` attribute is the model's `tams.CellSpec`, or None (no cells), and
      its ``dtype`` the computation's.
    h: the sublayer's input [b, t, D] (after its norm).
    mask: the sublayer's self-attention mask [b or 1, 1, t or 1, slots] (padded tokens get zero cell nodes).
    index: a cached decoder's write index (None: a full sequence).
    causal: causal convolutions (decoders) or centered ones (an encoder).
    cache: decoding: the layer's cache dict; its ``'tams'`` entry (absent before the first call) is the cell's
      history, and the returned cache carries the updated one.

  Returns:
    (the cell's output [b, t, D] to add to the residual stream, or None when there is nothing to add; ``cache``
    with the cell's history updated, or as it was).

  Raises:
    ValueError: the variables have TAMS weights for this sublayer but the model was built without cells.
  """
  spec = module.tams
  if spec is None:
    if "tams" in module.variables.get("tams", {}):
      raise ValueError(
        f"the variables have TAMS cells at {'/'.join(module.scope.path)} but the model has none: build it with "
        "tams.attach(model, config.tams)."
      )
    return None, cache
  decoding = cache is not None
  history = cache.get("tams") if decoding else None
  tm = token_mask(mask, h.shape[1], 0 if index is None else index)
  out, history = tams.Cell(spec, causal, module.dtype, name="tams")(h, tm, history, decoding)
  if out is None or not decoding or history is None:
    return out, cache
  return out, {**cache, "tams": history}


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
