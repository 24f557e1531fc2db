"""Memory plan of the second-order meta-step for models this machine cannot hold: per-device bytes from shapes only.

For a model of known size (``--model gpt2-xl``, ``t5-large``, ...) and ``--devices`` N, for every remat policy
(``--policies``) and mesh shape (``--meshes``, default every ``tasks x model`` split of N with model a power of
two), this builds the parameters, the TARP difference and the Adam state abstractly (`jax.eval_shape`: no
weights, no allocation), shards them as training does (`mltd_jax.sharding`: tasks over ``tasks``, FSDP over
``model``), lowers the jitted meta-step (`meta.make_meta_step`, exact second order, ``--inner`` steps) with
sharded `jax.ShapeDtypeStruct` inputs on N fake CPU devices and compiles it. One JSON line per setting:

  * ``params_gib``, ``tarp_gib``, ``opt_gib``: per-device bytes of the base parameters, the difference and the
    optimizer state (from the shardings' shard shapes);
  * ``xla_argument_gib``, ``xla_output_gib``, ``xla_alias_gib``, ``xla_temp_gib``: the compiled step's memory
    analysis per device (arguments, outputs, outputs aliased to donated arguments, temporaries: activations and
    the second-order pass's residuals);
  * ``peak_gib`` = args + outputs - aliased + temporaries, and whether it fits 16 GiB and 80 GiB per device.

The numbers come from XLA's CPU compiler: a GPU or TPU compiler schedules and fuses differently, and a runtime
reserves some memory of its own, so take them as a plan (which settings are far from fitting, which are close),
not a guarantee. Policies: ``none`` (no block remat), ``full`` (each block recomputed in the backward pass), or a
`jax.checkpoint_policies` name (e.g. ``dots_saveable``: block remat keeping matmul outputs); the inner step's own
remat is ``--inner_remat`` (config.meta.remat, on by default).

Compiling a 48-layer model on 2 CPU cores takes many minutes per setting (FSDP meshes the longest):
``--extrapolate 2,4`` compiles the same model at 2 and 4 layers instead and extrapolates every term linearly to
the full depth (each block adds the same parameters, optimizer state and residuals; the per-device state bytes
are computed exactly at full size in any case). It is a quick first look, not the plan: XLA's buffer assignment
is not always linear in depth. Measured at GPT-2 medium width (seq 64, T_in 1, full remat), from 4 and 8 layers to
24: exact on tasks=4,model=2, but 38% under the real temporaries on tasks=8,model=1 (4.9 against 7.9 GiB).

  python benchmarks/memory_plan.py --model gpt2-xl --devices 8 --inner 4
  python benchmarks/memory_plan.py --model gpt2-xl --devices 8 --inner 4 --extrapolate 2,4
  python benchmarks/memory_plan.py --model t5-large --devices 8 --inner 4 --policies full
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

# Known sizes, in each family's config field names (transformers' names).
MODELS = {
  "gpt2-medium": ("gpt2", dict(n_layer=24, n_embd=1024, n_head=16, vocab_size=50257, n_positions=1024)),
  "gpt2-xl": ("gpt2", dict(n_layer=48, n_embd=1600, n_head=25, vocab_size=50257, n_positions=1024)),
  "t5-base": ("t5", dict(d_model=768, d_ff=3072, num_layers=12, num_decoder_layers=12, num_heads=12, d_kv=64)),
  "t5-large": ("t5", dict(d_model=1024, d_ff=4096, num_layers=24, num_decoder_layers=24, num_heads=16, d_kv=64)),
}
LAYER_FIELDS = {"gpt2": ("n_layer",), "t5": ("num_layers", "num_decoder_layers")}
NO_DROPOUT = {"gpt2": dict(embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0), "t5": dict(dropout_rate=0.0)}
GIB = 2**30
BUDGETS_GIB = (16, 80)
NOTE = "XLA CPU compiler's per-device memory analysis of the sharded step; GPU/TPU schedules differ somewhat"


def default_meshes(devices: int) -> list[str]:
  """``tasks x model`` splits of ``devices`` with a power-of-two model axis, e.g. 8 -> 8x1, 4x2, 2x4, 1x8."""
  return [f"{devices // m}x{m}" for m in (2**i for i in range(devices.bit_length())) if devices % m == 0]


def batch_shapes(family: str, a: argparse.Namespace) -> dict:
  """The meta-batch's abstract leaves: [tasks, shots, length] int32 (support and query alike)."""
  import jax
  import numpy as np

  def leaf(length):
    return jax.ShapeDtypeStruct((a.tasks, a.shots, length), np.int32)

  if family == "gpt2":
    side = {"ids": leaf(a.seq), "mask": leaf(a.seq)}
  else:
    side = {k: leaf(n) for k, n in [("source_ids", a.seq), ("source_mask", a.seq)]}
    side |= {k: leaf(a.target_len) for k in ("target_ids", "target_mask")}
  return {"support": side, "query": side}


