"""Token-level losses (pure), shared by the model families' loss functions."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_nll(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Summed negative log-likelihood and token count.

  Args:
    logits: [..., L, V] (computed in float32 or wider).
    targets: [..., L] int token ids.
    weights: [..., L] 1 for tokens that count, 0 for padding.

  Returns:
    (sum of -log p(target) over counted tokens, number of counted tokens), both scalars.
  """
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  # log p(target) = logits[target] - logsumexp(logits), the target picked by a comparison with the vocabulary's
  # indices rather than a gather: the gradient, softmax - one_hot, is then one fused elementwise pass over
  # [..., V] instead of a scatter into a zero [..., V] buffer and log_softmax's backward
  # (benchmarks/PERFORMANCE_LOG.md).
  hit = targets[..., None] == jnp.arange(logits.shape[-1])  # int32 indices: no wrap for narrow id dtypes
  nll = jax.nn.logsumexp(logits, axis=-1) - jnp.where(hit, logits, 0.0).sum(-1)
  w = weights.astype(logits.dtype)
  return (nll * w).sum(), w.sum()
