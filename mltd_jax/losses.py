"""Token-level language-modelling losses (pure)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_nll(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Summed negative log-likelihood and token count.

  Args:
    logits: [..., L, V] float32.
    targets: [..., L] int token ids.
    weights: [..., L] 1 for tokens that count, 0 for padding.

  Returns:
    (sum of -log p(target) over counted tokens, number of counted tokens), both scalars.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  w = weights.astype(logp.dtype)
  return (nll * w).sum(), w.sum()


def lm_loss(apply_fn, variables, batch: dict, **kw) -> jax.Array:
  """Mean next-token NLL of ``batch = {"ids": [B, L], "mask": [B, L]}`` under ``apply_fn(variables, ids, mask)``.

  An optional ``batch["weights"]`` [B, L] selects which target tokens count (default: ``mask``), e.g. only the
  objects of facts; attention always uses ``mask``.
  """
  ids, mask = batch["ids"], batch["mask"]
  logits = apply_fn(variables, ids[..., :-1], attention_mask=mask[..., :-1], **kw)
  total, count = token_nll(logits, ids[..., 1:], batch.get("weights", mask)[..., 1:])
  return total / jnp.maximum(count, 1.0)


def perplexity(mean_nll):
  """exp of a mean NLL (works on floats and arrays)."""
  return jnp.exp(mean_nll)
