"""The built-in offline task family: persona-like "facts" written into a shared filler language.

Why this family: MLtD claims that a model *prepared* by meta-learning adapts to a new task from a few examples
better than a multitask model adapted the same way. That needs tasks which (a) share most of their structure, so
multitask pretraining helps, (b) differ in a few task-specific ways that no shared model can predict, so per-task
adaptation helps more, and (c) can be learned from a handful of examples. Here:

* Words: ``n_filler`` filler words (w00..), ``n_subjects`` subjects (s00..), ``n_objects`` objects (o00..), and
  the relation word ``is``.
* Shared structure: filler text is a first-order Markov chain whose transition rows are drawn once per family from
  Dirichlet(``dirichlet_alpha``) (low entropy, so it is learnable); every task uses the same chain. Facts always
  have the form ``SUBJ is OBJ``.
* Task-specific part: a task binds ``facts_per_task`` distinct subjects to random objects (like a persona's
  facts). Which object follows ``SUBJ is`` can only be known from the task's own examples.
* Episodes: each text is ``words_per_text`` words of filler with ``facts_per_text`` of the task's facts written
  in, one in each equal part of the text. A subject occurs at most once per text, so a fact can't be copied from
  the context: it has to be learned into the weights. The support set has ``support_size`` texts in which every
  fact occurs equally often (3 times with the defaults); the query set has ``query_size`` other texts with the
  same facts.
* Streams: meta-training tasks are an endless stream, ``train_task(i)`` a pure function of (seed, i); validation
  and test tasks are separate fixed streams of ``num_eval_tasks``.
* ``mode="summary"`` makes the same tasks sequence-to-sequence (the offline stand-in for summarization): an
  example is ``(source, target)`` where the source is the text with each fact's ``is OBJ`` taken out (only the
  subject stays), and the target lists the text's facts in order, ``"SUBJ is OBJ SUBJ is OBJ ..."``. Copying the
  subjects is shared by all tasks; the objects can only come from the task's own support examples, so ROUGE
  after adaptation has room to rise above ROUGE before it. Task names end in ``#index`` (one "domain" per split).

With the defaults and a 2-layer d=64 GPT-2 this family was measured (../shared/DESIGN.md) to show the paper's
claim within minutes on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import numpy as np

from mltd_jax.data.tasks import Example, Task

_SPLITS = {"train": 0, "validation": 1, "test": 2}
REL = "is"


@dataclasses.dataclass(frozen=True)
class FactsFamily:
  """Generator of facts tasks; all fields are documented in the module docstring."""

  seed: int = 0
  n_filler: int = 30
  n_subjects: int = 40
  n_objects: int = 40
  dirichlet_alpha: float = 0.1
  facts_per_task: int = 8
  facts_per_text: int = 3
  words_per_text: int = 47
  support_size: int = 8
  query_size: int = 8
  num_eval_tasks: int = 20
  mode: str = "text"  # text (causal LM) | summary ((source, target) pairs)

  def __post_init__(self):
    if self.mode not in ("text", "summary"):
      raise ValueError(f"config.data.facts.mode={self.mode!r} must be 'text' or 'summary'.")
    if self.facts_per_text > self.facts_per_task:
      raise ValueError("facts_per_text must be <= facts_per_task (a subject occurs at most once per text).")
    if self.words_per_text < 3 * self.facts_per_text:
      raise ValueError(f"words_per_text={self.words_per_text} cannot hold {self.facts_per_text} facts of 3 words.")
    if self.facts_per_task > self.n_subjects:
      raise ValueError("facts_per_task must be <= n_subjects.")

  @property
  def filler(self) -> list[str]:
    return [f"w{i:02d}" for i in range(self.n_filler)]

  @property
  def subjects(self) -> list[str]:
    return [f"s{i:02d}" for i in range(self.n_subjects)]

  @property
  def objects(self) -> list[str]:
    return [f"o{i:02d}" for i in range(self.n_objects)]

  def vocabulary(self) -> list[str]:
    return self.filler + self.subjects + self.objects + [REL]

  @functools.cached_property
  def transitions(self) -> np.ndarray:
    """The filler chain shared by all tasks: [n_filler, n_filler] row-stochastic."""
    rng = np.random.default_rng([self.seed, 99])
    return rng.dirichlet(np.full(self.n_filler, self.dirichlet_alpha), size=self.n_filler)

  def _filler(self, rng: np.random.Generator, n_texts: int) -> np.ndarray:
    """[n_texts, words_per_text] filler word indices, all texts' chains advanced together."""
    cum = np.cumsum(self.transitions, axis=1)
    state = rng.integers(self.n_filler, size=n_texts)
    out = np.empty((n_texts, self.words_per_text), dtype=np.int64)
    for t in range(self.words_per_text):
      out[:, t] = state
      u = rng.random(n_texts)[:, None]
      state = np.minimum((cum[state] < u).sum(axis=1), self.n_filler - 1)
    return out

  def _texts(self, rng, facts: Sequence[tuple[int, int]], n_texts: int) -> tuple[Example, ...]:
    # Latin-square assignment: text i gets facts (i + o_j) mod F for distinct offsets o_j, so every fact occurs
    # equally often (when n_texts is a multiple of F) and never twice in one text.
    f = len(facts)
    offsets = rng.choice(f, size=self.facts_per_text, replace=False)
    order = rng.permutation(f)
    part = self.words_per_text // self.facts_per_text
    filler = self._filler(rng, n_texts)
    texts = []
    for i in range(n_texts):
      words = [self.filler[w] for w in filler[i]]
      summary = []
      for j, off in enumerate(offsets):
        subj, obj = facts[order[(i + off) % f]]
        start = j * part + int(rng.integers(part - 2))
        fact = [self.subjects[subj], REL, self.objects[obj]]
        words[start : start + 3] = fact if self.mode == "text" else [fact[0], None, None]
        summary += fact
      text = " ".join(w for w in words if w is not None)
      texts.append(text if self.mode == "text" else (text, " ".join(summary)))
    return tuple(texts)

  def task(self, split: str, index: int) -> Task:
    """Task ``index`` of ``split`` ("train", "validation" or "test"); deterministic in (seed, split, index)."""
    rng = np.random.default_rng([self.seed, _SPLITS[split], index])
    subjects = rng.choice(self.n_subjects, size=self.facts_per_task, replace=False)
    facts = [(int(s), int(rng.integers(self.n_objects))) for s in subjects]
    return Task(
      name=f"facts-{split}-{index}" if self.mode == "text" else f"facts-{split}#{index}",
      support=self._texts(rng, facts, self.support_size),
      query=self._texts(rng, facts, self.query_size),
    )

  # TaskSource interface
  def train_task(self, index: int) -> Task:
    return self.task("train", index)

  def eval_tasks(self, split: str) -> list[Task]:
    if split not in ("validation", "test"):
      raise ValueError(f"split must be 'validation' or 'test', not {split!r}.")
    return [self.task(split, i) for i in range(self.num_eval_tasks)]
