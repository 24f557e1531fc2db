"""Devices and hosts: the mesh of ``config.mesh``, shardings for the state and batches, multi-host helpers.

MLtD's work is a meta-batch of tasks, each adapted independently: the natural parallelism is over tasks. The mesh
has two axes, ``tasks`` (default: every device) and ``model`` (default 1). This is what ``pmap`` has become in
current JAX: the steps are jitted with `NamedSharding` in/out shardings and XLA's SPMD partitioner splits the
vmapped tasks over the ``tasks`` axis (each device adapts its own tasks; the meta-gradient's mean over tasks is an
all-reduce), so the result equals the single-device one up to float summation order.

* Meta-batches (leaves [tasks, examples, ...]): the task axis on ``tasks``. With a ``model`` axis (FSDP), every
  device gets its own tasks when they divide over all devices (data parallel over both axes, as FSDP/ZeRO-3 is),
  else the example axis goes on ``model`` when it divides (`task_spec`).
* Pretraining batches (leaves [examples, ...]): the example axis on all devices (``tasks`` x ``model``).
* Meta-test chunks (``config.eval.tasks_per_batch`` tasks): like meta-batches when the chunk divides over the
  ``tasks`` axis, else replicated (with a warning).
* The state (parameters, optimizer state): replicated, or with ``config.mesh.model`` > 1 sharded FSDP style by a
  rule on shapes (`fsdp_spec`): each array is split along its largest dimension that the ``model`` axis size
  divides; arrays with no such dimension (scalars, odd sizes) are replicated. Adam's moments have their
  parameters' shapes, so they are sharded like them. XLA all-gathers what a layer needs when it needs it.

Multi-host (`initialize_distributed`): every process runs the same program; each builds only its share of each
batch (`process_part`) and `put_local` assembles the global array (`jax.make_array_from_process_local_data`). The
mesh lays devices out process-major, so a process's share of a sharded leading axis is one contiguous block. Only
process 0 writes metrics, files and prints (`is_main_process`, `main_process_writer`); every process reads the
workdir (Orbax's checkpoints, the resume check's records), so it must be on a filesystem all hosts share. What only
process 0 does never raises on its own (a host that stopped alone would leave the others waiting in a collective).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Mapping, NamedTuple

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger("mltd_jax")
AXES = ("tasks", "model")
DISTRIBUTED = ("auto", "on", "off")
# config.mesh of a config file that has none: every device on the tasks axis, single host unless launched as one.
DEFAULT = dict(tasks=-1, model=1, distributed="auto", coordinator_address="", num_processes=0, process_id=-1)


# ---- the mesh ---------------------------------------------------------------------------------------------------


def mesh_shape(cfg: Any, num_devices: int) -> tuple[int, int]:
  """(tasks, model) axis sizes of a ``config.mesh`` block for ``num_devices`` devices.

  Raises:
    ValueError: a size is not a positive integer (or -1 for tasks), or the mesh needs more devices than there are.
  """
  model, tasks = cfg["model"], cfg["tasks"]
  if not isinstance(model, int) or isinstance(model, bool) or model < 1 or num_devices % model:
    raise ValueError(
      f"config.mesh.model={model!r} must be a positive integer that divides the {num_devices} devices; set it to 1 "
      "(no parameter sharding) or a divisor of the device count."
    )
  if tasks == -1:
    tasks = num_devices // model
  if not isinstance(tasks, int) or isinstance(tasks, bool) or tasks < 1:
    raise ValueError(f"config.mesh.tasks={tasks!r} must be -1 (all devices) or an integer >= 1.")
  if tasks * model > num_devices:
    raise ValueError(
      f"config.mesh.tasks={cfg['tasks']!r} with config.mesh.model={model} needs more than the {num_devices} devices "
      "there are; set config.mesh.tasks=-1 (all devices) or a smaller positive integer."
    )
  return tasks, model


def make_mesh(cfg: Any, devices: list | None = None) -> Mesh:
  """The ``(tasks, model)`` mesh of a ``config.mesh`` block (None: `DEFAULT`) over ``devices`` (default: all).

  ``config.mesh.tasks * config.mesh.model`` may be smaller than the device count on one host (the first devices
  are used, e.g. to compare with a 1-device run), not across hosts. The axes are plain (auto) mesh axes, so jit
  with `NamedSharding` partitions the steps.
  """
  devices = list(jax.devices() if devices is None else devices)
  cfg = DEFAULT if cfg is None else cfg
  tasks, model = mesh_shape(cfg, len(devices))
  if tasks * model < len(devices) and jax.process_count() > 1:
    raise ValueError(
      f"config.mesh.tasks={cfg['tasks']} x config.mesh.model={model} leaves devices unused on a multi-host run; use "
      f"all {len(devices)} devices (config.mesh.tasks=-1)."
    )
  devices = devices[: tasks * model]
  return Mesh(_device_grid(tasks, model, devices), AXES)


def _device_grid(tasks: int, model: int, devices: list) -> np.ndarray:
  """[tasks, model] devices: topology-aware within a host; across hosts process-major along ``tasks`` (each host
  holds a contiguous block of tasks, the rows it builds itself) and the ``model`` axis inside every host."""
  hosts = jax.process_count()
  if hosts > 1:
    if tasks % hosts:
      raise ValueError(
        f"config.mesh.tasks={tasks} must be a multiple of the {hosts} hosts (the model axis stays inside a host)."
      )
    return mesh_utils.create_hybrid_device_mesh((tasks // hosts, model), (hosts, 1), devices, process_is_granule=True)
  try:  # topology-aware order on TPU and GPU
    return mesh_utils.create_device_mesh((tasks, model), devices)
  except (AssertionError, NotImplementedError, ValueError, AttributeError):
    return np.asarray(devices).reshape(tasks, model)


def describe(mesh: Mesh) -> str:
  """E.g. ``"4 devices, axes tasks=4"`` (the model axis is named only when > 1)."""
  axes = [f"{name}={size}" for name, size in mesh.shape.items() if name == "tasks" or size > 1]
  hosts = f" on {jax.process_count()} hosts" if jax.process_count() > 1 else ""
  kind = mesh.devices.flat[0].device_kind
  return f"{mesh.size} devices{hosts}, axes {', '.join(axes)} ({kind})"


def check_divisible(n: int, mesh: Mesh, field: str, axes: tuple[str, ...] = ("tasks",), what: str = "") -> None:
  """``n`` must split evenly over the mesh axes ``axes``; config field ``field`` sets it (``what`` says how).

  Raises:
    ValueError: naming ``field``, the axis sizes and the fix.
  """
  size = int(np.prod([mesh.shape[a] for a in axes]))
  if n % size:
    sizes = ", ".join(f"config.mesh.{a}={mesh.shape[a]}" for a in axes)
    where = f"{' x '.join(axes)} {'axis' if len(axes) == 1 else 'axes'}"
    raise ValueError(
      f"{what or f'{field}={n}'} is not divisible by the {size} devices of the mesh's {where} ({sizes}); set "
      f"{field} so that it is a multiple of {size}, or choose config.mesh sizes that divide {n}."
    )


# ---- shardings --------------------------------------------------------------------------------------------------


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], axis_size: int) -> P:
  """The FSDP rule: split the largest dimension that ``axis_size`` divides over ``model``; else replicate.

  Ties go to the earlier dimension. E.g. with ``axis_size`` 2: [768, 2304] -> P(None, "model"); [50257, 768] ->
  P(None, "model") (50257 is odd); [3] -> P(); a scalar -> P().
  """
  if axis_size == 1:
    return P()
  dims = [i for i, d in enumerate(shape) if d % axis_size == 0]
  if not dims:
    return P()
  axis = max(dims, key=lambda i: (shape[i], -i))
  return P(*([None] * axis), "model")


def state_shardings(mesh: Mesh, state: Any) -> Any:
  """A `NamedSharding` per leaf of ``state`` (arrays or `jax.ShapeDtypeStruct`s): replicated, or by `fsdp_spec`."""
  size = mesh.shape["model"]
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), size)), state)


def task_spec(tasks_axis: int, model_axis: int, n_tasks: int, n_examples: int | None) -> P:
  """Where a meta-batch leaf [n_tasks, n_examples, ...] goes on a (tasks_axis, model_axis) mesh.

  Without a model axis: the tasks over ``tasks``. With one (FSDP): every device its own tasks when they divide over
  all devices (data parallel over ``tasks`` x ``model``, the state sharded over ``model``: ZeRO-3); else the tasks
  over ``tasks`` and the examples over ``model`` when it divides them; else the tasks over ``tasks`` only.
  """
  if model_axis > 1 and n_tasks % (tasks_axis * model_axis) == 0:
    return P(AXES)
  if model_axis > 1 and n_examples is not None and n_examples % model_axis == 0:
    return P("tasks", "model")
  return P("tasks")


def task_groups(mesh: Mesh, n_tasks: int) -> int:
  """Into how many blocks `task_spec` splits ``n_tasks`` tasks: `meta.make_meta_step`'s ``task_groups``."""
  return (
    mesh.size if task_spec(mesh.shape["tasks"], mesh.shape["model"], n_tasks, None) == P(AXES) else mesh.shape["tasks"]
  )


