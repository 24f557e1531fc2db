"""Where one compiled meta-step's time goes, op by op: a `jax.profiler` trace of the benchmark's meta-step.

The meta-step of `benchmarks/meta_step.py` (the peer's shapes, tasks one after another unless ``--task_chunk`` says
otherwise, a fresh support batch per inner step) is compiled once and traced over ``--steps`` calls. One JSON line:
seconds per step, XLA's FLOP count of the compiled step (loop bodies counted once; the oneDNN custom calls, the
weight gradients on XLA:CPU, not counted), milliseconds per step by kind of XLA:CPU thunk
(`meta_parts.thunk_counts` and `op_kinds`: matmul fusions, i.e. XLA's dots and the library fusions holding one, the
oneDNN custom calls, transposing copies, other fusions; summed over the threads), and the ``--top`` costliest thunks
with their output shape and the JAX operation they came from. (Until session 16 every YNNPACK fusion counted as a
matmul; in float32 with the kernel most of them are reductions.)

  python benchmarks/profile_meta_step.py --order 1
  python benchmarks/profile_meta_step.py --order 1 --task_chunk 0    # tasks vmapped (0) instead of one at a time
  python benchmarks/profile_meta_step.py --order 2 --inner 1 --trace /tmp/meta_trace
  python benchmarks/profile_meta_step.py --order 2 --dtype bfloat16    # products in bfloat16 (mltd_jax.matmul)
  taskset -c 0 python benchmarks/profile_meta_step.py --order 2 --floor --bytes  # one core: products alone, bytes

``--floor`` adds ``products``: the step's products on the oneDNN kernel (`mltd_jax.onednn`; every float32 product on
XLA:CPU), how many ran per step, their GFLOP, their thunk time in the step, and the time the same products take
alone, one call per product shape timed by the profiler on fresh operands of that shape: ``alone_cold_ms`` with the
operands pushed out of the core's caches first (numpy writes 64 MiB between calls), as a product meets them in the
step, and ``alone_hot_ms`` on the operands of the call just before. Summed over the step's calls, these say how long
the products alone would take at the rates the kernel reaches by itself; ``rest_ms`` is the step's other thunks.
``--bytes`` adds ``rest_traffic``: the bytes those other thunks move per step (each run's output plus its operands,
read off the HLO; an estimate: a fusion that slices its operand counts a slice its output's size, and a thunk that
reads an operand twice counts it once), their thunk time, the rate that makes, and numpy's copy rate (read plus
write) on this core for working sets of 0.5 to 64 MiB: how near the non-product work runs to the memory's speed.
Thunk times are summed over threads: on one core (``taskset -c 0``) they add up to the step's time; on more, a
product's thunk time is its time on the calling thread, the pieces other threads take for it (`mltd_jax.onednn`)
unseen, so compare the products with their time alone on one core.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import tempfile
import time
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
  p.add_argument("--floor", action="store_true", help="time the step's kernel products alone too (``products``)")
  p.add_argument("--floor_calls", type=int, default=11, help="cold and hot calls per product shape with --floor")
  p.add_argument("--bytes", action="store_true", help="bytes the non-product thunks move per step (``rest_traffic``)")
  a = p.parse_args()

  import jax
  import numpy as np
  import optax
  from meta_parts import dot_fusions, hlo_instructions, op_kinds, time_calls  # this directory's scripts

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
  seconds, per_op, runs = time_calls(compiled, (state, batch, key), a.steps, trace)
  text = compiled.as_text()  # the step's HLO, read and parsed once (megabytes of text)
  instructions = list(hlo_instructions(text))
  hlo = {}  # instruction name -> (output shape, the JAX operation it came from)
  for i in instructions:
    origin = re.search(r'op_name="([^"]*)"', i.line)
    hlo[i.name] = (i.type, origin.group(1)[-100:] if origin else "")
  row = {
    "order": a.order, "inner": a.inner, "dtype": a.dtype, "seconds": round(seconds, 4),
    "flops_loops_once": _flops(compiled),
    "thunk_ms": round(sum(per_op.values()), 1), "ms_by_kind": op_kinds(per_op, dot_fusions(instructions)),
    "top": [[name, round(ms, 1), *hlo.get(name, ("?", ""))] for name, ms in per_op.most_common(a.top)],
  }  # fmt: skip
  products = kernel_products(text) if a.floor or a.bytes else {}
  if a.floor:
    row.update(floor(products, per_op, runs, a.floor_calls, a.top))
  if a.bytes:
    row["rest_traffic"] = rest_traffic(instructions, products, per_op, runs)
  print(json.dumps(row), flush=True)


def kernel_products(hlo_text: str) -> dict[str, tuple]:
  """The oneDNN custom calls of a compiled program: instruction name -> (shape of a, shape of c, transpose_a,
  transpose_b, operand dtype), read from each call's operand layout constraints and backend config."""
  from mltd_jax import onednn

  out = {}
  for line in hlo_text.splitlines():
    if f'custom_call_target="{onednn.TARGET}"' not in line:
      continue
    name = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
    operands = re.search(r"operand_layout_constraints=\{(\w+)\[([\d,]*)\](?:\{[\d,]*\})?, (\w+)\[([\d,]*)\]", line)
    flags = re.search(r"transpose_a = (true|false), transpose_b = (true|false)", line)
    if not (name and operands and flags):
      raise ValueError(f"a {onednn.TARGET} custom call this script cannot read (its HLO changed?): {line[:300]}")
    shape = lambda dims: tuple(int(d) for d in dims.split(",") if d)  # noqa: E731
    dtype = {"f32": "float32", "bf16": "bfloat16"}.get(operands.group(1))
    if dtype is None:
      raise ValueError(f"a {onednn.TARGET} custom call on {operands.group(1)} operands (float32 or bfloat16 expected)")
    out[name.group(1)] = (shape(operands.group(2)), shape(operands.group(4)), flags.group(1) == "true",
                          flags.group(2) == "true", dtype)  # fmt: skip
  return out


