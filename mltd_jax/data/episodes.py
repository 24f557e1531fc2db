"""Episodes: tasks of examples -> the fixed-shape arrays that the jitted steps take, through an encoder.

An encoder batch has leaves [N, ...] (e.g. causal LM ``{"ids", "mask"}: [N, L]``; seq2seq
``{"source_ids", "source_mask"}: [N, Ls]`` and ``{"target_ids", "target_mask"}: [N, Lt]``). Shapes here:
  * a task: ``{"support": leaves [S, ...], "query": leaves [Q, ...]}``; the inner loop reuses the one support
    batch at every step, so it is not repeated per step;
  * a meta-batch: tasks stacked on a new leading axis: support [tasks, S, ...], query [tasks, Q, ...];
  * a pretraining batch: every support and query example of the step's tasks, leaves [tasks * (S + Q), ...].
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from mltd_jax.data.tasks import Task, TaskSource

Batch = dict[str, np.ndarray]


def task_arrays(encoder: Any, task: Task) -> dict[str, Batch]:
  """One task's support [S, ...] and query [Q, ...] batches, encoded by ``encoder``."""
  return {
    "support": encoder.encode(task.support, where=f"task {task.name!r} support: "),
    "query": encoder.encode(task.query, where=f"task {task.name!r} query: "),
  }


def stack(trees: Sequence[dict], names: Sequence[str] = (), path: str = "") -> dict:
  """Stack equally shaped nested dicts of arrays on a new leading (task) axis; ``names`` (the tasks') for the error
  when shapes differ (tasks of different support or query sizes)."""
  first = trees[0]
  if isinstance(first, dict):
    return {k: stack([t[k] for t in trees], names, f"{path}/{k}") for k in first}
  shapes = [np.shape(t) for t in trees]
  if len(set(shapes)) > 1:
    shown = ", ".join(f"{n}: {s}" for n, s in zip(names or range(len(trees)), shapes))
    raise ValueError(
      f"tasks batched together have {path.strip('/')} of different shapes ({shown}): a task source with "
      "variable support or query sizes (e.g. config.data.personachat.support_size=0 or query_size=0, every turn) "
      "cannot be batched; give it fixed sizes."
    )
  return np.stack(trees)


def _step_tasks(source: TaskSource, step: int, tasks_per_step: int, part: slice = slice(None)) -> list[Task]:
  """Tasks ``step * tasks_per_step + j`` of the stream: a pure function of ``step``, so resuming needs no state.
  ``part`` selects some of the step's tasks by ``j`` (a host's share on a multi-host run)."""
  return [source.train_task(step * tasks_per_step + j) for j in range(tasks_per_step)[part]]


def meta_batch(encoder: Any, source: TaskSource, step: int, tasks_per_step: int, part: slice = slice(None)) -> dict:
  """Meta-training batch of ``step``: support leaves [tasks, S, ...], query leaves [tasks, Q, ...] (only the tasks
  ``part`` of the step's ``tasks_per_step``, e.g. this host's share)."""
  tasks = _step_tasks(source, step, tasks_per_step, part)
  return stack([task_arrays(encoder, t) for t in tasks], [t.name for t in tasks])


def pretrain_batch(
  encoder: Any, source: TaskSource, step: int, tasks_per_step: int, part: slice = slice(None)
) -> Batch:
  """Multitask-pretraining batch of ``step``: all support and query examples of its tasks (of the tasks ``part``
  of them, e.g. this host's share), leaves [N, ...]."""
  tasks = _step_tasks(source, step, tasks_per_step, part)
  examples = [ex for task in tasks for ex in (*task.support, *task.query)]
  return encoder.encode(examples, where="pretraining ")