def example_sharding(mesh: Mesh) -> NamedSharding:
  """A leaf [examples, ...] of a pretraining batch: examples over every device."""
  return NamedSharding(mesh, P(AXES))


def batch_shardings(mesh: Mesh, batch: Any, kind: str, n: int | None = None) -> Any:
  """Shardings for every leaf of ``batch``: ``kind`` "tasks" (meta-batches, task chunks: `task_spec`) or
  "examples" (pretraining); ``n`` is the global size of the leading axis (default: this process's x processes)."""
  if kind == "examples":
    return jax.tree.map(lambda x: example_sharding(mesh), batch)
  n = n or leading_dim(batch) * jax.process_count()
  sizes = mesh.shape["tasks"], mesh.shape["model"]

  def one(x):
    shape = np.shape(x)
    return NamedSharding(mesh, task_spec(*sizes, n, shape[1] if len(shape) > 1 else None))

  return jax.tree.map(one, batch)


class PhaseShardings(NamedTuple):
  """What `train.jit_step` and `train.run_phase` need: shardings of the state and the batch, and the replicated
  one (the key and the metrics)."""

  state: Any
  batch: Any
  replicated: NamedSharding


def phase_shardings(mesh: Mesh, state: Any, batch: Any, kind: str, field: str) -> PhaseShardings:
  """The shardings of a training phase whose batches look like ``batch`` (this process's share).

  Args:
    mesh: the mesh.
    state: the phase's state (arrays or `jax.ShapeDtypeStruct`s).
    batch: its first batch: this process's share of the leading axis, which is checked to split over the mesh.
    kind: "tasks" (meta-batches: the task axis over ``tasks``) or "examples" (pretraining: over every device).
    field: the config field that sets the leading axis (for the error), e.g. ``config.meta.tasks_per_step``.
  """
  n = leading_dim(batch) * jax.process_count()
  if kind == "tasks":
    check_divisible(n, mesh, field)
  else:
    check_divisible(n, mesh, field, AXES, what=f"a pretraining batch of {n} examples (tasks x examples; {field})")
  shardings = batch_shardings(mesh, batch, kind, n)
  rows = NamedSharding(mesh, P(jax.tree.leaves(shardings)[0].spec[0]))  # the leading axis
  if process_rows(rows, n) != process_part(n, field):  # what put_local assumes of the mesh (`make_mesh`)
    raise ValueError(f"process {jax.process_index()} does not hold one contiguous block of the {n} rows of {field}.")
  return PhaseShardings(state_shardings(mesh, state), shardings, replicated(mesh))


