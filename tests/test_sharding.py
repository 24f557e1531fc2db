"""Task-parallel meta-training over a device mesh: 4 fake CPU devices against 1, FSDP, checkpoints across device
counts, bfloat16 compute, and the mesh/config checks.

The multi-device checks run in ONE subprocess (XLA_FLAGS must give 4 devices before jax is imported, and this
pytest process has 1): it prints a JSON report that the tests below assert on. Multi-host runs cannot be tested
here beyond one process with an explicit coordinator (`sharding.initialize_distributed` on localhost).
"""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mltd_jax import sharding

ROOT = Path(__file__).resolve().parents[1]
BF16_RTOL = 2e-2  # bfloat16 compute vs float32: relative error of the meta-loss on the tiny model

SCRIPT = r'''
import json, logging, socket, sys, time
import jax, jax.numpy as jnp, numpy as np, optax
from mltd_jax import checkpoint, evaluate, meta, models, onednn, sharding, tarp, train
from mltd_jax.models import gpt2
from mltd_jax.state import TrainState
from tests.helpers import lm_batch, tiny_gpt2

tmp = sys.argv[1]
out = {}
T0 = time.time()
def lap(what):
  print(f"{what}: {time.time() - T0:.1f}s", file=sys.stderr, flush=True)
with socket.socket() as s:  # a free port for a one-process jax.distributed "cluster"
  s.bind(("localhost", 0))
  port = s.getsockname()[1]
explicit = dict(sharding.DEFAULT, coordinator_address=f"localhost:{port}", num_processes=1, process_id=0)
out["distributed"] = sharding.initialize_distributed(explicit)
out["process_count"], out["devices"] = jax.process_count(), len(jax.devices())
out["onednn_available"] = onednn.available()  # off with several devices: the custom call has no partitioning rule

INNER = meta.InnerLoop(steps=2, lr=0.5)
TX = optax.sgd(1.0, momentum=0.9)  # after one step its trace is the meta-gradient; it has a param-shaped state
BATCHES = [{"support": lm_batch(13, (4, 2, 8), 2 * i), "query": lm_batch(13, (4, 2, 8), 2 * i + 1)} for i in range(2)]
RNG = jax.random.key(0)


def setup(dtype=jnp.float32):
  model, params = tiny_gpt2(layers=1, dtype=dtype)  # one block: every path, half the compile time
  cfg = tarp.TarpConfig(kind="bilinear", rank=2, targets=gpt2.DEFAULT_TARGETS, init_scale=0.3)
  diff = tarp.init(jax.random.key(1), params, cfg, models.dense_paths(model))
  diff = jax.tree.map(lambda x: x + 0.1, diff)  # V != 0: every meta-gradient term is non-zero
  return gpt2.make_loss(model), {"params": params, "tarp": diff}


LOSS, VARIABLES = setup()


def on(mesh_cfg, chunk):
  """(mesh, shardings, the jitted step, the jitted per-task losses) for a config.mesh and meta.task_chunk."""
  mesh = sharding.make_mesh(dict(sharding.DEFAULT, **mesh_cfg))
  state = TrainState.create(VARIABLES, TX)
  sh = sharding.phase_shardings(mesh, state, BATCHES[0], "tasks", "config.meta.tasks_per_step")
  shardings = (sh.state.variables, sh.batch, sh.replicated)
  groups = sharding.task_groups(mesh, 4)  # as train.meta_train passes it
  step = meta.make_meta_step(LOSS, TX, INNER, task_chunk=chunk, task_groups=groups)
  per_task = lambda v, b, r: meta.meta_loss(LOSS, v, b, INNER, r, chunk, task_groups=groups)[1]
  return mesh, sh, train.jit_step(step, sh), jax.jit(per_task, in_shardings=shardings)


def fresh(sh):  # a copy: the step donates its state, and a 1-device put may alias VARIABLES' buffers
  return sharding.put_global(jax.tree.map(jnp.copy, TrainState.create(VARIABLES, TX)), sh.state)


def host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) for x, y in
             zip(jax.tree.leaves(host(a)), jax.tree.leaves(host(b))))


def specs(tree):
  return sorted({str(x.sharding.spec) for x in jax.tree.leaves(tree)})


runs = {}
# task_chunk 1 on the FSDP mesh: each device maps over its own 2 tasks, one at a time.
for name, mesh_cfg, chunk in [("one", dict(tasks=1), 0), ("four", {}, 0), ("fsdp", dict(tasks=2, model=2), 1)]:
  mesh, sh, step, per_task_fn = on(mesh_cfg, chunk)
  batch = sharding.put_local(BATCHES[0], sh.batch)
  state, metrics = step(fresh(sh), batch, RNG)
  g = state.opt_state[0].trace  # the meta-gradient (momentum's trace after its first step)
  runs[name] = dict(mesh=mesh, sh=sh, step=step, grad=g, state=state, loss=metrics["query_loss"])
  out[name] = {"describe": sharding.describe(mesh)}
  if name != "one":  # one more compile each: the per-task losses come out sharded over the tasks axis
    per_task = per_task_fn(sharding.put_global(VARIABLES, sh.state.variables), batch, RNG)
    out[name]["per_task_spec"] = str(per_task.sharding.spec)
    out[name]["per_task_shard_shapes"] = sorted({s.data.shape for s in per_task.addressable_shards})
  out[name] |= {
    "batch_spec": specs(batch),
    "batch_shard_shapes": sorted({s.data.shape for s in jax.tree.leaves(batch)[0].addressable_shards}),
    "state_specs": specs(state),
    "opt_specs": specs(state.opt_state),
    "wte_spec": str(state.variables["params"]["transformer"]["wte"]["weight"].sharding.spec),
    "metrics_spec": specs(metrics),
    "grad_diff": max_diff(g, runs["one"]["grad"]),
    "state_diff": max_diff(state, runs["one"]["state"]),
    "grad_norm": float(metrics["grad_norm"]),
  }

# meta.map_tasks with task_chunk 1 over a task axis sharded on 2 devices: each maps over its own 4 tasks.
two = sharding.make_mesh(dict(sharding.DEFAULT, tasks=2))
x = jax.device_put(jnp.arange(32.0).reshape(8, 4), jax.sharding.NamedSharding(two, jax.sharding.PartitionSpec("tasks")))
mapped = jax.jit(lambda x: meta.map_tasks(lambda t: jnp.sin(t).sum(), x, 1, task_groups=2))
out["map_tasks"] = {
  "spec": str(mapped(x).sharding.spec),
  "gathers": "all-gather" in mapped.lower(x).compile().as_text(),
  "diff": max_diff(mapped(x), jnp.sin(x).sum(1)),
}
lap("meshes")
# Checkpoints across device counts: 4 devices -> 1, and 1 -> FSDP (2 x 2); each continues one step.
def save(state, name):
  ckpt = checkpoint.Checkpointer(f"{tmp}/{name}")
  ckpt.save(1, state)
  ckpt.close()


def restore_and_continue(name, target):
  r = runs[target]
  ckpt = checkpoint.Checkpointer(f"{tmp}/{name}")
  state = ckpt.restore_or(fresh(r["sh"]))
  ckpt.close()
  restored = {"step": int(state.step), "specs": specs(state.variables), "diff": max_diff(state, runs[name]["state"])}
  state, _ = r["step"](state, sharding.put_local(BATCHES[1], r["sh"].batch), RNG)
  return restored, state


save(runs["four"]["state"], "four")
save(runs["one"]["state"], "one")
save(runs["fsdp"]["state"], "fsdp")  # read back by test_checkpoints_move_between_device_counts, on 1 device
out["ckpt_4_to_1"], cont_1 = restore_and_continue("four", "one")
out["ckpt_1_to_fsdp"], cont_fsdp = restore_and_continue("one", "fsdp")
r4 = runs["four"]
cont_4, _ = r4["step"](r4["state"], sharding.put_local(BATCHES[1], r4["sh"].batch), RNG)  # the 4-device run goes on
out["continue_diff_1_vs_4"] = max_diff(cont_1, cont_4)
out["continue_diff_fsdp_vs_4"] = max_diff(cont_fsdp, cont_4)
out["continue_fsdp_specs"] = specs(cont_fsdp.variables)

lap("checkpoints")
# bfloat16 compute: parameters and the inner loop's updates stay float32.
loss16, vars16 = setup(jnp.bfloat16)
out["loss_f32"] = float(runs["one"]["loss"])
out["loss_bf16"] = float(jax.jit(lambda v, b: meta.meta_loss(loss16, v, b, INNER, RNG)[0])(vars16, BATCHES[0]))
task0 = jax.tree.map(lambda x: x[0], BATCHES[0])
adapted, _ = jax.eval_shape(lambda v: meta.adapt(loss16, v, task0["support"], INNER, RNG), vars16)
out["bf16_adapted_dtypes"] = sorted({str(x.dtype) for x in jax.tree.leaves(adapted)})

lap("bf16")
# Meta-test chunks: the scorer's tasks sharded over the tasks axis give the single-device scores.
scorer = evaluate.make_scorer(LOSS, meta.InnerLoop(steps=1, lr=0.0))
seen = []
spy = lambda v, t, k, lr: (seen.append(str(jax.tree.leaves(t)[0].sharding.spec)), scorer(v, t, k, lr))[1]
tasks = {"support": BATCHES[0]["support"], "eval": {"query": BATCHES[0]["query"]}}
keys = jax.random.split(RNG, 4)
reference = jax.device_get(scorer(VARIABLES, tasks, keys, 0.5))["query"]
four = runs["four"]["mesh"]
placed = sharding.put_global(VARIABLES, sharding.state_shardings(four, VARIABLES))
scores = sharding.scorer_on(four)(spy)(placed, tasks, keys, 0.5)["query"]
out["scorer_diff"], out["scorer_task_spec"] = max_diff(scores, reference), seen

# train.train_and_evaluate names its mesh, and refuses tasks_per_step % devices != 0 before any compute.
from tests.test_main import tiny_config

logs = []
handler = logging.Handler()
handler.emit = lambda record: logs.append(record.getMessage())
logging.getLogger("mltd_jax").addHandler(handler)
logging.getLogger("mltd_jax").setLevel(logging.INFO)
cfg = tiny_config()
cfg.meta.tasks_per_step = 6
try:
  train.train_and_evaluate(cfg, f"{tmp}/bad")
except ValueError as e:
  out["bad_tasks_error"] = str(e)
out["run_logs"] = [line for line in logs if line.startswith("mesh:")]
lap("run")
print("REPORT " + json.dumps(out))
'''


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("sharding")
  # LLVM opt level 0: a third less compile time on 2 cores; the HLO passes (SPMD partitioning included) still run.
  flags = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
  env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
  for _ in range(3):  # the free port the script probes can be taken before its coordinator binds it: run it again
    proc = subprocess.run(
      [sys.executable, "-c", SCRIPT, str(tmp)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    if proc.returncode == 0 or "Failed to add port to server" not in proc.stderr:
      break
  lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
  assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-6000:]
  return {**json.loads(lines[-1].removeprefix("REPORT ")), "tmp": tmp}


def test_four_devices_match_one_and_tasks_are_sharded(report):
  assert report["process_count"] == 1 and report["devices"] == 4 and report["distributed"] is True
  assert report["onednn_available"] is False  # `onednn.available`: one device per process only
  one, four = report["one"], report["four"]
  assert one["describe"].startswith("1 devices, axes tasks=1") and four["describe"].startswith(
    "4 devices, axes tasks=4"
  )
  assert four["grad_diff"] < 1e-5 and four["state_diff"] < 1e-5
  assert four["grad_norm"] > 0.1  # a real gradient was compared
  # The per-task losses come out split over the tasks axis (1 task per device), and so does the batch.
  assert four["per_task_spec"] == "P('tasks',)" and four["per_task_shard_shapes"] == [[1]]
  assert four["batch_spec"] == ["P('tasks',)"] and four["batch_shard_shapes"] == [[1, 2, 8]]
  # Without the model axis the state is replicated; the metrics are replicated.
  assert four["state_specs"] == ["P()"] and four["metrics_spec"] == ["P()"]


def test_task_chunks_are_mapped_on_their_own_devices(report):
  assert report["map_tasks"] == {"spec": "P('tasks',)", "gathers": False, "diff": 0.0}


def test_fsdp_shards_parameters_and_optimizer_state_and_matches(report):
  """FSDP mesh (tasks=2 x model=2) with meta.task_chunk=1."""
  fsdp = report["fsdp"]
  assert fsdp["describe"].startswith("4 devices, axes tasks=2, model=2")
  # wte [13, 8]: 13 is odd, so the embedding dimension is split; Adam's moments follow their parameters.
  assert fsdp["wte_spec"] == "P(None, 'model')"
  assert "P(None, 'model')" in fsdp["state_specs"] and "P('model',)" in fsdp["state_specs"]
  assert "P(None, 'model')" in fsdp["opt_specs"]
  # 4 tasks over 4 devices: each device its own task (data parallel over both axes), the state over "model".
  assert fsdp["per_task_spec"] == "P(('tasks', 'model'),)" and fsdp["per_task_shard_shapes"] == [[1]]
  assert fsdp["batch_spec"] == ["P(('tasks', 'model'),)"] and fsdp["batch_shard_shapes"] == [[1, 2, 8]]
  assert fsdp["grad_diff"] < 1e-5 and fsdp["state_diff"] < 1e-5


def test_checkpoints_move_between_device_counts(report):
  for key in ("ckpt_4_to_1", "ckpt_1_to_fsdp"):
    assert report[key]["step"] == 1 and report[key]["diff"] == 0.0, report[key]
  assert report["ckpt_4_to_1"]["specs"] == ["P()"]
  assert "P(None, 'model')" in report["ckpt_1_to_fsdp"]["specs"]  # restored into the target shardings
  assert report["continue_diff_1_vs_4"] < 1e-5 and report["continue_diff_fsdp_vs_4"] < 1e-5
  assert "P(None, 'model')" in report["continue_fsdp_specs"]
  # `checkpoint.load` (no template) in this 1-device process reads the states saved on 4 devices and on the FSDP mesh
  from mltd_jax import checkpoint

  one = checkpoint.load(report["tmp"] / "one")
  for name in ("four", "fsdp"):
    state = checkpoint.load(report["tmp"] / name)
    assert jax.tree.structure(state) == jax.tree.structure(one) and int(state["step"]) == 1
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(one)):
      assert a.shape == b.shape and a.dtype == b.dtype and len(a.sharding.device_set) == 1
      np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), atol=1e-5)


