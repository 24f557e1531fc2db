"""Meta-testing in parts: adapt-and-score per task, `select_lr` on validation tasks, `summarize`; and the driver.

For every adaptation method (a name -> regex of the variables it adapts, e.g. ``{"tarp": "^tarp/", "full":
"^params/"}``) and every learning rate of its grid, every task is adapted for K steps with `meta.adapt` (the
function meta-training adapts with) and scored on its evaluation batches after each step. The learning rate for k
steps is chosen by the mean validation loss of each metric in ``config.eval.select_by``; the test tasks' numbers at
the chosen rates are reported with standard errors over test tasks. The metric set is the experiment's
(``config.eval.metrics``, names of `METRICS`): ``query`` (perplexity of the query set) and ``query_focus``
(perplexity of the tokens after ``config.eval.focus_token``, e.g. the objects of facts); decoding metrics (ROUGE,
BLEU) register there too.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mltd_jax import meta
from mltd_jax.data import episodes
from mltd_jax.data.tasks import Task

EVAL_FIELDS = (
  ("steps", "config.eval.adapt_steps"),
  ("optimizer", "config.eval.optimizer"),
  ("support_chunks", "config.eval.support_chunks"),
  ("lr_schedule", "config.eval.lr_schedule"),
)


def _query(encoder, query: dict, cfg: Any) -> dict:
  return query


FOCUS_MISSING = "config.eval.metrics has 'query_focus' but config.eval.focus_token is empty; name the token."


def _query_focus(encoder, query: dict, cfg: Any) -> dict:
  if not cfg.focus_token:
    raise ValueError(FOCUS_MISSING)
  return encoder.focus(query, cfg.focus_token)


# Metric name -> (encoder, query batch, config.eval) -> the batch whose loss is the metric.
METRICS: dict[str, Callable[[Any, dict, Any], dict]] = {"query": _query, "query_focus": _query_focus}


def eval_inner(cfg: Any, method: str, regex: str) -> meta.InnerLoop:
  """The adaptation of method ``method`` (``config.eval``): plain optimizers (Adam's eps_root 0), nothing
  differentiated; the learning rate comes from the grid at call time."""
  fields = EVAL_FIELDS + (("fast_regex", f"config.eval.methods[{method!r}]"),)
  return meta.InnerLoop(
    steps=cfg.adapt_steps,
    lr=0.0,
    optimizer=cfg.optimizer,
    support_chunks=cfg.support_chunks,
    lr_schedule=cfg.get("lr_schedule", "constant"),
    fast_regex=regex,
    adam_eps_root=0.0,
    fields=fields,
  )


def _grid_key(cfg: Any, method: str) -> str:
  """The key of ``config.eval.lr_grid`` that holds method ``method``'s grid: its own entry, else 'default'."""
  if method not in cfg.lr_grid and "default" not in cfg.lr_grid:
    raise ValueError(
      f"config.eval.lr_grid has no entry for method {method!r} and no 'default' (its keys: {sorted(cfg.lr_grid)})."
    )
  return method if method in cfg.lr_grid else "default"


def grid_field(cfg: Any, method: str) -> str:
  """The config field that holds method ``method``'s learning-rate grid, for messages."""
  return f"config.eval.lr_grid[{_grid_key(cfg, method)!r}]"


def lr_grid(cfg: Any, method: str) -> list[float]:
  """Method ``method``'s learning-rate grid (``config.eval.lr_grid[method]``, else ``["default"]``), checked."""
  field, grid = grid_field(cfg, method), list(cfg.lr_grid[_grid_key(cfg, method)])
  if not grid or not all(isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0 for lr in grid):
    raise ValueError(f"{field}={tuple(grid)} must be a non-empty tuple of finite learning rates >= 0.")
  return grid


def adapt_and_score(
  loss_fn: meta.LossFn,
  variables: dict,
  task: dict,
  inner: meta.InnerLoop,
  rng: jax.Array,
  lr,
  query_chunks: int = 1,
  prepare: meta.Prepare | None = None,
) -> dict[str, jax.Array]:
  """``{metric: [K + 1]}`` mean losses of ``task["eval"][metric]`` before (column 0) and after each of K steps
  (each evaluation batch scored in ``query_chunks`` slices: the same mean with the memory of one slice).

  With ``prepare`` (e.g. TAMS' fixed argmax architecture, `mltd_jax.tams.make_prepare` with ``fixed=True``) the
  task starts from ``prepare(variables, support, key, None)``, as in meta-training's `meta.task_loss`.
  """
  k_adapt, k_score = jax.random.split(rng)
  if prepare is not None:
    variables = prepare(variables, task["support"], jax.random.fold_in(rng, 2), None)
  query_loss = meta.chunked_loss(loss_fn, query_chunks, "config.eval.query_chunks")

  def score(v):
    return {name: query_loss(v, batch, k_score) for name, batch in task["eval"].items()}

  _, after = meta.adapt(loss_fn, variables, task["support"], inner, k_adapt, observe=score, lr=lr)
  return jax.tree.map(lambda b, a: jnp.concatenate([b[None], a]), score(variables), after)


def make_scorer(
  loss_fn: meta.LossFn, inner: meta.InnerLoop, query_chunks: int = 1, prepare: meta.Prepare | None = None
) -> Callable:
  """Jitted ``(variables, tasks, keys, lr) -> {metric: [num_tasks, K + 1]}``, one key per task; ``lr`` is traced
  (a learning-rate search compiles once); ``prepare`` goes to `adapt_and_score`. Tasks are vmapped by
  `meta.map_tasks` (a single task without a vmap over it)."""

  def scorer(variables, tasks, keys, lr):
    one = lambda t: adapt_and_score(loss_fn, variables, t[0], inner, t[1], lr, query_chunks, prepare)  # noqa: E731
    return meta.map_tasks(one, (tasks, keys), task_chunk=0)

  return jax.jit(scorer)


def select_lr(grid: Sequence[float], mean_loss: np.ndarray, field: str = "the grid") -> list[float]:
  """The learning rate of ``grid`` with the lowest mean validation loss, for each k.

  Args:
    grid: the candidate rates.
    mean_loss: [len(grid), K + 1] mean validation loss of each rate after k steps.
    field: the config field the grid came from, for the error.

  Returns:
    K + 1 rates (ties go to the earlier rate of the grid; a rate whose loss is NaN is never chosen).

  Raises:
    ValueError: the table does not fit the grid, or every rate diverged (NaN) for some k.
  """
  mean_loss = np.asarray(mean_loss, dtype=np.float64)
  if mean_loss.shape[0] != len(grid):
    raise ValueError(f"{mean_loss.shape[0]} rows of losses for a grid of {len(grid)} learning rates.")
  diverged = np.isnan(mean_loss)
  if diverged.all(axis=0).any():
    k = int(np.flatnonzero(diverged.all(axis=0))[0])
    raise ValueError(
      f"every learning rate of {field}={list(grid)} gives a NaN loss after {k} steps; lower the grid (a rerun in the "
      "same workdir restores the finished phases and only meta-tests again)."
    )
  return [grid[i] for i in np.argmin(np.where(diverged, np.inf, mean_loss), axis=0)]


def summarize(loss: np.ndarray) -> dict[str, list]:
  """Means over tasks of [num_tasks, K + 1] losses: loss, perplexity, and the perplexity's standard error."""
  n, ppl = loss.shape[0], np.exp(loss)
  return {
    "loss_mean": loss.mean(0).tolist(),
    "ppl_mean": ppl.mean(0).tolist(),
    "ppl_se": (ppl.std(0, ddof=1) / math.sqrt(n)).tolist() if n > 1 else None,
  }


def check_config(cfg: Any) -> None:
  """Stop on a bad ``config.eval`` value (naming the field) before anything is computed: the metrics and
  ``select_by``, each method's adaptation settings and learning-rate grid, the decoding metrics' names and
  settings."""
  unknown = [m for m in cfg.metrics if m not in METRICS]
  if unknown or not cfg.metrics:
    raise ValueError(f"config.eval.metrics={tuple(cfg.metrics)} must name some of {sorted(METRICS)}.")
  if "query_focus" in cfg.metrics and not cfg.focus_token:
    raise ValueError(FOCUS_MISSING)
  unknown = [m for m in cfg.select_by if m not in cfg.metrics]
  if unknown or not cfg.select_by:
    raise ValueError(
      f"config.eval.select_by={tuple(cfg.select_by)} must name some of the metrics {tuple(cfg.metrics)}."
    )
  for method, regex in cfg.methods.items():
    eval_inner(cfg, method, regex)
    lr_grid(cfg, method)
  decode = cfg.get("decode")
  if decode is not None and decode.metrics:
    from mltd_jax import text_metrics  # rouge-score and sacrebleu stay unimported

    text_metrics.check_names(decode.metrics)
    least = {"num_beams": 1, "max_new_tokens": 1, "batch_size": 0}
    for name, low in least.items():
      value = decode.get(name)
      if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"config.eval.decode.{name}={value!r} must be an integer >= {low}.")
    if not isinstance(decode.get("length_penalty"), (int, float)) or not math.isfinite(decode.length_penalty):
      raise ValueError(f"config.eval.decode.length_penalty={decode.get('length_penalty')!r} must be a finite number.")