def process_rows(rows: NamedSharding, n: int) -> slice | None:
  """The rows of a leading axis of ``n`` that this process's devices hold under ``rows``, if one block."""
  spans = sorted({(i[0].start or 0, i[0].stop or n) for i in rows.addressable_devices_indices_map((n,)).values()})
  merged = [list(spans[0])]
  for start, stop in spans[1:]:
    if start > merged[-1][1]:
      merged.append([start, stop])
    merged[-1][1] = max(merged[-1][1], stop)
  return slice(*merged[0]) if len(merged) == 1 else None


def leading_dim(tree: Any) -> int:
  """The size of the leading axis of a batch's first leaf."""
  return int(np.shape(jax.tree.leaves(tree)[0])[0])


# ---- placing data -----------------------------------------------------------------------------------------------


def process_part(n: int, field: str) -> slice:
  """This process's contiguous share of ``n`` items (the tasks of a step): all of them on one host.

  The mesh is process-major, so the sharded leading axis gives process p the p-th of ``process_count`` equal
  blocks.

  Raises:
    ValueError: ``n`` (config field ``field``) does not split evenly over the processes.
  """
  count, index = jax.process_count(), jax.process_index()
  if n % count:
    raise ValueError(f"{field}={n} must be divisible by the {count} processes (hosts); set it to a multiple.")
  share = n // count
  return slice(index * share, (index + 1) * share)


def put_local(batch: Any, shardings: Any) -> Any:
  """Global arrays from this process's share of a batch (leaves [local rows, ...]; all rows on one host)."""
  count = jax.process_count()

  def put(x, s):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(s, x, (x.shape[0] * count, *x.shape[1:]))

  return jax.tree.map(put, batch, shardings)


