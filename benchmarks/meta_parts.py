"""Where the meta-step's time goes: each part of an exact second-order SGD inner step, timed and FLOP-counted alone.

At the peer's shapes (GPT-2 4 layers, d 256, vocab 4096, rank-8 bilinear TARP, 4 tasks x 4 shots x 128 tokens),
one JSON line per part with its seconds per call, XLA's FLOP count and GFLOP/s (the count of the lowered program
with the tasks vmapped, whatever ``--tasks_as``: XLA counts a loop body once; with `mltd_jax.onednn` off, so that its
products count as the XLA dots they replace):
  * ``forward``: the support loss;  ``grad_fast``: its gradient w.r.t. the difference (one inner step's work);
  * ``grad_full``: w.r.t. every variable (the query pass);  ``hvp``: one forward-over-reverse Hessian-vector
    product (the hand-derived backward of one inner step, `mltd_jax.meta.sgd_adapt`);
  * ``hvp_rev``: the same product by reverse-over-reverse (`jax.grad` of <grad, v>);
  * ``linearize``: one inner step's gradient w.r.t. the difference computed by `jax.linearize` of the full gradient
    under `jax.checkpoint` with ``dots_saveable`` (`mltd_jax.models.layers.remat_policy`'s, which also keeps the
    TARP layers' and the narrow products' outputs), returning the linearization's residuals (every product's output
    the HVP needs), and ``hvp_saved``: the HVP from those residuals (its tangent pass only, no primal recomputed):
    the split a backward that keeps each inner step's products would make of ``grad_fast`` + ``hvp`` (its line's
    ``max_abs_diff_vs_hvp`` compares the two products);
  * ``fwdbwd``: a plain forward+backward over the same tokens as one task batch (no task axis).
Each part runs over the tasks vmapped (``--tasks_as vmap``) or one task after another (``map``).

  python benchmarks/meta_parts.py
  python benchmarks/meta_parts.py --tasks_as map   # as the meta-step runs its tasks (one at a time)
  python benchmarks/meta_parts.py --tasks_as map --dtype bfloat16
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
import re
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def thunk_events(trace_dir: Path) -> list[tuple[str, float, float]]:
  """(name, start µs, milliseconds) of every XLA:CPU thunk (by HLO instruction name) in the Perfetto trace under
  ``trace_dir``, in the trace's order, without the executor's and Python's own events."""
  paths = sorted(trace_dir.glob("**/perfetto_trace.json.gz"))
  if not paths:
    raise SystemExit(f"no perfetto_trace.json.gz under {trace_dir}: did jax.profiler write the trace?")
  events = json.load(gzip.open(paths[-1]))
  events = events["traceEvents"] if isinstance(events, dict) else events
  skip = ("ThunkExecutor", "$", "SlinkyThreadPool", "Common", "Pjit")
  return [
    (e["name"], e.get("ts", 0), e.get("dur", 0) / 1000)
    for e in events
    if e.get("ph") == "X" and not e.get("name", "").startswith(skip)
  ]


def thunk_counts(trace_dir: Path, calls: int) -> tuple[collections.Counter, collections.Counter]:
  """Per call of ``calls``, each XLA:CPU thunk's milliseconds and how many times it ran (a loop body's thunks once per
  iteration), by HLO instruction name, from one read of the trace under ``trace_dir`` (`thunk_events`)."""
  per_op: collections.Counter = collections.Counter()
  runs: collections.Counter = collections.Counter()
  for name, _, ms in thunk_events(trace_dir):
    per_op[name] += ms / calls
    runs[name] += 1 / calls
  return per_op, runs


class Instruction(NamedTuple):
  """One instruction of a compiled program's HLO text."""

  computation: str | None  # the computation it belongs to
  name: str
  type: str  # its result type: ``f32[508,256]{1,0}`` or a tuple of such
  op: str
  operands: list[str]  # operand names
  calls: str | None  # the computation it calls (a fusion's), or None
  line: str


