"""Tasks from a JSON Lines file: one ``{"task": ..., "text": ...}`` object per line; a task = a domain.

Meta-training episodes draw a training domain and disjoint support and query texts from it; held-out domains
(named in the config, or the last ones in sorted order) give fixed evaluation episodes. Meta-training,
validation and test domains are disjoint.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from mltd_jax.data.tasks import Task


class JsonlTasks:
  """A TaskSource over a JSONL file; see the module docstring."""

  def __init__(
    self,
    path: str,
    *,
    task_key: str = "task",
    text_key: str = "text",
    support_size: int = 8,
    query_size: int = 8,
    validation_tasks: Sequence[str] = (),
    test_tasks: Sequence[str] = (),
    eval_episodes: int = 4,
    seed: int = 0,
  ):
    file = Path(path).expanduser()
    if not file.is_file():
      raise FileNotFoundError(
        f"data file {file} not found; set config.data.jsonl.path to a JSON Lines file of "
        f'{{"{task_key}": ..., "{text_key}": ...}} objects.'
      )
    texts: dict[str, list[str]] = collections.defaultdict(list)
    for n, line in enumerate(file.read_text().splitlines(), 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        texts[str(row[task_key])].append(str(row[text_key]))
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{file}:{n}: expected a JSON object with keys {task_key!r} and {text_key!r} ({e}).") from e
    self.texts = dict(sorted(texts.items()))
    need = support_size + query_size
    small = [t for t, v in self.texts.items() if len(v) < need]
    if small:
      raise ValueError(
        f"{file}: tasks {small} have fewer than support_size + query_size = {need} texts; "
        "lower config.data.jsonl.support_size/query_size or drop those tasks."
      )
    names = list(self.texts)
    # A single name given as a string (e.g. --config.data.jsonl.test_tasks=b) is one task, not its characters.
    validation_tasks = tuple(
      dict.fromkeys([validation_tasks] if isinstance(validation_tasks, str) else validation_tasks)
    )
    test_tasks = tuple(dict.fromkeys([test_tasks] if isinstance(test_tasks, str) else test_tasks))
    unknown = sorted((set(validation_tasks) | set(test_tasks)) - set(names))
    if unknown:
      raise ValueError(f"{file}: held-out tasks {unknown} are not in the file (its tasks: {names}).")
    overlap = sorted(set(validation_tasks) & set(test_tasks))
    if overlap:
      raise ValueError(
        f"{file}: tasks {overlap} are in both config.data.jsonl.validation_tasks and config.data.jsonl.test_tasks; "
        "validation and test tasks must be disjoint."
      )
    # A split left unnamed defaults to the last task in sorted order that the other split does not hold.
    self.test_names = list(test_tasks) or [n for n in names if n not in validation_tasks][-1:]
    self.validation_names = list(validation_tasks) or [n for n in names if n not in self.test_names][-1:]
    self.train_names = [n for n in names if n not in self.test_names + self.validation_names]
    if not self.train_names:
      raise ValueError(
        f"{file}: no task is left for meta-training after holding out "
        f"{self.validation_names + self.test_names}; the file needs at least 3 tasks."
      )
    self.support_size, self.query_size = support_size, query_size
    self.eval_episodes, self.seed = eval_episodes, seed

  def _episode(self, name: str, rng: np.random.Generator, label: str) -> Task:
    pool = self.texts[name]
    pick = rng.choice(len(pool), size=self.support_size + self.query_size, replace=False)
    chosen = [pool[i] for i in pick]
    return Task(label, tuple(chosen[: self.support_size]), tuple(chosen[self.support_size :]))

  def train_task(self, index: int) -> Task:
    rng = np.random.default_rng([self.seed, 0, index])
    name = self.train_names[int(rng.integers(len(self.train_names)))]
    return self._episode(name, rng, name)

  def eval_tasks(self, split: str) -> list[Task]:
    names = {"validation": self.validation_names, "test": self.test_names}[split]
    split_id = {"validation": 1, "test": 2}[split]
    return [
      self._episode(n, np.random.default_rng([self.seed, split_id, i, k]), f"{n}#{k}")
      for i, n in enumerate(names)
      for k in range(self.eval_episodes)
    ]