def put_global(tree: Any, shardings: Any) -> Any:
  """``tree`` (the same full values on every process, or global arrays) placed with ``shardings``."""

  def put(x, s):
    if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
      return jax.device_put(x, s)
    if not isinstance(x, jax.Array):  # a host value; a local jax.Array (typed PRNG keys too) is sliced as it is
      x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda index: x[index])

  return jax.tree.map(put, tree, shardings)


def fetch(tree: Any) -> Any:
  """Numpy values of (possibly sharded, multi-host) arrays, the same on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils

  return multihost_utils.process_allgather(tree, tiled=True)


def scorer_on(mesh: Mesh) -> Callable[[Callable], Callable]:
  """Wraps a meta-test scorer ``(variables, tasks, keys, lr) -> {metric: [n, K + 1]}`` (`evaluate.make_scorer`) so
  that its chunk of tasks is sharded over the mesh's ``tasks`` axis (replicated when the chunk does not divide,
  with a warning naming ``config.eval.tasks_per_batch``) and its result comes back as numpy on every process."""
  size, warned = mesh.shape["tasks"], []

  def wrap(scorer: Callable) -> Callable:
    def run(variables, tasks, keys, lr):
      n = keys.shape[0]
      if n % size == 0:
        shard = lambda tree: batch_shardings(mesh, tree, "tasks", n)  # noqa: E731
      else:
        if not warned:
          log.warning(
            "meta-test: a chunk of %d tasks does not divide over the %d devices of the tasks axis: replicated "
            "(set config.eval.tasks_per_batch to a multiple of %d whose chunks divide the task count).",
            n,
            size,
            size,
          )
          warned.append(True)
        shard = lambda tree: jax.tree.map(lambda _: replicated(mesh), tree)  # noqa: E731
      tasks, keys = put_global(tasks, shard(tasks)), put_global(keys, shard(keys))
      return fetch(scorer(variables, tasks, keys, lr))

    return run

  return wrap


# ---- processes --------------------------------------------------------------------------------------------------


def cluster_environment(environ: Mapping[str, str] | None = None) -> str | None:
  """The multi-host launcher the environment shows ("tpu-pod", "slurm"), or None for a single-host run."""
  env = os.environ if environ is None else environ
  if "MEGASCALE_COORDINATOR_ADDRESS" in env or len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1:
    return "tpu-pod"
  tasks = env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS") or "1"
  if "SLURM_JOB_ID" in env and tasks.isdigit() and int(tasks) > 1:
    return "slurm"
  return None


def initialize_distributed(cfg: Any, environ: Mapping[str, str] | None = None) -> bool:
  """`jax.distributed.initialize` when ``config.mesh.distributed`` says so (``cfg`` None: `DEFAULT`); call it before
  any other JAX call.

  "off": never; "on": always (with the coordinator fields where set, else JAX's own cluster detection); "auto":
  when the environment is a TPU pod or a multi-task SLURM job, or ``config.mesh.coordinator_address`` is set.
  Returns whether JAX runs distributed.

  Raises:
    ValueError: an unknown ``config.mesh.distributed``.
  """
  cfg = DEFAULT if cfg is None else cfg
  mode = cfg["distributed"]
  if mode not in DISTRIBUTED:
    raise ValueError(f"config.mesh.distributed={mode!r} is not one of {DISTRIBUTED}.")
  if jax.distributed.is_initialized():
    return True
  cluster = cluster_environment(environ)
  if mode == "off" or (mode == "auto" and not cluster and not cfg["coordinator_address"]):
    return False
  kwargs: dict[str, Any] = {}
  if cfg["coordinator_address"]:
    kwargs["coordinator_address"] = cfg["coordinator_address"]
  if cfg["num_processes"] > 0:
    kwargs["num_processes"] = cfg["num_processes"]
  if cfg["process_id"] >= 0:
    kwargs["process_id"] = cfg["process_id"]
  jax.distributed.initialize(**kwargs)
  log.info("distributed: process %d of %d (%s)", jax.process_index(), jax.process_count(), cluster or "explicit")
  return True


def is_main_process() -> bool:
  """Process 0: the one that writes metrics, eval.json and config.json and prints."""
  return jax.process_index() == 0


class NullWriter:
  """A `MetricWriter` that writes nothing (processes other than 0)."""

  def write(self, step: int, scalars: dict[str, float]) -> None:
    del step, scalars

  def rewind(self, phase: str, step: int, only: bool = False) -> None:
    del phase, step, only

  def close(self) -> None:
    pass


def main_process_writer(workdir: Any) -> Any:
  """A `metric_writer.MetricWriter` on process 0, a `NullWriter` elsewhere."""
  from mltd_jax.metric_writer import MetricWriter

  return MetricWriter(workdir) if is_main_process() else NullWriter()