def per_device_gib(tree) -> float:
  """Bytes of one device's shards of abstract arrays with shardings, in GiB."""
  import jax
  import numpy as np

  return (
    sum(int(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)) / GIB
  )


def abstract_step(a: argparse.Namespace, layers: int = 0):
  """(abstract sharded state, abstract sharded batch, the jitted step, the mesh's task groups, param and
  difference sizes) of a setting, with ``layers`` overriding the model's layer count (0 = its own)."""
  import jax
  import jax.numpy as jnp
  import optax

  from mltd_jax import meta, models, sharding, tarp, train
  from mltd_jax.models import registry
  from mltd_jax.state import TrainState

  family_name, size = MODELS[a.model]
  family = registry.FAMILIES[family_name]
  if layers:  # a shallower model of the same width
    size = {**size, **{k: layers for k in LAYER_FIELDS[family_name]}}
  remat = {"none": False, "full": True}.get(a.policy, a.policy)
  model = family.model(family.config_cls(**size, **NO_DROPOUT[family_name]), dtype=jnp.dtype(a.dtype), remat=remat)
  params = jax.eval_shape(model.init_params, jax.random.key(0))
  tcfg = tarp.TarpConfig(kind=a.kind, rank=a.rank, targets=family.default_targets)
  dense = models.dense_paths(model)
  diff = jax.eval_shape(lambda p: tarp.init(jax.random.key(1), p, tcfg, dense), params)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(5e-5))  # as train.meta_train
  state = jax.eval_shape(lambda v: TrainState.create(v, tx), {"params": params, "tarp": diff})
  tasks, model_axis = (int(x) for x in a.mesh.split("x"))
  mesh = sharding.make_mesh(dict(sharding.DEFAULT, tasks=tasks, model=model_axis))
  batch = batch_shapes(family_name, a)
  sh = sharding.phase_shardings(mesh, state, batch, "tasks", "--tasks")
  place = lambda tree, shs: jax.tree.map(  # noqa: E731
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shs
  )
  inner = meta.InnerLoop(steps=a.inner, lr=5e-4, first_order=a.order == 1, remat=bool(a.inner_remat))
  groups = sharding.task_groups(mesh, a.tasks)
  step = meta.make_meta_step(family.make_loss(model), tx, inner, task_chunk=a.task_chunk, task_groups=groups)
  sizes = [sum(x.size for x in jax.tree.leaves(t)) for t in (params, diff)]
  return place(state, sh.state), place(batch, sh.batch), train.jit_step(step, sh), sizes


def compiled_memory(a: argparse.Namespace, layers: int = 0) -> dict[str, float]:
  """The compiled step's per-device memory analysis (GiB) and compile seconds at ``layers`` (0: the model's)."""
  import jax

  state, batch, step, _ = abstract_step(a, layers)
  t0 = time.perf_counter()
  mem = step.lower(state, batch, jax.random.key(0)).compile().memory_analysis()
  out = {k: getattr(mem, f"{k}_size_in_bytes") / GIB for k in ("argument", "output", "alias", "temp")}
  return {**out, "compile_s": time.perf_counter() - t0}


