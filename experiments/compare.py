"""MLtD against its baselines on the offline :tiny setting, over several seeds; writes a Markdown and a JSON table.

For each seed:
  1. ``multitask``: multitask pretraining only; meta-test with full fine-tuning ("full") and with TARP adaptation of
     a zero-initialized difference ("tarp") -- the two baselines without meta-training.
  2. ``multitask_<N>``: the same baselines on a model pretrained for N steps instead (a run of its own, the cosine
     schedule spanning all its steps): is MLtD's gain more than more multitask training? By default N adds as many
     tasks as MLtD's meta-training draws (meta.steps x meta.tasks_per_step, in steps of pretrain.tasks_per_step);
     ``--control_steps N [N ...]`` sets other lengths (e.g. one matching meta-training's wall time). The control
     sees tasks the stream has not shown before, where meta-training revisits pretraining's first ones.
  3. ``mltd_2nd``: the pretrained checkpoint of 1, then exact second-order MLtD meta-training; meta-test with TARP.
  4. ``mltd_1st``: the same with first-order meta-training (FOMAML), the same number of meta-steps.
Every method's adaptation learning rate is chosen per k on validation tasks (`mltd_jax.evaluate`).

With ``--tams`` (issue #9) it compares, per seed, MLtD second order without and with TAMS at the same budget
(same pretrained checkpoint, same meta-steps, tasks and inner loop): ``mltd_2nd`` pretrains and meta-trains,
``mltd_2nd_tams`` starts from its pretraining checkpoint with ``config.tams.enabled=True`` (its inner loop and
meta-test adapt TARP and the cells' weights); the tables add TAMS' parameter and meta-step time overhead and the
architectures chosen for the test tasks.

``--config FILE:VARIANT`` picks the setting (default ``multidomain_lm:tiny``; ``adaptsum:tiny`` is the summarization
one, whose runs also decode: the tables then add ROUGE of the test summaries before and after adaptation).

  python experiments/compare.py --seeds 0 1 --out runs/compare
  python experiments/compare.py --tams --seeds 0 1 2 --out runs/compare_tams
  python experiments/compare.py --tams --config adaptsum:tiny --seeds 0 1 2 --out runs/compare_tams_adaptsum
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: `python experiments/compare.py`

from mltd_jax import config_files  # noqa: E402  (after the path is set)

CONFIG = "multidomain_lm:tiny"  # set by --config: configs/<file>.py and its variant


def get_config(name: str | None = None):
  """``configs/<file>.py``'s ``get_config(<variant>)`` for ``name`` = ``"<file>:<variant>"`` (default: `CONFIG`)."""
  file, _, variant = (name or CONFIG).partition(":")
  path = ROOT / "configs" / f"{file}.py"
  if not path.exists():
    raise FileNotFoundError(f"--config {name or CONFIG!r}: no {path}; use <file>:<variant> of a file in configs/.")
  return config_files.load(path).get_config(variant or None)


def run(name: str, seed: int, out: Path, pretrained: str = "multitask", **overrides) -> tuple[dict, float]:
  """Train and meta-test run ``name`` of ``seed`` in ``out/seed<seed>/<name>`` with ``overrides`` ({dotted config
  field: value}); every run but ``pretrained`` starts from the pretraining checkpoint of run ``pretrained``."""
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
  if name != pretrained:  # start meta-training from that run's pretrained checkpoint
    src = out / f"seed{seed}" / pretrained / "checkpoints"
    dst = workdir / "checkpoints"
    if not (dst / "pretrain").exists():
      shutil.copytree(src / "pretrain", dst / "pretrain")
      # its record too: a reused --out whose copy was pretrained under other settings is then refused on resume
      shutil.copy2(src / "pretrain.config.json", dst / "pretrain.config.json")
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


