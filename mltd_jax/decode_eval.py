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

from mltd_jax import consistency, decode, meta, text_metrics
from mltd_jax.data.tasks import Task


def chosen_setting(selection: dict) -> tuple[float, int]:
  """``(lr, k)`` of the lowest mean validation loss over k >= 1 in one selection of a loss-based meta-test result."""
  losses = np.asarray(selection["validation_loss_mean"][1:], dtype=np.float64)
  if losses.size == 0 or np.isnan(losses).all():
    raise ValueError("no finite validation loss after k >= 1 adaptation steps; raise config.eval.adapt_steps.")
  k = int(np.nanargmin(losses)) + 1
  return float(selection["lr"][k]), k


def domain_of(task_name: str) -> str:
  """The domain of a held-out task named ``"<domain>#<episode number>"`` (the domain may hold ``#`` itself); a name
  not ending in ``#<digits>`` is its own domain."""
  domain, sep, episode = task_name.rpartition("#")
  return domain if sep and episode.isdigit() else task_name


def make_adapter(loss_fn: meta.LossFn, inner: meta.InnerLoop, prepare: meta.Prepare | None = None) -> Callable:
  """Jitted ``(variables, support, rng, lr) -> adapted variables`` (one task; ``lr`` traced); with ``prepare`` the
  task adapts from ``prepare(variables, support, key, None)`` (TAMS: its fixed architecture), as in meta-testing."""

  def adapter(v, support, rng, lr):
    if prepare is not None:
      v = prepare(v, support, jax.random.fold_in(rng, 2), None)
    return meta.adapt(loss_fn, v, support, inner, rng, lr=lr)[0]

  return jax.jit(adapter)


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
    ids, mask = encoder.prompts(part, max_new_tokens=cfg.max_new_tokens)
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
  for t in tasks:
    check_pairs(t)
  return [[ex[1] for ex in t.query] for t in tasks]


def check_pairs(task: Task) -> None:
  """Decoding metrics score a generated target against the reference of a (source, target) or (context,
  response) query example: stop, naming the field, on a task whose query examples are plain texts."""
  if not all(isinstance(ex, tuple) and len(ex) == 2 for ex in task.query):
    raise ValueError(
      f"config.eval.decode.metrics scores generated outputs against references, but task {task.name!r} has plain "
      "texts as query examples (a causal-LM text source, e.g. config.data.jsonl.kind='text'): use a source of "
      "(source, target) or (context, response) pairs, or set config.eval.decode.metrics=()."
    )


def make_sequence_losses(loss_fn: meta.LossFn) -> Callable:
  """Jitted ``(variables, batch [N, ...]) -> [N]``: each row's summed loss (a mean for losses without weights)."""

  def one(variables, row):
    out = loss_fn(variables, jax.tree.map(lambda x: x[None], row), jax.random.key(0))
    return out[0] if isinstance(out, tuple) else out

  return jax.jit(jax.vmap(one, in_axes=(None, 0)))


def candidate_hits(sequence_losses: Callable, encoder, variables: dict, task: Task) -> list[bool]:
  """Per query example: is its gold response (the last candidate) the likeliest of its candidates?

  Every (context, candidate) pair is scored by its summed response loss (lower is likelier); ties count as misses
  unless the gold is the first of the lowest. Empty when the task has no candidates.
  """
  if not task.candidates:
    return []
  pairs = [(ex[0], c) for ex, cands in zip(task.query, task.candidates) for c in cands]
  losses = np.asarray(sequence_losses(variables, encoder.encode(pairs, where=f"task {task.name!r} candidates: ")))
  hits, start = [], 0
  for cands in task.candidates:
    part = losses[start : start + len(cands)]
    hits.append(bool(np.argmin(part) == len(cands) - 1))
    start += len(cands)
  return hits


