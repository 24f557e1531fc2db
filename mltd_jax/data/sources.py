"""The registry of task sources, and `build(data_config) -> (tokenizer, source)` for the training loop."""

from __future__ import annotations

from typing import Any, Callable

from mltd_jax.data.jsonl import JsonlTasks
from mltd_jax.data.synthetic import FactsFamily
from mltd_jax.data.tasks import TaskSource
from mltd_jax.data.tokenizers import load_tokenizer, word_level_tokenizer


def _facts(cfg: Any, seed: int) -> TaskSource:
  return FactsFamily(seed=seed, **dict(cfg.facts))


def _jsonl(cfg: Any, seed: int) -> TaskSource:
  return JsonlTasks(seed=seed, **dict(cfg.jsonl))


SOURCES: dict[str, Callable[[Any, int], TaskSource]] = {"facts": _facts, "jsonl": _jsonl}


def build(cfg: Any, seed: int = 0):
  """Tokenizer and task source named by ``cfg.source`` / ``cfg.tokenizer`` (a ``config.data`` block).

  ``cfg.tokenizer == "facts"`` builds the word-level tokenizer of the synthetic family's vocabulary in code.
  """
  if cfg.source not in SOURCES:
    raise ValueError(f"config.data.source={cfg.source!r} is not one of {sorted(SOURCES)}.")
  source = SOURCES[cfg.source](cfg, seed)
  if cfg.tokenizer == "facts":
    if not isinstance(source, FactsFamily):
      raise ValueError(
        "config.data.tokenizer='facts' only fits config.data.source='facts'; use 'bytes', a "
        "tokenizer.json file, a directory or a hub name."
      )
    return word_level_tokenizer(source.vocabulary()), source
  return load_tokenizer(cfg.tokenizer), source