def baselines(
  seeds: list[int], out: Path, methods: dict, seconds: dict, extra: dict, control_steps: list[int] | None = None
) -> dict:
  """The multitask baselines (also pretrained longer: the module's docstring) and MLtD first and second order, per
  seed (the default comparison); decoding scores into ``extra["decode"]`` when the config decodes. Returns a
  multitask run's meta-test result (for its settings)."""
  def record(label: str, res: dict, method: str) -> None:
    methods.setdefault(label, []).append(res["methods"][method])
    if "decode" in res:
      extra.setdefault("decode", {}).setdefault(label, []).append(decoded(res, method))

  cfg = get_config()
  equal_tasks = cfg.pretrain.steps + -(-cfg.meta.steps * cfg.meta.tasks_per_step // cfg.pretrain.tasks_per_step)
  for seed in seeds:
    base, t = run("multitask", seed, out, **{"meta.steps": 0})
    record("full fine-tuning (multitask)", base, "full")
    record("TARP, no meta-training (multitask)", base, "tarp")
    for n in control_steps or [equal_tasks]:
      res, t = run(f"multitask_{n}", seed, out, f"multitask_{n}", **{"meta.steps": 0, "pretrain.steps": n})
      record(f"full fine-tuning (multitask, {n} steps)", res, "full")
      record(f"TARP, no meta-training (multitask, {n} steps)", res, "tarp")
    for name, first in (("mltd_2nd", False), ("mltd_1st", True)):
      res, t = run(name, seed, out, **{"meta.first_order": first, "eval.methods": {"tarp": "^tarp/"}})
      label = f"MLtD {'first' if first else 'second'}-order (TARP)"
      record(label, res, "tarp")
      seconds.setdefault(label, []).append(t)
  return base


SELECTION_NAMES = {"query": "overall query loss", "query_focus": "fact-object loss"}
TAMS_LABEL = "MLtD second-order (TARP + TAMS)"


def with_tams(seeds: list[int], out: Path, methods: dict, seconds: dict, extra: dict) -> dict:
  """MLtD second order without and with TAMS, per seed, at the same budget; ``extra["tams"]`` gets each seed's
  overhead and chosen architectures. Returns the last meta-test result."""
  for seed in seeds:
    for name, on in (("mltd_2nd", False), ("mltd_2nd_tams", True)):
      res, t = run(name, seed, out, "mltd_2nd", **{"tams.enabled": on, "eval.methods": {"tarp": "^tarp/"}})
      label = TAMS_LABEL if on else "MLtD second-order (TARP)"
      methods.setdefault(label, []).append(res["methods"]["tarp"])
      seconds.setdefault(label, []).append(t)
      if on:
        extra.setdefault("tams", []).append({"seed": seed, **res["tams"]})
      if "decode" in res:
        extra.setdefault("decode", {}).setdefault(label, []).append(decoded(res, "tarp"))
  return res


def decoded(res: dict, method: str) -> dict:
  """A run's decoding scores (mean over domains) before and after ``method``'s adaptation at its chosen setting."""
  d = res["decode"]
  m = d["methods"][method]
  return {"before": d["before"]["mean"], "after": m["mean"], "lr": m["lr"], "steps": m["steps"]}


def decode_lines(per_label: dict[str, list[dict]], seeds: list[int]) -> list[str]:
  """Markdown: each decoding score before and after adaptation, mean over seeds, and per seed after adaptation."""
  scores = list(next(iter(per_label.values()))[0]["after"])
  lines = [
    "",
    "**Decoded test outputs** (beam search; mean over seeds of each seed's score, mean over domains; after: at the "
    "(lr, k) of the lowest validation loss)",
    "",
    "| method | " + " | ".join(f"{s} before | {s} after" for s in scores) + " | per seed after (lr, k) |",
    "|---" * (2 * len(scores) + 2) + "|",
  ]
  for label, rows in per_label.items():
    cells = [f"{np.mean([r[w][s] for r in rows]):.4f}" for s in scores for w in ("before", "after")]
    per_seed = "; ".join(
      f"seed {seed}: " + "/".join(f"{r['after'][s]:.3f}" for s in scores) + f" (lr {r['lr']:g}, k {r['steps']})"
      for seed, r in zip(seeds, rows)
    )
    lines.append(f"| {label} | " + " | ".join(cells) + f" | {per_seed} |")
  return lines


def meta_step_time(workdir: Path) -> float:
  """Mean time per meta-step relative to its tokens (1 / tokens/s) over the logged meta-training intervals of a run,
  the first (which includes compiling) left out."""
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  rates = [r["meta/tokens_per_s"] for r in rows if "meta/tokens_per_s" in r][1:]
  return float(np.mean([1.0 / r for r in rates])) if rates else float("nan")


def phase_overhead(out: Path, seed: int) -> float:
  """TAMS' meta-step time overhead over seed ``seed``'s whole meta-training phase (`meta_step_time`)."""
  return meta_step_time(out / f"seed{seed}" / "mltd_2nd_tams") / meta_step_time(out / f"seed{seed}" / "mltd_2nd") - 1


def tams_lines(per_seed: list[dict], out: Path) -> list[str]:
  """Markdown: TAMS' parameter and meta-step time overhead per seed (measured before meta-training, and over the
  whole meta-training phase from the runs' logged throughput), and the test tasks' architectures."""
  head = ["seed", "TAMS params", "base params", "param overhead", "step s without", "step s with", "step-time overhead"]
  head += ["over the whole phase"]
  lines = [
    "",
    "**TAMS overhead** (parameters: cells + controller against the base model; meta-step time measured on the first "
    "meta-batch before meta-training, `config.tams.overhead_steps` steps each, and over the whole meta-training "
    "phase from its logged tokens/s, first interval left out; on the shared 2-core CPU)",
    "",
    "| " + " | ".join(head + ["distinct test architectures"]) + " |",
    "|---" * (len(head) + 1) + "|",
  ]
  for r in per_seed:
    o = r["overhead"]
    lines.append(
      f"| {r['seed']} | {o['tams_params']:,} | {o['base_params']:,} | {100 * o['param_overhead']:.2f}% | "
      f"{o.get('step_seconds_plain', float('nan')):.3f} | {o.get('step_seconds_tams', float('nan')):.3f} | "
      f"{100 * o.get('step_time_overhead', float('nan')):+.1f}% | {100 * phase_overhead(out, r['seed']):+.1f}% | "
      f"{r['distinct_architectures']} of {len(r['tasks'])} |"
    )
  for r in per_seed:
    counts = collections.Counter(json.dumps(t["arch"]) for t in r["tasks"])
    arch, n = counts.most_common(1)[0]
    lines.append(f"\nSeed {r['seed']}: most common test-task architecture ({n} of {len(r['tasks'])} tasks): `{arch}`")
  return lines


def describe_commit() -> str:
  """The code's commit (``git describe --always --dirty``: "-dirty" with uncommitted edits), or "" outside git."""
  try:
    return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True).stdout
  except OSError:
    return ""


