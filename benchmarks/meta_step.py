"""Benchmark of the MLtD meta-step against its practical limits and the PyTorch peer: one JSON line per setting.

Modes (``--mode``, several per call):
  * ``meta``: the outer step (second or first order, ``--backward`` auto|hvp|autodiff, remat, ``--devices``), on the
    peer's meta-batch: support [tasks, T_in, shots, seq] (a fresh batch per inner step) and query [tasks, shots, seq];
  * ``fwdbwd``: a plain forward+backward+Adam step over the same tokens (the rate a meta-step is compared with: its
    line's ``of_fwdbwd``, when both ran in the same call);
  * ``adapt``: one TARP adaptation step against one full fine-tuning step (SGD) on one task batch, the two timed
    in turn (``tarp_speedup``: the median over ``--pairs`` pairs, default 21, of full / TARP seconds, and its range;
    the FLOPs of each, ``flops_per_step`` and ``full_flops_per_step``). Each step returns only what it adapted.
``--peer`` runs ../shared/bench/torch_meta_ref.py (``--peer_script``) with the same flags (order layers d heads
vocab seq tasks shots inner rank steps, and ``--threads``) and adds its line (``peer``) and the ratios ours / peer
(``vs_peer``: tokens/s and peak memory) to each meta line. The peer computes in float32; with ``--dtype bfloat16``
it runs under ``torch.autocast(dtype=torch.bfloat16)`` (its products bfloat16 with float32 accumulation, like ours,
`mltd_jax.matmul`) unless ``--peer_dtype float32`` says otherwise; its line records its ``dtype``. ``--tarp
dynamic`` and ``--tams`` measure those variants.
``--rounds R`` repeats all of it R times in turn and ends with one ``summary_of_rounds`` line per setting (median,
min, max of each figure and ratio): on a shared machine the speed drifts by 15% or more between minutes, so a ratio
from one round can mislead. Within a round each order's peer runs just before ours in even rounds (0, 2, ...) and
just after in odd ones, so that over an even number of rounds a drift within a round favours neither side.

Other programs: every line gets ``others`` (`Load`), the cores that other processes kept busy on average (our CPUs'
busy time in /proc/stat less the measured process's own CPU time, per second of wall time) and the hypervisor's
steal, and the span's ``seconds``: ours over its timed steps, the peer's over its whole process (its script is not
ours to instrument: imports and warm-up dilute load during its timed steps, so its figure is a lower bound); above
0.1 core over a second or more a warning is printed. The peer is fragile there: its OpenMP threads spin while
they wait, so one busy core elsewhere can slow it 40x while ours barely moves, and a ratio from such a minute says
nothing. Run alone.

Host memory: the processes measured here, ours and the peer's alike, start with glibc's huge-page tunable
(``--hugepages 1``, the default: ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, replacing a hugetlb value of the caller's,
`mltd_jax.hostmem`) or without it (``--hugepages 0``); each of our lines records whether its process got them
(``hugepages``, with the kernel's mode in ``thp``), a summary line the value its rounds agree on. XLA:CPU maps each
call's temporary buffer afresh, so without huge pages a first-order meta-step pays ~107,000 page faults.

Each setting runs in a fresh subprocess so that its peak memory is its own:
  * ``peak_rss_mb``: the process's peak resident memory (CPU), or ``peak_device_mb``: the largest peak bytes in
    use over the devices of the mesh (GPU/TPU);
  * ``xla_temp_mb``: XLA's own count of the step's temporary buffers per device (activations, residuals), the
    memory that second-order differentiation adds to, excluding parameters and optimizer state (``xla_args_mb``).
tokens/s counts every support and query token of the meta-batch, like the peer, whose defaults these mirror
(layers 4, d 256, heads 4, vocab 4096, seq 128, 4 tasks x 4 shots, rank 8, T_in 4). ``flops_per_step`` is XLA's
cost analysis of the lowered (not yet optimized) step, of every device together: a meta-step is counted on an
unrolled twin (`InnerLoop.unroll`, tasks vmapped), since XLA counts a loop body once; remat's recomputation is
included. On an accelerator ``mfu`` is that count per second against the device's peak for ``--dtype`` (the
compiled GPU program's own count misses its cuBLAS matmuls: 18.5 against 274 GFLOP for the default fwd+bwd).
Nor does it count custom calls, so every count is taken on a step traced afresh with `mltd_jax.onednn` off: the weight
gradients the kernel computes on XLA:CPU are counted as the XLA dots they replace (the same arithmetic). Where XLA
gives no count (jax 0.11.2 on an accelerator: a lowered program's cost analysis is None there), the same traced step's
products are counted from its jaxpr (``flops_source`` "jaxpr products", else "xla"; elementwise work uncounted).

``--devices 1 2 4`` (or ``1,2,4``) runs the meta-batch's tasks sharded over the first N devices (a ``tasks`` mesh
axis, `mltd_jax.sharding`, as training does). On CPU the devices are fake
(``--xla_force_host_platform_device_count``, added for the child processes when missing) and share the same
cores: the figures then show the partitioning overhead, not a speedup (the ``note`` field says so).

  python benchmarks/meta_step.py --mode fwdbwd adapt meta --inner 4 --order 2 1 --peer --rounds 3   # issue #11
  python benchmarks/meta_step.py --inner 1 4 16 --order 2 --remat 1 0 --backward autodiff
  python benchmarks/meta_step.py --inner 4 --order 2 --devices 1 2 4
  python benchmarks/meta_step.py --mode meta --order 2 --peer --rounds 3 --standins all   # free nonlinearities

``--standins all`` (or names among layer_norm, gelu, attention_softmax, token_loss; ``--mode meta`` only, without
``--tams``) measures ours with GPT-2's nonlinearities replaced by linear stand-ins of the same shapes (`standins`;
the peer keeps its own): what nearly free nonlinearities would give, everything else as it is, against the peer in
the same run. The meta-step is traced without and with them first and stops unless the products are the same
(``standins.check`` in the line), and the timed step's own trace must call every stand-in; the updates are not the
model's, and the FLOP count (XLA's, elementwise work included) is the stand-in step's.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: `python benchmarks/meta_step.py`

from mltd_jax import hostmem  # noqa: E402  (no jax at import)
import standins  # noqa: E402  this directory's (no jax at import)

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
  pairs=21,  # --mode adapt: paired calls (full, TARP) per round; a median of 5 moved by +-5% on the 2-core VM
  tarp="bilinear",
  task_chunk=-1,  # as config.meta.task_chunk (0 = all vmapped); -1: `_task_chunk`'s choice (one at a time)
  support_chunks=1,
  dtype="float32",
  standins="",  # "" none; "all" or names of `standins.PARTS`: GPT-2's nonlinearities as linear stand-ins
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
MODES = ("meta", "fwdbwd", "adapt")
CPU_NOTE = (
  "fake CPU devices (--xla_force_host_platform_device_count) share the same cores: more devices show the "
  "partitioning overhead, not a speedup"
)


def _flops(program) -> float | None:
  """FLOPs of one call of a lowered program (all devices together) or a compiled one (per device), from XLA's cost
  analysis: a loop body is counted once, and a compiled GPU program's cuBLAS calls not at all (lower instead)."""
  cost = program.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]) if cost and cost.get("flops") else None


