"""In-process A/B of the meta-step under XLA compile options: variants compiled in one process, calls paired.

The machine's speed drifts by 20% or more between minutes, so two separate runs of `meta_step.py` cannot resolve a
few percent. Here every variant after the first is called right next to the first (first then variant, then the
other way round), so each pair meets the same minute, and the median of the pairs' ratios resolves a few percent.
A variant is a set of XLA compile options, given to ``jax.jit(step).lower(...).compile(compiler_options=...)``:
``base`` (none) or ``KEY=VALUE[;KEY=VALUE...]``. Three keys are ours, not XLA's: ``onednn=false`` traces the step with
`mltd_jax.onednn` off (XLA computes every product, and the residual cotangent barrier,
`onednn.materialized_cotangent`, is off too; the default uses the kernel where it is available), and
``task_chunk=N`` replaces ``--task_chunk`` for that variant. ``standins=all`` (or ``standins=layer_norm,gelu``...)
traces that variant with linear stand-ins for GPT-2's nonlinearities (`standins`: the same products, the tensors
between them of the same shapes, the nonlinearities' elementwise work next to free; checked against the step
without them): its speedup is what nearly
free nonlinearities would give, everything else as it is; its updates are not the model's.

  python benchmarks/ab_meta_step.py --order 1 --task_chunk 0 --variant base \\
      --variant xla_cpu_enable_concurrency_optimized_scheduler=true \\
      --variant "xla_disable_hlo_passes=transpose-folding,algsimp" --calls 12

One JSON line per variant: the median seconds per step; against the first variant, the median and range over the
pairs of (the first's seconds / this one's) and the ratio of the two medians; and the largest difference of the
updated variables from the first variant's (zero, or rounding, for options that keep the arithmetic). The step is
`benchmarks/meta_step.py`'s meta-step (the peer's shapes, a fresh support batch per inner step, remat as its
``--remat``, default on) on one fixed meta-batch, without buffer donation (every call gets the same state). To
compare code variants, compile them in one process the same way (`mltd_jax.train.compile_step` and this module's
`paired_times`, from a script that builds the other step).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meta_step import FIELDS, _model, lacks_kernel, meta_batch  # noqa: E402  this directory's script (no jax at import)
import standins  # noqa: E402  this directory's (no jax at import)


def options(variant: str) -> dict[str, str | bool]:
  """``base`` -> {}; ``k=v;k2=v2`` -> {k: v, k2: v2} with ``true``/``false`` as booleans."""
  if variant == "base":
    return {}
  out: dict[str, str | bool] = {}
  for item in variant.split(";"):
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise SystemExit(f"--variant {variant!r}: expected 'base' or KEY=VALUE[;KEY=VALUE...], got item {item!r}")
    out[key.strip()] = {"true": True, "false": False}.get(value.strip(), value.strip())
  return out


def paired_times(compiled: dict, args: tuple, calls: int) -> dict[str, list[tuple[float, float]]]:
  """For each compiled function after the first: ``calls`` pairs (the first's seconds, its seconds) of adjacent
  calls, the first called first in even pairs and second in odd ones, after a warm-up call of each."""
  import jax

  def seconds(name: str) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(compiled[name](*args))
    return time.perf_counter() - t0

  for c in compiled.values():
    jax.block_until_ready(c(*args))
  first, *others = compiled
  pairs: dict[str, list[tuple[float, float]]] = {name: [] for name in others}
  for i in range(calls):
    for name in others:
      if i % 2 == 0:
        t_first = seconds(first)
        pairs[name].append((t_first, seconds(name)))
      else:
        t_name = seconds(name)
        pairs[name].append((seconds(first), t_name))
  return pairs


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  shapes = {k: FIELDS[k] for k in ("layers", "d", "heads", "vocab", "seq", "tasks", "shots", "rank")}  # the peer's
  for k, v in dict(shapes, inner=4, order=1, task_chunk=0, remat=1, calls=10).items():
    p.add_argument(f"--{k}", type=int, default=v)
  p.add_argument("--dtype", default="float32", help="compute dtype: float32 | bfloat16")
  p.add_argument("--variant", action="append", required=True, help="'base' or KEY=VALUE[;KEY=VALUE...] (repeat)")
  a = p.parse_args()
  if len(a.variant) < 2 or len(a.variant) != len(set(a.variant)):
    raise SystemExit(f"--variant: give two or more different variants (the first is the reference), got {a.variant}")
  variants = {v: options(v) for v in a.variant}
  for opts in variants.values():
    if "standins" in opts:
      standins.parse(opts["standins"])  # a wrong name stops before anything compiles

  import jax
  import numpy as np
  import optax

  from mltd_jax import meta, onednn, train
  from mltd_jax.models import gpt2
  from mltd_jax.state import TrainState

  model, variables, _ = _model(argparse.Namespace(**vars(a), tarp="bilinear", tams=False))
  tx = optax.adam(1e-4)
  state = TrainState.create(variables, tx)
  inner = meta.InnerLoop(
    steps=a.inner, lr=0.05, first_order=a.order == 1, remat=bool(a.remat), per_step_support=True
  )  # as meta_step.py's (its fast_regex default '^tarp/', backward 'auto')
  rng = np.random.default_rng(0)
  batch = meta_batch(rng, a)
  args = (state, batch, jax.random.key(0))
  compiled, chunks, checks = {}, {}, {}
  for name, opts in variants.items():
    opts = dict(opts)
    kernel = opts.pop("onednn", True)
    if not isinstance(kernel, bool):
      raise SystemExit(f"--variant {name!r}: onednn takes true or false")
    chunk = opts.pop("task_chunk", a.task_chunk)
    if not str(chunk).lstrip("-").isdigit():
      raise SystemExit(f"--variant {name!r}: task_chunk takes an integer")
    # a fresh step per variant: a trace cached for the same function would keep the other variant's products
    chunks[name] = int(chunk)
    parts = standins.parse(opts.pop("standins")) if "standins" in opts else ()
    fresh = meta.make_meta_step(gpt2.make_loss(model), tx, inner, chunks[name])
    with contextlib.nullcontext() if kernel else onednn.disabled():
      if parts:  # the step traced without and with the stand-ins (new functions): the same products
        twins = [meta.make_meta_step(gpt2.make_loss(model), tx, inner, chunks[name]) for _ in range(2)]
        plain = jax.make_jaxpr(twins[0])(*args)
        with standins.linear(parts) as called:
          checks[name] = standins.check(plain, jax.make_jaxpr(twins[1])(*args), parts, called)
      with standins.linear(parts) as called:
        compiled[name] = train.compile_step(jax.jit(fresh), *args, compiler_options=opts or None)
      if not all(called[part] for part in parts):
        raise SystemExit(f"--variant {name!r}: the compiled step did not call every stand-in ({dict(called)})")
    kernel_calls = compiled[name].as_text().count(onednn.TARGET)
    if kernel_calls and not kernel:
      raise SystemExit(f"--variant {name!r}: {kernel_calls} oneDNN calls in the compiled step with the kernel off")
    if kernel and lacks_kernel(compiled[name], a.dtype):
      raise SystemExit(f"--variant {name!r}: no oneDNN calls in the {a.dtype} step although the kernel is available")
  updated = {name: jax.tree.leaves(c(*args)[0].variables) for name, c in compiled.items()}
  pairs = paired_times(compiled, args, a.calls)
  first = a.variant[0]
  first_times = [t for p in pairs.values() for t, _ in p]
  for name in compiled:
    times = first_times if name == first else [t for _, t in pairs[name]]
    ratios = sorted(t0 / t for t0, t in pairs[name]) if name != first else [1.0]
    median = statistics.median(times)
    diff = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(updated[name], updated[first]))
    print(json.dumps({
      "variant": name, "compiler_options": variants[name], "dtype": a.dtype, "order": a.order,
      "task_chunk": chunks[name], "remat": bool(a.remat), "calls": a.calls, "median_step_s": float(f"{median:.4g}"),
      "speedup_vs_first": round(statistics.median(ratios), 3),
      "speedup_range": [round(ratios[0], 3), round(ratios[-1], 3)],
      "speedup_of_medians": round(statistics.median(first_times) / median, 3),
      "max_abs_diff_vs_first": diff, **({"standins": checks[name]} if name in checks else {}),
    }), flush=True)  # fmt: skip


if __name__ == "__main__":
  main()
