"""An offline stand-in for Persona-Chat: persona-like tasks whose dialogues reveal a persona's facts.

Why: the Persona-Chat experiment (`mltd_jax.data.persona_chat`) needs data and a pretrained GPT-2; this family runs
the same pipeline (dialogue examples, response perplexity, hits@1 over candidates) offline in minutes with a
2-layer GPT-2 and a word-level tokenizer (`vocabulary()`, as `FactsFamily`). Like the facts family, the tasks
share most of their structure and differ in a few facts that only the task's own examples tell:

* A persona has ``facts_per_persona`` facts: distinct slots (``job``, ``pet``, ...) of ``n_slots``, each with a
  value ``v00..`` of ``n_values`` (``"my pet is v07 ."``).
* A dialogue has ``turns_per_dialogue`` turns; each asks about a different fact of the persona: the partner says
  ``"what is your pet ?"`` and the response is ``"my pet is v07 ."``. The context is the dialogue so far (earlier
  questions and answers, then the question) joined by "\\n"; the persona lines are never in it, so a value can't be
  copied from the context (the setting of Madotto et al. 2019). Shared structure: answering with the asked slot.
  Persona-specific: its value, chance 1/``n_values`` without adaptation.
* A task: ``support_dialogues`` dialogues in which every fact is asked equally often (when support_dialogues x
  turns_per_dialogue is a multiple of facts_per_persona), and ``query_dialogues`` other dialogues about the same
  facts. Each query turn has ``n_candidates`` candidate responses: what other personas would answer (the asked slot
  with other values), the gold response last (`mltd_jax.data.tasks.GOLD_INDEX`).
* Streams: meta-training personas are an endless stream (or a pool of ``num_train_personas`` when > 0, like a
  dataset's fixed personas); validation and test are separate streams of ``num_eval_tasks`` personas. Everything
  is a pure function of (seed, split, index).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mltd_jax.data.encoders import SEPARATOR
from mltd_jax.data.tasks import Task

_SPLITS = {"train": 0, "validation": 1, "test": 2}
SLOTS = (
  "job", "pet", "color", "food", "hobby", "sport", "city", "drink",
  "car", "book", "song", "game", "movie", "team", "flower", "fruit",
)  # fmt: skip
QUESTION = ("what", "is", "your", "?")
ANSWER = ("my", "is", ".")


@dataclasses.dataclass(frozen=True)
class SyntheticPersonas:
  """Generator of synthetic persona tasks; the fields are documented in the module docstring."""

  seed: int = 0
  n_slots: int = 12
  n_values: int = 30
  facts_per_persona: int = 4
  turns_per_dialogue: int = 3
  support_dialogues: int = 4
  query_dialogues: int = 2
  n_candidates: int = 10
  num_train_personas: int = 0
  num_eval_tasks: int = 20

  def __post_init__(self):
    field = "config.data.personas"
    if not 1 <= self.n_slots <= len(SLOTS):
      raise ValueError(f"{field}.n_slots={self.n_slots} must be in 1..{len(SLOTS)}.")
    if not 1 <= self.facts_per_persona <= self.n_slots:
      raise ValueError(f"{field}.facts_per_persona={self.facts_per_persona} must be in 1..n_slots={self.n_slots}.")
    if not 1 <= self.turns_per_dialogue <= self.facts_per_persona:
      raise ValueError(f"{field}.turns_per_dialogue must be in 1..facts_per_persona (a fact is asked once a dialogue).")
    if not 2 <= self.n_candidates <= self.n_values:
      raise ValueError(f"{field}.n_candidates={self.n_candidates} must be in 2..n_values={self.n_values}.")
    if self.support_dialogues < 1 or self.query_dialogues < 1:
      raise ValueError(f"{field}.support_dialogues and query_dialogues must be >= 1.")

  @property
  def slots(self) -> list[str]:
    return list(SLOTS[: self.n_slots])

  @property
  def values(self) -> list[str]:
    return [f"v{i:02d}" for i in range(self.n_values)]

  def vocabulary(self) -> list[str]:
    """Every word of the family, for `mltd_jax.data.tokenizers.word_level_tokenizer`."""
    return list(dict.fromkeys([*QUESTION, *ANSWER, *self.slots, *self.values]))

  def answer(self, slot: int, value: int) -> str:
    return f"my {self.slots[slot]} is {self.values[value]} ."

  def persona(self, split: str, index: int) -> list[tuple[int, int]]:
    """Persona ``index`` of ``split``: its (slot, value) facts; a pure function of (seed, split, index)."""
    rng = np.random.default_rng([self.seed, _SPLITS[split], index])
    slots = rng.choice(self.n_slots, size=self.facts_per_persona, replace=False)
    return [(int(s), int(rng.integers(self.n_values))) for s in slots]

  def _dialogues(self, rng: np.random.Generator, facts: list[tuple[int, int]], n: int) -> list[list[tuple]]:
    """``n`` dialogues of ``((context, response), candidates)`` turns about ``facts``.

    Dialogue d asks facts ``order[(d * T + j) % F]`` (j < T, shuffled): every fact equally often, none twice in
    one dialogue.
    """
    f, t = len(facts), self.turns_per_dialogue
    order = rng.permutation(f)
    out = []
    for d in range(n):
      history, turns = [], []
      for j in rng.permutation(t):
        slot, value = facts[order[(d * t + j) % f]]
        history.append(f"what is your {self.slots[slot]} ?")
        others = rng.choice([v for v in range(self.n_values) if v != value], self.n_candidates - 1, replace=False)
        cands = (*[self.answer(slot, int(v)) for v in others], self.answer(slot, value))
        turns.append(((SEPARATOR.join(history), self.answer(slot, value)), cands))
        history.append(self.answer(slot, value))
      out.append(turns)
    return out

  def task(self, split: str, index: int) -> Task:
    """The episode of persona ``index`` of ``split``; deterministic in (seed, split, index)."""
    persona = index
    if split == "train" and self.num_train_personas > 0:
      persona = int(np.random.default_rng([self.seed, 3, index]).integers(self.num_train_personas))
    rng = np.random.default_rng([self.seed, _SPLITS[split], persona, 1, index])
    facts = self.persona(split, persona)
    support = [turn for d in self._dialogues(rng, facts, self.support_dialogues) for turn in d]
    query = [turn for d in self._dialogues(rng, facts, self.query_dialogues) for turn in d]
    return Task(
      name=f"persona-{split}-{persona}" if split == "train" else f"personas-{split}#{persona}",  # one domain
      support=tuple(e for e, _ in support),
      query=tuple(e for e, _ in query),
      candidates=tuple(c for _, c in query),
      persona=tuple(self.answer(slot, value) for slot, value in facts),
    )

  # TaskSource interface
  def train_task(self, index: int) -> Task:
    return self.task("train", index)

  def eval_tasks(self, split: str) -> list[Task]:
    if split not in ("validation", "test"):
      raise ValueError(f"split must be 'validation' or 'test', not {split!r}.")
    return [self.task(split, i) for i in range(self.num_eval_tasks)]
