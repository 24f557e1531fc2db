"""The training state: one pytree that the jitted steps take, donate and return, and that Orbax saves."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
  """step, the variables by collection ({'params': base model, 'tarp': difference, ...}) and optimizer state.

  The optimizer itself is not part of the state (the step function closes over it), and neither is the random key
  (each phase has its own stream key; the step folds in ``step``), so the state holds only arrays and saves as is.
  """

  step: jax.Array
  variables: dict
  opt_state: Any

  @classmethod
  def create(cls, variables: dict, tx: optax.GradientTransformation) -> "TrainState":
    return cls(step=jnp.zeros((), jnp.int32), variables=variables, opt_state=tx.init(variables))
