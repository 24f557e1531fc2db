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


def encode_tasks(tokenizer, tasks: Sequence[Task], seq_len: int, **kw) -> dict:
  return episodes.stack([episodes.encode_task(tokenizer, t, seq_len, inner_steps=1, **kw) for t in tasks])


def _losses(evaluate: Callable, variables, arrays: dict, lr: float, chunk: int) -> np.ndarray:
  """[num_tasks, K+1] query losses, evaluated ``chunk`` tasks at a time (bounds memory for large models)."""
  n = arrays["query"]["ids"].shape[0]
  parts = [np.asarray(evaluate(variables, jax.tree.map(lambda x: x[i:i + chunk], arrays), lr))
           for i in range(0, n, chunk)]
  return np.concatenate(parts)


def meta_test(apply_fn: Callable, variables: dict, tokenizer, source, cfg: Any, seq_len: int,
              encode_kw: dict | None = None) -> dict:
  """Evaluate adaptation on held-out tasks; ``cfg`` is ``config.eval``. Returns the eval.json dict."""
  encode_kw = encode_kw or {}
  val_tasks, test_tasks = source.eval_tasks("validation"), source.eval_tasks("test")
  val = encode_tasks(tokenizer, val_tasks, seq_len, **encode_kw)
  test = encode_tasks(tokenizer, test_tasks, seq_len, **encode_kw)
  k_steps = cfg.adapt_steps
  out = {"adapt_steps": k_steps, "num_validation_tasks": len(val_tasks), "num_test_tasks": len(test_tasks),
         "methods": {}}
  for method, regex in cfg.methods.items():
    if regex.startswith("^tarp") and "tarp" not in variables:
      continue
    evaluate = meta.make_adapt_eval(apply_fn, regex, k_steps, cfg.optimizer)
    grid = list(cfg.lr_grid[method] if method in cfg.lr_grid else cfg.lr_grid["default"])
    val_l = np.stack([_losses(evaluate, variables, val, lr, cfg.tasks_per_batch) for lr in grid])  # [G, N, K+1]
    test_l = np.stack([_losses(evaluate, variables, test, lr, cfg.tasks_per_batch) for lr in grid])
    best = val_l.mean(axis=1).argmin(axis=0)  # [K+1]: the lr index chosen for each k
    chosen = test_l[best, :, np.arange(k_steps + 1)].T  # [N, K+1]
    ppl = np.exp(chosen)
    out["methods"][method] = {
        "fast_params": regex,
        "lr": [grid[i] for i in best],
        "lr_grid": grid,
        "query_loss_mean": chosen.mean(0).tolist(),
        "query_ppl_mean": ppl.mean(0).tolist(),
        "query_ppl_se": (ppl.std(0, ddof=1) / math.sqrt(len(test_tasks))).tolist() if len(test_tasks) > 1 else None,
        "validation_query_loss_mean": val_l[best, :, np.arange(k_steps + 1)].T.mean(0).tolist(),
        "tasks": [{"name": t.name, "before_adaptation": {"query_loss": float(chosen[i, 0]),
                                                         "query_ppl": float(ppl[i, 0])},
                   "query_loss": chosen[i].tolist(), "query_ppl": ppl[i].tolist()}
                  for i, t in enumerate(test_tasks)],
    }
  return out


def format_table(result: dict) -> str:
  """Mean test query perplexity ± standard error after k = 0..K steps, one column per method."""
  methods = result["methods"]
  names = list(methods)
  lines = ["k  " + "".join(f"{n:>22}" for n in names)]
  for k in range(result["adapt_steps"] + 1):
    cells = []
    for n in names:
      m, se = methods[n]["query_ppl_mean"][k], methods[n]["query_ppl_se"]
      cells.append(f"{m:>12.3f} ± {se[k]:<7.3f}" if se else f"{m:>22.3f}")
    lines.append(f"{k:<3}" + "".join(cells))
  return "\n".join(lines)
