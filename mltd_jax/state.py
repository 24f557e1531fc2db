"""The training state: one pytree that the jitted steps take, donate and return, and that Orbax saves."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
  """step, the variables by collection ({'params': base model, 'tarp': difference, ...}), optimizer state, rng.

  The optimizer itself is not part of the state (it is closed over by the step function), so the state holds only
  arrays and saves as it is.
  """

  step: jax.Array
  variables: dict
  opt_state: Any
  rng: jax.Array  # raw uint32 key data: jax.random.wrap_key_data(state.rng) gives the key

  @classmethod
  def create(cls, variables: dict, tx: optax.GradientTransformation, rng: jax.Array) -> "TrainState":
    return cls(
      step=jnp.zeros((), jnp.int32), variables=variables, opt_state=tx.init(variables), rng=jax.random.key_data(rng)
    )