def _product_flops(eqn) -> float:
  """2 M N K (times the batch) of one product equation: XLA's dot_general or `mltd_jax.matmul`'s primitives."""
  name = eqn.primitive.name
  if name == "dot_general":
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    k, batch = math.prod(lhs[i] for i in lc), math.prod(lhs[i] for i in lb)
    m = math.prod(d for i, d in enumerate(lhs) if i not in lc and i not in lb)
    n = math.prod(d for i, d in enumerate(rhs) if i not in rc and i not in rb)
    return 2.0 * batch * m * n * k
  out = math.prod(eqn.outvars[0].aval.shape)  # the primitives below: result elements times their contraction
  if name == "lowp_matmul":  # x [*b, M, K]
    return 2.0 * out * eqn.invars[0].aval.shape[-1]
  if name == "tn_matmul":  # a [*b, K, M]
    return 2.0 * out * eqn.invars[0].aval.shape[-2]
  if name == "sum_of_two_products":  # a1 [*b, N, r1], a2 [*b, N, r2]
    return 2.0 * out * (eqn.invars[0].aval.shape[-1] + eqn.invars[2].aval.shape[-1])
  return 0.0


def subjaxprs(value) -> Iterator:
  """The jaxprs an equation's parameter value holds (a jaxpr, closed or open, or tuples and lists of them), open."""
  from jax.extend import core

  if isinstance(value, (core.ClosedJaxpr, core.Jaxpr)):
    yield value.jaxpr if isinstance(value, core.ClosedJaxpr) else value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from subjaxprs(v)


def jaxpr_product_flops(jaxpr) -> float:
  """FLOPs of the matrix products of a (closed) jaxpr once its dead code is removed (as lowering does: e.g. a
  custom VJP's weight gradient where only the difference is differentiated): every product equation's 2 M N K, a
  scan body's times its length, the costliest branch of a cond, a while body once; the fallback count where XLA
  gives none (`_count`). Elementwise work is not counted, so it is below XLA's count of the same program (84% for a
  tiny meta-step, more of it at real sizes)."""
  from jax._src.interpreters import partial_eval as pe  # dce_jaxpr: JAX's own dead-code pass, not public API
  from jax.extend import core

  def count(jx) -> float:
    total = 0.0
    for eqn in jx.eqns:
      total += _product_flops(eqn)
      if eqn.primitive.name == "cond":
        total += max(count(b) for b in subjaxprs(eqn.params["branches"]))
        continue
      inner = sum(count(sub) for value in eqn.params.values() for sub in subjaxprs(value))
      total += inner * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
    return total

  jaxpr = jaxpr.jaxpr if isinstance(jaxpr, core.ClosedJaxpr) else jaxpr
  live, _ = pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
  return count(live)


