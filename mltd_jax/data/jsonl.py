"""Tasks from a JSON Lines file, one example per line; a task = a domain.

Two line formats, chosen by ``kind`` (not guessed from the data, so a stray line cannot switch a file's meaning):

* ``kind="text"`` (causal LM): ``{"task": ..., "text": ...}``; an example is the text (``str``).
* ``kind="pair"`` (seq2seq, e.g. summarization): ``{"task": ..., "source": ..., "target": ...}``; an example is the
  ``(source, target)`` pair. Source and target must be non-empty.

The key names are ``task_key``, ``text_key``, ``source_key`` and ``target_key``. Blank lines are skipped; every other
line must be a JSON object with the keys of its kind and string values, else the error names ``file:line`` (a line
of the other kind says which ``kind`` would read it).

Meta-training episodes draw a training domain and disjoint support and query examples from it; held-out domains
(named in the config, or the last ones in sorted order) give fixed evaluation episodes. Meta-training,
validation and test domains are disjoint.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mltd_jax.data.tasks import Example, Task, check_encodable

KINDS = ("text", "pair")


class JsonlTasks:
  """A TaskSource over a JSONL file; see the module docstring."""

  def __init__(
    self,
    path: str,
    *,
    task_key: str = "task",
    text_key: str = "text",
    source_key: str = "source",
    target_key: str = "target",
    kind: str = "text",
    support_size: int = 8,
    query_size: int = 8,
    validation_tasks: Sequence[str] = (),
    test_tasks: Sequence[str] = (),
    eval_episodes: int = 4,
    seed: int = 0,
  ):
    if kind not in KINDS:
      raise ValueError(f"config.data.jsonl.kind={kind!r} is not one of {KINDS} (text: causal LM, pair: seq2seq).")
    for name, value in (("support_size", support_size), ("query_size", query_size), ("eval_episodes", eval_episodes)):
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"config.data.jsonl.{name}={value!r} must be an int >= 1.")
    if not str(path).strip():
      raise ValueError("config.data.jsonl.path is not set; give it a JSON Lines file of tasks' examples.")
    file = Path(path).expanduser()
    self.keys = (text_key,) if kind == "text" else (source_key, target_key)
    if not file.is_file():
      fields = ", ".join(f'"{k}": ...' for k in (task_key, *self.keys))
      raise FileNotFoundError(
        f"data file {file} not found; set config.data.jsonl.path to a JSON Lines file of {{{fields}}} objects."
      )
    self.task_key, self.kind = task_key, kind
    self.other_keys = (source_key, target_key) if kind == "text" else (text_key,)
    self.file = file
    self.examples, self.lines = self._read(file)
    if not self.examples:
      raise ValueError(f"{file} has no records (config.data.jsonl.path): one JSON object per line is expected.")
    need = support_size + query_size
    small = [t for t, v in self.examples.items() if len(v) < need]
    if small:
      raise ValueError(
        f"{file}: tasks {small} have fewer than support_size + query_size = {need} examples; "
        "lower config.data.jsonl.support_size/query_size or drop those tasks."
      )
    self._hold_out(file, list(self.examples), validation_tasks, test_tasks)
    self.support_size, self.query_size = support_size, query_size
    self.eval_episodes, self.seed = eval_episodes, seed

  def _read(self, file: Path) -> tuple[dict[str, list[Example]], dict[str, list[int]]]:
    """Examples per task name, sorted by name, and the line number of each."""
    examples: dict[str, list[Example]] = collections.defaultdict(list)
    lines: dict[str, list[int]] = collections.defaultdict(list)
    # Iterating the file splits at "\n" only; str.splitlines would also split inside a JSON string holding a raw
    # U+2028 or U+0085, which json.dumps(..., ensure_ascii=False) writes as is.
    with file.open(encoding="utf-8-sig", newline="\n") as f:  # -sig: a byte-order mark some editors write
      for n, line in enumerate(f, 1):
        if line.strip():
          name, example = self._parse(line, f"{file}:{n}")
          examples[name].append(example)
          lines[name].append(n)
    return dict(sorted(examples.items())), dict(lines)

  def check_examples(self, encoder: Any, chunk: int = 256) -> None:
    """Encode every meta-training example before training (`mltd_jax.data.tasks.check_encodable`): one the
    encoder refuses stops the run here, named by file and line, not when its step draws it."""
    for name in self.train_names:
      lines = self.lines[name]
      check_encodable(encoder, self.examples[name], lambda i: f"{self.file}:{lines[i]}", chunk)

  def _parse(self, line: str, where: str) -> tuple[str, Example]:
    """(task name, example) of one line; ``where`` is ``file:line`` for errors."""
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{where}: not valid JSON ({e}).") from e
    if not isinstance(row, dict):
      raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}.")
    missing = [k for k in (self.task_key, *self.keys) if k not in row]
    if missing:
      hint, other = "", "pair" if self.kind == "text" else "text"
      if all(k in row for k in self.other_keys):
        hint = f"; it has the keys of kind {other!r}: set config.data.jsonl.kind={other!r} if the file is of that kind"
      raise ValueError(
        f"{where}: missing key(s) {missing} for config.data.jsonl.kind={self.kind!r} (line keys: {sorted(row)}){hint}."
      )
    values = []
    for key in self.keys:
      value = row[key]
      if not isinstance(value, str):
        raise ValueError(f"{where}: {key!r} must be a string, got {type(value).__name__} ({str(value)[:40]!r}).")
      if not value.strip():  # an empty text scores no token: it would silently drop out of the losses
        raise ValueError(f"{where}: {key!r} is empty; every {'text' if self.kind == 'text' else 'source and target'} "
                         "needs text.")  # fmt: skip
      values.append(value)
    task = row[self.task_key]
    if not isinstance(task, str) or not task.strip():  # 1 and "1", or null and "None", would merge
      raise ValueError(
        f"{where}: the task name {self.task_key!r} must be a non-empty string, got {type(task).__name__} "
        f"({str(task)[:40]!r}); config.data.jsonl.task_key names the field."
      )
    return task, values[0] if self.kind == "text" else (values[0], values[1])

  def _hold_out(self, file: Path, names: list[str], validation_tasks: Sequence[str], test_tasks: Sequence[str]):
    """Set the validation, test and meta-training task names (disjoint)."""
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

  def _episode(self, name: str, rng: np.random.Generator, label: str) -> Task:
    pool = self.examples[name]
    pick = rng.choice(len(pool), size=self.support_size + self.query_size, replace=False)
    chosen = [pool[i] for i in pick]
    return Task(label, tuple(chosen[: self.support_size]), tuple(chosen[self.support_size :]))

  def train_task(self, index: int) -> Task:
    """Meta-training task ``index``: a random training domain's episode; pure in (seed, index).

    Args:
      index: position in the endless meta-training stream.

    Returns:
      The task, named after its domain.
    """
    rng = np.random.default_rng([self.seed, 0, index])
    name = self.train_names[int(rng.integers(len(self.train_names)))]
    return self._episode(name, rng, name)

  def eval_tasks(self, split: str) -> list[Task]:
    """``eval_episodes`` episodes of each held-out domain of ``split``, named ``f"{domain}#{k}"``.

    Args:
      split: "validation" or "test".

    Returns:
      The tasks, domain by domain.
    """
    names = {"validation": self.validation_names, "test": self.test_names}[split]
    split_id = {"validation": 1, "test": 2}[split]
    return [
      self._episode(n, np.random.default_rng([self.seed, split_id, i, k]), f"{n}#{k}")
      for i, n in enumerate(names)
      for k in range(self.eval_episodes)
    ]