def summarize(
  metrics: Sequence[str],
  tasks: Sequence[Task],
  outputs: Sequence[Sequence[str]],
  per_example: dict[str, Sequence[Sequence[float]]] | None = None,
) -> dict:
  """Scores per task, per domain (one call on the domain's outputs) and their mean over domains.

  ``per_example`` maps a score name to per-task lists of per-example values (``hits@1``: 1.0 when the gold candidate
  ranks first; ``c_score``: a response's consistency with the persona); their means join the text metrics wherever
  a task has values.
  """
  refs = references(tasks)
  extra = {name: list(values) for name, values in (per_example or {}).items()}
  by_domain: dict[str, dict[str, list]] = collections.defaultdict(lambda: collections.defaultdict(list))
  for i, (task, out, ref) in enumerate(zip(tasks, outputs, refs)):
    parts = by_domain[domain_of(task.name)]
    parts["preds"].extend(out)
    parts["refs"].extend(ref)
    for name, values in extra.items():
      parts[name].extend(values[i])

  def scores(preds, refs_, values: dict) -> dict[str, float]:
    return {
      **text_metrics.score(metrics, preds, refs_),
      **{name: float(np.mean(v)) for name, v in values.items() if len(v)},
    }

  per_domain = {d: scores(p["preds"], p["refs"], {n: p[n] for n in extra}) for d, p in sorted(by_domain.items())}
  names = list(dict.fromkeys(k for v in per_domain.values() for k in v))
  return {
    "per_domain": per_domain,
    "mean": {s: float(np.mean([v[s] for v in per_domain.values() if s in v])) for s in names},
    "tasks": [
      {"name": t.name, **scores(o, r, {n: extra[n][i] for n in extra})}
      for i, (t, o, r) in enumerate(zip(tasks, outputs, refs))
    ],
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
  prepare: meta.Prepare | None = None,
) -> tuple[dict, list[dict]]:
  """Decode and score the test ``tasks`` before and after each method's adaptation.

  Args:
    model: the linen model (a `mltd_jax.decode.Decoder`).
    loss_fn: the family's loss, for adaptation (and for ranking candidates, when tasks have them).
    encoder: the family's encoder (``encode`` for the support set, ``prompts`` for decoding).
    tokenizer: turns generated ids back into text.
    variables: the prepared (meta-trained) variables.
    tasks: the test tasks, in the order of ``loss_result``'s task lists.
    loss_result: `mltd_jax.evaluate.meta_test`'s result (its chosen rates and validation losses).
    inners: method -> its adaptation (`mltd_jax.evaluate.eval_inner`); ``steps`` is replaced by the chosen k.
    cfg: ``config.eval.decode`` (metrics, num_beams, max_new_tokens, length_penalty, batch_size).
    rng: the meta-test key; task i adapts with ``fold_in(rng, i)`` like the loss-based meta-test.
    prepare: run on each task's support set before decoding or adapting it (TAMS: its fixed argmax architecture,
      ``tams.make_prepare(..., fixed=True)``; the decoder then computes only the chosen operations).

  Returns:
    (the ``decode`` entry of eval.json, prediction records ``{"method", "task", "prediction", "reference"}``).
  """
  metrics = list(cfg.metrics)
  refs = references(tasks)
  sequence_losses = make_sequence_losses(loss_fn)
  records: list[dict] = []

  nli = consistency.load(cfg.get("nli_model", "")) if any(t.persona for t in tasks) else None

  def score(label: str, per_task_variables) -> dict:
    outputs, extra = [], {"hits@1": [], "c_score": []}
    for task, ref, v in zip(tasks, refs, per_task_variables):
      out = generate_texts(model, v, encoder, tokenizer, task.query, cfg)
      outputs.append(out)
      extra["hits@1"].append([float(h) for h in candidate_hits(sequence_losses, encoder, v, task)])
      extra["c_score"].append(nli(task.persona, out) if nli is not None and task.persona else [])
      records.extend({"method": label, "task": task.name, "prediction": p, "reference": r} for p, r in zip(out, ref))
    return summarize(metrics, tasks, outputs, extra)

  select_by = loss_result["select_by"][0]
  result = {
    "metrics": metrics,
    "settings": {k: cfg[k] for k in ("num_beams", "max_new_tokens", "length_penalty")},
    "select_by": select_by,
    "before": None,
    "methods": {},
  }
  supports = [encoder.encode(t.support, where=f"task {t.name!r} support: ") for t in tasks]
  keys = [jax.random.fold_in(rng, i) for i in range(len(tasks))]
  if prepare is None:
    result["before"] = score("before", [variables] * len(tasks))
  else:  # one task's prepared variables at a time (each holds its own copy of the parameters)
    prep = jax.jit(lambda v, support, key: prepare(v, support, jax.random.fold_in(key, 2), None))
    result["before"] = score("before", (prep(variables, s, key) for s, key in zip(supports, keys)))
  for method, inner in inners.items():
    lr, k = chosen_setting(loss_result["methods"][method]["selections"][select_by])
    adapter = make_adapter(loss_fn, dataclasses.replace(inner, steps=k), prepare)
    t0 = time.perf_counter()
    jax.block_until_ready(adapter(variables, supports[0], keys[0], lr))  # compiles
    compile_s = time.perf_counter() - t0
    seconds = []

    def adapted(seconds=seconds, adapter=adapter, lr=lr):
      for support, key in zip(supports, keys):
        t0 = time.perf_counter()
        out = jax.block_until_ready(adapter(variables, support, key, lr))
        seconds.append(time.perf_counter() - t0)
        yield out

    summary = score(method, adapted())
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
