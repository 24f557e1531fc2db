"""The task type and the interface every task source implements.

A task's support and query sets are *examples*, not arrays: a text (``str``) for causal language modeling, or a
``(source, target)`` pair of texts for sequence-to-sequence tasks. An encoder (`mltd_jax.data.encoders`) turns
examples into fixed-shape arrays, so sources know nothing of tokenizers, special tokens or padding.

A dialogue turn for a causal LM is a ``(context, response)`` pair too (`CausalLMEncoder` scores the response
only). A task may carry ``candidates`` for its query examples (e.g. Persona-Chat's 20 responses per turn, for
hits@1): one tuple per query example, **the gold response last** (``GOLD_INDEX``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, Sequence

Example = str | tuple[str, str]  # a text (causal LM) or a (source, target) / (context, response) pair
GOLD_INDEX = -1  # where a query example's gold response sits among its candidates: last


@dataclasses.dataclass(frozen=True)
class Task:
  """One task (a domain, a persona, a genre): few support examples to adapt on, query examples to evaluate on."""

  name: str
  support: tuple[Example, ...]
  query: tuple[Example, ...]
  # Optional: for each query example its candidate responses, the gold one last (``GOLD_INDEX``); () = none.
  candidates: tuple[tuple[str, ...], ...] = ()
  # Optional: the persona's profile sentences (dialogue tasks), for the C-score of generated responses.
  persona: tuple[str, ...] = ()

  def __post_init__(self):
    for part in ("support", "query"):
      if not getattr(self, part):
        raise ValueError(
          f"task {self.name!r} has an empty {part} set; every task needs at least one support and "
          "one query example (check the data file or lower the support/query sizes)."
        )
    if self.candidates:
      self._check_candidates()

  def _check_candidates(self) -> None:
    if len(self.candidates) != len(self.query):
      raise ValueError(
        f"task {self.name!r} has {len(self.candidates)} candidate lists for {len(self.query)} query examples; "
        "give one per query example, or none."
      )
    for i, (example, cands) in enumerate(zip(self.query, self.candidates)):
      gold = example[1] if isinstance(example, tuple) else None
      if not cands or (gold is not None and cands[GOLD_INDEX] != gold):
        raise ValueError(
          f"task {self.name!r}: the candidates of query example {i} must end with its gold response {gold!r:.80}."
        )


def check_encodable(encoder: Any, examples: Sequence[Example], where: Callable[[int], str], chunk: int = 256) -> None:
  """Encode ``examples`` ``chunk`` at a time, so that one the encoder refuses (too long for config.data.seq_len
  without config.data.truncate) stops a run before training; the error names the example by ``where(i)``, its
  place in the data (``file:line``, a record), with the encoder's message and fix."""
  for start in range(0, len(examples), chunk):
    part = [examples[i] for i in range(start, min(start + chunk, len(examples)))]
    try:
      encoder.encode(part, where=f"examples from {where(start)}: ")
    except ValueError:
      for i, example in enumerate(part, start):
        encoder.encode([example], where=f"{where(i)}: ")  # raises, naming the example
      raise


class TaskSource(Protocol):
  """A distribution of tasks: an endless meta-training stream and fixed held-out tasks.

  ``train_task(i)`` is a pure function of ``i`` (and the source's seed), so a resumed run sees the same tasks
  without saving any iterator state. A source that holds all its meta-training examples may also define
  ``check_examples(encoder)``, which `mltd_jax.evaluate.check_data` calls before training, unless the encoder
  truncates, to encode them all (`check_encodable`): an example the encoder refuses then stops the run up front, not
  when a step draws it (a resumed run refuses a changed config.data.seq_len, so finding it late costs a restart).
  `JsonlTasks`, `AdaptSumTasks` and `PersonaChatTasks` do; `TfdsTasks` does not (a large corpus is never iterated).
  """

  def train_task(self, index: int) -> Task: ...

  def eval_tasks(self, split: str) -> Sequence[Task]:
    """Held-out tasks of ``split`` ("validation" or "test")."""
    ...
