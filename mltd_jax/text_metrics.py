"""Scores of generated texts against references: ROUGE (rouge-score) and BLEU (sacrebleu).

Every metric is a corpus-level function ``(predictions, references) -> {score name: float}`` registered in
`TEXT_METRICS` under the name a config uses (``config.eval.decode.metrics``), so a table's number for a domain is
exactly one call on that domain's outputs, and a test can recompute it with the library directly.

* ``rouge``: mean over examples of ROUGE-1/2/L F1 in [0, 1], with Porter stemming (as the summarization literature
  reports: rouge-score's ``RougeScorer(use_stemmer=True)``).
* ``bleu``: sacrebleu's corpus BLEU in [0, 100] with its default 13a tokenizer, one reference per prediction.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


@functools.lru_cache(maxsize=None)
def _rouge_scorer(types: tuple[str, ...]):
  from rouge_score import rouge_scorer  # imported on first use: meta-training never needs it

  return rouge_scorer.RougeScorer(list(types), use_stemmer=True)


def _check(predictions: Sequence[str], references: Sequence[str]) -> None:
  if len(predictions) != len(references) or not predictions:
    raise ValueError(f"{len(predictions)} predictions for {len(references)} references; need equally many, > 0.")


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
  """Mean ROUGE-1/2/L F1 of ``predictions`` against ``references`` (one reference each), stemmed."""
  _check(predictions, references)
  scorer = _rouge_scorer(ROUGE_TYPES)
  scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
  return {t: sum(s[t].fmeasure for s in scores) / len(scores) for t in ROUGE_TYPES}


def bleu(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
  """sacrebleu's corpus BLEU of ``predictions`` against one reference each."""
  _check(predictions, references)
  import sacrebleu  # imported on first use, like rouge-score

  return {"bleu": float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)}


TEXT_METRICS: dict[str, Callable[[Sequence[str], Sequence[str]], dict[str, float]]] = {"rouge": rouge, "bleu": bleu}


def check_names(names: Sequence[str]) -> None:
  """Stop on a name of ``config.eval.decode.metrics`` that is not a key of `TEXT_METRICS`."""
  unknown = [n for n in names if n not in TEXT_METRICS]
  if unknown:
    raise ValueError(f"config.eval.decode.metrics has {unknown}; known metrics: {sorted(TEXT_METRICS)}.")


def score(names: Sequence[str], predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
  """All scores of the metrics ``names`` (keys of `TEXT_METRICS`) in one dict."""
  check_names(names)
  return {k: v for n in names for k, v in TEXT_METRICS[n](predictions, references).items()}