def hlo_instructions(hlo_text: str) -> Iterator[Instruction]:
  """Every instruction of a compiled program's HLO text, in order."""
  computation = None
  for line in hlo_text.splitlines():
    head = re.match(r"%?([\w.\-]+) .*\{$", line)
    if head and not line.startswith(" "):
      computation = head.group(1)
      continue
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\(.*?\)|\S+) ([\w\-]+)\((.*?)\)", line)
    if m:
      calls = re.search(r"calls=%?([\w.\-]+)", line)
      name, hlo_type, op, args = m.groups()
      operands = re.findall(r"%([\w.\-]+)", args)
      yield Instruction(computation, name, hlo_type, op, operands, calls.group(1) if calls else None, line)


def parsed(hlo: str | list[Instruction]) -> list[Instruction]:
  """A compiled program's instructions from its HLO text, or the list `hlo_instructions` already gave (a caller that
  reads the program several ways parses its megabytes of text once)."""
  return list(hlo_instructions(hlo) if isinstance(hlo, str) else hlo)  # a generator read once, not emptied twice


def dot_fusions(hlo: str | list[Instruction]) -> set[str]:
  """Names of the fusions in a compiled program (HLO text, or its `hlo_instructions`) whose fused computation holds a
  ``dot``: of XLA:CPU's library fusions (YNNPACK's, XNNPACK's) these are products, the others reductions or
  elementwise work."""
  instructions = parsed(hlo)
  with_dot = {i.computation for i in instructions if i.op == "dot"}
  return {i.name for i in instructions if i.op == "fusion" and i.calls in with_dot}


def op_kinds(per_op: collections.Counter, dots: set[str] | None = None) -> dict[str, float]:
  """`thunk_counts`' milliseconds summed by kind of thunk: matmul fusions, custom calls (`mltd_jax.onednn`'s products),
  transposing copies, other fusions. With ``dots`` (`dot_fusions` of the program) a library fusion counts as a matmul
  only if it holds a product (in float32 with the kernel, YNNPACK's fusions are mostly reductions); without, every
  library fusion does."""
  kinds: collections.Counter = collections.Counter()
  for name, ms in per_op.items():
    library = name.startswith(("ynn_fusion", "xnn_fusion"))
    if name.startswith("dot") or (library and (dots is None or name in dots)):
      kinds["matmuls"] += ms
    elif name.startswith(("ffi_call", "custom-call", "custom_call")):
      kinds["custom calls (oneDNN)"] += ms
    elif name.startswith("copy") or "transpose" in name:
      kinds["transposing copies"] += ms
    elif "fusion" in name or name.startswith("wrapped"):
      kinds["other fusions"] += ms
  return {k: round(v, 1) for k, v in kinds.most_common()}


