"""Benchmark of the MLtD meta-step: one JSON line per setting (tokens/s, tasks/s, compile seconds, peak memory).

Settings: second vs first order, remat on/off, T_in in {1, 4, 16} (``--inner``), device count (``--devices``), on
a GPT-2 whose size is given on the command line. Each setting runs in a fresh subprocess so that its peak memory
is its own:
  * ``peak_rss_mb``: the process's peak resident memory (CPU), or ``peak_device_mb``: the largest peak bytes in
    use over the devices of the mesh (GPU/TPU);
  * ``xla_temp_mb``: XLA's own count of the step's temporary buffers per device (activations, residuals), the
    memory that second-order differentiation adds to, excluding parameters and optimizer state (``xla_args_mb``).
tokens/s counts every support and query token of the meta-batch, like ../shared/bench/torch_meta_ref.py, whose
defaults these mirror (layers 4, d 256, heads 4, vocab 4096, seq 128, 4 tasks x 4 shots, rank 8).

``--devices 1 2 4`` (or ``1,2,4``) runs the meta-batch's tasks sharded over the first N devices (a ``tasks`` mesh
axis, `mltd_jax.sharding`, as training does). On CPU the devices are fake
(``--xla_force_host_platform_device_count``, added for the child processes when missing) and share the same
cores: the figures then show the partitioning overhead, not a speedup (the ``note`` field says so). On an
accelerator each line also has ``flops_per_step`` (XLA's cost analysis of the compiled step, summed over the
devices: the second-order pass's real FLOPs) and ``mfu``, model FLOPs utilization against the device's peak for
``--dtype`` (`PEAK_TFLOPS`).

  python benchmarks/meta_step.py                          # the full grid
  python benchmarks/meta_step.py --inner 16 --order 2 --remat 1   # one setting
  python benchmarks/meta_step.py --inner 4 --order 2 --remat 1 --devices 1 2 4
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
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
  dtype="float32",
)
# Dense peak TFLOP/s per device by device_kind and compute dtype (float32 matmuls run as TF32 on these GPUs).
PEAK_TFLOPS = {
  "NVIDIA H100 80GB HBM3": {"bfloat16": 989.4, "float32": 494.7},
  "NVIDIA H200": {"bfloat16": 989.4, "float32": 494.7},
  "NVIDIA A100-SXM4-80GB": {"bfloat16": 312.0, "float32": 156.0},
  "NVIDIA A100-SXM4-40GB": {"bfloat16": 312.0, "float32": 156.0},
  "TPU v4": {"bfloat16": 275.0, "float32": 275.0},
  "TPU v5 lite": {"bfloat16": 197.0, "float32": 197.0},
}
CPU_NOTE = (
  "fake CPU devices (--xla_force_host_platform_device_count) share the same cores: more devices show the "
  "partitioning overhead, not a speedup"
)


def _flops(compiled) -> float | None:
  """FLOPs of one call of a compiled (per-device) program, from XLA's cost analysis."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]) if cost and cost.get("flops") else None


