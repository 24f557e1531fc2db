"""Where one compiled meta-step's time goes, op by op: a `jax.profiler` trace of the benchmark's meta-step.

The meta-step of `benchmarks/meta_step.py` (the peer's shapes, tasks one after another unless ``--task_chunk`` says
otherwise, a fresh support batch per inner step) is compiled once and traced over ``--steps`` calls. One JSON line:
seconds per step, XLA's FLOP count of the compiled step (loop bodies counted once; the oneDNN custom calls, the
weight gradients on XLA:CPU, not counted), milliseconds per step by kind of XLA:CPU thunk
(`meta_parts.thunk_ms` and `op_kinds`: matmul fusions, transposing copies, other fusions; summed over the threads),
and the ``--top`` costliest thunks with their output shape and the JAX operation they came from.

  python benchmarks/profile_meta_step.py --order 1
  python benchmarks/profile_meta_step.py --order 1 --task_chunk 0    # tasks vmapped (0) instead of one at a time
  python benchmarks/profile_meta_step.py --order 2 --inner 1 --trace /tmp/meta_trace
  python benchmarks/profile_meta_step.py --order 2 --dtype bfloat16    # products in bfloat16 (mltd_jax.matmul)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meta_step import FIELDS, _flops, _model, meta_batch  # noqa: E402  this directory's script (no jax at import)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  shapes = {k: FIELDS[k] for k in ("layers", "d", "heads", "vocab", "seq", "tasks", "shots", "rank")}  # the peer's
  for k, v in dict(shapes, inner=4, order=2, task_chunk=1).items():
    p.add_argument(f"--{k}", type=int, default=v)
  p.add_argument("--dtype", default="float32", help="compute dtype: float32 | bfloat16")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--top", type=int, default=10)
  p.add_argument("--trace", type=Path, default=None, help="directory for the trace (default: a temporary one)")
  a = p.parse_args()

  import jax
  import numpy as np
  import optax
  from meta_parts import op_kinds, time_calls  # this directory's scripts

  from mltd_jax import meta
  from mltd_jax.models import gpt2
  from mltd_jax.state import TrainState

  model, variables, _ = _model(argparse.Namespace(**vars(a), tarp="bilinear", tams=False))
  tx = optax.adam(1e-4)
  state = TrainState.create(variables, tx)
  inner = meta.InnerLoop(steps=a.inner, lr=0.05, first_order=a.order == 1, per_step_support=True)
  rng = np.random.default_rng(0)
  batch = meta_batch(rng, a)
  key = jax.random.key(0)
  step = meta.make_meta_step(gpt2.make_loss(model), tx, inner, a.task_chunk)
  compiled = jax.jit(step).lower(state, batch, key).compile()
  trace = a.trace or Path(tempfile.mkdtemp(prefix="meta_trace_"))
  seconds, per_op = time_calls(compiled, (state, batch, key), a.steps, trace)
  hlo = {}  # instruction name -> (output shape, the JAX operation it came from)
  for line in compiled.as_text().splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ", line)
    if m:
      origin = re.search(r'op_name="([^"]*)"', line)
      hlo[m.group(1)] = (m.group(2), origin.group(1)[-100:] if origin else "")
  print(json.dumps({
    "order": a.order, "inner": a.inner, "dtype": a.dtype, "seconds": round(seconds, 4),
    "flops_loops_once": _flops(compiled),
    "thunk_ms": round(sum(per_op.values()), 1), "ms_by_kind": op_kinds(per_op),
    "top": [[name, round(ms, 1), *hlo.get(name, ("?", ""))] for name, ms in per_op.most_common(a.top)],
  }), flush=True)  # fmt: skip


if __name__ == "__main__":
  main()
