"""End-to-end runs of `python -m mltd_jax.main` on the :tiny config (shrunk), in subprocesses like a user."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from mltd_jax import checkpoint, meta, runs
from mltd_jax.data import episodes
from tests.helpers import experiment_config

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
  "--config.log_every=5",
  "--config.checkpoint_every=10",
  "--config.data.facts.num_eval_tasks=4",
  "--config.eval.adapt_steps=2",
  "--config.meta.tasks_per_step=2",
  "--config.pretrain.tasks_per_step=2",
]


def tiny_config():
  """configs/multidomain_lm.py:tiny as a ConfigDict, shrunk like SMALL (for in-process runs)."""
  cfg = experiment_config("multidomain_lm", "tiny")
  for override in SMALL:
    dotted, value = override.removeprefix("--config.").split("=")
    *parents, leaf = dotted.split(".")
    node = cfg
    for p in parents:
      node = node[p]
    node[leaf] = type(node[leaf])(value)
  return cfg


def test_train_and_evaluate_one_step_in_process(tmp_path):
  """One step of each phase through train.train_and_evaluate itself (as flax's lm1b train_test does)."""
  from mltd_jax import train

  cfg = tiny_config()
  cfg.pretrain.steps = cfg.meta.steps = 1
  cfg.eval.adapt_steps = 1
  cfg.data.facts.num_eval_tasks = 2
  result = train.train_and_evaluate(cfg, tmp_path)
  assert json.loads((tmp_path / "eval.json").read_text()) == json.loads(json.dumps(result))
  before = []
  for method in result["methods"].values():
    for s in method["selections"].values():
      assert len(s["query"]["ppl_mean"]) == 2 and all(math.isfinite(v) for v in s["query"]["ppl_mean"])
      before.append(s["query"]["ppl_mean"][0])
  assert max(before) - min(before) <= 1e-6 * before[0]  # k = 0: every method scores the same, unadapted model
  assert [r["step"] for r in metrics(tmp_path) if "meta/query_loss" in r] == [1]


def run_main(workdir, *overrides, check=True):
  cmd = [
    sys.executable,
    "-m",
    "mltd_jax.main",
    "--config=configs/multidomain_lm.py:tiny",
    f"--workdir={workdir}",
    *SMALL,
    *overrides,
  ]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  if check and proc.returncode != 0:
    raise AssertionError(f"main failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
  return proc


def metrics(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_main_end_to_end_then_resume(tmp_path):
  wd = tmp_path / "run"
  first = run_main(wd, "--config.pretrain.steps=20", "--config.meta.steps=10")
  assert "Held-out test tasks" in first.stdout and "eval.json" in first.stdout
  assert json.loads((wd / "config.json").read_text())["meta"]["steps"] == 10
  assert list((wd / "tensorboard").glob("events.out.tfevents.*"))
  rows = metrics(wd)
  assert [r["step"] for r in rows if "pretrain/loss" in r] == [5, 10, 15, 20]
  assert [r["step"] for r in rows if "meta/query_loss" in r] == [5, 10]
  assert all({"step", "pretrain/loss", "pretrain/tokens_per_s"} <= set(r) for r in rows if "pretrain/loss" in r)

  result = json.loads((wd / "eval.json").read_text())
  assert result["adapt_steps"] == 2 and set(result["methods"]) == {"tarp", "full"}
  assert result["select_by"] == ["query", "query_focus"] and result["metrics"] == ["query", "query_focus"]
  for method in result["methods"].values():
    for s in method["selections"].values():
      assert len(s["tasks"]) == 4 and len(s["query"]["ppl_mean"]) == 3 and len(s["lr"]) == 3
      for task in s["tasks"]:
        assert len(task["query_loss"]) == len(task["query_focus_loss"]) == 3

  saved = checkpoint.load(wd / "checkpoints" / "meta")
  assert int(saved["step"]) == 10 and {"params", "tarp"} <= set(saved["variables"])
  # The run opened from its workdir (`runs.open_run`): its held-out tasks (the run's data seed, not 0), model and
  # variables give eval.json's unadapted query loss of the first test task.
  opened = runs.open_run(wd)
  task = opened.source.eval_tasks("test")[0]
  scored = result["methods"]["tarp"]["selections"]["query"]["tasks"][0]
  arrays = episodes.task_arrays(opened.encoder, task)
  loss = float(meta.mean_loss(opened.loss_fn(opened.variables, arrays["query"], None)))
  assert (opened.step, scored["name"]) == (10, task.name) and loss == pytest.approx(scored["query_loss"][0], rel=1e-5)
  pretrained = runs.open_run(wd, phase="pretrain")
  assert pretrained.step == 20 and set(pretrained.variables) == {"params"}

  # Second run in the same workdir with more meta-steps: it continues from the checkpoint.
  second = run_main(wd, "--config.pretrain.steps=20", "--config.meta.steps=15")
  log = second.stderr + second.stdout
  assert "pretrain: restored finished phase at step 20" in log and "meta: resuming from step 10" in log
  rows = metrics(wd)
  assert [r["step"] for r in rows if "pretrain/loss" in r] == [5, 10, 15, 20]
  assert [r["step"] for r in rows if "meta/query_loss" in r] == [5, 10, 15]
  assert int(checkpoint.load(wd / "checkpoints" / "meta")["step"]) == 15
  # The same command again: both phases restored as finished, meta-tested again; its eval row replaces step 15's.
  again = run_main(wd, "--config.pretrain.steps=20", "--config.meta.steps=15")
  assert "meta: restored finished phase at step 15" in again.stderr + again.stdout
  assert [r["step"] for r in metrics(wd) if any(k.startswith("eval/") for k in r)] == [10, 15]

  # More pretraining steps are another run (the cosine schedule spans them), under which the meta-training would
  # silently keep the old one's: refused before any phase runs, with the ways out.
  third = run_main(wd, "--config.pretrain.steps=30", "--config.meta.steps=15", check=False)
  assert third.returncode != 0 and "config.pretrain.steps: 20 then, 30 now" in third.stderr
  assert "checkpoints/pretrain was trained under other settings" in third.stderr and "new --workdir" in third.stderr
  assert "pretrain: resuming" not in third.stderr + third.stdout
  assert json.loads((wd / "config.json").read_text())["pretrain"]["steps"] == 20  # the refused run's not written


def test_nan_loss_stops_with_a_message(tmp_path):
  proc = run_main(
    tmp_path / "nan",
    "--config.pretrain.steps=10",
    "--config.meta.steps=0",
    "--config.pretrain.lr=1e30",
    "--config.pretrain.warmup_steps=1",
    check=False,
  )
  assert proc.returncode != 0
  assert "not finite" in proc.stderr and "config.pretrain" in proc.stderr


def test_misspelt_config_field_is_named(tmp_path):
  proc = run_main(tmp_path / "typo", "--config.meta.inner_lrr=0.1", check=False)
  assert proc.returncode != 0 and "inner_lrr" in proc.stderr


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("data.source", "nope", "config.data.source"),
    ("tarp.kind", "sparse", "tarp.kind"),
    ("model.name_or_dir", "./missing_model_dir", "missing_model_dir"),
    ("keep_checkpoints", 0, "config.keep_checkpoints=0 must be an integer >= 1"),
    ("log_every", 0, "config.log_every"),
    ("meta.clip_grad_norm", 0.0, "config.meta.clip_grad_norm"),
    ("meta.tasks_per_step", 0, "config.meta.tasks_per_step=0"),
    ("eval.select_by", ("bleu",), "config.eval.select_by"),
    ("eval.decode.metrics", ("rouge1",), "known metrics"),
    ("eval.decode.metrics", ("rouge",), "plain texts as query examples"),  # the facts family's are texts
    ("eval.methods", {"tarp": "^tarp/", "x": "^foo/"}, "config.eval.methods['x']='^foo/' matches no variable"),
    ("eval.support_chunks", 3, "config.eval.support_chunks=3 must be an integer >= 1 that divides"),
    ("eval.query_chunks", 3, "config.eval.query_chunks=3 must be an integer >= 1 that divides"),
    ("eval.query_chunks", True, "config.eval.query_chunks=True must be an integer >= 1 that divides"),
    ("eval.lr_grid", {"tarp": (0.1,)}, "config.eval.lr_grid has no entry for method 'full' and no 'default'"),
    ("data.facts.num_eval_tasks", 0, "no validation tasks"),
    ("data.seq_len", 8, "> config.data.seq_len=8"),  # a held-out text too long: found before training
  ],
)
def test_bad_config_values_name_the_field(tmp_path, field, value, message):
  """In process (CI time): the error train_and_evaluate raises names the field, before any phase runs (nothing
  is checkpointed) or meta-test; main prints it (the misspelt-field test above goes through main)."""
  from mltd_jax import train

  cfg = tiny_config()
  cfg.pretrain.steps = cfg.meta.steps = 1
  *parents, leaf = field.split(".")
  node = cfg
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises((ValueError, OSError)) as error:
    train.train_and_evaluate(cfg, tmp_path / "bad")
  assert message in str(error.value)
  assert not (tmp_path / "bad" / "checkpoints").exists()  # refused up front


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path):
  import signal
  import time

  wd = tmp_path / "killed"
  args = ["--config.pretrain.steps=200", "--config.meta.steps=0", "--config.checkpoint_every=10"]
  cmd = [
    sys.executable,
    "-m",
    "mltd_jax.main",
    "--config=configs/multidomain_lm.py:tiny",
    f"--workdir={wd}",
    *SMALL,
    *args,
  ]
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpts = wd / "checkpoints" / "pretrain"
  deadline = time.time() + 300
  while time.time() < deadline and not any(p.name.isdigit() and int(p.name) >= 20 for p in ckpts.glob("*")):
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)  # no chance to clean up
  proc.wait()
  saved = sorted(int(p.name) for p in ckpts.glob("*") if p.name.isdigit())
  assert saved and saved[-1] < 200, saved
  again = run_main(wd, *args)  # the same command again
  log = again.stderr + again.stdout
  assert f"pretrain: resuming from step {saved[-1]}" in log, log[-2000:]
  assert int(checkpoint.load(ckpts)["step"]) == 200
  logged = [r["step"] for r in metrics(wd) if "pretrain/loss" in r]  # the replayed steps logged once
  assert logged == list(range(5, 201, 5)), logged