def _count(fn: Callable, *args) -> tuple[float | None, str]:
  """(FLOPs, what counted them) of ``fn(*args)`` traced afresh (its own jit: no trace shared with the timed step)
  with the oneDNN kernel off, since XLA's cost analysis has no count for a custom call: the kernel's products count
  as XLA's dots. Where XLA gives no count (jax 0.11.2 on an accelerator: a lowered program's cost analysis is None
  for every platform), the products of the same traced program counted from its jaxpr (`jaxpr_product_flops`)."""
  import jax

  from mltd_jax import onednn

  with onednn.disabled():
    traced = jax.jit(lambda *xs: fn(*xs)).trace(*args)
    lowered = traced.lower()
  if onednn.TARGET in lowered.as_text():  # e.g. a closure over a function traced with the kernel on
    raise RuntimeError("meta_step._count: the program to count still calls the oneDNN kernel; trace its inputs too "
                       "with the kernel off (onednn.disabled())")
  flops = _flops(lowered)
  if flops is not None:
    return flops, "xla"
  return jaxpr_product_flops(traced.jaxpr), "jaxpr products"


def lacks_kernel(compiled, dtype: str) -> bool:
  """Whether the compiled step has no oneDNN call although the kernel is available here for ``dtype`` (float32 and
  bfloat16 weight gradients): e.g. a trace shared with one made with the kernel off."""
  from mltd_jax import onednn

  return onednn.available() and dtype in ("float32", "bfloat16") and onednn.TARGET not in compiled.as_text()


