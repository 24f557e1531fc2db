"""The C-score of dialogue responses (Madotto et al. 2019): their consistency with the persona, judged by an NLI model.

For a response r and the persona's profile sentences p_1..p_n, ``C(r) = sum_j NLI(p_j, r)`` with +1 when p_j
entails r, -1 when it contradicts r and 0 otherwise; a task's C-score is the mean over its responses. The NLI model
is any transformers sequence-classification checkpoint whose ``id2label`` names "entailment" and "contradiction"
(e.g. a RoBERTa or BERT fine-tuned on MNLI or DialogueNLI), loaded with PyTorch (`torch` is then required; the
project's runtime does not need it otherwise). Without a model the score is skipped with one log line, never
estimated some other way.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

log = logging.getLogger("mltd_jax")
Scorer = Callable[[Sequence[str], Sequence[str]], list[float]]


def _label_values(id2label: dict) -> dict[int, float]:
  names = {int(i): str(name).lower() for i, name in id2label.items()}
  found = {kind: [i for i, n in names.items() if n.startswith(kind)] for kind in ("entail", "contradict")}
  if not all(found.values()):
    raise ValueError(
      f"the NLI model's id2label {id2label} must name an 'entailment' and a 'contradiction' label "
      "(config.eval.decode.nli_model)."
    )
  return {i: 1.0 if i in found["entail"] else -1.0 if i in found["contradict"] else 0.0 for i in names}


def load(name_or_dir: str, batch_size: int = 32) -> Scorer | None:
  """``scorer(persona, responses) -> C per response`` from the NLI model ``name_or_dir``; None (with one log line)
  when ``name_or_dir`` is empty."""
  if not name_or_dir:
    log.info("C-score skipped: no NLI model (set config.eval.decode.nli_model to a transformers NLI checkpoint).")
    return None
  import torch  # only for this optional metric
  import transformers

  tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_dir)
  model = transformers.AutoModelForSequenceClassification.from_pretrained(name_or_dir).eval()
  values = _label_values(model.config.id2label)

  def scorer(persona: Sequence[str], responses: Sequence[str]) -> list[float]:
    pairs = [(p, r) for r in responses for p in persona]
    labels = []
    for i in range(0, len(pairs), batch_size):
      part = pairs[i : i + batch_size]
      enc = tokenizer([p for p, _ in part], [r for _, r in part], padding=True, truncation=True, return_tensors="pt")
      with torch.no_grad():
        labels += model(**enc).logits.argmax(-1).tolist()
    n = len(persona)
    return [sum(values[label] for label in labels[k * n : (k + 1) * n]) for k in range(len(responses))]

  return scorer
