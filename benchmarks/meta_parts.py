"""Where the meta-step's time goes: each part of an exact second-order SGD inner step, timed and FLOP-counted alone.

At the peer's shapes (GPT-2 4 layers, d 256, vocab 4096, rank-8 bilinear TARP, 4 tasks x 4 shots x 128 tokens),
one JSON line per part with its seconds per call, XLA's FLOP count and GFLOP/s:
  * ``forward``: the support loss;  ``grad_fast``: its gradient w.r.t. the difference (one inner step's work);
  * ``grad_full``: w.r.t. every variable (the query pass);  ``hvp``: one forward-over-reverse Hessian-vector
    product (the hand-derived backward of one inner step, `mltd_jax.meta.sgd_adapt`);
  * ``hvp_rev``: the same product by reverse-over-reverse (`jax.grad` of <grad, v>);
  * ``fwdbwd``: a plain forward+backward over the same tokens as one task batch (no task axis).
Each part runs over the tasks vmapped (``--tasks_as vmap``) or one task after another (``map``).

  python benchmarks/meta_parts.py
  python benchmarks/meta_parts.py --tasks_as map
  python benchmarks/meta_parts.py --parts grad_fast hvp --profile /tmp/parts_trace   # + time by kind of XLA op

``--profile DIR`` records a `jax.profiler` trace of each part's timed calls (``DIR/<part>``, Perfetto JSON next to
the XSpace file) and adds ``profile_ms``: milliseconds per call by kind of XLA:CPU thunk (matmul fusions,
transposing copy fusions, other fusions), summed over the threads of both cores.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def op_kinds(trace_dir: Path, calls: int) -> dict[str, float]:
  """Milliseconds per call by kind of XLA:CPU thunk in the Perfetto trace under ``trace_dir`` (``calls`` calls)."""
  (path,) = sorted(trace_dir.glob("**/perfetto_trace.json.gz"))[-1:]
  events = json.load(gzip.open(path))
  events = events["traceEvents"] if isinstance(events, dict) else events
  kinds: collections.Counter = collections.Counter()
  for e in events:
    name = e.get("name", "")
    if e.get("ph") != "X" or name.startswith(("ThunkExecutor", "$", "SlinkyThreadPool", "Common", "PjitFunction")):
      continue
    if name.startswith(("ynn_fusion", "xnn_fusion", "dot")):
      kinds["matmuls"] += e.get("dur", 0)
    elif name.startswith("copy") or "transpose" in name:
      kinds["transposing copies"] += e.get("dur", 0)
    elif "fusion" in name or name.startswith("wrapped"):
      kinds["other fusions"] += e.get("dur", 0)
  return {k: round(v / 1000 / calls, 1) for k, v in kinds.most_common()}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  for k, v in dict(layers=4, d=256, heads=4, vocab=4096, seq=128, tasks=4, shots=4, rank=8, steps=5).items():
    p.add_argument(f"--{k}", type=int, default=v)
  p.add_argument("--tarp", default="bilinear")
  p.add_argument("--tasks_as", default="vmap", choices=("vmap", "map"))
  p.add_argument("--parts", nargs="*", default=["forward", "grad_fast", "grad_full", "hvp", "hvp_rev", "fwdbwd"])
  p.add_argument("--profile", type=Path, default=None, help="directory for jax.profiler traces (one per part)")
  a = p.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np
  from meta_step import _model  # benchmarks/meta_step.py (this script's directory): the same model

  from mltd_jax import meta
  from mltd_jax.models import gpt2

  model, variables, _ = _model(argparse.Namespace(**vars(a), dtype="float32", tams=False))
  variables["tarp"] = jax.tree.map(lambda x: x + 0.01, variables["tarp"])  # V != 0: every term of the products is live
  fast, slow = meta.split(variables, "^tarp/")
  loss_fn = gpt2.make_loss(model)
  key = jax.random.key(0)
  rng = np.random.default_rng(0)
  ids = rng.integers(0, a.vocab, (a.tasks, a.shots, a.seq)).astype(np.int32)
  batch = {"ids": jnp.asarray(ids), "mask": jnp.ones(ids.shape, jnp.int32)}

  loss = lambda s, f, b: meta.mean_loss(loss_fn(meta.merge(s, f), b, key))  # noqa: E731
  full = lambda s, f, b: jax.grad(loss, argnums=(0, 1))(s, f, b)  # noqa: E731

  def hvp(s, f, b):  # (H_sf v, H_ff v) with v = f (any direction of the difference's shape)
    return jax.jvp(lambda f_: full(s, f_, b), (f,), (f,))[1]

  def hvp_rev(s, f, b):
    inner = lambda s_, f_: sum(
      jnp.vdot(g, v) for g, v in zip(jax.tree.leaves(jax.grad(loss, 1)(s_, f_, b)), jax.tree.leaves(f))
    )  # noqa: E731,E501
    return jax.grad(inner, argnums=(0, 1))(s, f)

  per_task = {
    "forward": loss,
    "grad_fast": lambda s, f, b: jax.grad(loss, 1)(s, f, b),
    "grad_full": full,
    "hvp": hvp,
    "hvp_rev": hvp_rev,
  }
  for name in a.parts:
    if name == "fwdbwd":
      fn = jax.jit(lambda s, f, b: jax.grad(lambda s_: loss(s_, f, jax.tree.map(lambda x: x.reshape(-1, a.seq), b)))(s))
    elif a.tasks_as == "vmap":
      fn = jax.jit(jax.vmap(per_task[name], in_axes=(None, None, 0)))
    else:
      fn = jax.jit(lambda s, f, b, g=per_task[name]: jax.lax.map(lambda x: g(s, f, x), b))
    t0 = time.perf_counter()
    compiled = fn.lower(slow, fast, batch).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(slow, fast, batch))
    times = []
    for _ in range(a.steps):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(slow, fast, batch))
      times.append(time.perf_counter() - t0)
    med = sorted(times)[len(times) // 2]
    extra = {}
    if a.profile:
      with jax.profiler.trace(str(a.profile / name), create_perfetto_trace=True):
        for _ in range(a.steps):
          jax.block_until_ready(compiled(slow, fast, batch))
      extra["profile_ms"] = op_kinds(a.profile / name, a.steps)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost["flops"])
    print(json.dumps({
      "part": name, "tasks_as": a.tasks_as if name != "fwdbwd" else "one batch", "seconds": round(med, 4),
      "gflop": round(flops / 1e9, 2), "gflop_per_s": round(flops / med / 1e9, 1), "compile_s": round(compile_s, 2),
      "tokens": int(ids.size), **extra,
    }), flush=True)  # fmt: skip


if __name__ == "__main__":
  main()
