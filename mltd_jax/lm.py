"""The plain language-model training step (multitask pretraining; also fine-tuning and DAPT baselines). Pure."""

from __future__ import annotations

import functools
from typing import Callable

import jax
import optax

from mltd_jax import losses
from mltd_jax.state import TrainState


def make_lm_step(apply_fn: Callable, tx: optax.GradientTransformation, dropout: bool = False) -> Callable:
  """The jitted ``(state, batch, rng) -> (state, metrics)`` step of next-token training; ``state`` is donated.

  ``batch = {"ids": [B, L], "mask": [B, L]}``; with ``dropout`` the model runs in training mode with ``rng``.
  """

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state: TrainState, batch: dict, rng: jax.Array):
    kw = {"deterministic": False, "rngs": {"dropout": rng}} if dropout else {}
    loss, grads = jax.value_and_grad(lambda v: losses.lm_loss(apply_fn, v, batch, **kw))(state.variables)
    updates, opt_state = tx.update(grads, state.opt_state, state.variables)
    new = state.replace(
      step=state.step + 1, variables=optax.apply_updates(state.variables, updates), opt_state=opt_state
    )
    return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

  return step