def test_bfloat16_meta_loss_is_close_and_updates_stay_float32(report):
  f32, bf16 = report["loss_f32"], report["loss_bf16"]
  assert f32 != bf16 and abs(bf16 - f32) < BF16_RTOL * abs(f32), (f32, bf16)
  assert report["bf16_adapted_dtypes"] == ["float32"]  # the fast variables, updated by the inner loop


def test_meta_test_chunks_are_sharded_and_score_the_same(report):
  assert report["scorer_task_spec"] == ["P('tasks',)"] and report["scorer_diff"] < 1e-5


def test_run_logs_its_mesh_and_rejects_indivisible_tasks(report):
  assert report["run_logs"] == ["mesh: 4 devices, axes tasks=4 (cpu)"]
  err = report["bad_tasks_error"]
  assert "config.meta.tasks_per_step=6" in err and "4 devices" in err and "multiple of 4" in err


# ---- one device, in this process --------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "shape,size,spec",
  [
    ((768, 2304), 2, P(None, "model")),
    ((50257, 768), 4, P(None, "model")),  # the largest dimension (50257) is odd: the next one
    ((8, 8), 2, P("model")),  # ties: the first
    ((3,), 2, P()),
    ((), 2, P()),
    ((768, 2304), 1, P()),
  ],
)
def test_fsdp_rule(shape, size, spec):
  assert sharding.fsdp_spec(shape, size) == spec


