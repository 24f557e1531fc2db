"""Benchmark of the MLtD meta-step: one JSON line per setting (tokens/s, compile seconds, peak memory).

Settings: second vs first order, remat on/off, T_in in {1, 4, 16} (``--inner``), on a GPT-2 whose size is given on
the command line. Each setting runs in a fresh subprocess so that its peak memory is its own:
  * ``peak_rss_mb``: the process's peak resident memory (CPU), or the device's peak bytes in use (GPU/TPU);
  * ``xla_temp_mb``: XLA's own count of the step's temporary buffers (activations, residuals), the memory that
    second-order differentiation adds to, excluding parameters and optimizer state (``xla_args_mb``).
tokens/s counts every support and query token of the meta-batch, like ../shared/bench/torch_meta_ref.py, whose
defaults these mirror (layers 4, d 256, heads 4, vocab 4096, seq 128, 4 tasks x 4 shots, rank 8).

  python benchmarks/meta_step.py                          # the full grid
  python benchmarks/meta_step.py --inner 16 --order 2 --remat 1   # one setting
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: `python benchmarks/meta_step.py`

FIELDS = dict(
  layers=4,
  d=256,
  heads=4,
  vocab=4096,
  seq=128,
  tasks=4,
  shots=4,
  rank=8,
  steps=5,
  kind="bilinear",
  task_chunk=0,
  support_chunks=1,
)


def run_one(a: argparse.Namespace) -> dict:
  import jax
  import numpy as np
  import optax

  from mltd_jax import meta, models, tarp
  from mltd_jax.models import gpt2
  from mltd_jax.state import TrainState

  cfg = gpt2.GPT2Config(
    vocab_size=a.vocab,
    n_positions=a.seq,
    n_embd=a.d,
    n_layer=a.layers,
    n_head=a.heads,
    embd_pdrop=0.0,
    resid_pdrop=0.0,
    attn_pdrop=0.0,
  )
  model = gpt2.GPT2LMHeadModel(cfg)
  params = model.init_params(jax.random.key(0))
  tcfg = tarp.TarpConfig(kind=a.kind, rank=a.rank, targets=gpt2.DEFAULT_TARGETS)
  diff = tarp.init(jax.random.key(1), params, tcfg, models.dense_paths(model))
  tx = optax.adam(1e-4)
  state = TrainState.create({"params": params, "tarp": diff}, tx)
  inner = meta.InnerLoop(
    steps=a.inner,
    lr=0.05,
    first_order=a.order == 1,
    remat=bool(a.remat),
    support_chunks=a.support_chunks,
    fast_regex="^tarp/",
  )
  step = jax.jit(meta.make_meta_step(gpt2.make_loss(model), tx, inner, task_chunk=a.task_chunk), donate_argnums=0)
  rng = np.random.default_rng(0)

  def batch():
    ids = lambda *s: rng.integers(0, a.vocab, s).astype(np.int32)  # noqa: E731
    return {
      "support": {"ids": ids(a.tasks, a.shots, a.seq), "mask": np.ones((a.tasks, a.shots, a.seq), np.int32)},
      "query": {"ids": ids(a.tasks, a.shots, a.seq), "mask": np.ones((a.tasks, a.shots, a.seq), np.int32)},
    }

  b = batch()
  key = jax.random.key(0)
  t0 = time.perf_counter()
  compiled = step.lower(state, b, key).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  state, m = step(state, b, key)  # warm-up
  jax.block_until_ready(m)
  times = []
  for _ in range(a.steps):
    b = batch()
    t0 = time.perf_counter()
    state, m = step(state, b, key)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  med = sorted(times)[len(times) // 2]
  tokens = a.tasks * (a.inner + 1) * a.shots * a.seq
  dev = jax.devices()[0]
  stats = dev.memory_stats() if dev.platform != "cpu" else None
  peak = stats["peak_bytes_in_use"] / 2**20 if stats else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return {
    "impl": "mltd_jax",
    "order": a.order,
    "remat": bool(a.remat),
    "inner": a.inner,
    "kind": a.kind,
    "task_chunk": a.task_chunk,
    "support_chunks": a.support_chunks,
    "layers": a.layers,
    "d": a.d,
    "seq": a.seq,
    "tasks": a.tasks,
    "shots": a.shots,
    "rank": a.rank,
    "median_step_s": round(med, 4),
    "tokens_per_s": round(tokens / med, 1),
    "compile_s": round(compile_s, 2),
    "peak_rss_mb" if not stats else "peak_device_mb": round(peak, 1),
    "xla_temp_mb": round(mem.temp_size_in_bytes / 2**20, 1) if mem else None,
    "xla_args_mb": round(mem.argument_size_in_bytes / 2**20, 1) if mem else None,
    "device": dev.device_kind,
    "loss": round(float(m["query_loss"]), 4),
  }


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  for k, v in FIELDS.items():
    p.add_argument(f"--{k}", type=type(v), default=v)
  p.add_argument("--inner", type=int, nargs="*", default=[1, 4, 16], help="T_in values")
  p.add_argument("--order", type=int, nargs="*", default=[2, 1], help="2 = exact second order, 1 = first order")
  p.add_argument("--remat", type=int, nargs="*", default=[1, 0], help="1 = jax.checkpoint the inner step")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.child:
    a.inner, a.order, a.remat = a.inner[0], a.order[0], a.remat[0]
    print(json.dumps(run_one(a)), flush=True)
    return
  common = [f"--{k}={getattr(a, k)}" for k in FIELDS]
  for inner, order, remat in itertools.product(a.inner, a.order, a.remat):
    cmd = [
      sys.executable,
      __file__,
      "--child",
      *common,
      "--inner",
      str(inner),
      "--order",
      str(order),
      "--remat",
      str(remat),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else None
    print(
      line
      or json.dumps(
        {"inner": inner, "order": order, "remat": bool(remat), "error": out.stderr.strip().splitlines()[-1:]}
      ),
      flush=True,
    )


if __name__ == "__main__":
  main()
