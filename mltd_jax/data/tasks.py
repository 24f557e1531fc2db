"""The task type and the interface every task source implements.

A task's support and query sets are *examples*, not arrays: a text (``str``) for causal language modeling, or a
``(source, target)`` pair of texts for sequence-to-sequence tasks. An encoder (`mltd_jax.data.encoders`) turns
examples into fixed-shape arrays, so sources know nothing of tokenizers, special tokens or padding.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

Example = str | tuple[str, str]  # a text (causal LM) or a (source, target) pair (seq2seq)


@dataclasses.dataclass(frozen=True)
class Task:
  """One task (a domain, a persona, a genre): few support examples to adapt on, query examples to evaluate on."""

  name: str
  support: tuple[Example, ...]
  query: tuple[Example, ...]

  def __post_init__(self):
    for part in ("support", "query"):
      if not getattr(self, part):
        raise ValueError(
          f"task {self.name!r} has an empty {part} set; every task needs at least one support and "
          "one query example (check the data file or lower the support/query sizes)."
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