def _peak_mb(devices) -> tuple[str, float]:
  """("peak_device_mb", the largest peak over ``devices``) on accelerators, else ("peak_rss_mb", process peak)."""
  stats = [d.memory_stats() for d in devices] if devices[0].platform != "cpu" else []
  if stats and all(stats):
    return "peak_device_mb", max(st["peak_bytes_in_use"] for st in stats) / 2**20
  return "peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _model(a: argparse.Namespace):
  """The benchmark's GPT-2 (the peer's: dropout off) and its parameters, TARP difference and TAMS cells."""
  import jax
  import jax.numpy as jnp

  from mltd_jax import models, tams, tarp
  from mltd_jax.models import gpt2

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
  params = jax.jit(model.init_params)(jax.random.key(0))
  tcfg = tarp.TarpConfig(kind=a.tarp, rank=a.rank, targets=gpt2.DEFAULT_TARGETS)
  variables = {"params": params, "tarp": tarp.init(jax.random.key(1), params, tcfg, models.dense_paths(model))}
  cells = None
  if a.tams:  # the paper's cell (768 -> 64 is d / 12; at least 8 wide), one architecture shared by all blocks
    cells = tams.TamsConfig(enabled=True, width=max(8, a.d // 12), anneal_steps=1000)
    model = tams.attach(model, cells)
    variables["tams"] = tams.init(jax.random.key(2), model, cells)
  return model, variables, cells


def lm_batch(rng, vocab: int, *shape: int) -> dict:
  """Random token ids over ``vocab`` with an all-ones mask, each of ``shape`` (numpy; drawn from ``rng``)."""
  import numpy as np

  return {"ids": rng.integers(0, vocab, shape).astype(np.int32), "mask": np.ones(shape, np.int32)}


def meta_batch(rng, a: argparse.Namespace) -> dict:
  """One meta-batch at ``a``'s shapes: a fresh support batch per inner step [tasks, inner, shots, seq] and the query
  [tasks, shots, seq]."""
  return {"support": lm_batch(rng, a.vocab, a.tasks, a.inner, a.shots, a.seq),
          "query": lm_batch(rng, a.vocab, a.tasks, a.shots, a.seq)}  # fmt: skip


def _run(step, state, batch_fn: Callable[[], Any], key, steps: int) -> tuple[float, float, Any, Any]:
  """Compile ``step(state, batch, key) -> (state, metrics)``, warm it up, then time ``steps`` calls, threading the
  state. Returns (median seconds per call, compile seconds, the compiled step, the last metrics, other programs'
  load during the timed calls: `Load`)."""
  import jax

  from mltd_jax import train

  t0 = time.perf_counter()
  compiled = train.compile_step(step, state, batch_fn(), key)  # as train.run_phase does: the compiler's memory freed
  compile_s = time.perf_counter() - t0
  state, m = compiled(state, batch_fn(), key)  # warm-up
  jax.block_until_ready((state, m))
  times, load = [], Load()
  for _ in range(steps):
    batch = batch_fn()
    t0 = time.perf_counter()
    state, m = compiled(state, batch, key)
    jax.block_until_ready((state, m))
    times.append(time.perf_counter() - t0)
  return statistics.median(times), compile_s, compiled, m, load.others()


def _alternate(steps: dict[str, Any], variables, batch_fn: Callable[[], Any], key, pairs: int) -> dict[str, tuple]:
  """Compile and warm up each of ``steps`` (name -> jitted ``fn(variables, batch, key)``), then time them in turn
  (A B, then B A, ...) ``pairs`` times, one fresh batch each time, so that the machine's drifts in speed (large on a
  shared 2-core VM) reach every step alike. Returns name -> (seconds of each call, compile seconds, the compiled
  step, other programs' load during the timed calls: `Load`)."""
  import jax

  from mltd_jax import train

  compiled, compile_s, times = {}, {}, {name: [] for name in steps}
  for name, step in steps.items():
    t0 = time.perf_counter()
    compiled[name] = train.compile_step(step, variables, batch_fn(), key)
    compile_s[name] = time.perf_counter() - t0
    jax.block_until_ready(compiled[name](variables, batch_fn(), key))  # warm-up
  load = Load()
  for r in range(pairs):
    batch = batch_fn()
    for name, c in list(compiled.items())[:: 1 if r % 2 == 0 else -1]:  # A B, B A, ...: no side always goes first
      t0 = time.perf_counter()
      jax.block_until_ready(c(variables, batch, key))
      times[name].append(time.perf_counter() - t0)
  others = load.others()
  return {name: (times[name], compile_s[name], compiled[name], others) for name in steps}


def _task_chunk(a: argparse.Namespace) -> int:
  """``--task_chunk``, or with -1 the measured better choice at the peer's shapes on CPU: one task at a time, for
  both orders and dtypes (two or four at once slower, and larger; the second order's peak under the peer's). In-process
  A/Bs since each chunk's gradient is taken inside the task loop (`meta.meta_value_and_grad`, session 13; lines in
  experiments/results/session13_cpu.jsonl): bfloat16 first order, one at a time against all vmapped 1.04x
  [1.02-1.07], two at a time 1.03x; bfloat16 second order, two at a time 0.89x and all vmapped 0.87x against one at a
  time. Session 12 (size_one_axes_ab_cpu.jsonl): float32 first order one at a time 1.09x [1.06-1.14] against
  vmapped, float32 second order vmapped 0.87x."""
  if a.task_chunk >= 0:
    return a.task_chunk
  return 1


def _adapt_step(loss_fn, regex: str, lr: float):
  """One SGD adaptation step of `mltd_jax.meta.adapt` on the variables matching ``regex``: a full fine-tuning
  (``^params/``) or a TARP adaptation (``^tarp/``) step, as meta-testing takes them. It returns the variables it
  adapted (flat, `meta.split`), not the frozen ones: a jitted function that hands back an argument it did not donate
  copies it into a fresh buffer, which for a TARP step would be every frozen weight of the model (17 MB at the
  peer's shapes: 2.8% of the step, in 30 in-process pairs of session 24) and for a full step only the difference."""
  from mltd_jax import meta

  inner = meta.InnerLoop(steps=1, lr=lr, fast_regex=regex)
  def step(variables, batch, key):
    adapted, _ = meta.adapt(loss_fn, variables, batch, inner, key)
    return meta.split(adapted, regex)[0], {}

  return step


def _inner_loop(a: argparse.Namespace, cells) -> Any:
  """The meta-step's inner loop at ``a``'s settings (SGD, a fresh support batch per inner step, as the peer)."""
  from mltd_jax import meta, tams

  return meta.InnerLoop(
    steps=a.inner,
    lr=0.05,
    first_order=a.order == 1,
    remat=bool(a.remat),
    support_chunks=a.support_chunks,
    fast_regex="^tarp/" + ("|" + tams.FAST_REGEX if cells else ""),
    per_step_support=True,  # a fresh support batch at every inner step, as the peer
    backward=a.backward,
  )


def _prepare(cells) -> Callable | None:
  """TAMS's per-task prepare for the benchmark's GPT-2 (its controller reads the task), or None without cells."""
  from mltd_jax import tams
  from mltd_jax.models import gpt2

  return tams.make_prepare(cells, gpt2.FAMILY.embedding, gpt2.FAMILY.task_tokens) if cells else None


def _meta_step_fn(a: argparse.Namespace, model, cells, tx) -> Callable:
  """The meta-step at ``a``'s settings, a new function with a loss of its own on every call (JAX reuses the trace
  of a function object it traced before: the stand-ins' check and the timed step each trace their own)."""
  from mltd_jax import meta
  from mltd_jax.models import gpt2

  inner, chunk = _inner_loop(a, cells), _task_chunk(a)
  return meta.make_meta_step(gpt2.make_loss(model), tx, inner, chunk, _prepare(cells), task_groups=a.devices)


def run_one(a: argparse.Namespace) -> dict:
  """One setting's row; with ``--standins`` measured on the model with those nonlinearities replaced (`standins`:
  the meta-step is first traced without and with them and checked to have the same products)."""
  import jax

  parts = standins.parse(a.standins) if a.standins else ()
  model, variables, cells = _model(a)
  checked = None
  if parts and a.mode == "meta":
    import numpy as np
    import optax

    from mltd_jax.state import TrainState

    tx = optax.adam(1e-4)
    args = (TrainState.create(variables, tx), meta_batch(np.random.default_rng(0), a), jax.random.key(0))
    plain = jax.make_jaxpr(_meta_step_fn(a, model, cells, tx))(*args)
    with standins.linear(parts) as calls:
      checked = standins.check(plain, jax.make_jaxpr(_meta_step_fn(a, model, cells, tx))(*args), parts, calls)
  with standins.linear(parts) as calls:
    row = _measure(a, model, variables, cells, calls)
  if [part for part in parts if not calls[part]]:
    raise SystemExit(f"--standins {a.standins}: the timed step's trace did not call every stand-in ({dict(calls)})")
  if parts:
    row["standins"] = {"parts": list(parts), **({"check": checked} if checked else {})}
  return row


def _measure(a: argparse.Namespace, model, variables, cells, calls=None) -> dict:
  """The row of ``a``'s setting; ``calls`` (a Counter of `standins.linear`'s, or None) is emptied just before the
  timed step is traced, so that afterwards it counts that trace's stand-in calls alone."""
  import jax
  import numpy as np
  import optax

  from mltd_jax import meta, sharding, train
  from mltd_jax.models import gpt2
  from mltd_jax.state import TrainState

  available = jax.devices()
  if a.devices > len(available):
    raise SystemExit(f"--devices {a.devices}: only {len(available)} {available[0].platform} devices here.")
  loss_fn = gpt2.make_loss(model)
  rng = np.random.default_rng(0)
  lm = lambda *s: lm_batch(rng, a.vocab, *s)  # noqa: E731
  key = jax.random.key(0)
  tokens = a.tasks * (a.inner + 1) * a.shots * a.seq
  row: dict[str, Any] = {"impl": "mltd_jax", "mode": a.mode}
  if a.mode == "meta":
    mesh = sharding.make_mesh(dict(sharding.DEFAULT, tasks=a.devices), available[: a.devices])
    tx = optax.adam(1e-4)
    state = TrainState.create(variables, tx)
    batch = lambda: meta_batch(rng, a)  # noqa: E731
    shardings = sharding.phase_shardings(mesh, state, batch(), "tasks", "--tasks")  # tasks split over the devices
    a.task_chunk = _task_chunk(a)
    step = train.jit_step(_meta_step_fn(a, model, cells, tx), shardings)
    # FLOPs: an unrolled twin, tasks vmapped, one support slice (the same arithmetic, no loop for XLA to count once)
    unrolled = dataclasses.replace(_inner_loop(a, cells), unroll=True, support_chunks=1)
    twin = meta.make_meta_step(loss_fn, tx, unrolled, 0, _prepare(cells))
    flops, flops_source = _count(twin, state, batch(), key)
    state = sharding.put_global(state, shardings.state)
    if calls is not None:
      calls.clear()  # the twin's trace called them too; `_run` traces the timed step
    med, compile_s, compiled, m, others = _run(
      step, state, lambda: sharding.put_local(batch(), shardings.batch), key, a.steps
    )
    row.update(order=a.order, remat=bool(a.remat), backward=a.backward, inner=a.inner)
    row.update(loss=round(float(m["query_loss"]), 4), tasks_per_s=round(a.tasks / med, 2))
  elif a.mode == "fwdbwd":  # a plain training step (Adam on every parameter) over the meta-step's tokens
    tx = optax.adam(1e-4)
    step = jax.jit(meta.make_train_step(loss_fn, tx), donate_argnums=0)
    state = TrainState.create({"params": variables["params"]}, tx)
    n = a.tasks * (a.inner + 1) * a.shots
    flops, flops_source = _count(meta.make_train_step(loss_fn, tx), state, lm(n, a.seq), key)
    med, compile_s, compiled, m, others = _run(step, state, lambda: lm(n, a.seq), key, a.steps)
    row.update(inner=a.inner, loss=round(float(m["loss"]), 4))
  else:  # adapt: one TARP adaptation step against one full fine-tuning step, same model and batch
    tokens = a.tasks * a.shots * a.seq
    batch = lambda: lm(a.tasks * a.shots, a.seq)  # noqa: E731
    regexes = {"full": "^params/", "tarp": "^tarp/"}
    steps = {name: jax.jit(_adapt_step(loss_fn, regex, 1e-3)) for name, regex in regexes.items()}
    flops, flops_source = _count(_adapt_step(loss_fn, regexes["tarp"], 1e-3), variables, batch(), key)
    timed = _alternate(steps, variables, batch, key, a.pairs)
    (full, _, _, others), (ours, compile_s, compiled, _) = timed["full"], timed["tarp"]
    med, full_s = statistics.median(ours), statistics.median(full)
    ratios = sorted(f / t for f, t in zip(full, ours))  # per pair: drifts cancel within a pair
    full_flops = _count(_adapt_step(loss_fn, regexes["full"], 1e-3), variables, batch(), key)[0]
    row.update(full_step_s=round(full_s, 4), full_tokens_per_s=round(tokens / full_s, 1))
    row.update(full_flops_per_step=full_flops)
    row.update(tarp_speedup=round(statistics.median(ratios), 3), pairs=len(ratios))
    row.update(tarp_speedup_range=[round(ratios[0], 3), round(ratios[-1], 3)])
  if lacks_kernel(compiled, a.dtype):
    raise SystemExit(f"--mode {a.mode}: the timed step has no oneDNN call although the kernel is available here")
  mem = compiled.memory_analysis()
  dev = available[0]
  peak_name, peak = _peak_mb(available[: a.devices])
  peak_tflops = PEAK_TFLOPS.get(dev.device_kind, {}).get(a.dtype)
  row.update({
    "kind": a.tarp, "tams": bool(a.tams), "task_chunk": a.task_chunk if a.mode == "meta" else None,
    "support_chunks": a.support_chunks,
    "layers": a.layers, "d": a.d, "heads": a.heads, "vocab": a.vocab, "seq": a.seq, "tasks": a.tasks,
    "shots": a.shots, "rank": a.rank, "dtype": a.dtype, "devices": a.devices,
    "median_step_s": round(med, 4), "tokens_per_s": round(tokens / med, 1), "compile_s": round(compile_s, 2),
    peak_name: round(peak, 1),
    "xla_temp_mb": round(mem.temp_size_in_bytes / 2**20, 1) if mem else None,
    "xla_args_mb": round(mem.argument_size_in_bytes / 2**20, 1) if mem else None,
    "flops_per_step": flops, "flops_source": flops_source, "device": dev.device_kind,
    "hugepages": hostmem.hugepages(), "thp": hostmem.transparent_hugepages(), "others": others,
    "cpu": cpu_name() if dev.platform == "cpu" else None,
  })  # fmt: skip
  if dev.platform == "cpu":
    row["gflops_per_s"] = round(flops / med / 1e9, 1) if flops else None
    if a.devices > 1:
      row["note"] = CPU_NOTE
  elif flops and peak_tflops:
    row["mfu"] = round(flops / med / (a.devices * peak_tflops * 1e12), 4)
  return row


def _device_counts(values: list[str]) -> list[int]:
  """``["1,2", "4"]`` -> [1, 2, 4]."""
  return [int(v) for value in values for v in value.split(",") if v]


PEER_FLAGS = ("order", "layers", "d", "heads", "vocab", "seq", "tasks", "shots", "inner", "rank", "steps")


# Runs the peer's script (argv[2:]) under torch.autocast to the dtype argv[1] names: its products (mm, addmm, bmm,
# linear) in that dtype with float32 accumulation, the rest in float32, the parameters float32. Without autocast's
# cache of the parameters' casts: one context around the whole script would keep the first step's bfloat16 copies
# of parameters that the optimizer then updates in place (a user enters autocast per step, which recasts them).
AUTOCAST = (
  "import runpy, sys, torch; dtype = getattr(torch, sys.argv[1]); sys.argv = sys.argv[2:]\n"
  "with torch.autocast('cpu', dtype=dtype, cache_enabled=False):\n  runpy.run_path(sys.argv[0], run_name='__main__')"
)


BUSY_OTHERS = 0.1  # cores other programs may keep busy during a measurement before it is flagged


def cpu_name(path: str = "/proc/cpuinfo") -> str | None:
  """The CPU's vendor, model name, family and model as /proc/cpuinfo gives them ("AuthenticAMD AMD EPYC family 26
  model 2"), or None where it cannot be read: the ratios to the peer moved with the machine (session 24: a 2-core AMD
  EPYC in place of sessions 8-23's Xeon), so every line says which CPU it was measured on."""
  try:
    with open(path) as f:
      pairs = (line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
      fields = {k.strip(): v.strip() for k, v in pairs}  # "model name\t: AMD EPYC"
  except OSError:
    return None
  get = lambda k: fields.get(k, "")  # noqa: E731
  parts = [get("vendor_id"), get("model name")]
  parts += [f"family {get('cpu family')} model {get('model')}"] if get("cpu family") else []
  return " ".join(p for p in parts if p) or None


def cpu_seconds() -> tuple[float, float] | None:
  """(busy, steal) seconds since boot of the CPUs this process may run on (/proc/stat's ``cpuN`` lines for N in
  its affinity: a container's or a big host's other CPUs do not count; where those lines are not all there, the
  ``cpu`` line of every CPU together); None where there is no /proc/stat."""
  mine = {f"cpu{n}" for n in os.sched_getaffinity(0)}
  per_cpu: dict[str, tuple[int, int]] = {}
  try:
    with open("/proc/stat") as f:
      for line in f:
        name, *fields = line.split() or [""]
        if name == "cpu" or name in mine:
          v = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal (guest is in user)
          per_cpu[name] = (sum(v) - v[3] - v[4] - v[7], v[7])
  except (OSError, ValueError, IndexError):
    return None
  total = per_cpu.pop("cpu", None)
  if len(per_cpu) < len(mine):  # our CPUs not all listed (e.g. a virtualized /proc/stat): every CPU together
    if total is None:
      return None
    per_cpu = {"cpu": total}
  tick = os.sysconf("SC_CLK_TCK")
  return sum(b for b, _ in per_cpu.values()) / tick, sum(s for _, s in per_cpu.values()) / tick


class Load:
  """Other programs' load on our CPUs over a span (from creation to `others`): the cores they kept busy on average
  (the CPUs' busy time less the CPU time of this process, or of its waited-for child processes with ``children``)
  and the hypervisor's steal, per second of wall time."""

  def __init__(self, children: bool = False):
    self.who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    self.start = cpu_seconds(), self._own(), time.perf_counter()

  def _own(self) -> float:
    return sum(resource.getrusage(self.who)[:2])

  def others(self) -> dict | None:
    (before, own0, t0), after = self.start, cpu_seconds()
    wall = time.perf_counter() - t0
    if before is None or after is None or wall <= 0:
      return None
    busy = after[0] - before[0] - (self._own() - own0)
    steal = after[1] - before[1]
    return {"cores": round(busy / wall, 3), "steal_cores": round(steal / wall, 3), "seconds": round(wall, 2)}


def warn_if_busy(row: dict, what: str) -> dict:
  """Print a warning when ``row["others"]`` (`Load.others`) exceeds `BUSY_OTHERS` over a span of a second or more
  (/proc/stat counts in 10 ms ticks: shorter spans are noise); returns ``row``."""
  o = row.get("others") or {}
  if o.get("seconds", 0.0) >= 1.0 and max(o.get("cores", 0.0), o.get("steal_cores", 0.0)) > BUSY_OTHERS:
    print(f"meta_step.py: while {what} ran, other programs kept {o['cores']:.2f} cores busy (steal "
          f"{o['steal_cores']:.2f}): its figures are not to be trusted; run alone", file=sys.stderr)  # fmt: skip
  return row


def run_peer(a: argparse.Namespace, env: dict, inner: int, order: int) -> dict:
  """The PyTorch peer (``--peer_script``) with the same settings, in its own process (environment ``env``, as ours),
  under ``torch.autocast`` when its dtype (``--peer_dtype``, by default ``--dtype``) is not float32: its JSON line,
  with ``dtype`` and ``others`` (`Load`, over its whole process) added."""
  dtype = a.dtype if a.peer_dtype == "same" else a.peer_dtype
  values = {**{k: getattr(a, k) for k in PEER_FLAGS}, "inner": inner, "order": order}
  script = [str(a.peer_script), *[f"--{k}={v}" for k, v in values.items()], f"--threads={a.threads}"]
  cmd = [sys.executable, *(script if dtype == "float32" else ["-c", AUTOCAST, dtype, *script])]

  load = Load(children=True)  # the peer's whole process (its script is not ours to instrument)
  out = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if out.returncode or not out.stdout.strip():
    return {"error": out.stderr.strip().splitlines()[-1:] or [f"exit status {out.returncode}"], "dtype": dtype}
  row = {**json.loads(out.stdout.strip().splitlines()[-1]), "dtype": dtype, "others": load.others()}
  return warn_if_busy(row, f"the peer (order {order})")


def child(a: argparse.Namespace, env: dict, mode: str, inner: int, order: int, remat: int, n: int, backward: str):
  """One setting in a fresh process (its own peak memory): the JSON row (``others``: `Load` over its timed steps),
  or one with the error."""
  cmd = [sys.executable, __file__, "--child", *[f"--{k}={getattr(a, k)}" for k in FIELDS], *(["--tams"] * a.tams)]
  cmd += ["--mode", mode, "--inner", str(inner), "--order", str(order), "--remat", str(remat), "--devices", str(n)]
  cmd += ["--backward", backward]

  out = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if out.returncode == 0 and out.stdout.strip():
    return warn_if_busy(json.loads(out.stdout.strip().splitlines()[-1]), f"ours ({mode}, order {order})")
  setting = {"mode": mode, "inner": inner, "order": order, "remat": bool(remat), "devices": n, "backward": backward}
  return {**setting, "error": out.stderr.strip().splitlines()[-1:]}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  for k, v in FIELDS.items():
    p.add_argument(f"--{k}", type=type(v), default=v)
  p.add_argument("--mode", nargs="*", default=["meta"], choices=MODES, help="meta | fwdbwd | adapt (several: each)")
  p.add_argument("--inner", type=int, nargs="*", default=[4], help="T_in values")
  p.add_argument("--order", type=int, nargs="*", default=[2, 1], help="2 = exact second order, 1 = first order")
  p.add_argument("--remat", type=int, nargs="*", default=[1], help="1 = jax.checkpoint the inner step (autodiff)")
  p.add_argument("--backward", nargs="*", default=["auto"], help="InnerLoop.backward: auto | hvp | autodiff")
  p.add_argument("--devices", nargs="*", default=["1"], help="device counts (1 2 4 or 1,2,4): the first N devices")
  p.add_argument("--tams", action="store_true", help="GPT-2 with TAMS cells, the controller's prepare per task")
  p.add_argument("--peer", action="store_true", help="also run the PyTorch peer with the same settings; add ratios")
  p.add_argument("--peer_script", type=Path, default=ROOT.parent / "shared" / "bench" / "torch_meta_ref.py")
  peer_dtype_help = "the peer's compute dtype: same (as --dtype), float32, or bfloat16 (torch.autocast on CPU)"
  p.add_argument("--peer_dtype", default="same", choices=("same", "float32", "bfloat16"), help=peer_dtype_help)
  rounds_help = "repeat every setting (and the peer) R times in turn; end with its median and range per setting"
  p.add_argument("--rounds", type=int, default=1, help=rounds_help)
  p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="the peer's torch threads")
  hugepages_help = "1: start ours and the peer with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (mltd_jax.hostmem; it "
  hugepages_help += "replaces a hugetlb value of yours); 0: without any"
  p.add_argument("--hugepages", type=int, default=1, choices=(0, 1), help=hugepages_help)
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.dtype not in ("float32", "bfloat16"):  # the peer's autocast, the peak table and `_task_chunk` read the name
    raise SystemExit(f"--dtype: float32 or bfloat16, got {a.dtype!r}")
  devices = _device_counts(a.devices)
  if a.standins:
    standins.parse(a.standins)  # a wrong name stops here, not in each child
    if set(a.mode) != {"meta"}:
      raise SystemExit(f"--standins: with --mode meta only (got --mode {' '.join(a.mode)})")
    if a.tams:  # TAMS's cells and controller have nonlinearities of their own that no stand-in replaces
      raise SystemExit("--standins: GPT-2's own nonlinearities only; drop --tams (its cells' are not replaced)")
  if a.child:
    a.mode, a.inner, a.order, a.remat, a.devices, a.backward = (
      a.mode[0], a.inner[0], a.order[0], a.remat[0], devices[0], a.backward[0]
    )  # fmt: skip
    print(json.dumps(run_one(a)), flush=True)
    return
  if a.peer and not a.peer_script.exists():
    raise SystemExit(f"--peer: no peer script at {a.peer_script}; pass --peer_script PATH (torch_meta_ref.py).")
  env = hostmem.with_hugepages(os.environ, bool(a.hugepages))
  if "xla_force_host_platform_device_count" not in env.get("XLA_FLAGS", ""):  # CPU: fake devices (GPUs ignore it)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={max(devices)}".strip()
  for inner in a.inner:
    rounds: dict[tuple, list[dict]] = {}
    for r in range(a.rounds):
      tag = {"round": r} if a.rounds > 1 else {}
      fwdbwd = child(a, env, "fwdbwd", inner, 2, 0, 1, "auto") if "fwdbwd" in a.mode else None
      if fwdbwd:
        print(json.dumps({**fwdbwd, **tag}), flush=True)
      if "adapt" in a.mode:
        adapt = child(a, env, "adapt", inner, 2, 0, 1, "auto")
        rounds.setdefault(("adapt",), []).append(adapt)
        print(json.dumps({**adapt, **tag}), flush=True)
      if "meta" not in a.mode:
        continue
      for order in a.order:
        peer_first = r % 2 == 0  # alternate: the peer before ours in even rounds, after in odd ones
        peer = run_peer(a, env, inner, order) if a.peer and peer_first else None
        settings = list(itertools.product(a.remat, devices, a.backward))
        rows = [child(a, env, "meta", inner, order, *s) for s in settings]
        if a.peer and not peer_first:
          peer = run_peer(a, env, inner, order)
        for (remat, n, backward), row in zip(settings, rows):
          if fwdbwd and "tokens_per_s" in row and "tokens_per_s" in fwdbwd:
            row["of_fwdbwd"] = round(row["tokens_per_s"] / fwdbwd["tokens_per_s"], 3)  # share of the plain rate
          if peer is not None:
            row["peer"] = peer
            if "tokens_per_s" in row and "tokens_per_s" in peer:
              mine = row.get("peak_rss_mb", row.get("peak_device_mb"))
              row["vs_peer"] = {
                "tokens_per_s": round(row["tokens_per_s"] / peer["tokens_per_s"], 3),
                "peak_mb": round(mine / peer["peak_rss_mb"], 3) if mine and peer.get("peak_rss_mb") else None,
              }
          rounds.setdefault(("meta", order, remat, n, backward), []).append(row)
          print(json.dumps({**row, **tag}), flush=True)
    if a.rounds > 1:
      for setting, rows in rounds.items():
        print(json.dumps(summarize(setting, inner, rows)), flush=True)


def summarize(setting: tuple, inner: int, rows: list[dict]) -> dict:
  """One line for a setting measured over several ``--rounds``: the median and range of each ratio, round by round
  (ours and the peer, or the two adaptation steps, ran minutes apart at most)."""

  def stat(get) -> dict | None:
    values = sorted(v for v in map(get, rows) if v is not None)
    return {"median": statistics.median(values), "min": values[0], "max": values[-1]} if values else None

  out: dict[str, Any] = {"summary_of_rounds": len(rows), "mode": setting[0], "inner": inner}
  if setting[0] == "adapt":
    out["tarp_speedup"] = stat(lambda r: r.get("tarp_speedup"))
  else:
    out.update(zip(("order", "remat", "devices", "backward"), setting[1:]))
    out["of_fwdbwd"] = stat(lambda r: r.get("of_fwdbwd"))
    out["vs_peer_tokens_per_s"] = stat(lambda r: r.get("vs_peer", {}).get("tokens_per_s"))
    out["vs_peer_peak_mb"] = stat(lambda r: r.get("vs_peer", {}).get("peak_mb"))
    out["peer_tokens_per_s"] = stat(lambda r: r.get("peer", {}).get("tokens_per_s"))
  out["tokens_per_s"] = stat(lambda r: r.get("tokens_per_s"))

  def agreed(get) -> Any:  # a setting every round shares (None where they differ)
    values = {v for v in map(get, rows) if v is not None}
    return values.pop() if len(values) == 1 else None

  out["hugepages"] = agreed(lambda r: r.get("hugepages"))
  out["standins"] = agreed(lambda r: ",".join(r["standins"]["parts"]) if "standins" in r else None)
  out["dtype"] = agreed(lambda r: r.get("dtype"))
  out["cpu"] = agreed(lambda r: r.get("cpu"))
  if setting[0] == "meta":
    out["peer_dtype"] = agreed(lambda r: r.get("peer", {}).get("dtype"))
  out["peak_rss_mb"] = stat(lambda r: r.get("peak_rss_mb", r.get("peak_device_mb")))
  others = lambda r: (r.get("others") or {}).get("cores")  # noqa: E731
  busy = [v for r in rows for v in (others(r), others(r.get("peer") or {})) if v is not None]
  out["others_cores_max"] = max(busy) if busy else None  # the busiest minute's other programs, ours or the peer's
  return out


if __name__ == "__main__":
  main()