def test_outer_schedule_warms_up_then_decays_as_inverse_square_root():
  """`train.outer_schedule` (the paper's Transformer schedule, configs/adaptsum.py's default): update s + 1 gets
  outer_lr * min(1, (s + 1) / warmup) * sqrt(warmup / max(s + 1, warmup)); constant without warmup."""
  import ml_collections
  import numpy as np

  from mltd_jax import train

  cfg = lambda **kw: ml_collections.ConfigDict({"outer_lr": 2.0, **kw})  # noqa: E731
  paper = train.outer_schedule(cfg(outer_warmup_steps=4, outer_schedule="inverse_sqrt"))
  want = 2.0 * np.array([0.25, 0.5, 0.75, 1, np.sqrt(4 / 5), np.sqrt(4 / 6), np.sqrt(4 / 7), np.sqrt(4 / 8)])
  np.testing.assert_allclose([float(paper(s)) for s in range(8)], want, rtol=1e-6)
  bare = train.outer_schedule(cfg(outer_schedule="inverse_sqrt"))
  np.testing.assert_allclose([float(bare(s)) for s in range(3)], 2.0 / np.sqrt([1, 2, 3]), rtol=1e-6)
  assert [float(train.outer_schedule(cfg())(s)) for s in (0, 9)] == [2.0, 2.0]
  with pytest.raises(ValueError, match="config.meta.outer_schedule='cosine'"):
    train.outer_schedule(cfg(outer_schedule="cosine"))