def product_flops(a_shape: tuple, c_shape: tuple, ta: bool, tb: bool) -> int:
  m, k = (a_shape[-1], a_shape[-2]) if ta else (a_shape[-2], a_shape[-1])
  return 2 * math.prod(a_shape[:-2]) * m * k * (c_shape[-2] if tb else c_shape[-1])


def alone_ms(a_shape: tuple, c_shape: tuple, ta: bool, tb: bool, dtype: str, calls: int) -> tuple[float, float]:
  """Median thunk milliseconds of one kernel product alone: right after numpy wrote 64 MiB (its operands out of the
  core's caches) and right after the same call (hot)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from meta_parts import thunk_events

  from mltd_jax import onednn

  rng = np.random.default_rng(0)
  a, c = (jnp.asarray(rng.standard_normal(s, np.float32), dtype) for s in (a_shape, c_shape))
  compiled = jax.jit(lambda a, c: onednn.product(a, c, transpose_a=ta, transpose_b=tb)).lower(a, c).compile()
  (name,) = kernel_products(compiled.as_text())
  jax.block_until_ready(compiled(a, c))
  evict = np.zeros(16 << 20, np.float32)  # 64 MiB
  with tempfile.TemporaryDirectory() as trace:
    with jax.profiler.trace(trace, create_perfetto_trace=True):
      for _ in range(calls):
        evict += 1.0
        jax.block_until_ready(compiled(a, c))
        jax.block_until_ready(compiled(a, c))
    runs = sorted((ts, ms) for n, ts, ms in thunk_events(Path(trace)) if n == name)
  if len(runs) != 2 * calls:
    raise SystemExit(f"the trace has {len(runs)} runs of {name}, not {2 * calls}: did the profiler drop events?")
  return statistics.median(ms for _, ms in runs[0::2]), statistics.median(ms for _, ms in runs[1::2])


def floor(products: dict[str, tuple], per_op, runs, calls: int, top: int) -> dict:
  """``products`` (see the module docstring) and ``products_top``: the ``top`` product shapes by time alone (cold);
  ``products`` in: the step's `kernel_products`."""
  from mltd_jax import onednn

  if not onednn.available():
    return {"products": None}
  by_shape: dict[tuple, list] = {}  # (a, c, ta, tb, dtype) -> [runs per step, in-step ms per step]
  for name, key in products.items():
    entry = by_shape.setdefault(key, [0.0, 0.0])
    entry[0] += runs.get(name, 0)
    entry[1] += per_op.get(name, 0.0)
  rows = []
  for key, (n, in_step) in by_shape.items():
    if n:
      cold, hot = alone_ms(*key, calls)
      rows.append({"a": key[0], "c": key[1], "transpose_a": key[2], "transpose_b": key[3], "dtype": key[4],
                   "runs": round(n, 1), "in_step_ms": in_step, "alone_cold_ms": n * cold, "alone_hot_ms": n * hot,
                   "gflop": n * product_flops(*key[:4]) / 1e9})  # fmt: skip
  keys = ("runs", "gflop", "in_step_ms", "alone_cold_ms", "alone_hot_ms")
  total = {k: float(f"{sum(r[k] for r in rows):.6g}") for k in keys}
  total["rest_ms"] = round(sum(per_op.values()) - total["in_step_ms"], 1)
  rows.sort(key=lambda r: -r["alone_cold_ms"])
  rnd = lambda r: {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in r.items()}  # noqa: E731
  return {"products": dict(shapes=len(rows), **total), "products_top": [rnd(r) for r in rows[:top]]}


_BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
          "s8": 1, "u8": 1, "pred": 1, "token": 0}


def _type_bytes(hlo_type: str) -> int:
  """Bytes of an HLO result type: ``f32[508,256]{1,0}``, a tuple of such, or a scalar ``f32[]``."""
  total = 0
  for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", hlo_type):
    if dtype not in _BYTES:
      raise ValueError(f"an HLO element type this script cannot size: {dtype!r} in {hlo_type[:200]!r}")
    total += _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def hlo_bytes(hlo) -> dict[str, int]:
  """Instruction name -> bytes its run moves: its output plus its distinct operands (every instruction of a compiled
  program: its HLO text or `meta_parts.hlo_instructions` list). A fusion whose computation slices (slice,
  dynamic-slice, gather) counts its output's size for its reads instead, since it reads part of an operand."""
  from meta_parts import parsed

  instructions = parsed(hlo)
  sizes = {i.name: _type_bytes(i.type) for i in instructions}
  slicing = {i.computation for i in instructions if i.op in ("slice", "dynamic-slice", "gather") and i.computation}
  out = {}
  for i in instructions:
    reads = sizes[i.name] if i.calls in slicing else sum(sizes.get(x, 0) for x in dict.fromkeys(i.operands))
    out[i.name] = sizes[i.name] + reads
  return out


def copy_rates(sizes_mib=(0.5, 2, 8, 64)) -> dict[str, float]:
  """numpy's copy rate on this thread, GB/s counting the read and the write, for working sets of ``sizes_mib``."""
  import numpy as np

  rates = {}
  for mib in sizes_mib:
    src = np.ones(int(mib * 2**20) // 4, np.float32)
    dst = np.empty_like(src)
    reps = max(5, int(512 / mib))
    np.copyto(dst, src)
    t0 = time.perf_counter()
    for _ in range(reps):
      np.copyto(dst, src)
    rates[f"{mib:g}MiB"] = round(2 * src.nbytes * reps / (time.perf_counter() - t0) / 1e9, 1)
  return rates


def rest_traffic(instructions: list, products: dict[str, tuple], per_op, runs) -> dict:
  """``rest_traffic`` (see the module docstring): the thunks other than the oneDNN products (the step's
  `kernel_products`) and the loops' own; ``instructions``: the step's `meta_parts.hlo_instructions`."""
  sizes = hlo_bytes(instructions)
  names = [n for n in per_op if n in sizes and n not in products and not n.startswith(("while", "conditional", "call"))]
  gb = sum(runs.get(n, 0) * sizes[n] for n in names) / 1e9
  ms = sum(per_op[n] for n in names)
  return {"gb": round(gb, 3), "ms": round(ms, 1), "gb_per_s": round(gb / (ms / 1e3), 1) if ms else None,
          "copy_gb_per_s": copy_rates()}  # fmt: skip


if __name__ == "__main__":
  main()