def _peak_mb(devices) -> tuple[str, float]:
  """("peak_device_mb", the largest peak over ``devices``) on accelerators, else ("peak_rss_mb", process peak)."""
  stats = [d.memory_stats() for d in devices] if devices[0].platform != "cpu" else []
  if stats and all(stats):
    return "peak_device_mb", max(st["peak_bytes_in_use"] for st in stats) / 2**20
  return "peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(a: argparse.Namespace) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from mltd_jax import meta, models, sharding, tarp, train
  from mltd_jax.models import gpt2
  from mltd_jax.state import TrainState

  available = jax.devices()
  if a.devices > len(available):
    raise SystemExit(f"--devices {a.devices}: only {len(available)} {available[0].platform} devices here.")
  mesh = sharding.make_mesh(dict(sharding.DEFAULT, tasks=a.devices), available[: a.devices])
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
  model = gpt2.GPT2LMHeadModel(cfg, dtype=jnp.dtype(a.dtype))
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
  rng = np.random.default_rng(0)

  def batch():
    ids = lambda *s: rng.integers(0, a.vocab, s).astype(np.int32)  # noqa: E731
    return {
      "support": {"ids": ids(a.tasks, a.shots, a.seq), "mask": np.ones((a.tasks, a.shots, a.seq), np.int32)},
      "query": {"ids": ids(a.tasks, a.shots, a.seq), "mask": np.ones((a.tasks, a.shots, a.seq), np.int32)},
    }

  b = batch()
  shardings = sharding.phase_shardings(mesh, state, b, "tasks", "--tasks")  # tasks split over the devices
  step_fn = meta.make_meta_step(gpt2.make_loss(model), tx, inner, task_chunk=a.task_chunk, task_groups=a.devices)
  step = train.jit_step(step_fn, shardings)
  state = sharding.put_global(state, shardings.state)
  put = lambda b: sharding.put_local(b, shardings.batch)  # noqa: E731
  key = jax.random.key(0)
  t0 = time.perf_counter()
  compiled = step.lower(state, put(b), key).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  state, m = compiled(state, put(b), key)  # warm-up
  jax.block_until_ready(m)
  times = []
  for _ in range(a.steps):
    b = put(batch())
    t0 = time.perf_counter()
    state, m = compiled(state, b, key)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  med = sorted(times)[len(times) // 2]
  tokens = a.tasks * (a.inner + 1) * a.shots * a.seq
  dev = available[0]
  peak_name, peak = _peak_mb(available[: a.devices])
  flops = _flops(compiled)
  flops = flops * a.devices if flops else None  # the per-device program, on every device
  peak_tflops = PEAK_TFLOPS.get(dev.device_kind, {}).get(a.dtype)
  row = {
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
    "dtype": a.dtype,
    "devices": a.devices,
    "median_step_s": round(med, 4),
    "tokens_per_s": round(tokens / med, 1),
    "tasks_per_s": round(a.tasks / med, 2),
    "compile_s": round(compile_s, 2),
    peak_name: round(peak, 1),
    "xla_temp_mb": round(mem.temp_size_in_bytes / 2**20, 1) if mem else None,
    "xla_args_mb": round(mem.argument_size_in_bytes / 2**20, 1) if mem else None,
    "flops_per_step": flops,
    "device": dev.device_kind,
    "loss": round(float(m["query_loss"]), 4),
  }
  if dev.platform == "cpu":
    row["note"] = CPU_NOTE
  elif flops and peak_tflops:
    row["mfu"] = round(flops / med / (a.devices * peak_tflops * 1e12), 4)
  return row


def _device_counts(values: list[str]) -> list[int]:
  """``["1,2", "4"]`` -> [1, 2, 4]."""
  return [int(v) for value in values for v in value.split(",") if v]


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  for k, v in FIELDS.items():
    p.add_argument(f"--{k}", type=type(v), default=v)
  p.add_argument("--inner", type=int, nargs="*", default=[1, 4, 16], help="T_in values")
  p.add_argument("--order", type=int, nargs="*", default=[2, 1], help="2 = exact second order, 1 = first order")
  p.add_argument("--remat", type=int, nargs="*", default=[1, 0], help="1 = jax.checkpoint the inner step")
  p.add_argument("--devices", nargs="*", default=["1"], help="device counts (1 2 4 or 1,2,4): the first N devices")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  a = p.parse_args()
  devices = _device_counts(a.devices)
  if a.child:
    a.inner, a.order, a.remat, a.devices = a.inner[0], a.order[0], a.remat[0], devices[0]
    print(json.dumps(run_one(a)), flush=True)
    return
  env = dict(os.environ)
  if "xla_force_host_platform_device_count" not in env.get("XLA_FLAGS", ""):  # CPU: fake devices (GPUs ignore it)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={max(devices)}".strip()
  common = [f"--{k}={getattr(a, k)}" for k in FIELDS]
  for inner, order, remat, n in itertools.product(a.inner, a.order, a.remat, devices):
    cmd = [sys.executable, __file__, "--child", *common]
    cmd += ["--inner", str(inner), "--order", str(order), "--remat", str(remat), "--devices", str(n)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else None
    error = {"inner": inner, "order": order, "remat": bool(remat), "devices": n}
    print(line or json.dumps({**error, "error": out.stderr.strip().splitlines()[-1:]}), flush=True)


if __name__ == "__main__":
  main()