def encode_tasks(encoder, tasks: Sequence[Task], cfg: Any) -> dict:
  """Stacked ``support`` [N, S, ...] and ``eval`` batches, one per metric of ``cfg.metrics`` (``config.eval``)."""
  arrays = episodes.stack([episodes.task_arrays(encoder, t) for t in tasks], [t.name for t in tasks])
  query = arrays.pop("query")
  arrays["eval"] = {m: METRICS[m](encoder, query, cfg) for m in cfg.metrics}
  return arrays


def check_data(encoder, source, cfg: Any, train_examples: bool = True) -> None:
  """Encode the held-out tasks before any training (``cfg`` is ``config.eval``): a text too long for the
  encoder, a split without tasks, chunk counts that do not divide the support or query sets, or (with decoding
  metrics) no room for a prompt beside ``max_new_tokens`` stop the run here, not after meta-training; so does a
  meta-training example the encoder refuses, for a source that can check them all (``source.check_examples``),
  unless ``train_examples`` is False (no phase draws training tasks) or the encoder truncates (it refuses no example
  for its length)."""
  tasks = {}
  for split in ("validation", "test"):
    tasks[split] = list(source.eval_tasks(split))
    if not tasks[split]:
      raise ValueError(
        f"the data source has no {split} tasks: check its held-out settings in config.data (the held-out "
        "tasks or domain, eval_episodes or num_eval_tasks >= 1)."
      )
    arrays = encode_tasks(encoder, tasks[split], cfg)
    batches = [("config.eval.support_chunks", cfg.support_chunks, arrays["support"])]
    batches += [("config.eval.query_chunks", cfg.get("query_chunks", 1), b) for b in arrays["eval"].values()]
    for field, chunks, batch in batches:  # each [tasks, examples, ...]: a task's examples are chunked
      n = jax.tree.leaves(batch)[0].shape[1]
      if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1 or n % chunks:
        raise ValueError(
          f"{field}={chunks!r} must be an integer >= 1 that divides the {split} tasks' {n} examples; set it to a "
          f"divisor of {n}."
        )
  check_examples = getattr(source, "check_examples", None)  # optional (`mltd_jax.data.tasks.TaskSource`)
  if check_examples is not None and train_examples and not getattr(encoder, "truncate", False):
    check_examples(encoder)
  decoding = cfg.get("decode")
  if decoding is not None and decoding.metrics:
    try:
      encoder.prompts(tasks["test"][0].query[:1], max_new_tokens=decoding.max_new_tokens)
    except ValueError as e:
      raise ValueError(
        f"config.eval.decode.max_new_tokens={decoding.max_new_tokens} leaves no room for a prompt in "
        f"config.data.seq_len={getattr(encoder, 'seq_len', '?')} ({str(e).rstrip('.')}); lower it or raise "
        "config.data.seq_len."
      ) from e


