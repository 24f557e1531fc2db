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


def lm_nll(apply_fn, variables, batch: dict, **kw) -> tuple[jax.Array, jax.Array]:
  """(summed next-token NLL, token count) of ``batch = {"ids": [B, L], "mask": [B, L]}``.

  An optional ``batch["weights"]`` [B, L] selects which target tokens count (default: ``mask``), e.g. only the
  objects of facts; attention always uses ``mask``.
  """
  ids, mask = batch["ids"], batch["mask"]
  logits = apply_fn(variables, ids[..., :-1], attention_mask=mask[..., :-1], **kw)
  return token_nll(logits, ids[..., 1:], batch.get("weights", mask)[..., 1:])


def lm_loss(apply_fn, variables, batch: dict, chunks: int = 1, **kw) -> jax.Array:
  """Mean next-token NLL of ``batch`` under ``apply_fn(variables, ids, attention_mask=mask)``.

  With ``chunks > 1`` the batch is split into that many equal slices along its first axis, and each slice's
  forward pass is a `jax.checkpoint` inside a `lax.scan`: the same value and gradients (any order), with the
  activation memory of one slice, for one extra forward pass per differentiation.
  """
  if chunks == 1:
    total, count = lm_nll(apply_fn, variables, batch, **kw)
    return total / jnp.maximum(count, 1.0)
  n = batch["ids"].shape[0]
  if n % chunks:
    raise ValueError(
      f"a batch of {n} sequences cannot be split into {chunks} equal chunks; set config.meta.support_chunks to a "
      f"divisor of {n}."
    )
  sliced = jax.tree.map(lambda x: x.reshape(chunks, n // chunks, *x.shape[1:]), batch)

  @jax.checkpoint
  def one(carry, piece):
    total, count = lm_nll(apply_fn, variables, piece, **kw)
    return (carry[0] + total, carry[1] + count), None

  zeros = jax.tree.map(  # (0, 0) of lm_nll's dtypes
    lambda a: jnp.zeros(a.shape, a.dtype),
    jax.eval_shape(lambda p: lm_nll(apply_fn, variables, p, **kw), jax.tree.map(lambda x: x[0], sliced)),
  )
  (total, count), _ = jax.lax.scan(one, zeros, sliced)
  return total / jnp.maximum(count, 1.0)
