"""Decoding metrics of held-out tasks before and after adaptation (ROUGE for summaries, BLEU for dialogue).

Decoding is expensive, so it runs at one setting per adaptation method: the loss-based meta-test
(`mltd_jax.evaluate.meta_test`) has already chosen a learning rate for every number of steps k on validation tasks;
`chosen_setting` takes the k >= 1 (and its rate) with the lowest mean validation loss. Then, for every test task:
adapt with `mltd_jax.meta.adapt` (the function meta-training adapts with) at that setting, timed; generate the
outputs of the query examples with `mltd_jax.decode.generate` (beam search); score them with
`mltd_jax.text_metrics`. "Before" is the prepared model with no adaptation, decoded once for all methods.

A task's domain is its name up to ``#`` (task sources name held-out episodes ``"<domain>#<episode>"``); a domain's
scores are one metric call on all its tasks' outputs, and the mean is over domains.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from mltd_jax import decode, meta, text_metrics
from mltd_jax.data.tasks import Task


def chosen_setting(selection: dict) -> tuple[float, int]:
  """``(lr, k)`` of the lowest mean validation loss over k >= 1 in one selection of a loss-based meta-test result."""
  losses = np.asarray(selection["validation_loss_mean"][1:], dtype=np.float64)
  if losses.size == 0 or np.isnan(losses).all():
    raise ValueError("no finite validation loss after k >= 1 adaptation steps; raise config.eval.adapt_steps.")
  k = int(np.nanargmin(losses)) + 1
  return float(selection["lr"][k]), k


def domain_of(task_name: str) -> str:
  """The domain of a held-out task named ``"<domain>#<episode>"`` (a name without ``#`` is its own domain)."""
  return task_name.split("#")[0]


def make_adapter(loss_fn: meta.LossFn, inner: meta.InnerLoop) -> Callable:
  """Jitted ``(variables, support, rng, lr) -> adapted variables`` (one task; ``lr`` traced)."""
  return jax.jit(lambda v, support, rng, lr: meta.adapt(loss_fn, v, support, inner, rng, lr=lr)[0])


def generate_texts(model, variables: dict, encoder, tokenizer, examples: Sequence, cfg: Any) -> list[str]:
  """Beam-search outputs for ``examples`` (``config.eval.decode`` settings), decoded to text.

  Examples go through in batches of ``cfg.batch_size`` (0: all at once); a short last batch is padded with copies
  of its last example, so every batch has the same shape and decoding compiles once.
  """
  n = len(examples)
  size = cfg.batch_size or n
  texts = []
  for start in range(0, n, size):
    part = list(examples[start : start + size])
    part += [part[-1]] * (size - len(part))
    ids, mask = encoder.prompts(part)
    out = decode.generate(
      model,
      variables,
      ids,
      mask,
      num_beams=cfg.num_beams,
      max_new_tokens=cfg.max_new_tokens,
      length_penalty=cfg.length_penalty,
      eos_token_id=tokenizer.eos_token_id,
      pad_token_id=tokenizer.pad_token_id,
    )
    texts += tokenizer.batch_decode(np.asarray(out), skip_special_tokens=True)
  return [t.strip() for t in texts[:n]]


def references(tasks: Sequence[Task]) -> list[list[str]]:
  """The reference outputs (second element of each query pair) of every task."""
  return [[ex[1] for ex in t.query] for t in tasks]


def summarize(metrics: Sequence[str], tasks: Sequence[Task], outputs: Sequence[Sequence[str]]) -> dict:
  """Scores per task, per domain (one call on the domain's outputs) and their mean over domains."""
  refs = references(tasks)
  by_domain: dict[str, tuple[list, list]] = collections.defaultdict(lambda: ([], []))
  for task, out, ref in zip(tasks, outputs, refs):
    by_domain[domain_of(task.name)][0].extend(out)
    by_domain[domain_of(task.name)][1].extend(ref)
  per_domain = {d: text_metrics.score(metrics, p, r) for d, (p, r) in sorted(by_domain.items())}
  names = list(next(iter(per_domain.values())))
  return {
    "per_domain": per_domain,
    "mean": {s: float(np.mean([v[s] for v in per_domain.values()])) for s in names},
    "tasks": [{"name": t.name, **text_metrics.score(metrics, o, r)} for t, o, r in zip(tasks, outputs, refs)],
  }


def decode_eval(
  model,
  loss_fn: meta.LossFn,
  encoder,
  tokenizer,
  variables: dict,
  tasks: Sequence[Task],
  loss_result: dict,
  inners: dict[str, meta.InnerLoop],
  cfg: Any,
  rng: jax.Array,
) -> tuple[dict, list[dict]]:
  """Decode and score the test ``tasks`` before and after each method's adaptation.

  Args:
    model: the linen model (a `mltd_jax.decode.Decoder`).
    loss_fn: the family's loss, for adaptation.
    encoder: the family's encoder (``encode`` for the support set, ``prompts`` for decoding).
    tokenizer: turns generated ids back into text.
    variables: the prepared (meta-trained) variables.
    tasks: the test tasks, in the order of ``loss_result``'s task lists.
    loss_result: `mltd_jax.evaluate.meta_test`'s result (its chosen rates and validation losses).
    inners: method -> its adaptation (`mltd_jax.evaluate.eval_inner`); ``steps`` is replaced by the chosen k.
    cfg: ``config.eval.decode`` (metrics, num_beams, max_new_tokens, length_penalty, batch_size).
    rng: the meta-test key; task i adapts with ``fold_in(rng, i)`` like the loss-based meta-test.

  Returns:
    (the ``decode`` entry of eval.json, prediction records ``{"method", "task", "prediction", "reference"}``).
  """
  metrics = list(cfg.metrics)
  select_by = loss_result["select_by"][0]
  refs = references(tasks)
  records: list[dict] = []

  def run(label: str, outputs: list[list[str]]) -> dict:
    for task, out, ref in zip(tasks, outputs, refs):
      records.extend({"method": label, "task": task.name, "prediction": p, "reference": r} for p, r in zip(out, ref))
    return summarize(metrics, tasks, outputs)

  before = [generate_texts(model, variables, encoder, tokenizer, t.query, cfg) for t in tasks]
  result = {
    "metrics": metrics,
    "settings": {k: cfg[k] for k in ("num_beams", "max_new_tokens", "length_penalty")},
    "select_by": select_by,
    "before": run("before", before),
    "methods": {},
  }
  for method, inner in inners.items():
    lr, k = chosen_setting(loss_result["methods"][method]["selections"][select_by])
    adapter = make_adapter(loss_fn, dataclasses.replace(inner, steps=k))
    supports = [encoder.encode(t.support, where=f"task {t.name!r} support: ") for t in tasks]
    keys = [jax.random.fold_in(rng, i) for i in range(len(tasks))]
    t0 = time.perf_counter()
    jax.block_until_ready(adapter(variables, supports[0], keys[0], lr))  # compiles
    compile_s = time.perf_counter() - t0
    outputs, seconds = [], []
    for support, key, task in zip(supports, keys, tasks):
      t0 = time.perf_counter()
      adapted = jax.block_until_ready(adapter(variables, support, key, lr))
      seconds.append(time.perf_counter() - t0)
      outputs.append(generate_texts(model, adapted, encoder, tokenizer, task.query, cfg))
    summary = run(method, outputs)
    for entry, s in zip(summary["tasks"], seconds):
      entry["adapt_seconds"] = s
    result["methods"][method] = {
      "lr": lr,
      "steps": k,
      "adapt_seconds_mean": float(np.mean(seconds)),
      "adapt_compile_seconds": compile_s,
      **summary,
    }
  return result, records


def format_table(result: dict) -> str:
  """One row per domain and the mean; columns: each score before and after each method's adaptation."""
  scores = list(result["before"]["mean"])
  columns = [("before", result["before"])] + [(f"{m} (k={r['steps']})", r) for m, r in result["methods"].items()]
  head = f"{'domain':<16}" + "".join(f"{f'{name} {s}':>28}" for name, _ in columns for s in scores)
  rows = [head]
  for domain in [*result["before"]["per_domain"], "mean"]:
    cells = []
    for _, r in columns:
      values = r["mean"] if domain == "mean" else r["per_domain"][domain]
      cells += [f"{values[s]:>28.4f}" for s in scores]
    rows.append(f"{domain:<16}" + "".join(cells))
  timing = "; ".join(f"{m}: {r['adapt_seconds_mean']:.3f} s/task" for m, r in result["methods"].items())
  return "\n".join(rows + [f"adaptation wall-clock (compiled, per task): {timing}"])