def test_a_resumed_phase_ends_where_an_uninterrupted_one_does(tmp_path):
  """train.run_phase run to step 2, then again to step 4 in the same workdir, ends with the state of 4 steps in one
  go: the same batches (a pure function of the step), keys (the step folded in) and Adam moments (restored)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from mltd_jax import meta, train
  from mltd_jax.metric_writer import MetricWriter
  from mltd_jax.state import TrainState

  def loss_fn(variables, batch, rng):  # depends on the step's batch and on its key
    return jnp.sum((variables["params"]["w"] - batch["x"] - jax.random.normal(rng, (3,))) ** 2)

  tx = optax.adam(0.1)
  step_fn = meta.make_train_step(loss_fn, tx)
  cfg = tiny_config()
  cfg.checkpoint_every, cfg.log_every = 2, 1

  def run(workdir, steps):
    writer = MetricWriter(workdir)
    state = TrainState.create({"params": {"w": jnp.zeros(3)}}, tx)
    make = lambda step: {"x": np.full(3, float(step), np.float32)}  # noqa: E731
    try:
      return jax.device_get(train.run_phase("pretrain", state, step_fn, make, steps, 1, workdir, writer, cfg,
                                            jax.random.key(0)))  # fmt: skip
    finally:
      writer.close()

  once = run(tmp_path / "once", 4)
  assert int(run(tmp_path / "twice", 2).step) == 2
  twice = run(tmp_path / "twice", 4)
  assert int(twice.step) == 4
  for a, b in zip(jax.tree.leaves(once), jax.tree.leaves(twice)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
  assert [r["step"] for r in metrics(tmp_path / "twice")] == [1, 2, 3, 4]
  assert int(run(tmp_path / "twice", 4).step) == 4  # finished: restored as it is
  with pytest.raises(ValueError, match=r"config.pretrain.steps=3 but .*twice/checkpoints/pretrain holds this phase at "
                     r"step 4: .* report it as step 3. Set config.pretrain.steps=4"):  # fmt: skip
    run(tmp_path / "twice", 3)  # fewer steps than done: refused, not the step-4 model labelled as step 3


def test_resuming_under_other_settings_is_refused_naming_the_fields(tmp_path):
  """`train.check_resume`: a phase's checkpoints resume only under the config fields they were trained with; layout
  fields, meta.steps, the held-out tasks' sizes, other sources' blocks and TAMS's settings while it is off may
  change; pretrain.steps may not (its cosine schedule spans them)."""
  from mltd_jax import train

  cfg = tiny_config()
  train.check_resume(cfg, tmp_path, "meta", resuming=False)  # a fresh phase: records its fields
  assert json.loads((tmp_path / "checkpoints" / "meta.config.json").read_text())["meta.inner_lr"] == cfg.meta.inner_lr
  free = tiny_config()
  free.meta.steps, free.meta.task_chunk, free.model.remat = 99, 3, not cfg.model.remat
  free.data.jsonl.path, free.tams.width = "elsewhere.jsonl", 7  # jsonl is not the source; TAMS is off
  free.data.facts.num_eval_tasks = 9  # only the held-out tasks
  train.check_resume(free, tmp_path, "meta", resuming=True)
  changed = tiny_config()
  changed.meta.inner_lr, changed.data.facts.n_objects, changed.pretrain.steps = 0.5, 9, 3
  with pytest.raises(ValueError) as error:
    train.check_resume(changed, tmp_path, "meta", resuming=True)
  message = str(error.value)
  for field in ("config.meta.inner_lr", "config.data.facts.n_objects", "config.pretrain.steps"):
    assert field in message
  assert "new --workdir" in message and "meta.config.json" in message and "num_eval_tasks" not in message
  train.check_resume(cfg, tmp_path, "pretrain", resuming=False)
  cfg.pretrain.steps += 10
  with pytest.raises(ValueError, match="config.pretrain.steps"):
    train.check_resume(cfg, tmp_path, "pretrain", resuming=True)
  (tmp_path / "checkpoints" / "meta.config.json").unlink()  # a workdir from before the check: its old record
  (tmp_path / "checkpoints" / "meta_origin.json").write_text(json.dumps({"pretrain_steps": 1}))
  with pytest.raises(ValueError, match="meta-trained from 1 pretraining steps"):
    train.check_resume(cfg, tmp_path, "meta", resuming=True)


def test_metrics_rewind_drops_the_phase_rows_after_the_checkpoint(tmp_path):
  from mltd_jax.metric_writer import MetricWriter

  writer = MetricWriter(tmp_path)
  for step in (5, 10, 15):
    writer.write(step, {"pretrain/loss": step, "meta/loss": -step})
  writer.rewind("pretrain", 10)
  rows = metrics(tmp_path)
  assert [r["step"] for r in rows if "pretrain/loss" in r] == [5, 10]
  assert [r["step"] for r in rows if "meta/loss" in r] == [5, 10, 15]
  writer.rewind("meta", 10, only=True)  # step 10's alone (a rerun's eval row replaces its step's)
  assert [r["step"] for r in metrics(tmp_path) if "meta/loss" in r] == [5, 15]
  writer.close()
  with (tmp_path / "metrics.jsonl").open("a") as f:
    f.write('{"step": 20, "meta/lo')  # a killed run's unfinished line
  writer = MetricWriter(tmp_path)  # the next run cuts it: its rows start their own lines
  writer.write(25, {"eval/x": 1.0})
  assert [r["step"] for r in metrics(tmp_path)][-2:] == [15, 25]
  writer.rewind("meta", 5)
  assert [r["step"] for r in metrics(tmp_path) if "meta/loss" in r] == [5]
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "meta/a": 1}\nnot json\n{"step": 2, "meta/a": 2}\n')
  writer.rewind("meta", 1)  # a bad line is dropped with a warning (never raised on process 0 alone)
  assert metrics(tmp_path) == [{"step": 1, "meta/a": 1}]
  writer.close()


def test_load_names_what_is_there(tmp_path):
  """`checkpoint.load`: a missing folder, a parent of the phases' folders or a step not saved say what to pass."""
  import numpy as np

  ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints" / "meta")
  ckpt.save(3, {"step": np.int32(3), "variables": {"w": np.ones(2, np.float32)}, "opt": [np.zeros(2, np.float32)]})
  ckpt.close()
  assert int(checkpoint.load(tmp_path / "checkpoints" / "meta")["step"]) == 3
  part = checkpoint.load(tmp_path / "checkpoints" / "meta", keys=("step", "variables"))  # not the optimizer state
  assert set(part) == {"step", "variables"} and part["variables"]["w"].tolist() == [1.0, 1.0]
  with pytest.raises(KeyError, match=r"has no \['params'\]; its entries: \['opt', 'step', 'variables'\]"):
    checkpoint.load(tmp_path / "checkpoints" / "meta", keys=("params",))
  with pytest.raises(FileNotFoundError, match="not a directory"):
    checkpoint.load(tmp_path / "nope")
  assert not (tmp_path / "nope").exists()
  for parent in (tmp_path / "checkpoints", tmp_path):  # the phases' parent, or the workdir
    with pytest.raises(FileNotFoundError, match=r"no checkpoint in .* Pass a phase's folder: \['.*checkpoints/meta'\]"):
      checkpoint.load(parent)
  with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 5 .* steps \[3\]"):
    checkpoint.load(tmp_path / "checkpoints" / "meta", step=5)
  kept = checkpoint.Checkpointer(tmp_path / "kept", max_to_keep=2)  # config.keep_checkpoints: the newest 2 stay
  for step in (1, 2, 3):
    kept.save(step, {"step": np.int32(step)})
  kept.close()
  assert sorted(int(p.name) for p in (tmp_path / "kept").iterdir() if p.name.isdigit()) == [2, 3]


