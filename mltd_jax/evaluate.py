"""Meta-testing: adapt to each held-out task on its support set, report query loss and perplexity.

For every adaptation method (a name -> regex of the variables it adapts, e.g. ``{"tarp": "^tarp/", "full":
"^params/"}``) and every learning rate of the grid, every task is adapted for K steps (`meta.make_adapt_eval`).
The learning rate is chosen per number of steps k by the mean query loss on the *validation* tasks; the test
tasks' numbers at that learning rate are reported. Task-to-task noise is reported as the standard error over
test tasks.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import numpy as np

from mltd_jax import meta
from mltd_jax.data import episodes
from mltd_jax.data.tasks import Task


def encode_tasks(tokenizer, tasks: Sequence[Task], seq_len: int, focus_token: str = "", **kw) -> dict:
  """Stacked support [N, 1, S, L] and evaluation batches: ``query`` and, with ``focus_token``, ``query_focus``
  (the query scored only on tokens that follow ``focus_token``, e.g. the objects after "is" in facts)."""
  arrays = episodes.stack([episodes.encode_task(tokenizer, t, seq_len, inner_steps=1, **kw) for t in tasks])
  query = arrays.pop("query")
  arrays["eval"] = {"query": query}
  if focus_token:
    focus_id = tokenizer.convert_tokens_to_ids(focus_token)
    if focus_id is None or focus_id == tokenizer.unk_token_id:
      raise ValueError(f"config.eval.focus_token={focus_token!r} is not a token of the tokenizer.")
    weights = np.zeros_like(query["mask"])
    weights[..., 1:] = query["mask"][..., 1:] * (query["ids"][..., :-1] == focus_id)  # [N, Q, L]
    arrays["eval"]["query_focus"] = {**query, "weights": weights}
  return arrays


def _losses(evaluate: Callable, variables, arrays: dict, lr: float, chunk: int) -> dict[str, np.ndarray]:
  """{name: [num_tasks, K+1]} losses, evaluated ``chunk`` tasks at a time (bounds memory for large models)."""
  n = arrays["support"]["ids"].shape[0]
  parts = [
    jax.device_get(evaluate(variables, jax.tree.map(lambda x: x[i : i + chunk], arrays), lr))
    for i in range(0, n, chunk)
  ]
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def meta_test(
  apply_fn: Callable, variables: dict, tokenizer, source, cfg: Any, seq_len: int, encode_kw: dict | None = None
) -> dict:
  """Evaluate adaptation on held-out tasks; ``cfg`` is ``config.eval``. Returns the eval.json dict."""
  encode_kw = encode_kw or {}
  val_tasks, test_tasks = source.eval_tasks("validation"), source.eval_tasks("test")
  val = encode_tasks(tokenizer, val_tasks, seq_len, cfg.focus_token, **encode_kw)
  test = encode_tasks(tokenizer, test_tasks, seq_len, cfg.focus_token, **encode_kw)
  k_steps, n = cfg.adapt_steps, len(test_tasks)
  out = {"adapt_steps": k_steps, "num_validation_tasks": len(val_tasks), "num_test_tasks": n, "methods": {}}
  for method, regex in cfg.methods.items():
    if regex.startswith("^tarp") and "tarp" not in variables:
      continue
    evaluate = meta.make_adapt_eval(apply_fn, regex, k_steps, cfg.optimizer)
    grid = list(cfg.lr_grid[method] if method in cfg.lr_grid else cfg.lr_grid["default"])
    val_l = [_losses(evaluate, variables, val, lr, cfg.tasks_per_batch) for lr in grid]
    # The lr for k steps: the one with the lowest mean validation query loss after k steps.
    best = np.stack([v["query"].mean(0) for v in val_l]).argmin(axis=0)  # [K+1]
    test_l = {int(i): _losses(evaluate, variables, test, grid[i], cfg.tasks_per_batch) for i in set(best)}
    pick = lambda runs, name: np.stack([runs[best[k]][name][:, k] for k in range(k_steps + 1)], 1)  # noqa: E731
    result = {
      "fast_params": regex,
      "lr": [grid[i] for i in best],
      "lr_grid": grid,
      "validation_query_loss_mean": pick(val_l, "query").mean(0).tolist(),
    }
    for name in test_l[int(best[0])]:
      loss = pick(test_l, name)  # [N, K+1]
      ppl = np.exp(loss)
      result[f"{name}_loss_mean"] = loss.mean(0).tolist()
      result[f"{name}_ppl_mean"] = ppl.mean(0).tolist()
      result[f"{name}_ppl_se"] = (ppl.std(0, ddof=1) / math.sqrt(n)).tolist() if n > 1 else None
      if name == "query":
        result["tasks"] = [
          {
            "name": t.name,
            "query_loss": loss[i].tolist(),
            "query_ppl": ppl[i].tolist(),
            "before_adaptation": {"query_loss": float(loss[i, 0]), "query_ppl": float(ppl[i, 0])},
          }
          for i, t in enumerate(test_tasks)
        ]
    out["methods"][method] = result
  return out


def format_table(result: dict, metric: str = "query") -> str:
  """Mean test ``metric`` perplexity ± standard error after k = 0..K steps, one column per method."""
  methods = result["methods"]
  names = list(methods)
  lines = ["k  " + "".join(f"{n:>22}" for n in names)]
  for k in range(result["adapt_steps"] + 1):
    cells = []
    for n in names:
      m, se = methods[n][f"{metric}_ppl_mean"][k], methods[n][f"{metric}_ppl_se"]
      cells.append(f"{m:>12.3f} ± {se[k]:<7.3f}" if se else f"{m:>22.3f}")
    lines.append(f"{k:<3}" + "".join(cells))
  return "\n".join(lines)
