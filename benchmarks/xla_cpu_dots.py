"""The meta-step's matrix products on XLA:CPU one at a time: how fast, and through which kernel (issue #11's limit).

Parts, each one JSON line per shape, calls of the implementations in turn (the machine's speed drifts between
minutes, so only same-minute ratios are read), medians over ``--calls``:

* ``matmul``: the dense products of the peer's model at its shapes, [tokens, d_in] @ [d_in, d_out] for the attention
  and MLP kernels, and the tied LM head x @ E^T (E [vocab, d]) with its input gradient, as XLA compiles them
  (``kernel``: YNNPACK or Eigen), against torch's (its CPU build's BLAS) and numpy's in the same process.
* ``transposed``: a product contracting both operands over their leading (token) axis, x^T g: every weight gradient
  x^T dY and the difference's thin x^T (dY V) and dY^T (x U). XLA:CPU hands YNNPACK only dots whose operands are
  laid out as it expects (xla/backends/cpu/ynn_support.cc, ``IsDotSupportedByYnn``: the left operand contracting
  over its minor axis, neither operand column-major) and runs the others through Eigen; it does not transpose an
  operand to make such a dot YNNPACK's. Timed as JAX emits it (``as_emitted``) and written with explicit
  transposes, (g^T x)^T, compiled with XLA's transpose folding and algebraic simplifier off for that one program
  (``transposes_kept``: otherwise XLA folds the transposes back into the dot), with torch's x.T @ g beside them.

* ``bfloat16`` (not by default): the same products with bfloat16 operands, as `mltd_jax.matmul` computes them on
  XLA:CPU (float32 accumulation) and as a plain bfloat16 dot, beside float32 and torch's (issue #11, session 10).

* ``onednn`` (not by default): the weight-gradient form x^T g, dense and thin, at all tokens and at one task's, as
  `mltd_jax.matmul.tn_matmul` computes it through the oneDNN custom call (`mltd_jax.onednn`, bfloat16 and float32
  operands) and without it (XLA's float32 dot of the widened operands: Eigen), beside torch's (issue #11, session 11).

* ``reduce`` (not by default): the attention softmax backward's reduction, sum(P * dP) over the keys of [heads x
  shots, query, key] arrays, with 0, 1 and 2 leading axes of size 1 in front (what a vmap over a batch of one, or
  over one group, adds), through YNNPACK (XLA:CPU's default for a reduction at these shapes) and through XLA's own
  loops (compiled with ``xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT``: YNNPACK for
  dots only), beside torch's; milliseconds (issue #11, session 12: YNNPACK's reductions slow down several-fold
  behind axes of size 1).

* ``ceiling`` (not by default): the float32 rate the oneDNN kernel reaches on its best shapes, x [tokens, k] @ w
  [k, n] in the forward form at the step's dense shapes (one task's 508 tokens and four tasks' 2,032) and at two
  large ones (2,048^3; 4,096 x 1,024 x 1,024), beside torch's float32 matmul: GFLOP/s of the fastest call and of the
  median (``cpus``: the cores the process may use), and the kernel's largest difference from torch's result. Under
  ``taskset -c 0`` it is one core's float32 ceiling as this project reaches it, the yardstick of the README's limit
  (issue #11, session 19). On more than one core torch's OpenMP threads spin for a while after each of its calls
  and slow the kernel's next one: read the best calls there, or time the kernel alone.

``--threads`` sets torch's threads; XLA and numpy use the machine's cores (2 on the project's CPU machines).

  python benchmarks/xla_cpu_dots.py --calls 100      # the peer's shapes: 2,032 tokens, d 256, vocab 4096, rank 8
  python benchmarks/xla_cpu_dots.py --part transposed --calls 200
  python benchmarks/xla_cpu_dots.py --part bfloat16 --calls 60   # bfloat16 operands: AMX through YNNPACK, or not
  python benchmarks/xla_cpu_dots.py --part onednn --calls 60     # x^T g through the oneDNN custom call, or XLA
  python benchmarks/xla_cpu_dots.py --part reduce --calls 100    # a reduction behind axes of size 1, or not
  taskset -c 0 python benchmarks/xla_cpu_dots.py --part ceiling --calls 100 --threads 1   # one core's float32 ceiling
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere (mltd_jax, --part onednn)

# The compile options under which explicit transposes stay transposes (XLA folds them into the dot otherwise).
KEEP_TRANSPOSES = {"xla_disable_hlo_passes": "transpose-folding,algsimp"}
# The compile options under which XLA:CPU gives YNNPACK dots only (its default: dots and reductions).
NO_YNN_REDUCE = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def kernels(compiled) -> list[str]:
  """The matmul kernels of a compiled program's entry computation: 'ynnpack' per YNNPACK fusion, 'eigen' per plain
  dot thunk (a dot XLA:CPU did not give YNNPACK). Dots inside loops or other fusions are not seen (the one-product
  programs here have none)."""
  text = compiled.as_text()
  entry = text[text.index("\nENTRY ") :]
  entry = entry[: entry.index("\n}")]
  out = []
  for line in entry.splitlines():
    if "__ynn_fusion" in line:
      out.append("ynnpack")
    elif " dot(" in line:
      out.append("eigen")
  return out


def call_times(fns: dict, calls: int) -> dict[str, list[float]]:
  """Seconds of each of ``calls`` calls of each zero-argument callable (which must block until its result is ready),
  after a warm-up call each, called in turn (forward, then backward order, so none always follows the same one)."""
  times: dict[str, list[float]] = {name: [] for name in fns}
  for f in fns.values():
    f()  # warm-up
  for i in range(calls):
    for name in fns if i % 2 == 0 else list(fns)[::-1]:
      t0 = time.perf_counter()
      fns[name]()
      times[name].append(time.perf_counter() - t0)
  return times


def timed(fns: dict, calls: int) -> dict[str, float]:
  """Median seconds of each zero-argument callable over `call_times`."""
  return {name: statistics.median(t) for name, t in call_times(fns, calls).items()}


def _sig(x: float) -> float:
  """Four significant digits (a fixed number of decimals would print 0.0 for a tiny product's rate)."""
  return float(f"{x:.4g}")


def _torch(threads: int):
  try:
    import torch
  except ImportError:  # the runtime venv has no torch; the test venv does
    return None
  torch.set_num_threads(threads)
  return torch


def matmul_rows(a: argparse.Namespace, torch) -> list[dict]:
  t, d, v = a.tokens, a.d, a.vocab
  # name -> (m, k, n, whether the right operand is stored [n, k] and used transposed, as the tied LM head's E)
  shapes = {"c_attn": (t, d, 3 * d, False), "attn.c_proj": (t, d, d, False), "mlp.c_fc": (t, d, 4 * d, False),
            "mlp.c_proj": (t, 4 * d, d, False), "lm_head": (t, d, v, True), "lm_head.dx": (t, v, d, False)}  # fmt: skip
  rng = np.random.default_rng(0)
  rows = []
  for name, (m, k, n, rhs_t) in shapes.items():
    x = rng.standard_normal((m, k), np.float32)
    y = rng.standard_normal((n, k) if rhs_t else (k, n), np.float32)
    jx, jy = jnp.asarray(x), jnp.asarray(y)
    compiled = jax.jit(lambda p, q, rhs_t=rhs_t: p @ (q.T if rhs_t else q)).lower(jx, jy).compile()
    yy = y.T if rhs_t else y
    fns = {"xla": lambda c=compiled, p=jx, q=jy: c(p, q).block_until_ready(), "numpy": lambda p=x, q=yy: p @ q}
    if torch is not None:
      fns["torch"] = lambda p=torch.from_numpy(x), q=torch.from_numpy(y), rhs_t=rhs_t: p @ (q.T if rhs_t else q)
    sec = timed(fns, a.calls)
    gflop = 2 * m * k * n / 1e9
    row = {"part": "matmul", "product": name, "m": m, "k": k, "n": n, "rhs_transposed": rhs_t}
    row["kernel"] = kernels(compiled)
    row.update({f"{impl}_gflops": _sig(gflop / s) for impl, s in sec.items()})
    if torch is not None:
      row["xla_over_torch"] = round(sec["torch"] / sec["xla"], 3)
    rows.append(row)
  return rows


def transposed_rows(a: argparse.Namespace, torch) -> list[dict]:
  t, d, r = a.tokens, a.d, a.rank
  shapes = {
    "thin dU = x^T (dY V)": (t, d, r),
    "thin dV = dY^T (x U)": (t, 3 * d, r),
    "dense dW = x^T dY": (t, d, 3 * d),
  }
  rng = np.random.default_rng(0)
  rows = []
  for name, (n, c, o) in shapes.items():
    x, g = rng.standard_normal((n, c), np.float32), rng.standard_normal((n, o), np.float32)
    jx, jg = jnp.asarray(x), jnp.asarray(g)
    emitted = jax.jit(lambda p, q: p.T @ q).lower(jx, jg).compile()
    kept = jax.jit(lambda p, q: (q.T @ p).T).lower(jx, jg).compile(compiler_options=KEEP_TRANSPOSES)
    error = float(jnp.abs(emitted(jx, jg) - kept(jx, jg)).max())
    fns = {
      "as_emitted": lambda c=emitted, p=jx, q=jg: c(p, q).block_until_ready(),
      "transposes_kept": lambda c=kept, p=jx, q=jg: c(p, q).block_until_ready(),
    }
    if torch is not None:
      fns["torch"] = lambda p=torch.from_numpy(x), q=torch.from_numpy(g): p.T @ q
    sec = timed(fns, a.calls)
    row = {"part": "transposed", "product": name, "tokens": n, "rows": c, "cols": o, "max_abs_diff": error}
    row.update({"kernel_as_emitted": kernels(emitted), "kernel_transposes_kept": kernels(kept)})
    row.update({f"{impl}_ms": _sig(1e3 * s) for impl, s in sec.items()})
    row["kept_speedup"] = round(sec["as_emitted"] / sec["transposes_kept"], 3)
    rows.append(row)
  return rows


def bfloat16_rows(a: argparse.Namespace, torch) -> list[dict]:
  """Each product with float32 operands and with bfloat16 ones: XLA's float32 accumulation (``bf16_acc32``, the
  lowering of `mltd_jax.matmul`'s narrow product), a plain bfloat16 dot (``bf16_out``, bfloat16 result) and, with
  torch, its float32 and bfloat16 products; GFLOP/s. ``x^T g`` contracts both operands' leading (token) axis."""
  t, d, v = a.tokens, a.d, a.vocab
  # name -> (rows, inner, cols, whether both operands are stored [inner, ...], contracting their leading axis)
  shapes = {"mlp.c_fc": (t, d, 4 * d, False), "mlp.c_proj": (t, 4 * d, d, False), "lm_head": (t, d, v, False),
            "dW = x^T g (c_fc)": (d, t, 4 * d, True), "dW = x^T g (c_proj)": (4 * d, t, d, True)}  # fmt: skip
  rng = np.random.default_rng(0)
  rows = []
  for name, (m, k, n, leading) in shapes.items():
    x = rng.standard_normal((k, m) if leading else (m, k), np.float32)
    y = rng.standard_normal((k, n), np.float32)
    dims = (((0,) if leading else (1,), (0,)), ((), ()))
    f32 = jax.jit(lambda p, q: jax.lax.dot_general(p, q, dims))
    acc = jax.jit(lambda p, q: jax.lax.dot_general(p, q, dims, preferred_element_type=jnp.float32))
    jx, jy = jnp.asarray(x), jnp.asarray(y)
    bx, by = jx.astype(jnp.bfloat16), jy.astype(jnp.bfloat16)
    fns = {
      "f32": lambda p=jx, q=jy: f32(p, q).block_until_ready(),
      "bf16_acc32": lambda p=bx, q=by: acc(p, q).block_until_ready(),
      "bf16_out": lambda p=bx, q=by: f32(p, q).block_until_ready(),
    }
    if torch is not None:
      tx, ty = torch.from_numpy(x), torch.from_numpy(y)
      tbx, tby = tx.to(torch.bfloat16), ty.to(torch.bfloat16)
      fns["torch_f32"] = lambda p=tx, q=ty: (p.T if leading else p) @ q
      fns["torch_bf16"] = lambda p=tbx, q=tby: (p.T if leading else p) @ q
    sec = timed(fns, a.calls)
    gflop = 2 * m * k * n / 1e9
    row = {"part": "bfloat16", "product": name, "m": m, "k": k, "n": n, "contract_leading": leading}
    row["kernel_bf16_acc32"] = kernels(acc.lower(bx, by).compile())
    row.update({f"{impl}_gflops": _sig(gflop / s) for impl, s in sec.items()})
    rows.append(row)
  return rows


def onednn_rows(a: argparse.Namespace, torch) -> list[dict]:
  """x^T g (x [k, m], g [k, n], contracting the k tokens): `mltd_jax.matmul.tn_matmul` with bfloat16 operands (the
  oneDNN kernel, ``onednn_bf16``), the kernel on float32 operands (``onednn_f32``, as float32 training uses it since
  session 14), and XLA's float32 dot (``xla_f32``: what `tn_matmul` does without the kernel), with torch's bfloat16
  x.T @ g; GFLOP/s, and the float32 kernel's largest difference from the float64 product."""
  from mltd_jax import matmul, onednn

  if not onednn.available():
    raise SystemExit("--part onednn: the oneDNN kernel is unavailable here (the warning above says why)")
  t, d, r = a.tokens, a.d, a.rank
  shapes = {"dW (c_fc)": (d, 4 * d), "dW (c_proj)": (4 * d, d), "dE (lm_head)": (a.vocab, d), "dU = x^T (g V)": (d, r),
            "dV^T = (x U)^T g": (r, d)}  # fmt: skip
  on = {
    jnp.bfloat16: jax.jit(lambda p, q: matmul.tn_matmul(p, q, jnp.bfloat16)),  # the kernel, as training uses it
    jnp.float32: jax.jit(lambda p, q: onednn.product(p, q, transpose_a=True)),  # the kernel, as float32 training
  }
  xla = jax.jit(lambda p, q: matmul.tn_matmul(p, q, jnp.float32))  # compiled with the kernel off, per shape
  rng = np.random.default_rng(0)
  rows = []
  for tokens in (t, t // 4):
    for name, (m, n) in shapes.items():
      x, g = rng.standard_normal((tokens, m), np.float32), rng.standard_normal((tokens, n), np.float32)
      jx, jg = jnp.asarray(x), jnp.asarray(g)
      with onednn.disabled():
        off = xla.lower(jx, jg).compile()
      bx, bg = jx.astype(jnp.bfloat16), jg.astype(jnp.bfloat16)
      fns = {
        "onednn_bf16": lambda p=bx, q=bg: on[jnp.bfloat16](p, q).block_until_ready(),
        "onednn_f32": lambda p=jx, q=jg: on[jnp.float32](p, q).block_until_ready(),
        "xla_f32": lambda p=jx, q=jg: off(p, q).block_until_ready(),
      }
      if torch is not None:
        tx, tg = torch.from_numpy(x).to(torch.bfloat16), torch.from_numpy(g).to(torch.bfloat16)
        fns["torch_bf16"] = lambda p=tx, q=tg: p.T @ q
      sec = timed(fns, a.calls)
      want = x.T.astype(np.float64) @ g
      error = float(np.max(np.abs(np.asarray(on[jnp.float32](jx, jg)) - want)))
      gflop = 2 * m * tokens * n / 1e9
      row = {"part": "onednn", "product": name, "tokens": tokens, "m": m, "n": n, "f32_max_abs_diff": _sig(error)}
      row.update({f"{impl}_gflops": _sig(gflop / s) for impl, s in sec.items()})
      rows.append(row)
  return rows


def reduce_rows(a: argparse.Namespace, torch) -> list[dict]:
  """sum(p * q, -1) over [*ones, heads x shots, seq - 1, seq - 1] (the attention softmax backward's reduction at one
  task's shapes), with 0, 1 and 2 leading axes of size 1: milliseconds as XLA:CPU compiles it by default
  (``ynnpack_ms``: through YNNPACK at the default shapes; ``kernel`` says which), compiled with `NO_YNN_REDUCE`
  (``xla_ms``: XLA's own loops, ``kernel_without_ynn_reduce``) and torch's."""
  rows_of, seq = a.heads * a.shots, a.seq - 1
  rng = np.random.default_rng(0)
  f = jax.jit(lambda p, q: jnp.sum(p * q, axis=-1))
  rows = []
  for ones in (0, 1, 2):
    shape = (1,) * ones + (rows_of, seq, seq)
    x, y = rng.standard_normal(shape, np.float32), rng.standard_normal(shape, np.float32)
    jx, jy = jnp.asarray(x), jnp.asarray(y)
    ynn, own = f.lower(jx, jy).compile(), f.lower(jx, jy).compile(compiler_options=NO_YNN_REDUCE)
    fns = {
      "ynnpack": lambda c=ynn, p=jx, q=jy: c(p, q).block_until_ready(),
      "xla": lambda c=own, p=jx, q=jy: c(p, q).block_until_ready(),
    }
    if torch is not None:
      fns["torch"] = lambda p=torch.from_numpy(x), q=torch.from_numpy(y): (p * q).sum(-1)
    sec = timed(fns, a.calls)
    error = float(np.max(np.abs(np.asarray(ynn(jx, jy)) - np.asarray(own(jx, jy)))))
    kernel = {c: "ynnpack" if "__ynn_fusion" in c.as_text() else "xla" for c in (ynn, own)}
    row = {"part": "reduce", "shape": list(shape), "leading_ones": ones, "kernel": kernel[ynn],
           "kernel_without_ynn_reduce": kernel[own], "max_abs_diff": _sig(error)}  # fmt: skip
    row.update({f"{impl}_ms": _sig(1e3 * s) for impl, s in sec.items()})
    rows.append(row)
  return rows


def ceiling_rows(a: argparse.Namespace, torch) -> list[dict]:
  """x [m, k] @ w [k, n] in float32 through the oneDNN kernel (``onednn_f32``) and torch (``torch_f32``): GFLOP/s of
  the fastest of ``--calls`` calls (``*_best_gflops``) and of their median, at the step's dense forward shapes and at
  two large ones."""
  from mltd_jax import onednn

  if not onednn.available():
    raise SystemExit("--part ceiling: the oneDNN kernel is unavailable here (the warning above says why)")
  d = a.d
  dense = [(tokens, k, n) for tokens in (a.tokens // 4, a.tokens) for k, n in ((d, 3 * d), (d, 4 * d), (4 * d, d))]
  product = jax.jit(lambda x, w: onednn.product(x, w))
  rng = np.random.default_rng(0)
  rows = []
  for m, k, n in [*dense, (2048, 2048, 2048), (4096, 1024, 1024)]:
    x, w = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
    jx, jw = jnp.asarray(x), jnp.asarray(w)
    fns = {"onednn_f32": lambda p=jx, q=jw: product(p, q).block_until_ready()}
    if torch is not None:
      fns["torch_f32"] = lambda p=torch.from_numpy(x), q=torch.from_numpy(w): p @ q
    times = call_times(fns, a.calls)
    gflop = 2 * m * k * n / 1e9
    row = {"part": "ceiling", "m": m, "k": k, "n": n, "cpus": len(os.sched_getaffinity(0))}
    if torch is not None:
      diff = np.abs(np.asarray(product(jx, jw)) - fns["torch_f32"]().numpy())
      row["max_abs_diff_vs_torch"] = _sig(float(np.max(diff)))
    for name, t in times.items():
      row[f"{name}_best_gflops"] = _sig(gflop / min(t))
      row[f"{name}_gflops"] = _sig(gflop / statistics.median(t))
    rows.append(row)
  return rows


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parts = {"matmul": matmul_rows, "transposed": transposed_rows, "bfloat16": bfloat16_rows, "onednn": onednn_rows,
           "reduce": reduce_rows, "ceiling": ceiling_rows}  # fmt: skip
  p.add_argument("--part", nargs="+", default=["matmul", "transposed"], choices=tuple(parts))
  p.add_argument("--tokens", type=int, default=2032, help="rows of a product: 4 x 4 sequences of 127 tokens")
  for k, v in dict(d=256, vocab=4096, rank=8, heads=4, shots=4, seq=128, calls=60, threads=2).items():
    p.add_argument(f"--{k}", type=int, default=v)
  a = p.parse_args()
  torch = _torch(a.threads)
  run = {"calls": a.calls, "threads": a.threads, "jax": jax.__version__, "torch": torch.__version__ if torch else None}
  for part in a.part:
    for row in parts[part](a, torch):
      print(json.dumps({**row, **run}), flush=True)


if __name__ == "__main__":
  main()
