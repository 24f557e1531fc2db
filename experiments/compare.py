"""MLtD against its baselines on the offline :tiny setting, over several seeds; writes a Markdown and a JSON table.

For each seed:
  1. ``multitask``: multitask pretraining only; meta-test with full fine-tuning ("full") and with TARP adaptation of
     a zero-initialized difference ("tarp") -- the two baselines without meta-training.
  2. ``mltd_2nd``: the same pretrained checkpoint, then exact second-order MLtD meta-training; meta-test with TARP.
  3. ``mltd_1st``: the same with first-order meta-training (FOMAML), the same number of meta-steps.
Every method's adaptation learning rate is chosen per k on validation tasks (`mltd_jax.evaluate`).

  python experiments/compare.py --seeds 0 1 --out runs/compare
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: `python experiments/compare.py`


def get_config(variant: str = "tiny"):
  spec = importlib.util.spec_from_file_location("cfg", ROOT / "configs" / "multidomain_lm.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(variant)


def run(name: str, seed: int, out: Path, **overrides) -> tuple[dict, float]:
  from mltd_jax import train

  cfg = get_config()
  cfg.seed = seed
  for dotted, value in overrides.items():
    node = cfg
    *parents, leaf = dotted.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  workdir = out / f"seed{seed}" / name
  if name != "multitask":  # start meta-training from the multitask run's pretrained checkpoint
    src = out / f"seed{seed}" / "multitask" / "checkpoints" / "pretrain"
    dst = workdir / "checkpoints" / "pretrain"
    if not dst.exists():
      shutil.copytree(src, dst)
  t0 = time.time()
  result = train.train_and_evaluate(cfg, workdir)
  return result, time.time() - t0


def summarize(rows: list[dict], k: int, metric: str, sel: str) -> dict:
  """Mean over seeds of the per-seed mean perplexity at step k, its s.e. over tasks, per-seed values and rates."""
  chosen = [r["selections"][sel] for r in rows]
  per_seed = [c[metric]["ppl_mean"][k] for c in chosen]
  task_se = [c[metric]["ppl_se"][k] if c[metric]["ppl_se"] else float("nan") for c in chosen]
  return {"ppl": float(np.mean(per_seed)), "per_seed": per_seed, "task_se": task_se, "lr": [c["lr"][k] for c in chosen]}


def markdown(table: dict, k_max: int, title: str) -> list[str]:
  lines = [
    title,
    "",
    "| method | " + " | ".join(f"k={k}" for k in range(k_max + 1)) + f" | per seed at k={k_max} |",
    "|---" * (k_max + 3) + "|",
  ]
  for m, by_k in table.items():
    last = by_k[k_max]
    seeds_txt = ", ".join(
      f"{v:.2f} ± {se:.2f} (lr {lr:g})" for v, se, lr in zip(last["per_seed"], last["task_se"], last["lr"])
    )
    lines.append(f"| {m} | " + " | ".join(f"{by_k[k]['ppl']:.3f}" for k in range(k_max + 1)) + f" | {seeds_txt} |")
  return lines + [""]


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  p.add_argument("--out", type=Path, default=ROOT / "runs" / "compare")
  a = p.parse_args()
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
  for noisy in ("absl", "orbax", "jax"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  methods: dict[str, list[dict]] = {}
  seconds: dict[str, list[float]] = {}
  for seed in a.seeds:
    base, t = run("multitask", seed, a.out, **{"meta.steps": 0})
    methods.setdefault("full fine-tuning (multitask)", []).append(base["methods"]["full"])
    methods.setdefault("TARP, no meta-training (multitask)", []).append(base["methods"]["tarp"])
    for name, first in (("mltd_2nd", False), ("mltd_1st", True)):
      res, t = run(name, seed, a.out, **{"meta.first_order": first, "eval.methods": {"tarp": "^tarp/"}})
      label = f"MLtD {'first' if first else 'second'}-order (TARP)"
      methods.setdefault(label, []).append(res["methods"]["tarp"])
      seconds.setdefault(label, []).append(t)
  k_max = base["adapt_steps"]
  names = {
    "query": "Overall query perplexity",
    "query_focus": "Perplexity of the fact objects only (tokens after 'is')",
  }
  tables = {
    sel: {
      metric: {m: {k: summarize(rows, k, metric, sel) for k in range(k_max + 1)} for m, rows in methods.items()}
      for metric in base["metrics"]
    }
    for sel in base["select_by"]
  }
  intro = (
    f"Seeds {a.seeds}; {base['num_test_tasks']} test tasks per seed. Each method's adaptation learning rate is "
    "chosen per k on validation tasks, once by overall query loss and once by fact-object loss (a table each). "
    "Cells: mean over seeds of the per-seed mean test perplexity after k steps; last column: per seed, mean ± "
    "standard error over test tasks, and the rate chosen for k = K."
  )
  lines = [intro, ""]
  for sel in base["select_by"]:
    for metric in base["metrics"]:
      lines += markdown(tables[sel][metric], k_max, f"**{names.get(metric, metric)}; rates chosen by {sel} loss**")
  if seconds:
    lines += [
      "",
      "Wall time per run (pretraining restored, meta-training + meta-testing): "
      + "; ".join(f"{m}: {np.mean(s):.0f} s" for m, s in seconds.items()),
    ]
  text = "\n".join(lines)
  a.out.mkdir(parents=True, exist_ok=True)
  (a.out / "compare.md").write_text(text + "\n")
  (a.out / "compare.json").write_text(json.dumps({"seeds": a.seeds, "tables": tables, "seconds": seconds}, indent=2))
  print(text)


if __name__ == "__main__":
  main()
