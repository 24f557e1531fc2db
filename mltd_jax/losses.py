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
  logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  w = weights.astype(logp.dtype)
  return (nll * w).sum(), w.sum()
