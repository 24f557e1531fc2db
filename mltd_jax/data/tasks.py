"""The task type and the interface every task source implements."""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence


@dataclasses.dataclass(frozen=True)
class Task:
  """One task (a domain, a persona, a genre): few support texts to adapt on, query texts to evaluate on."""

  name: str
  support: tuple[str, ...]
  query: tuple[str, ...]

  def __post_init__(self):
    for part in ("support", "query"):
      if not getattr(self, part):
        raise ValueError(
          f"task {self.name!r} has an empty {part} set; every task needs at least one support and "
          "one query text (check the data file or lower the support/query sizes)."
        )


class TaskSource(Protocol):
  """A distribution of tasks: an endless meta-training stream and fixed held-out tasks.

  ``train_task(i)`` is a pure function of ``i`` (and the source's seed), so a resumed run sees the same tasks
  without saving any iterator state.
  """

  def train_task(self, index: int) -> Task: ...

  def eval_tasks(self, split: str) -> Sequence[Task]:
    """Held-out tasks of ``split`` ("validation" or "test")."""
    ...
