"""MLtD's meta-learning core (paper Algorithm 1), as pure functions.

* `inner_loop`: T_in optimizer steps on a task's support batches, adapting only the "fast" parameters; a
  `jax.lax.scan`, so `jax.grad` of a loss of its output is the exact second-order meta-gradient.
* `task_query_loss` / `meta_loss`: adapt on the support set, evaluate on the query set; vmapped over tasks.
* `make_meta_step`: the jitted outer step ``(state, batch, rng) -> (state, metrics)`` (Adam on everything).
* `make_adapt_eval`: meta-testing: K adaptation steps per held-out task, query loss after each.

Which parameters are fast is a regex over '/'-joined variable paths (``^tarp/`` adapts the TARP difference;
``^params/`` is full fine-tuning; ``^tarp/|ln_`` adds layer norms). Nothing here knows about data or files.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from mltd_jax import losses
from mltd_jax.state import TrainState

Variables = dict[str, Any]
Flat = dict[str, jax.Array]
# eps_root keeps Adam differentiable where a gradient is exactly zero (d sqrt(v)/dv is infinite at v = 0), as it
# is for a zero-initialized difference: without it the second-order meta-gradient is NaN.
INNER_OPTIMIZERS: dict[str, Callable[[Any], optax.GradientTransformation]] = {
  "sgd": optax.sgd,
  "adam": lambda lr: optax.adam(lr, eps_root=1e-8),
}


def inner_optimizer(name: str, lr) -> optax.GradientTransformation:
  """The adaptation optimizer ``name`` (config.meta.inner_optimizer / config.eval.optimizer) at rate ``lr``."""
  if name not in INNER_OPTIMIZERS:
    raise ValueError(
      f"inner optimizer {name!r} is not one of {sorted(INNER_OPTIMIZERS)} "
      "(config.meta.inner_optimizer, config.eval.optimizer)."
    )
  return INNER_OPTIMIZERS[name](lr)


def split(variables: Variables, fast_regex: str) -> tuple[Flat, Flat]:
  """Flat ('/'-joined path -> leaf) dicts of the fast and the remaining ("slow") variables."""
  flat = traverse_util.flatten_dict(variables, sep="/")
  fast = {k: v for k, v in flat.items() if re.search(fast_regex, k)}
  if not fast:
    raise ValueError(
      f"fast-parameter regex {fast_regex!r} (config.meta.fast_params or config.eval.methods) matches no "
      f"variable; variable paths look like {sorted(flat)[:3]}."
    )
  return fast, {k: v for k, v in flat.items() if k not in fast}


def merge(slow: Flat, fast: Flat) -> Variables:
  """Inverse of `split`."""
  return traverse_util.unflatten_dict({**slow, **fast}, sep="/")


def inner_loop(
  loss_fn: Callable[[Any, Any], jax.Array],
  fast_params: Any,
  batches: Any,
  lr,
  *,
  first_order: bool = False,
  remat: bool = False,
  optimizer: str = "sgd",
) -> Any:
  """Adapt ``fast_params`` with one optimizer step per support batch.

  Args:
    loss_fn: ``(fast_params, batch) -> scalar`` support loss.
    fast_params: pytree of the parameters the inner loop adapts.
    batches: pytree whose leaves have a leading axis T_in: batch t is used at step t.
    lr: inner learning rate (a float or a traced scalar).
    first_order: stop gradients through the inner gradients (FOMAML): the meta-gradient then ignores the
      curvature of the support loss; cheaper in time and memory.
    remat: wrap the scan body in `jax.checkpoint`: the backward pass recomputes each step instead of storing its
      activations, so memory no longer grows with T_in beyond the per-step carry.
    optimizer: "sgd" (the paper's Algorithm 1) or "adam" (its released configs), as in `INNER_OPTIMIZERS`.

  Returns:
    The adapted fast parameters, same structure as ``fast_params``.
  """
  tx = inner_optimizer(optimizer, lr)
  update = _update_fn(loss_fn, tx, first_order)

  def step(carry, batch):
    return update(carry, batch), None

  if remat:
    step = jax.checkpoint(step)
  (adapted, _), _ = jax.lax.scan(step, (fast_params, tx.init(fast_params)), batches)
  return adapted


def _update_fn(loss_fn: Callable, tx: optax.GradientTransformation, first_order: bool = False) -> Callable:
  """One optimizer step on ``loss_fn``: ``((fast, opt_state), batch) -> (fast, opt_state)``."""

  def update(carry, batch):
    fast, opt_state = carry
    grads = jax.grad(loss_fn)(fast, batch)
    if first_order:
      grads = jax.lax.stop_gradient(grads)
    updates, opt_state = tx.update(grads, opt_state, fast)
    return optax.apply_updates(fast, updates), opt_state

  return update


def task_query_loss(
  apply_fn: Callable,
  variables: Variables,
  task: dict,
  *,
  fast_regex: str,
  inner_lr,
  first_order: bool = False,
  remat: bool = False,
  optimizer: str = "sgd",
  support_chunks: int = 1,
) -> jax.Array:
  """Query loss of one task after adapting the fast variables on its support batches [T_in, S, L].

  ``support_chunks > 1`` computes each inner step's loss over that many slices of the support batch, one after
  another (`losses.lm_loss`): the same meta-gradient, with the inner step's activation memory divided.
  """
  fast, slow = split(variables, fast_regex)

  def support_loss(fast_params, batch):
    return losses.lm_loss(apply_fn, merge(slow, fast_params), batch, chunks=support_chunks)

  adapted = inner_loop(
    support_loss, fast, task["support"], inner_lr, first_order=first_order, remat=remat, optimizer=optimizer
  )
  return losses.lm_loss(apply_fn, merge(slow, adapted), task["query"])


def meta_loss(
  apply_fn: Callable, variables: Variables, batch: dict, task_chunk: int | None = None, **inner
) -> tuple[jax.Array, jax.Array]:
  """Mean query loss over the tasks of a meta-batch (leading task axis), and the per-task losses.

  Tasks are vmapped; with ``task_chunk`` only that many at a time (the chunks run one after another), which bounds
  memory for large models at the cost of less parallelism. The result is the same.
  """
  one = lambda task: task_query_loss(apply_fn, variables, task, **inner)  # noqa: E731
  per_task = jax.vmap(one)(batch) if task_chunk is None else jax.lax.map(one, batch, batch_size=task_chunk)
  return per_task.mean(), per_task


def make_meta_step(apply_fn: Callable, tx: optax.GradientTransformation, **inner) -> Callable:
  """The jitted outer step ``(state, batch, rng) -> (state, metrics)``; ``state`` is donated.

  ``inner`` holds the keyword arguments of `task_query_loss` (fast_regex, inner_lr, first_order, remat,
  optimizer, support_chunks) and `meta_loss`'s ``task_chunk``. The gradient reaches every variable: the base
  model and the fast variables' initialization. ``rng`` is accepted for stochastic extensions (TAMS' Gumbel
  noise); the TARP step is deterministic.
  """

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state: TrainState, batch: dict, rng: jax.Array) -> tuple[TrainState, dict]:
    del rng
    (loss, per_task), grads = jax.value_and_grad(lambda v: meta_loss(apply_fn, v, batch, **inner), has_aux=True)(
      state.variables
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.variables)
    new = state.replace(
      step=state.step + 1, variables=optax.apply_updates(state.variables, updates), opt_state=opt_state
    )
    return new, {"query_loss": loss, "query_loss_max": per_task.max(), "grad_norm": optax.tree.norm(grads)}

  return step


def make_adapt_eval(apply_fn: Callable, fast_regex: str, adapt_steps: int, optimizer: str = "sgd") -> Callable:
  """Meta-testing: ``evaluate(variables, tasks, lr) -> {name: [num_tasks, adapt_steps + 1]}`` query losses.

  Each task (support [1, S, L] or [T, S, L]: its first support batch is used at every step) is adapted for
  ``adapt_steps`` steps at learning rate ``lr``; column k is the loss after k steps (column 0: before
  adaptation) on every batch of ``task["eval"]`` (e.g. ``{"query": ..., "query_focus": ...}``). ``lr`` is an
  argument, so a learning-rate search compiles once.
  """

  def one_task(variables, task, lr):
    fast, slow = split(variables, fast_regex)
    support = jax.tree.map(lambda x: x[0], task["support"])
    tx = inner_optimizer(optimizer, lr)
    update = _update_fn(lambda f, b: losses.lm_loss(apply_fn, merge(slow, f), b), tx)

    def query_loss(f):
      return {k: losses.lm_loss(apply_fn, merge(slow, f), b) for k, b in task["eval"].items()}

    def step(carry, _):
      carry = update(carry, support)
      return carry, query_loss(carry[0])

    _, after = jax.lax.scan(step, (fast, tx.init(fast)), None, length=adapt_steps)
    return jax.tree.map(lambda b, a: jnp.concatenate([b[None], a]), query_loss(fast), after)

  return jax.jit(jax.vmap(one_task, in_axes=(None, 0, None)))