def test_task_spec_rule():
  assert sharding.task_spec(4, 1, 8, 2) == P("tasks")
  assert sharding.task_spec(2, 2, 4, 2) == P(("tasks", "model"))  # every device its own task
  assert sharding.task_spec(2, 2, 2, 4) == P("tasks", "model")  # 2 tasks on 4 devices: examples over model
  assert sharding.task_spec(2, 2, 2, 3) == P("tasks")


def test_put_global_on_several_hosts_takes_typed_keys(monkeypatch):
  """The multi-host branch of `sharding.put_global` (process_count > 1, simulated): host values and local jax
  arrays, typed PRNG keys among them (meta-test's per-task keys), come out as global arrays of the same values."""
  mesh = sharding.make_mesh(None)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jax.numpy.arange(4))
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  rep = sharding.replicated(mesh)
  out = sharding.put_global({"keys": keys, "x": np.arange(4.0)}, {"keys": rep, "x": rep})
  assert (jax.random.key_data(out["keys"]) == jax.random.key_data(keys)).all()
  assert out["x"].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_mesh_config_errors_name_the_field():
  mesh_cfg = functools.partial(dict, sharding.DEFAULT)
  assert sharding.mesh_shape(mesh_cfg(), 8) == (8, 1) and sharding.mesh_shape(mesh_cfg(model=2), 8) == (4, 2)
  with pytest.raises(ValueError, match=r"config.mesh.model=3 must .* divides the 8 devices"):
    sharding.mesh_shape(mesh_cfg(model=3), 8)
  with pytest.raises(ValueError, match=r"config.mesh.tasks=0 must be -1 \(all devices\) or an integer >= 1"):
    sharding.mesh_shape(mesh_cfg(tasks=0), 8)
  for field in ("model", "tasks"):  # a bool is not read as 1
    with pytest.raises(ValueError, match=rf"config.mesh.{field}=True"):
      sharding.mesh_shape(mesh_cfg(**{field: True}), 8)
  with pytest.raises(ValueError, match=r"config.mesh.tasks=16 .* needs more than the 8 devices"):
    sharding.mesh_shape(mesh_cfg(tasks=16), 8)
  mesh = sharding.make_mesh(None)
  assert dict(mesh.shape) == {"tasks": len(jax.devices()), "model": 1}