def time_calls(compiled, args: tuple, steps: int, trace_dir: Path | None = None):
  """(median seconds of ``steps`` calls of ``compiled(*args)`` after a warm-up call, and with ``trace_dir`` each
  thunk's milliseconds and runs per call (`thunk_counts`) over ``steps`` more calls under `jax.profiler`, else None
  and None)."""
  import jax

  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  median = statistics.median(times)
  if trace_dir is None:
    return median, None, None
  with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
    for _ in range(steps):
      jax.block_until_ready(compiled(*args))
  return (median, *thunk_counts(trace_dir, steps))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  for k, v in dict(layers=4, d=256, heads=4, vocab=4096, seq=128, tasks=4, shots=4, rank=8, steps=5).items():
    p.add_argument(f"--{k}", type=int, default=v)
  p.add_argument("--tarp", default="bilinear")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="the model's compute dtype")
  p.add_argument("--tasks_as", default="vmap", choices=("vmap", "map"))
  parts = ["forward", "grad_fast", "grad_full", "hvp", "hvp_rev", "linearize", "hvp_saved", "fwdbwd"]
  p.add_argument("--parts", nargs="*", default=parts, choices=parts)
  p.add_argument("--profile", type=Path, default=None, help="directory for jax.profiler traces (one per part)")
  a = p.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np
  from meta_step import _count, _model  # benchmarks/meta_step.py (this script's directory): the same model

  from mltd_jax import meta, onednn
  from mltd_jax.models import gpt2, layers

  model, variables, _ = _model(argparse.Namespace(**vars(a), tams=False))
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

  def linearize(s, f, b):  # (the fast gradient, the linearization of the full gradient: a jax Partial of residuals)
    saved = jax.checkpoint(lambda f_: full(s, f_, b), policy=layers.remat_policy("dots_saveable"))
    (_, g), lin = jax.linearize(saved, f)
    return g, lin

  per_task = {
    "forward": loss,
    "grad_fast": lambda s, f, b: jax.grad(loss, 1)(s, f, b),
    "grad_full": full,
    "hvp": hvp,
    "hvp_rev": hvp_rev,
    "linearize": linearize,
    "hvp_saved": lambda s, f, lin: lin(f),  # ``lin``: `linearize`'s residuals of one task (in place of the batch)
  }
  vmapped = {name: jax.vmap(g, in_axes=(None, None, 0)) for name, g in per_task.items()}

  def fwdbwd(s, f, b):  # the tasks' sequences as one batch, every slow variable's gradient
    return jax.grad(lambda s_: loss(s_, f, jax.tree.map(lambda x: x.reshape(-1, a.seq), b)))(s)

  lins, lins_off, check = None, None, {}
  if "hvp_saved" in a.parts:  # its input, and its check: the same product as ``hvp``
    lins = jax.jit(vmapped["linearize"])(slow, fast, batch)[1]
    with onednn.disabled():  # for its FLOP count: the linearization holds the products' kernels as traced
      lins_off = jax.jit(lambda *xs: vmapped["linearize"](*xs))(slow, fast, batch)[1]
    products = jax.jit(vmapped["hvp"])(slow, fast, batch), jax.jit(vmapped["hvp_saved"])(slow, fast, lins)
    pairs = zip(*map(jax.tree.leaves, products))
    check = {"max_abs_diff_vs_hvp": max(float(jnp.max(jnp.abs(x - y))) for x, y in pairs)}
  for name in a.parts:
    if name == "fwdbwd":
      fn = jax.jit(fwdbwd)
    elif a.tasks_as == "vmap":
      fn = jax.jit(vmapped[name])
    else:
      fn = jax.jit(lambda s, f, b, g=per_task[name]: jax.lax.map(lambda x: g(s, f, x), b))
    data = lins if name == "hvp_saved" else batch
    t0 = time.perf_counter()
    compiled = fn.lower(slow, fast, data).compile()
    compile_s = time.perf_counter() - t0
    trace = a.profile / name if a.profile else None
    med, per_op, _ = time_calls(compiled, (slow, fast, data), a.steps, trace)
    extra = {"profile_ms": op_kinds(per_op, dot_fusions(compiled.as_text()))} if per_op is not None else {}
    # counted on the vmapped twin (the same arithmetic): XLA counts a loop body once, so lax.map's is one task's
    counted = fwdbwd if name == "fwdbwd" else vmapped[name]
    flops, _ = _count(counted, slow, fast, lins_off if name == "hvp_saved" else data)
    print(json.dumps({
      "part": name, "tasks_as": a.tasks_as if name != "fwdbwd" else "one batch", "seconds": round(med, 4),
      "gflop": float(f"{flops / 1e9:.5g}"), "gflop_per_s": round(flops / med / 1e9, 1),
      "compile_s": round(compile_s, 2), "tokens": int(ids.size), "dtype": a.dtype,
      **(check if name == "hvp_saved" else {}), **extra,
    }), flush=True)  # fmt: skip


if __name__ == "__main__":
  main()