def test_restoring_a_state_of_another_structure_names_the_directory(tmp_path):
  import numpy as np

  ckpt = checkpoint.Checkpointer(tmp_path / "phase")
  ckpt.save(1, {"step": np.int32(1), "w": np.zeros(3, np.float32)})
  ckpt.close()
  again = checkpoint.Checkpointer(tmp_path / "phase")
  with pytest.raises(ValueError, match=r"phase/1 holds a state of another structure.*new --workdir"):
    again.restore_or({"step": np.int32(0), "w": np.zeros(3, np.float32), "rng": np.zeros(2, np.uint32)})
  again.close()


@pytest.mark.parametrize("sharded", [False, True])
def test_compile_step_compiles_once_and_the_jitted_step_reuses_it(sharded):
  """train.run_phase compiles ahead (then trims the C heap) and calls the jitted step: one compilation in all, also
  for a step jitted with shardings (`train.jit_step` on a mesh)."""
  import logging

  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from mltd_jax import train

  def double_the_state(state, batch):
    return state * 2 + batch.sum()

  if sharded:
    rep = NamedSharding(jax.make_mesh((1,), ("tasks",)), P())
    step = jax.jit(double_the_state, in_shardings=(rep, rep), out_shardings=rep, donate_argnums=0)
  else:
    step = jax.jit(double_the_state, donate_argnums=0)
  seen = []
  handler = logging.Handler()
  handler.emit = lambda record: seen.append(record.getMessage())
  logger = logging.getLogger("jax")
  logger.addHandler(handler)
  try:
    with jax.log_compiles(True):
      compiled = train.compile_step(step, jnp.ones(3), jnp.ones(2))
      ahead = compiled(jnp.ones(3), jnp.ones(2))
      jitted = step(jnp.ones(3), jnp.ones(2))
  finally:
    logger.removeHandler(handler)
  assert len([m for m in seen if "compilation of jit(double_the_state)" in m]) == 1, seen
  assert ahead.tolist() == jitted.tolist() == [4.0, 4.0, 4.0]