def test_cluster_detection_and_distributed_modes():
  assert sharding.cluster_environment({}) is None
  assert sharding.cluster_environment({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None  # one task: one host
  assert sharding.cluster_environment({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) == "slurm"
  assert sharding.cluster_environment({"TPU_WORKER_HOSTNAMES": "a,b"}) == "tpu-pod"
  assert sharding.cluster_environment({"TPU_WORKER_HOSTNAMES": "a"}) is None
  cfg = dict(sharding.DEFAULT)
  assert sharding.initialize_distributed(cfg, environ={}) is False  # auto, nothing says multi-host
  assert (
    sharding.initialize_distributed(dict(cfg, distributed="off"), environ={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"})
    is False
  )
  with pytest.raises(ValueError, match="config.mesh.distributed='maybe'"):
    sharding.initialize_distributed(dict(cfg, distributed="maybe"))
  assert sharding.is_main_process() and sharding.process_part(8, "config.meta.tasks_per_step") == slice(0, 8)


def test_remat_policy_reaches_the_blocks_and_keeps_the_gradients():
  from mltd_jax.models import gpt2, registry
  from tests.helpers import lm_batch, tiny_gpt2

  setting = lambda remat, policy: registry.remat_setting({"remat": remat, "remat_policy": policy})  # noqa: E731
  assert setting(False, "dots_saveable") is False and setting(True, "") is True
  assert setting(True, "dots_saveable") == "dots_saveable"
  with pytest.raises(ValueError, match="config.model.remat_policy='dots' is not one of"):
    setting(True, "dots")
  plain, params = tiny_gpt2(layers=1)
  saving = gpt2.GPT2LMHeadModel(plain.config, remat="dots_saveable")
  batch = lm_batch(13, (2, 8))
  grad = lambda m: jax.value_and_grad(lambda p: gpt2.make_loss(m)({"params": p}, batch, None)[0])  # noqa: E731
  # the blocks' checkpoint has it: dots_saveable or the TARP low-rank layers' name (`layers.remat_policy`)
  assert "policy=<function save_from_both_policies" in str(jax.make_jaxpr(grad(saving))(params))
  (l0, g0), (l1, g1) = jax.jit(grad(plain))(params), jax.jit(grad(saving))(params)
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_memory_plan_meshes_split_the_devices():
  import importlib.util

  spec = importlib.util.spec_from_file_location("memory_plan", ROOT / "benchmarks" / "memory_plan.py")
  plan = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(plan)
  assert plan.default_meshes(8) == ["8x1", "4x2", "2x4", "1x8"] and plan.default_meshes(6) == ["6x1", "3x2"]
  assert set(plan.MODELS) >= {"gpt2-xl", "t5-large"} and plan.MODELS["gpt2-xl"][1]["n_layer"] == 48