def _run(scorer: Callable, variables, arrays: dict, rng, lr: float, chunk: int) -> dict[str, np.ndarray]:
  """{metric: [num_tasks, K + 1]}, scoring ``chunk`` tasks at a time (bounds memory for large models); task i
  gets the key ``fold_in(rng, i)``, the same at every learning rate."""
  n = meta.leading_dim(arrays["support"])
  keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(n))
  parts = [
    jax.device_get(scorer(variables, jax.tree.map(lambda x: x[i : i + chunk], arrays), keys[i : i + chunk], lr))
    for i in range(0, n, chunk)
  ]
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def meta_test(
  loss_fn: meta.LossFn,
  encoder,
  variables: dict,
  source,
  cfg: Any,
  rng: jax.Array,
  shard: Callable[[Callable], Callable] | None = None,
  prepare: meta.Prepare | None = None,
) -> dict:
  """Adapt to held-out tasks and score them; ``cfg`` is ``config.eval``. Returns the eval.json dict.

  ``shard`` wraps each scorer to place its task chunks on a device mesh (`mltd_jax.sharding.scorer_on`).
  ``prepare`` runs once per task before its adaptation (TAMS: the task's fixed argmax architecture).
  """
  check_config(cfg)
  val_tasks, test_tasks = list(source.eval_tasks("validation")), list(source.eval_tasks("test"))
  val = encode_tasks(encoder, val_tasks, cfg)
  test = encode_tasks(encoder, test_tasks, cfg)
  metrics = list(val["eval"])
  select_by = list(cfg.select_by)
  out = {
    "adapt_steps": cfg.adapt_steps,
    "num_validation_tasks": len(val_tasks),
    "num_test_tasks": len(test_tasks),
    "metrics": metrics,
    "select_by": select_by,
    "methods": {},
  }
  for method, regex in cfg.methods.items():
    scorer = make_scorer(loss_fn, eval_inner(cfg, method, regex), cfg.get("query_chunks", 1), prepare)
    scorer = shard(scorer) if shard else scorer
    grid = lr_grid(cfg, method)
    run = lambda arrays, lr: _run(scorer, variables, arrays, rng, lr, cfg.tasks_per_batch)  # noqa: E731
    val_runs = [run(val, lr) for lr in grid]
    test_runs: dict[float, dict] = {}
    selections = {}
    for sel in select_by:
      lrs = select_lr(grid, np.stack([r[sel].mean(0) for r in val_runs]), grid_field(cfg, method))
      for lr in set(lrs) - set(test_runs):
        test_runs[lr] = run(test, lr)
      # Column k of each metric at the rate chosen for k steps.
      pick = lambda runs, m: np.stack([runs[lr][m][:, k] for k, lr in enumerate(lrs)], 1)  # noqa: E731, B023
      chosen = {m: pick(test_runs, m) for m in metrics}
      val_at = {lr: val_runs[grid.index(lr)] for lr in lrs}
      selections[sel] = {
        "lr": lrs,
        "validation_loss_mean": pick(val_at, sel).mean(0).tolist(),
        **{m: summarize(chosen[m]) for m in metrics},
        "tasks": [
          {"name": t.name, **{f"{m}_loss": chosen[m][i].tolist() for m in metrics}} for i, t in enumerate(test_tasks)
        ],
      }
    out["methods"][method] = {"fast_params": regex, "lr_grid": grid, "selections": selections}
  return out