def run_one(a: argparse.Namespace) -> dict:
  family_name, size = MODELS[a.model]
  layers = a.layers or size[LAYER_FIELDS[family_name][0]]
  state, _, _, (n_params, n_diff) = abstract_step(a, layers)  # exact per-device state bytes, nothing compiled
  if a.extrapolate:  # every term of the memory analysis is linear in the layer count: fit two shallow compiles
    lo, hi = (int(x) for x in a.extrapolate.split(","))
    m_lo, m_hi = compiled_memory(a, lo), compiled_memory(a, hi)
    mem = {k: m_lo[k] + (m_hi[k] - m_lo[k]) * (layers - lo) / (hi - lo) for k in m_lo}
    mem["compile_s"] = m_lo["compile_s"] + m_hi["compile_s"]
  else:
    mem = compiled_memory(a, layers)
  peak = mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]
  tasks, model_axis = a.mesh.split("x")
  return {
    "model": a.model,
    "layers": layers,
    "params_m": round(n_params / 1e6, 1),
    "tarp_m": round(n_diff / 1e6, 2),
    "devices": a.devices,
    "mesh": f"tasks={tasks},model={model_axis}",
    "policy": a.policy,
    "inner_remat": bool(a.inner_remat),
    "inner": a.inner,
    "order": a.order,
    "tasks": a.tasks,
    "task_chunk": a.task_chunk,
    "shots": a.shots,
    "seq": a.seq,
    **({"target_len": a.target_len} if family_name == "t5" else {}),
    "dtype": a.dtype,
    "tarp": f"{a.kind} r={a.rank}",
    "params_gib": round(per_device_gib(state.variables["params"]), 3),
    "tarp_gib": round(per_device_gib(state.variables["tarp"]), 3),
    "opt_gib": round(per_device_gib(state.opt_state), 3),
    **{f"xla_{k}_gib": round(mem[k], 3) for k in ("argument", "output", "alias", "temp")},
    "peak_gib": round(peak, 3),
    **{f"fits_{b}gib": peak <= b for b in BUDGETS_GIB},
    "compile_s": round(mem["compile_s"], 1),
    "extrapolated_from_layers": a.extrapolate or None,
    "note": NOTE,
  }


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="gpt2-xl", choices=sorted(MODELS))
  p.add_argument("--devices", type=int, default=8, help="fake CPU devices (the mesh size)")
  p.add_argument("--layers", type=int, default=0, help="override the layer count (0 = the model's; quick checks)")
  p.add_argument(
    "--extrapolate", default="", help="L1,L2: compile at L1 and L2 layers and extrapolate linearly (much faster)"
  )
  p.add_argument("--inner", type=int, default=4, help="T_in: inner steps (exact second order through them)")
  p.add_argument("--order", type=int, default=2, help="2 = exact second order, 1 = first order")
  p.add_argument("--inner_remat", type=int, default=1, help="1 = jax.checkpoint each inner step (config.meta.remat)")
  p.add_argument("--tasks", type=int, default=0, help="tasks per meta-step (0 = one per device)")
  p.add_argument("--task_chunk", type=int, default=0, help="tasks adapted at once per device (0 = all)")
  p.add_argument("--shots", type=int, default=2, help="support (and query) examples per task")
  p.add_argument("--seq", type=int, default=256, help="tokens per example (T5: source tokens)")
  p.add_argument("--target_len", type=int, default=64, help="T5: target tokens")
  p.add_argument("--dtype", default="bfloat16", help="compute dtype (parameters stay float32)")
  p.add_argument("--kind", default="bilinear", help="TARP kind")
  p.add_argument("--rank", type=int, default=8, help="TARP rank")
  p.add_argument("--policies", nargs="*", default=["none", "full", "dots_saveable"], help="block remat policies")
  p.add_argument("--meshes", nargs="*", default=None, help="TxM shapes, e.g. 8x1 4x2 (default: every split)")
  p.add_argument("--timeout", type=int, default=3600, help="seconds per setting")
  p.add_argument("--llvm_opt", type=int, default=0, help="XLA CPU backend optimization level (memory unaffected)")
  p.add_argument("--policy", help=argparse.SUPPRESS)
  p.add_argument("--mesh", help=argparse.SUPPRESS)
  a = p.parse_args()
  a.tasks = a.tasks or a.devices
  if a.policy:  # a child: one setting
    print(json.dumps(run_one(a)), flush=True)
    return
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  # LLVM opt level 0 compiles much faster; buffer assignment (the memory analysis) is decided before it, on HLO.
  flags = f"--xla_force_host_platform_device_count={a.devices} --xla_backend_optimization_level={a.llvm_opt}"
  env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags}".strip()
  fields = [
    "model",
    "devices",
    "layers",
    "inner",
    "order",
    "inner_remat",
    "tasks",
    "task_chunk",
    "shots",
    "seq",
    "target_len",
  ]
  common = [f"--{k}={getattr(a, k)}" for k in fields + ["dtype", "kind", "rank", "extrapolate"]]
  for policy, mesh in itertools.product(a.policies, a.meshes or default_meshes(a.devices)):
    cmd = [sys.executable, __file__, *common, f"--policy={policy}", f"--mesh={mesh}"]
    t0 = time.perf_counter()
    try:
      out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.timeout)
      line = out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else None
      error = out.stderr.strip().splitlines()[-1:]
    except subprocess.TimeoutExpired:
      line, error = None, [f"timed out after {a.timeout} s"]
    row = json.loads(line) if line else {"model": a.model, "mesh": mesh, "policy": policy, "error": error}
    print(json.dumps({**row, "wall_s": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
  main()
