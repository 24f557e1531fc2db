"""The registry of task sources, and `build(data_config) -> (tokenizer, source)` for the training loop."""

from __future__ import annotations

from typing import Any, Callable

from mltd_jax.data.adaptsum import AdaptSumTasks
from mltd_jax.data.jsonl import JsonlTasks
from mltd_jax.data.persona_chat import PersonaChatTasks
from mltd_jax.data.synthetic import FactsFamily
from mltd_jax.data.synthetic_personas import SyntheticPersonas
from mltd_jax.data.tasks import TaskSource
from mltd_jax.data.tfds_source import TfdsTasks
from mltd_jax.data.tokenizers import load_tokenizer, word_level_tokenizer


def _facts(cfg: Any, seed: int) -> TaskSource:
  return FactsFamily(seed=seed, **dict(cfg.facts))


def _jsonl(cfg: Any, seed: int) -> TaskSource:
  return JsonlTasks(seed=seed, **dict(cfg.jsonl))


def _personachat(cfg: Any, seed: int) -> TaskSource:
  return PersonaChatTasks(seed=seed, **dict(cfg.personachat))


def _personas(cfg: Any, seed: int) -> TaskSource:
  return SyntheticPersonas(seed=seed, **dict(cfg.personas))


def _adaptsum(cfg: Any, seed: int) -> TaskSource:
  return AdaptSumTasks(seed=seed, **dict(cfg.adaptsum))


def _tfds(cfg: Any, seed: int) -> TaskSource:
  return TfdsTasks(seed=seed, **dict(cfg.tfds))


SOURCES: dict[str, Callable[[Any, int], TaskSource]] = {
  "facts": _facts,
  "jsonl": _jsonl,
  "adaptsum": _adaptsum,
  "tfds": _tfds,
  "personachat": _personachat,
  "personas": _personas,
}


def build(cfg: Any, seed: int = 0):
  """Tokenizer and task source named by ``cfg.source`` / ``cfg.tokenizer`` (a ``config.data`` block).

  ``cfg.tokenizer`` "facts" or "personas" builds in code the word-level tokenizer of the source's ``vocabulary()``
  (the synthetic families have one).
  """
  if cfg.source not in SOURCES:
    raise ValueError(f"config.data.source={cfg.source!r} is not one of {sorted(SOURCES)}.")
  if cfg.source not in cfg:
    raise ValueError(
      f"config.data.source={cfg.source!r} reads its settings from config.data.{cfg.source}, which this config does "
      f"not define: use a config that has it (configs/personachat.py for personachat and personas, "
      f"configs/multidomain_lm.py or configs/adaptsum.py for the others) or add the block."
    )
  source = SOURCES[cfg.source](cfg, seed)
  if cfg.tokenizer in ("facts", "personas"):
    if not hasattr(source, "vocabulary"):
      raise ValueError(
        f"config.data.tokenizer={cfg.tokenizer!r} only fits a synthetic source ('facts', 'personas'), not "
        f"config.data.source={cfg.source!r}; use 'bytes', a tokenizer.json file, a directory or a hub name."
      )
    return word_level_tokenizer(source.vocabulary()), source
  return load_tokenizer(cfg.tokenizer), source
