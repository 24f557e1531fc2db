"""MLtD's meta-learning core (paper Algorithm 1), as pure functions over an injected loss.

* `InnerLoop`: the inner loop's settings, one frozen, validated dataclass (a static argument of the steps).
* `adapt`: ``inner.steps`` optimizer steps on a task's support batch, adapting only the variables whose
  '/'-joined path matches ``inner.fast_regex``; a `jax.lax.scan`, so `jax.grad` of a loss of its output is the
  exact second-order meta-gradient. With SGD it runs `sgd_adapt`, whose backward is derived by hand (one
  Hessian-vector product per step) instead. Meta-training and meta-testing both adapt with it.
* `task_loss` / `meta_loss`: adapt on the support set, score the query set; tasks vmapped or chunked.
  `meta_value_and_grad`: `meta_loss` and its gradient, each chunk of tasks differentiated within the loop over chunks.
* `make_meta_step` / `make_train_step`: plain ``(state, batch, rng) -> (state, metrics)`` functions; the caller
  jits them (with donation and shardings).

The model enters only through ``loss_fn(variables, batch, rng)``, which returns a scalar mean or a pair
``(summed loss, weight)``; a pair makes chunked means exact. An optional ``prepare(variables, support, rng, step)
-> variables`` runs once per task before the inner loop (TAMS puts the task's sampled architecture into the
variables with it, `mltd_jax.tams.make_prepare`); the meta-gradient flows through it. This module knows nothing
of model families, batch keys, data or files: a task is ``{"support": batch, "query": batch}`` of whatever the
loss takes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import TYPE_CHECKING, Any, Callable, Iterator

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

if TYPE_CHECKING:  # the steps only call .replace on it: any flax struct with step, variables, opt_state works
  from mltd_jax.state import TrainState

Variables = dict[str, Any]
Flat = dict[str, jax.Array]
LossFn = Callable[[Variables, Any, jax.Array], Any]
# prepare(variables, support batch, rng, outer step or None) -> the variables the task adapts and is scored with.
Prepare = Callable[[Variables, Any, jax.Array, Any], Variables]
OPTIMIZERS = ("sgd", "adam")
BACKWARDS = ("auto", "hvp", "autodiff")


@dataclasses.dataclass(frozen=True)
class InnerLoop:
  """How a task adapts: the inner loop of meta-training, or the adaptation of meta-testing.

  Attributes:
    steps: optimizer steps on the support batch (T_in; K at meta-test time).
    lr: learning rate (`adapt` also takes a traced ``lr``, so a learning-rate search compiles once).
    optimizer: "sgd" (the paper's Algorithm 1) or "adam" (its released configs).
    first_order: stop gradients through the inner gradients (FOMAML): cheaper, ignores the support loss's
      curvature.
    remat: `jax.checkpoint` each inner step: memory flat in ``steps`` for one recomputation per step.
    support_chunks: split the support batch into this many equal slices along its first axis, scanned one after
      another under `jax.checkpoint`: the same loss and gradients with the activations of one slice.
    fast_regex: which variables adapt ('/'-joined paths: ``^tarp/`` the TARP difference, ``^params/`` all).
    adam_eps_root: Adam's ``eps_root``. Differentiating through Adam needs it > 0: at a gradient of exactly zero
      (a zero-initialized difference) d sqrt(v)/dv is infinite and the meta-gradient NaN. It also changes the
      update (the first step shrinks for small gradients: 0.10x at |g| = 1e-5 with 1e-8), so the meta-gradient is
      exact for this slightly changed Adam. Use 0 where nothing is differentiated (meta-testing); with
      ``first_order`` nothing is differentiated through Adam either, and it is not applied.
    per_step_support: the support batch has a leading axis of ``steps`` (batch t at step t) instead of being
      reused at every step.
    lr_schedule: "constant", or "linear": the rate decays linearly from ``lr`` towards 0 over ``steps`` (optax's
      ``linear_schedule(lr, 0, steps)``: step t at ``lr * (1 - t / steps)``, the last at ``lr / steps``; the paper's
      fine-tuning of a held-out domain).
    backward: how `adapt` is differentiated. "hvp": a hand-derived backward for SGD (`sgd_adapt`): the forward
      keeps only the fast variables of each step, the backward runs the steps in reverse with one
      forward-over-reverse Hessian-vector product each (the same exact second-order gradient, fewer FLOPs and
      less memory than reverse-over-reverse; ``remat`` does not apply). "autodiff": `jax.grad` through the
      `lax.scan` (any optimizer). "auto" (default): "hvp" for SGD, "autodiff" for Adam.
    unroll: unroll the inner steps' loops (`jax.lax.scan` with ``unroll=True``, forward and backward): the same
      values, no loop left for XLA; longer compiles. XLA's cost analysis counts a loop body once, so
      `benchmarks/meta_step.py` counts a meta-step's FLOPs on an unrolled twin.
    fields: (attribute, config field) pairs, only for error messages (not compared or hashed).
  """

  steps: int
  lr: float
  optimizer: str = "sgd"
  first_order: bool = False
  remat: bool = False
  support_chunks: int = 1
  fast_regex: str = "^tarp/"
  adam_eps_root: float = 0.0
  per_step_support: bool = False
  lr_schedule: str = "constant"
  backward: str = "auto"
  unroll: bool = False
  fields: tuple[tuple[str, str], ...] = dataclasses.field(default=(), compare=False, repr=False)

  def field(self, name: str) -> str:
    """The config field behind attribute ``name`` (for messages)."""
    return dict(self.fields).get(name, f"InnerLoop.{name}")

  def __post_init__(self):
    def bad(name, why):
      raise ValueError(f"{self.field(name)}={getattr(self, name)!r} {why}")

    if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
      bad("steps", "must be an integer >= 1.")
    if not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) or self.lr < 0:
      bad("lr", "must be a finite number >= 0.")
    if self.optimizer not in OPTIMIZERS:
      bad("optimizer", f"is not one of {OPTIMIZERS}.")
    if self.lr_schedule not in ("constant", "linear"):
      bad("lr_schedule", "is not one of ('constant', 'linear').")
    if self.backward not in BACKWARDS:
      bad("backward", f"is not one of {BACKWARDS}.")
    if self.backward == "hvp" and self.optimizer != "sgd":
      bad("backward", f"needs the SGD inner optimizer (got {self.optimizer!r}); use 'auto' or 'autodiff' for Adam.")
    if self.backward == "hvp" and self.first_order:
      bad("backward", "is the second-order backward, but first_order=True differentiates nothing through the steps; "
          "use 'auto'.")  # fmt: skip
    if not isinstance(self.support_chunks, int) or isinstance(self.support_chunks, bool) or self.support_chunks < 1:
      bad("support_chunks", "must be an integer >= 1.")
    if not isinstance(self.unroll, bool):
      bad("unroll", "must be True or False.")
    if (
      not isinstance(self.adam_eps_root, (int, float))
      or not math.isfinite(self.adam_eps_root)
      or self.adam_eps_root < 0
    ):
      bad("adam_eps_root", "must be a finite number >= 0.")
    if not self.fast_regex:
      bad("fast_regex", "must be a non-empty regex over '/'-joined variable paths (e.g. '^tarp/').")
    try:
      re.compile(self.fast_regex)
    except re.error as e:
      bad("fast_regex", f"is not a valid regex ({e}).")

  @property
  def uses_hvp(self) -> bool:
    """Whether `adapt` runs `sgd_adapt` (its Hessian-vector-product backward): SGD, second order, not "autodiff".

    `adapt` also needs ``observe`` to be None for it (observations come from the scan)."""
    sgd = self.backward == "hvp" or (self.backward == "auto" and self.optimizer == "sgd")
    return sgd and not self.first_order

  def rates(self, lr) -> jax.Array:
    """The SGD rate of every step [steps] under ``lr_schedule`` (optax's ``linear_schedule(lr, 0, steps)``)."""
    t = jnp.arange(self.steps, dtype=jnp.result_type(float))
    return lr * (1.0 - t / self.steps) if self.lr_schedule == "linear" else jnp.full((self.steps,), 1.0) * lr

  def transform(self, lr) -> optax.GradientTransformation:
    """The optimizer at rate ``lr`` (a float or a traced scalar), decayed by ``lr_schedule``."""
    if self.lr_schedule == "linear":
      lr = optax.linear_schedule(lr, 0.0, self.steps)
    if self.optimizer == "adam":
      return optax.adam(lr, eps_root=0.0 if self.first_order else self.adam_eps_root)
    return optax.sgd(lr)


def mean_loss(out) -> jax.Array:
  """A loss function's result as a mean: a scalar as it is, ``(total, weight)`` as total / weight (0 if empty)."""
  if isinstance(out, tuple):
    total, weight = out
    return total / jnp.where(weight > 0, weight, 1.0)
  return out


def _as_pair(out) -> tuple[jax.Array, jax.Array]:
  return out if isinstance(out, tuple) else (out, jnp.ones((), jnp.result_type(out)))


def _structure(regex: str) -> Iterator[tuple[int, str, int]]:
  """(index, character, depth after it) of each ``(``, ``)`` and ``|`` of ``regex`` outside escapes and classes."""
  depth, i = 0, 0
  while i < len(regex):
    c = regex[i]
    if c == "\\":
      i += 1  # the escaped character
    elif c == "[":
      i += 1 + (regex[i + 1 : i + 2] == "^")
      i += regex[i : i + 1] == "]"  # a ']' right after '[' or '[^' is literal
      while i < len(regex) and regex[i] != "]":
        i += 1 + (regex[i] == "\\")
    elif c in "()|":
      depth += {"(": 1, ")": -1, "|": 0}[c]
      yield i, c, depth
    i += 1


def alternatives(regex: str) -> list[str]:
  """The top-level alternatives of ``regex`` (split at ``|`` outside groups and character classes), each that is
  one whole non-capturing group ``(?:...)`` split in turn: a path matches ``regex`` iff it matches one of them."""
  cuts = [i for i, c, depth in _structure(regex) if c == "|" and depth == 0]
  parts = [regex[a + 1 : b] for a, b in zip([-1, *cuts], [*cuts, len(regex)])]
  if len(parts) > 1:
    return [leaf for part in parts for leaf in alternatives(part)]
  inner = regex[3:-1]
  depths = [depth for _, c, depth in _structure(inner) if c != "|"]
  if regex.startswith("(?:") and regex.endswith(")") and min(depths, default=0) >= 0 and depths[-1:] in ([], [0]):
    return alternatives(inner)  # one whole group: (?:a)|(?:b) minus its outer characters is not one
  return parts


def split(variables: Variables, fast_regex: str, field: str = "fast_regex") -> tuple[Flat, Flat]:
  """Flat ('/'-joined path -> leaf) dicts of the fast and the remaining ("slow") variables.

  Raises:
    ValueError: the regex, or one of its `alternatives`, matches no variable (the message names ``field``, the
      config field it came from): ``"^tarp/|ln_"`` on a model without ``ln_`` is a mistake, not a choice.
  """
  flat = traverse_util.flatten_dict(variables, sep="/")
  fast = {k: v for k, v in flat.items() if re.search(fast_regex, k)}
  hint = f"variable paths look like {sorted(flat)[:3]} (collections: {sorted(variables)})."
  if not fast:
    raise ValueError(f"{field}={fast_regex!r} matches no variable; {hint}")
  flags = re.compile(fast_regex).flags  # (?i) at the front applies to every alternative
  for alt in [] if flags & re.VERBOSE else alternatives(fast_regex):  # (?x): '|' may sit in a comment
    try:
      alone = re.compile(alt, flags)
    except re.error:  # e.g. a back-reference to another alternative's group: not checked alone
      continue
    if not any(alone.search(k) for k in fast):
      raise ValueError(f"{field}={fast_regex!r}: its alternative {alt!r} matches no variable; {hint}")
  return fast, {k: v for k, v in flat.items() if k not in fast}


def merge(slow: Flat, fast: Flat) -> Variables:
  """Inverse of `split`."""
  return traverse_util.unflatten_dict({**slow, **fast}, sep="/")


def leading_dim(tree: Any) -> int:
  """The common size of the leading axis of every leaf (examples of a batch, tasks of a meta-batch)."""
  sizes = {x.shape[0] for x in jax.tree.leaves(tree)}
  if len(sizes) != 1:
    raise ValueError(f"batch leaves disagree on their leading (example or task) axis: {sorted(sizes)}.")
  if sizes == {0}:  # a mean over nothing: NaN losses and gradients
    raise ValueError(
      "a batch with no tasks or examples (leading axis 0): check config.meta.tasks_per_step and the tasks' "
      "support and query sizes."
    )
  return sizes.pop()


def chunked_loss(loss_fn: LossFn, chunks: int, field: str = "support_chunks") -> Callable[..., jax.Array]:
  """``(variables, batch, rng) -> mean loss`` computed over ``chunks`` equal slices of the batch's first axis.

  Each slice's loss is a `jax.checkpoint` inside a `lax.scan`: the same value and gradients (any order), with the
  activation memory of one slice. With ``(total, weight)`` pairs the mean is over all weight, exactly; with scalar
  means it is the mean of the slices' means (exact when the slices weigh the same).
  """
  if chunks == 1:
    return lambda v, batch, rng: mean_loss(loss_fn(v, batch, rng))

  def loss(variables, batch, rng):
    n = leading_dim(batch)
    if n % chunks:
      raise ValueError(
        f"a batch of {n} examples cannot be split into {chunks} equal chunks; set {field} to a divisor of {n}."
      )
    sliced = jax.tree.map(lambda x: x.reshape(chunks, n // chunks, *x.shape[1:]), batch)

    @jax.checkpoint
    def one(carry, xs):
      i, piece = xs
      total, weight = _as_pair(loss_fn(variables, piece, jax.random.fold_in(rng, i)))
      return (carry[0] + total, carry[1] + weight), None

    first = jax.tree.map(lambda x: x[0], sliced)
    shapes = jax.eval_shape(lambda p: _as_pair(loss_fn(variables, p, rng)), first)
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
    (total, weight), _ = jax.lax.scan(one, zeros, (jnp.arange(chunks), sliced))
    return mean_loss((total, weight))

  return loss


def _sgd_steps(support_loss, inner: InnerLoop, slow: Flat, fast: Flat, support, rng, lr, keep: bool):
  """The SGD inner loop: (adapted fast variables, the fast variables before each step [steps, ...] if ``keep``)."""

  def step(f, xs):
    t, per_step, rate = xs
    batch = per_step if inner.per_step_support else support
    g = jax.grad(lambda f_: support_loss(merge(slow, f_), batch, jax.random.fold_in(rng, t)))(f)
    return jax.tree.map(lambda a, b: (a - rate * b).astype(a.dtype), f, g), (f if keep else None)

  xs = (jnp.arange(inner.steps), support if inner.per_step_support else None, inner.rates(lr))
  return jax.lax.scan(step, fast, xs, unroll=inner.unroll)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def sgd_adapt(support_loss, inner: InnerLoop, slow: Flat, fast: Flat, support, rng: jax.Array, lr: jax.Array) -> Flat:
  """``inner.steps`` SGD steps f <- f - lr_t grad_f L(slow, f) on ``support``; exact second-order backward.

  The backward is derived by hand rather than by differentiating the scan: for the step f' = f - r g(s, f) with
  g = grad_f L, a cotangent v of f' gives  v_f = v - r H_ff v,  v_s += -r H_sf v,  v_r = -<g, v>, where
  (H_sf v, H_ff v) is one forward-over-reverse Hessian-vector product (`jax.jvp` of the full gradient of L in the
  direction (0, v)). The forward keeps only each step's fast variables (small for a low-rank difference); the
  backward replays the steps in reverse, so memory holds one step's activations whatever ``inner.steps``.

  Args:
    support_loss: ``(variables, batch, rng) -> mean loss`` (`chunked_loss`).
    inner: the settings (SGD; ``lr_schedule``, ``per_step_support``).
    slow, fast: flat ('/'-joined) variables; only ``fast`` adapts, the gradient reaches both.
    support: the support batch (or [steps, ...] with ``inner.per_step_support``); rng: step t uses fold_in(rng, t).
    lr: the base rate (a scalar array; differentiable).

  Returns:
    The adapted fast variables.
  """
  return _sgd_steps(support_loss, inner, slow, fast, support, rng, lr, keep=False)[0]


def _sgd_adapt_fwd(support_loss, inner, slow, fast, support, rng, lr):
  adapted, before = _sgd_steps(support_loss, inner, slow, fast, support, rng, lr, keep=True)
  return adapted, (slow, before, support, rng, lr)


def _sgd_adapt_bwd(support_loss, inner, residuals, v):
  slow, before, support, rng, lr = residuals
  inexact = {k: x for k, x in slow.items() if jnp.issubdtype(x.dtype, jnp.inexact)}
  const = {k: x for k, x in slow.items() if k not in inexact}

  def back(carry, xs):
    v, d_slow, d_lr = carry
    f, t, per_step, rate, d_rate = xs
    batch = per_step if inner.per_step_support else support
    key = jax.random.fold_in(rng, t)
    full = lambda f_: jax.grad(  # noqa: E731
      lambda s, g: support_loss(merge({**const, **s}, g), batch, key), argnums=(0, 1)
    )(inexact, f_)
    (_, g), (h_slow, h_fast) = jax.jvp(full, (f,), (v,))
    d_lr = d_lr - d_rate * sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(v)))
    d_slow = jax.tree.map(lambda d, h: d - rate * h.astype(d.dtype), d_slow, h_slow)
    v = jax.tree.map(lambda a, h: (a - rate * h).astype(a.dtype), v, h_fast)
    return (v, d_slow, d_lr), None

  per_step = support if inner.per_step_support else None
  xs = (before, jnp.arange(inner.steps), per_step, inner.rates(lr), inner.rates(1.0))
  # The slow cotangent sums in float32 at least (bfloat16 base weights: the carry keeps one dtype), cast at the end.
  zeros = {k: jnp.zeros(x.shape, jnp.promote_types(x.dtype, jnp.float32)) for k, x in inexact.items()}
  (v, d_slow, d_lr), _ = jax.lax.scan(back, (v, zeros, jnp.zeros_like(lr)), xs, reverse=True, unroll=inner.unroll)
  d_slow = {k: d.astype(inexact[k].dtype) for k, d in d_slow.items()}
  return {**d_slow, **{k: None for k in const}}, v, None, None, d_lr.astype(lr.dtype)


sgd_adapt.defvjp(_sgd_adapt_fwd, _sgd_adapt_bwd)


def adapt(
  loss_fn: LossFn,
  variables: Variables,
  support: Any,
  inner: InnerLoop,
  rng: jax.Array,
  observe: Callable[[Variables], Any] | None = None,
  *,
  lr: Any = None,
) -> tuple[Variables, Any]:
  """Adapt the fast variables of ``variables`` with ``inner.steps`` optimizer steps on ``support``.

  Args:
    loss_fn: ``(variables, batch, rng) -> scalar or (total, weight)``.
    variables: all variables (e.g. ``{"params": ..., "tarp": ...}``); those matching ``inner.fast_regex`` adapt.
    support: the support batch, reused at every step (or [steps, ...] with ``inner.per_step_support``).
    inner: the settings.
    rng: step t uses ``fold_in(rng, t)``.
    observe: if given, ``observe(adapted variables)`` after every step, stacked along a leading [steps] axis.
    lr: a learning rate overriding ``inner.lr`` (may be traced).

  Returns:
    (adapted variables, the stacked observations or None).
  """
  fast, slow = split(variables, inner.fast_regex, inner.field("fast_regex"))
  support_loss = chunked_loss(loss_fn, inner.support_chunks, inner.field("support_chunks"))
  lr = inner.lr if lr is None else lr
  if observe is None and inner.uses_hvp:
    rate = jnp.asarray(lr, jnp.result_type(float))
    support = jax.tree.map(jnp.asarray, support)  # numpy leaves are not valid custom_vjp arguments
    return merge(slow, sgd_adapt(support_loss, inner, slow, fast, support, rng, rate)), None
  tx = inner.transform(lr)

  def step(carry, xs):
    f, opt_state = carry
    t, per_step = xs
    batch = per_step if inner.per_step_support else support
    grads = jax.grad(lambda g: support_loss(merge(slow, g), batch, jax.random.fold_in(rng, t)))(f)
    if inner.first_order:
      grads = jax.lax.stop_gradient(grads)
    updates, opt_state = tx.update(grads, opt_state, f)
    f = optax.apply_updates(f, updates)
    return (f, opt_state), (None if observe is None else observe(merge(slow, f)))

  if inner.remat:
    step = jax.checkpoint(step)
  xs = (jnp.arange(inner.steps), support if inner.per_step_support else None)
  (adapted, _), observed = jax.lax.scan(step, (fast, tx.init(fast)), xs, unroll=inner.unroll)
  return merge(slow, adapted), observed


def task_loss(
  loss_fn: LossFn,
  variables: Variables,
  task: dict,
  inner: InnerLoop,
  rng: jax.Array,
  prepare: Prepare | None = None,
  step: Any = None,
) -> jax.Array:
  """Query loss of one task ``{"support": ..., "query": ...}`` after adapting on its support set.

  With ``prepare``, the task adapts from ``prepare(variables, support, key, step)`` (its own key; ``step`` is the
  outer step, or None); without it the result is exactly that of the plain task loss.
  """
  k_adapt, k_query = jax.random.split(rng)
  if prepare is not None:
    variables = prepare(variables, task["support"], jax.random.fold_in(rng, 2), step)
  adapted, _ = adapt(loss_fn, variables, task["support"], inner, k_adapt)
  return mean_loss(loss_fn(adapted, task["query"], k_query))


def map_tasks(one: Callable, tasks: Any, task_chunk: int, task_groups: int = 1) -> Any:
  """``one`` over the leading (task) axis of ``tasks``: vmapped, or ``task_chunk`` at a time with `jax.lax.map`;
  its outputs stacked along a leading task axis (with ``task_groups`` > 1, ``one`` must return a scalar).

  With ``task_groups`` > 1 the axis is split into that many contiguous groups first, vmapped over the groups and
  mapped inside each: when the task axis is sharded over that many devices, each device maps over its own tasks
  (a plain `lax.map` over a sharded axis would gather every task onto every device). Same result in any case.
  """
  tasks = jax.tree.map(jnp.asarray, tasks)  # numpy leaves would reach `sgd_adapt`'s custom_vjp as raw constants
  n = leading_dim(tasks)
  # Never a vmap over one task, one at a time or over one group: axes of size 1 would lead every array of the step,
  # and XLA:CPU's YNNPACK reductions run several times slower on such shapes ([1, 16, 127, 127] 0.96-0.98 ms against
  # 0.15 ms for [16, 127, 127], benchmarks/xla_cpu_dots.py --part reduce).
  if n == 1 and task_groups == 1:
    return jax.tree.map(lambda x: x[None], one(jax.tree.map(lambda x: x[0], tasks)))
  if not task_chunk:
    return jax.vmap(one)(tasks)

  def mapped(group):
    return jax.lax.map(one, group) if task_chunk == 1 else jax.lax.map(one, group, batch_size=task_chunk)

  if task_groups == 1:
    return mapped(tasks)
  return jax.vmap(mapped)(_grouped(tasks, task_groups)).reshape(n)  # [groups, n / groups] -> [n]


def _grouped(tasks: Any, groups: int) -> Any:
  """[n, ...] -> [groups, n / groups, ...]: contiguous groups of tasks (the devices' shares of a sharded task axis)."""
  n = leading_dim(tasks)
  if n % groups:
    raise ValueError(f"{n} tasks cannot be split into {groups} equal groups (devices of the tasks axis).")
  return jax.tree.map(lambda x: x.reshape(groups, n // groups, *x.shape[1:]), tasks)


def meta_loss(
  loss_fn: LossFn,
  variables: Variables,
  batch: dict,
  inner: InnerLoop,
  rng: jax.Array,
  task_chunk: int = 0,
  prepare: Prepare | None = None,
  step: Any = None,
  *,
  task_groups: int = 1,
) -> tuple[jax.Array, jax.Array]:
  """Mean query loss over the tasks of a meta-batch (leading task axis), and the per-task losses.

  Each task gets its own key. Tasks are vmapped; with ``task_chunk`` > 0 only that many at a time (the chunks run
  one after another). The result is the same. ``prepare`` and ``step`` go to `task_loss`. To differentiate it, use
  `meta_value_and_grad`: the gradient of this mapped mean keeps every chunk's residuals until the map's backward, so
  chunks bound its memory only there.
  With ``task_chunk`` and ``task_groups`` > 1 (the devices of a sharded task axis), each group of tasks
  (a device's share) is mapped over separately, so sharded tasks stay on their devices.
  """
  tasks = (batch, jax.random.split(rng, leading_dim(batch)))
  per_task = _task_losses(loss_fn, variables, tasks, inner, prepare, step, task_chunk, task_groups)
  return per_task.mean(), per_task


def _task_losses(loss_fn, variables, tasks, inner, prepare, step, task_chunk=0, task_groups=1) -> jax.Array:
  """Each task's query loss [n] for ``tasks`` = (batch, one key per task), mapped by `map_tasks`."""
  one = lambda args: task_loss(loss_fn, variables, args[0], inner, args[1], prepare, step)  # noqa: E731
  return map_tasks(one, tasks, task_chunk, task_groups)


def _apply(state: "TrainState", tx: optax.GradientTransformation, grads) -> TrainState:
  updates, opt_state = tx.update(grads, state.opt_state, state.variables)
  return state.replace(
    step=state.step + 1, variables=optax.apply_updates(state.variables, updates), opt_state=opt_state
  )


def meta_value_and_grad(
  loss_fn: LossFn,
  variables: Variables,
  batch: dict,
  inner: InnerLoop,
  rng: jax.Array,
  task_chunk: int = 0,
  prepare: Prepare | None = None,
  step: Any = None,
  *,
  task_groups: int = 1,
) -> tuple[tuple[jax.Array, jax.Array], Variables]:
  """`meta_loss` and its gradient w.r.t. ``variables``: ((mean query loss, per-task losses), gradient of the mean).

  The same value as ``jax.value_and_grad(meta_loss, has_aux=True)``, but with ``task_chunk`` > 0 each chunk of tasks is
  differentiated inside the loop over chunks, its gradient summed into the loop's carry (the gradient of a mean is the
  mean of the tasks' gradients). So a chunk's backward runs right after its forward and only one chunk's residuals are
  alive, where the gradient of the mapped mean keeps every chunk's residuals (its query pass and what the inner loop
  keeps) until the backward of the whole map. Measured at the peer's shapes, one task at a time: XLA's temporaries 564
  -> 187 MiB (float32) and 539 -> 158 MiB (bfloat16), the second-order step 1.03x and 1.07x as fast
  (benchmarks/PERFORMANCE_LOG.md, session 13). With ``task_chunk`` 0 (all tasks vmapped, whatever ``task_groups``, as in
  `meta_loss`) it is one value_and_grad. With ``task_chunk`` > 0 and ``task_groups`` > 1 each group (a device's share of
  a sharded task axis) loops over its own tasks, vmapped over the groups, and the groups' gradients are summed.
  """
  n = leading_dim(batch)
  tasks = jax.tree.map(jnp.asarray, (batch, jax.random.split(rng, n)))  # task i's key as in `meta_loss`
  groups = task_groups if task_chunk else 1
  size = n // groups
  chunk = min(task_chunk or size, size)

  def total(v, some):  # (sum of the tasks' query losses, each task's) over a chunk [c, ...]; one task unvmapped
    per_task = _task_losses(loss_fn, v, some, inner, prepare, step)
    return per_task.sum(), per_task

  def body(acc, some):
    (_, per_task), g = jax.value_and_grad(total, has_aux=True)(variables, some)
    return jax.tree.map(jnp.add, acc, g), per_task

  def group(own):  # [size, ...] -> (gradient summed over them, per-task losses [size])
    whole = size - size % chunk
    split = lambda x: x[:whole].reshape(whole // chunk, chunk, *x.shape[1:])  # noqa: E731
    acc, per_task = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, variables), jax.tree.map(split, own))
    per_task = per_task.reshape(whole)
    if whole < size:  # the rest, one smaller chunk (as `jax.lax.map` with batch_size does)
      acc, rest = body(acc, jax.tree.map(lambda x: x[whole:], own))
      per_task = jnp.concatenate([per_task, rest])
    return acc, per_task

  if groups == 1 and chunk == n:  # every task in one chunk: no loop
    (_, per_task), g = jax.value_and_grad(total, has_aux=True)(variables, tasks)
  elif groups == 1:
    g, per_task = group(tasks)
  else:
    g, per_task = jax.vmap(group)(_grouped(tasks, groups))
    g, per_task = jax.tree.map(lambda x: x.sum(0), g), per_task.reshape(n)
  return (per_task.mean(), per_task), jax.tree.map(lambda x: (x / n).astype(x.dtype), g)


def make_meta_step(
  loss_fn: LossFn,
  tx: optax.GradientTransformation,
  inner: InnerLoop,
  task_chunk: int = 0,
  prepare: Prepare | None = None,
  *,
  task_groups: int = 1,
):
  """The outer step ``(state, batch, rng) -> (state, metrics)`` (not jitted: jit it with ``donate_argnums=0``).

  ``rng`` is the phase's key; the step folds in ``state.step`` and gives every task its own key. The gradient
  reaches every variable: the base model and the fast variables' initialization (and, through ``prepare``, e.g.
  TAMS' controller). ``prepare`` runs once per task before its inner loop and gets ``state.step`` (for schedules
  such as TAMS' temperature).
  ``task_groups``: see `meta_value_and_grad` (`train.meta_train` passes the size of the mesh's tasks axis).
  """

  def step(state: "TrainState", batch: dict, rng: jax.Array) -> tuple["TrainState", dict]:
    rng = jax.random.fold_in(rng, state.step)
    (loss, per_task), grads = meta_value_and_grad(
      loss_fn, state.variables, batch, inner, rng, task_chunk, prepare, state.step, task_groups=task_groups
    )
    metrics = {"query_loss": loss, "query_loss_max": per_task.max(), "grad_norm": optax.tree.norm(grads)}
    return _apply(state, tx, grads), metrics

  return step


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation):
  """The plain step ``(state, batch, rng) -> (state, metrics)`` on ``loss_fn`` (multitask pretraining; not jitted)."""

  def step(state: "TrainState", batch: Any, rng: jax.Array) -> tuple["TrainState", dict]:
    rng = jax.random.fold_in(rng, state.step)
    loss, grads = jax.value_and_grad(lambda v: mean_loss(loss_fn(v, batch, rng)))(state.variables)
    return _apply(state, tx, grads), {"loss": loss, "grad_norm": optax.tree.norm(grads)}

  return step
