"""The only Orbax code: a checkpoint manager per training phase, restore-or-init, and `load` for users.

Orbax writes each step into a temporary directory and renames it when complete, so a killed run never leaves a
half-written checkpoint: the next run resumes from the last complete one.

Sharded states (`mltd_jax.sharding`): every process calls `save` and `restore_or` (Orbax requires it: each host
writes the shards it holds, process 0 the metadata), and a state restores into the shardings of the template it
is given, whatever mesh saved it (a 4-device checkpoint restores on 1 device and on an FSDP mesh, and back).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores a state pytree under ``directory/<step>``, keeping the newest ``max_to_keep``."""

  def __init__(self, directory: str | Path, max_to_keep: int = 2):
    self.directory = Path(directory).absolute()
    self.manager = ocp.CheckpointManager(
      self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any) -> None:
    self.manager.save(step, args=ocp.args.StandardSave(state))

  def restore_or(self, state: Any) -> Any:
    """The latest saved state (with ``state``'s structure, dtypes and shardings), or ``state`` if none.

    Place ``state`` on its mesh first (`sharding.put_global`): its arrays' shardings are the restore targets.
    """
    step = self.latest_step()
    if step is None:
      return state
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    try:
      return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(
        f"{self.directory}/{step} holds a state of another structure than this run's (a different model, TARP or "
        f"optimizer config, or an older mltd_jax): use a new --workdir, or delete {self.directory} to start this "
        f"phase again. ({type(e).__name__}: {str(e)[:300]})"
      ) from e

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def load(directory: str | Path, step: int | None = None, keys: tuple[str, ...] | None = None) -> Any:
  """Read a saved state back without a template (for notebooks and users): nested dicts of arrays.

  ``directory`` is a phase's checkpoint folder (e.g. ``WORKDIR/checkpoints/meta``); ``step`` defaults to the
  latest; ``keys`` restores only those top-level entries (e.g. ``("step", "variables")``: not the optimizer state,
  twice the parameters' size for Adam), all by default. Optimizer states come back as lists (Orbax does not know
  optax's named tuples); ``["variables"]`` holds ``{"params": ..., "tarp": ...}`` ready for ``model.apply``. Every
  array comes back whole on this process's first device, whatever mesh saved it (Orbax alone would rebuild the
  saving mesh, and refuse where its devices are not all here: a run on 4 devices read back in a 1-device notebook).
  """
  directory = Path(directory).absolute()
  if not directory.is_dir():
    raise FileNotFoundError(f"{directory} is not a directory; pass a phase's folder, e.g. WORKDIR/checkpoints/meta.")
  # PyTree (not Standard) restoring: it can leave entries unread (``keys``); it reads what StandardSave wrote.
  options = ocp.CheckpointManagerOptions(create=False)
  manager = ocp.CheckpointManager(directory, options=options, item_handlers=ocp.PyTreeCheckpointHandler())
  try:
    steps = sorted(manager.all_steps())
    if not steps:
      inside = directory / "checkpoints" if (directory / "checkpoints").is_dir() else directory  # a workdir?
      phases = sorted(p.name for p in inside.iterdir() if p.is_dir() and p.name in ("pretrain", "meta"))
      hint = f" Pass a phase's folder: {[str(inside / p) for p in phases]}." if phases else ""
      raise FileNotFoundError(f"no checkpoint in {directory}.{hint}")
    step = steps[-1] if step is None else step
    if step not in steps:
      raise FileNotFoundError(f"no checkpoint of step {step} in {directory}; it has steps {steps}.")
    saved = manager.item_metadata(step).tree  # shapes and dtypes of the saved arrays
    missing = sorted(set(keys or ()) - set(saved))
    if missing:
      raise KeyError(f"{directory}/{step} has no {missing}; its entries: {sorted(saved)}.")
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    part = {k: saved[k] for k in (saved if keys is None else keys)}
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), part)
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=here), abstract)
    return manager.restore(step, args=ocp.args.PyTreeRestore(abstract, restore_args=restore_args, partial_restore=True))
  finally:
    manager.close()