def main() -> None:
  global CONFIG
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  p.add_argument("--out", type=Path, default=ROOT / "runs" / "compare")
  p.add_argument("--tams", action="store_true", help="MLtD second order without and with TAMS (issue #9)")
  p.add_argument("--config", default=CONFIG, help="<file in configs/>:<variant>, e.g. adaptsum:tiny")
  control_help = "pretraining steps of the longer multitask controls (default: as many more tasks as meta-training)"
  p.add_argument("--control_steps", type=int, nargs="+", default=None, help=control_help)
  a = p.parse_args()
  CONFIG = a.config
  get_config()  # a wrong --config fails here, before any run
  if a.control_steps is not None:
    if a.tams:
      p.error("--control_steps: the multitask controls belong to the default comparison, not to --tams")
    if min(a.control_steps) < 1:
      p.error(f"--control_steps {a.control_steps}: pretraining steps must be >= 1")
    a.control_steps = sorted(set(a.control_steps))  # a repeated length would record its rows twice per seed
  commit = describe_commit()  # at the start: the runs import the code as it is now, whatever is committed later
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
  for noisy in ("absl", "orbax", "jax"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  methods: dict[str, list[dict]] = {}
  seconds: dict[str, list[float]] = {}
  extra: dict[str, list] = {}
  if a.tams:
    base = with_tams(a.seeds, a.out, methods, seconds, extra)
  else:
    base = baselines(a.seeds, a.out, methods, seconds, extra, a.control_steps)
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
  command = "python experiments/compare.py " + shlex.join(sys.argv[1:])
  intro = (
    f"`{command}` at commit {commit.strip() or 'unknown'}; `--config {a.config}`; seeds {a.seeds}; "
    f"{base['num_test_tasks']} test tasks per seed. Each method's "
    "adaptation learning rate is chosen per k on validation tasks, by "
    + " and by ".join(SELECTION_NAMES.get(s, s) for s in base["select_by"])
    + " (a table each). "
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
  if "decode" in extra:
    lines += decode_lines(extra["decode"], a.seeds)
  if "tams" in extra:
    lines += tams_lines(extra["tams"], a.out)
  text = "\n".join(lines)
  a.out.mkdir(parents=True, exist_ok=True)
  (a.out / "compare.md").write_text(text + "\n")
  summary = {"command": command, "commit": commit.strip(), "seeds": a.seeds, "tables": tables, "seconds": seconds,
             **extra}  # fmt: skip
  (a.out / "compare.json").write_text(json.dumps(summary, indent=2))
  print(text)


if __name__ == "__main__":
  main()