def format_table(result: dict, metric: str = "query", select_by: str | None = None) -> str:
  """Mean test ``metric`` perplexity ± standard error after k = 0..K steps, one column per method."""
  select_by = select_by or result["select_by"][0]
  names = list(result["methods"])
  lines = ["k  " + "".join(f"{n:>22}" for n in names)]
  for k in range(result["adapt_steps"] + 1):
    cells = []
    for n in names:
      s = result["methods"][n]["selections"][select_by][metric]
      m, se = s["ppl_mean"][k], s["ppl_se"]
      cells.append(f"{m:>12.3f} ± {se[k]:<7.3f}" if se else f"{m:>22.3f}")
    lines.append(f"{k:<3}" + "".join(cells))
  return "\n".join(lines)


def report(result: dict) -> str:
  """Every (selection, metric) table of a meta-test result, with the chosen learning rates."""
  parts = []
  for sel in result["select_by"]:
    for metric in result["metrics"]:
      parts.append(f"{metric} perplexity, learning rates chosen by validation {sel} loss:")
      parts.append(format_table(result, metric, sel))
    rates = "; ".join(f"{n}: {m['selections'][sel]['lr']}" for n, m in result["methods"].items())
    parts.append(f"learning rates per k (by {sel}): {rates}")
  return "\n".join(parts)
