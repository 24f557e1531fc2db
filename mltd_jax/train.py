"""The side effects: build data and model, run the phases with checkpoints and logs, write eval.json.

Phases (paper section 2 and Algorithm 1):
  1. ``pretrain``: multitask language modelling on the meta-training tasks (Adam on the base model).
  2. ``meta``: MLtD meta-training: per task, T_in inner steps on the TARP difference over the support set, then the
     query loss; Adam on the base model and the difference's initialization (`meta.make_meta_step`).
  3. meta-testing: K adaptation steps on each held-out task (`evaluate.meta_test`) -> ``eval.json``.

With ``config.tams.enabled`` (paper section 2.2, `mltd_jax.tams`) the model gets TAMS cells and the variables a
``'tams'`` collection: meta-training samples each task's architecture with the controller (the meta step's
``prepare``) and logs, per edge, the operation the meta-batch's tasks pick and the entropy of its distribution
(plotted to ``tams_ops.png``); meta-testing fixes each held-out task's argmax architecture (in ``eval.json``).

Each phase checkpoints under ``WORKDIR/checkpoints/<phase>``; a rerun restores the latest checkpoint of each phase
and continues from its step (a finished phase is only restored). Batches are pure functions of the step, so no
iterator state needs saving.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import math
import queue
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mltd_jax import data, decode_eval, evaluate, hostmem, meta, models, sharding, tams, tams_run, tarp
from mltd_jax.checkpoint import Checkpointer
from mltd_jax.data import episodes
from mltd_jax.state import TrainState

if TYPE_CHECKING:  # the writer comes from sharding.metric_writer; tensorboardX is imported only when one is made
  from mltd_jax.metric_writer import MetricWriter

log = logging.getLogger("mltd_jax")
# Named random streams, all split from one root key (config.seed). The task sources are numpy streams keyed by
# (data seed, split, index), the data seed drawn from the "data" stream, so a batch is a pure function of the step.
STREAMS = ("data", "init", "tarp", "pretrain", "meta", "eval")
# InnerLoop attribute -> config.meta field.
META_FIELDS = {
  "steps": "inner_steps",
  "lr": "inner_lr",
  "optimizer": "inner_optimizer",
  "first_order": "first_order",
  "remat": "remat",
  "support_chunks": "support_chunks",
  "fast_regex": "fast_params",
  "adam_eps_root": "inner_adam_eps_root",
  "backward": "inner_backward",
}


# The config sections a phase computes from: resuming a phase under other values of these is refused
# (`check_resume`), less the free fields below.
PHASE_SECTIONS = {
  "pretrain": ("seed", "data", "model", "pretrain"),
  "meta": ("seed", "data", "model", "pretrain", "tarp", "tams", "meta"),
}
# Free to change between a run and its resumption: how a phase runs, not what it computes, and meta.steps (its
# outer schedule does not depend on it, so a longer run continues the same one; pretraining's cosine schedule spans
# config.pretrain.steps, so more pretraining steps would be another run).
FREE_FIELDS = frozenset({
  "model.remat", "model.remat_policy", "model.allow_pickle", "meta.task_chunk", "meta.remat", "meta.support_chunks",
  "meta.inner_backward", "tams.overhead_steps", "meta.steps",
})  # fmt: skip
# Fields of a data source's block that shape only the held-out tasks (meta-testing), not a phase's training tasks.
EVAL_DATA_FIELDS = frozenset({"eval_episodes", "num_eval_tasks", "max_eval_personas", "eval_support_size",
                              "eval_query_size"})  # fmt: skip


def phase_fields(config: Any, name: str) -> dict[str, Any]:
  """The dotted config fields (JSON values) phase ``name`` computes from: `PHASE_SECTIONS`, less `FREE_FIELDS`,
  the held-out tasks' `EVAL_DATA_FIELDS`, the blocks of data sources other than ``config.data.source``, and TAMS's
  settings when it is off."""
  tree = json.loads(config.to_json_best_effort())
  flat: dict[str, Any] = {}

  def walk(prefix: str, x: Any) -> None:
    if isinstance(x, dict):
      for k, v in x.items():
        walk(f"{prefix}.{k}", v)
    else:
      flat[prefix] = x

  for section in PHASE_SECTIONS[name]:
    if section in tree:
      walk(section, tree[section])
  source = tree.get("data", {}).get("source")
  unused = {f"data.{k}." for k in data.SOURCES if k != source}
  if not flat.get("tams.enabled", False):
    unused.add("tams.")
  evaluation = {f"data.{source}.{k}" for k in EVAL_DATA_FIELDS}
  return {
    k: v
    for k, v in flat.items()
    if k not in FREE_FIELDS | evaluation and (k == "tams.enabled" or not k.startswith(tuple(unused)))
  }


def latest_step(workdir: Path, name: str) -> int | None:
  """The step of phase ``name``'s latest checkpoint in ``workdir``, or None (creating nothing)."""
  if not (workdir / "checkpoints" / name).is_dir():
    return None
  ckpt = Checkpointer(workdir / "checkpoints" / name)
  try:
    return ckpt.latest_step()
  finally:
    ckpt.close()


def has_checkpoint(workdir: Path, name: str) -> bool:
  """Whether phase ``name`` has a checkpoint in ``workdir`` (creating nothing)."""
  return latest_step(workdir, name) is not None


def check_steps(name: str, num_steps: int, done: int | None, directory: Path) -> None:
  """Refuse ``config.<name>.steps`` below the step a phase's checkpoint holds (``done``): the run would go on with
  the later model and report it under the lower count."""
  if done is None or done <= num_steps:
    return
  if name == "meta":  # config.meta.steps may change on resume (FREE_FIELDS)
    fix = f"Set config.meta.steps={done} (or more, to continue it), or use a new --workdir."
  else:  # pretraining's schedule spans its steps: another count is another run (check_resume)
    fix = f"Set config.{name}.steps={done} again (another count is another run: a new --workdir)."
  raise ValueError(
    f"config.{name}.steps={num_steps} but {directory} holds this phase at step {done}: the run would go on with the "
    f"model of step {done} and report it as step {num_steps}. {fix}"
  )


def check_resume(config: Any, workdir: Path, name: str, resuming: bool, record: bool = True) -> None:
  """Refuse to resume phase ``name`` under other `phase_fields` than its checkpoints were made with.

  The fields are kept in ``WORKDIR/checkpoints/<name>.config.json``, written (with ``record``: when the phase runs)
  when it starts afresh, or, for a workdir from before this check, when it first resumes (then nothing can be
  compared). A mismatch names every differing field and the ways out: the old values, a new --workdir, or
  deleting the phase's checkpoints.
  """
  path = workdir / "checkpoints" / f"{name}.config.json"
  now = phase_fields(config, name)
  if resuming and path.exists():
    then = json.loads(path.read_text())
    differ = sorted(k for k in set(then) | set(now) if then.get(k, "<unset>") != now.get(k, "<unset>"))
    if differ:
      shown = "\n".join(f"  config.{k}: {then.get(k, '<unset>')!r} then, {now.get(k, '<unset>')!r} now" for k in differ)
      raise ValueError(
        f"{workdir}/checkpoints/{name} was trained under other settings than this run's:\n{shown}\nResuming would "
        f"mix the two. Rerun with the old values, use a new --workdir, or delete {workdir}/checkpoints/{name} (and "
        f"the later phases' checkpoints) to train it again; if the change cannot matter (a moved file), edit {path}."
      )
    return
  origin = workdir / "checkpoints" / "meta_origin.json"  # the record of mltd_jax before this check
  if resuming and name == "meta" and origin.exists():
    started_from = json.loads(origin.read_text())["pretrain_steps"]
    if started_from != config.pretrain.steps:
      raise ValueError(
        f"{workdir}/checkpoints/meta was meta-trained from {started_from} pretraining steps, but config.pretrain.steps="
        f"{config.pretrain.steps}: use a new --workdir, set it back, or delete {workdir}/checkpoints/meta."
      )
  if not record:
    return
  if resuming:
    log.warning("%s: %s predates the resume check; this run's settings are taken as the checkpoints'", name, path)
  if sharding.is_main_process():
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(now, indent=1, sort_keys=True))
    tmp.replace(path)  # never half written


def rng_streams(seed: int) -> dict[str, jax.Array]:
  """One key per name of `STREAMS`, split from ``jax.random.key(seed)``."""
  return dict(zip(STREAMS, jax.random.split(jax.random.key(seed), len(STREAMS))))


def data_seed(key: jax.Array) -> int:
  """The integer seed of the numpy task streams, drawn from the "data" key."""
  return int(jax.random.randint(key, (), 0, 2**31 - 1))


def meta_inner(cfg: Any) -> meta.InnerLoop:
  """The meta-training inner loop of a ``config.meta`` block (a bad value names its field)."""
  inner = meta.InnerLoop(
    **{attr: cfg[name] for attr, name in META_FIELDS.items() if name in cfg},  # older configs: the defaults
    fields=tuple((attr, f"config.meta.{name}") for attr, name in META_FIELDS.items()),
  )
  if inner.optimizer == "adam" and not inner.first_order and inner.adam_eps_root == 0:
    raise ValueError(
      "config.meta.inner_adam_eps_root=0 with the Adam inner optimizer gives NaN second-order meta-gradients (a "
      "zero gradient has an infinite sqrt derivative); set it > 0 (1e-8) or config.meta.first_order=True."
    )
  return inner


def jit_step(step_fn: Callable, shardings: sharding.PhaseShardings | None = None) -> Callable:
  """The edge where steps are compiled: the state (argument 0) is donated.

  With ``shardings`` (`sharding.phase_shardings`) the state and the batch come in sharded over the mesh (the
  tasks of a meta-batch over its ``tasks`` axis: XLA partitions the vmapped tasks), the state goes out with the
  same shardings, the key and the metrics are replicated.
  """
  if shardings is None:
    return jax.jit(step_fn, donate_argnums=0)
  state, batch, rep = shardings
  return jax.jit(step_fn, in_shardings=(state, batch, rep), out_shardings=(state, rep), donate_argnums=0)


def compile_step(step_fn: Callable, *args: Any, compiler_options: dict | None = None) -> Any:
  """Compile the jitted ``step_fn`` for ``args`` ahead of its first call, then hand the compiler's freed host memory
  back to the operating system; returns the compiled step (a later ``step_fn(*args)`` reuses the compilation).
  ``compiler_options`` (XLA's, e.g. ``{"xla_cpu_use_fusion_emitters": False}``) go to ``.compile``; a step compiled
  with them is used through the returned object, since ``step_fn(*args)`` compiles without them.

  XLA frees its compiler's working memory when done (about 470 MB for the exact second-order meta-step at the
  benchmark's shapes, `benchmarks/meta_step.py`), but glibc keeps those pages resident in its arenas and the step's
  own buffers do not reuse them: without the trim a process's peak memory is the compiler's plus the step's
  (1,683 against 1,200 MB there).
  """
  compiled = step_fn.lower(*args).compile(compiler_options=compiler_options)
  hostmem.release()
  return compiled


def _prefetch(make: Callable[[int], Any], steps: range, depth: int = 2) -> Iterator[Any]:
  """Yield make(step) for each step, computed one or two steps ahead in a background thread."""
  q: queue.Queue = queue.Queue(maxsize=depth)

  def worker():
    try:
      for s in steps:
        q.put(make(s))
    except BaseException as e:  # surface data errors in the main thread
      q.put(e)

  threading.Thread(target=worker, daemon=True).start()
  for _ in steps:
    item = q.get()
    if isinstance(item, BaseException):
      raise item
    yield item


def _describe(ckpt: Checkpointer) -> str:
  step = ckpt.latest_step()
  return f"none yet in {ckpt.directory}" if step is None else f"step {step} in {ckpt.directory}"


def run_phase(
  name: str,
  state: TrainState,
  step_fn: Callable,
  make_batch: Callable[[int], Any],
  num_steps: int,
  tokens_per_step: int,
  workdir: Path,
  writer: MetricWriter,
  config: Any,
  rng: jax.Array,
  shardings: sharding.PhaseShardings | None = None,
  jitted: bool = False,
) -> TrainState:
  """The Python loop of one phase: restore, step, log, checkpoint; stops with a clear error on a NaN loss.

  ``step_fn(state, batch, rng)`` is jitted here with the state donated; ``rng`` is the phase's stream key (the
  step folds in its step number), so a resumed run draws the same randomness. With ``shardings`` the state is
  placed on the mesh before the restore (Orbax restores into those shardings, whatever device count saved it)
  and each batch (this process's share) is assembled into a global array in the prefetch thread. ``jitted``:
  ``step_fn`` is already ``jit_step(step_fn, shardings)`` (its compilation is reused).
  """
  step_fn = step_fn if jitted else jit_step(step_fn, shardings)
  ckpt = Checkpointer(workdir / "checkpoints" / name, max_to_keep=config.keep_checkpoints)
  check_resume(config, workdir, name, ckpt.latest_step() is not None)
  if shardings is not None:
    state = sharding.put_global(state, shardings.state)
    make_batch = functools.partial(_put_batch, make_batch, shardings.batch)
  state = ckpt.restore_or(state)
  start = int(state.step)
  if start > num_steps:
    ckpt.close()
    check_steps(name, num_steps, start, ckpt.directory)
  if start == num_steps:
    log.info("%s: restored finished phase at step %d from %s", name, start, ckpt.directory)
    ckpt.close()
    return state
  if start:
    log.info("%s: resuming from step %d (%s)", name, start, ckpt.directory)
  writer.rewind(name, start)  # steps logged after the checkpoint (or by a run killed before the first) come again
  t_start, t_last, s_last = time.time(), time.time(), start
  try:
    for step, batch in zip(range(start, num_steps), _prefetch(make_batch, range(start, num_steps))):
      if step == start:
        compile_step(step_fn, state, batch, rng)  # peak memory: max(compiler's, step's), not their sum
        t_start = t_last = time.time()  # tokens/s and the ETA count steps, not the compilation
      state, metrics = step_fn(state, batch, rng)
      done = step + 1
      save = done % config.checkpoint_every == 0 or done == num_steps
      if done % config.log_every == 0 or save:  # metrics are checked before every save: no NaN is checkpointed
        metrics = {f"{name}/{k}": float(v) for k, v in jax.device_get(metrics).items()}
        bad = [k for k, v in metrics.items() if not math.isfinite(v)]
        if bad:
          raise FloatingPointError(
            f"{name}: {bad} not finite at step {done}; lower the learning rate (config.{name}) or check the "
            f"data. Last good checkpoint: {_describe(ckpt)}."
          )
        now = time.time()
        tok_s = tokens_per_step * (done - s_last) / max(now - t_last, 1e-9)
        eta = (now - t_start) / (done - start) * (num_steps - done)
        writer.write(done, {**metrics, f"{name}/tokens_per_s": tok_s})
        shown = " ".join(f"{k.split('/')[-1]}={v:.4f}" for k, v in metrics.items() if "/tams/" not in k)
        log.info("%s step %d/%d %s tokens/s=%.0f eta=%.0fs", name, done, num_steps, shown, tok_s, eta)
        t_last, s_last = now, done
      if save:
        ckpt.save(done, state)
  finally:
    ckpt.close()  # waits for the last (asynchronous) save, also when the loop stops with an error
  return state


def _put_batch(make_batch: Callable[[int], Any], shardings: Any, step: int) -> Any:
  return sharding.put_local(make_batch(step), shardings)


def pretrain(run: Run, params: dict, config, writer) -> dict:
  """Phase 1, multitask training on the meta-training tasks' examples; returns ``{"params": ...}``."""
  cfg = config.pretrain
  decay_steps = max(cfg.steps, cfg.warmup_steps + 1)
  tx = optax.adamw(
    optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps, decay_steps), weight_decay=cfg.weight_decay
  )
  state = TrainState.create({"params": params}, tx)
  loss_fn = run.family.make_loss(run.model, train=config.model.dropout > 0)
  part = sharding.process_part(cfg.tasks_per_step, "config.pretrain.tasks_per_step")  # this host's tasks
  make = functools.partial(
    episodes.pretrain_batch, run.encoder, run.source, tasks_per_step=cfg.tasks_per_step, part=part
  )
  first = make(0)
  tokens = run.encoder.positions(first) * jax.process_count()
  step_fn = meta.make_train_step(loss_fn, tx)
  field = "config.pretrain.tasks_per_step"
  shardings = None if run.mesh is None else sharding.phase_shardings(run.mesh, state, first, "examples", field)
  state = run_phase(
    "pretrain", state, step_fn, make, cfg.steps, tokens, run.workdir, writer, config, run.rngs["pretrain"], shardings
  )
  return state.variables


def outer_schedule(cfg: Any) -> optax.Schedule:
  """The outer learning rate of a ``config.meta`` block: linear warmup over ``outer_warmup_steps``, then constant
  or inverse-square-root decay (``outer_lr * sqrt(warmup / step)``, the Transformer schedule the paper uses)."""
  warmup = int(cfg.get("outer_warmup_steps", 0))
  kind = cfg.get("outer_schedule", "constant")
  if warmup < 0 or kind not in ("constant", "inverse_sqrt"):
    raise ValueError(
      f"config.meta.outer_warmup_steps={warmup} must be >= 0 and config.meta.outer_schedule={kind!r} one of "
      "'constant', 'inverse_sqrt'."
    )
  lr = cfg.outer_lr

  def schedule(step):
    step = jnp.asarray(step, jnp.float32) + 1.0  # the rate of the (step + 1)-th update
    rise = jnp.minimum(1.0, step / warmup) if warmup else 1.0
    decay = jnp.sqrt(max(warmup, 1) / jnp.maximum(step, max(warmup, 1))) if kind == "inverse_sqrt" else 1.0
    return lr * rise * decay

  return schedule


def check_loop(config: Any) -> None:
  """Stop, naming the field, on loop settings that would fail late or silently: intervals, the number of
  checkpoints kept (Orbax's max_to_keep=0 keeps none) and the phases' tasks per step must be integers >= 1,
  the outer gradient clip > 0."""
  counts = {f"config.{f}": config[f] for f in ("log_every", "checkpoint_every", "keep_checkpoints")}
  counts.update({f"config.{p}.tasks_per_step": config[p].tasks_per_step for p in ("pretrain", "meta")})
  for field, value in counts.items():
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{field}={value!r} must be an integer >= 1.")
  clip = config.meta.get("clip_grad_norm", 1.0)
  if not (isinstance(clip, (int, float)) and math.isfinite(clip) and clip > 0):
    raise ValueError(f"config.meta.clip_grad_norm={clip!r} must be a finite number > 0 (it clips the outer gradient).")


def meta_tx(cfg: Any) -> optax.GradientTransformation:
  """The outer optimizer of a ``config.meta`` block: clipping, then Adam at `outer_schedule`."""
  return optax.chain(optax.clip_by_global_norm(cfg.clip_grad_norm), optax.adam(outer_schedule(cfg)))


def meta_step_fn(run: Run, inner: meta.InnerLoop, config, tcfg: tams.TamsConfig | None = None) -> Callable:
  """The (unjitted) meta step of ``config.meta``; with ``tcfg`` TAMS' prepare samples each task's architecture and
  the metrics carry the controller's per-edge choices (`tams_run.tams_metrics`)."""
  cfg = config.meta
  groups = 1 if run.mesh is None else sharding.task_groups(run.mesh, cfg.tasks_per_step)  # chunks map per device
  loss_fn = run.family.make_loss(run.model)
  prepare = None if tcfg is None else tams.make_prepare(tcfg, run.family.embedding, run.family.task_tokens)
  step_fn = meta.make_meta_step(
    loss_fn, meta_tx(cfg), inner, task_chunk=cfg.task_chunk, prepare=prepare, task_groups=groups
  )
  if tcfg is None:
    return step_fn

  def step(state: TrainState, batch: dict, rng: jax.Array) -> tuple[TrainState, dict]:
    choices = tams_run.tams_metrics(state.variables, batch["support"], tcfg, run.family)  # before this step's update
    state, metrics = step_fn(state, batch, rng)
    return state, {**metrics, **choices}

  return step


def meta_train(
  run: Run, variables: dict, inner: meta.InnerLoop, config, writer, tcfg: tams.TamsConfig | None = None
) -> dict:
  """Phase 2, MLtD meta-training of ``{"params", "tarp"}`` (and ``"tams"`` with ``tcfg``); returns the
  meta-trained variables. With TAMS, ``tams_ops.png`` (the controller's choices over the phase) is written at the
  end."""
  cfg = config.meta
  tx = meta_tx(cfg)
  state = TrainState.create(variables, tx)
  step_fn = meta_step_fn(run, inner, config, tcfg)
  make = meta_batches(run, cfg)
  first = make(0)
  tokens = inner.steps * run.encoder.positions(first["support"]) + run.encoder.positions(first["query"])
  tokens *= jax.process_count()
  field = "config.meta.tasks_per_step"
  shardings = None if run.mesh is None else sharding.phase_shardings(run.mesh, state, first, "tasks", field)
  step_fn = jit_step(step_fn, shardings)  # compiled once: the overhead measurement and the phase share it
  if tcfg is not None:
    resumed = has_checkpoint(run.workdir, "meta")  # the overhead's row is in metrics.jsonl already
    overhead = tams_overhead(run, state, step_fn, first, inner, config, tcfg, resumed, shardings)
    if not resumed:  # a phase starting afresh: a killed first attempt's rows go, step 0's overhead row too
      writer.rewind("meta", -1)
      writer.write(0, {f"meta/tams/{k}": v for k, v in overhead.items()})
  state = run_phase(
    "meta", state, step_fn, make, cfg.steps, tokens, run.workdir, writer, config, run.rngs["meta"], shardings, True
  )
  if tcfg is not None and sharding.is_main_process():
    try:  # process 0 alone: a failed plot must not stop it while the other hosts go on
      png = tams_run.plot_tams(run.workdir, tcfg)
      log.info("TAMS: operation probabilities per edge over meta-training in %s", png)
    except Exception as e:  # noqa: BLE001
      log.warning("TAMS: the plot of the operation probabilities failed (%s: %s); metrics.jsonl has the values",
                  type(e).__name__, e)  # fmt: skip
  return state.variables


def meta_batches(run: Run, cfg: Any) -> Callable[[int], dict]:
  """``step -> meta-batch`` (this host's share of ``cfg.tasks_per_step`` tasks; ``cfg`` is ``config.meta``)."""
  part = sharding.process_part(cfg.tasks_per_step, "config.meta.tasks_per_step")  # this host's tasks
  return functools.partial(episodes.meta_batch, run.encoder, run.source, tasks_per_step=cfg.tasks_per_step, part=part)


@dataclasses.dataclass(frozen=True)
class Run:
  """What every phase of one run shares: the model and its family, data, keys and the workdir."""

  model: Any
  family: models.Family
  tokenizer: Any
  encoder: Any
  source: Any
  rngs: dict
  workdir: Path
  mesh: Any = None  # the device mesh (sharding.make_mesh); None: no shardings, one device


def tarp_config(run: Run, cfg: Any) -> tarp.TarpConfig:
  """``config.tarp`` as a TarpConfig (targets "" = the family's defaults)."""
  fields = dict(cfg)
  fields["targets"] = fields["targets"] or run.family.default_targets
  return tarp.TarpConfig(**fields)


def check_methods(run: Run, params: dict, config, tcfg: tams.TamsConfig | None) -> None:
  """Each meta-test method's regex (``config.eval.methods``, with TAMS's cells joined) must match variables of the
  model meta-testing will adapt: checked on their shapes before any phase runs."""
  dense = models.dense_paths(run.model)
  difference = jax.eval_shape(lambda p: tarp.init(run.rngs["tarp"], p, tarp_config(run, config.tarp), dense), params)
  shapes = {"params": params, "tarp": difference}
  if tcfg is not None:
    shapes["tams"] = tams.init(jax.random.key(0), run.model, tcfg)  # its structure (one small draw)
  for method, regex in eval_config(config, tcfg).methods.items():
    meta.split(shapes, regex, f"config.eval.methods[{method!r}]")


def init_tarp(run: Run, params: dict, cfg: Any) -> tuple[dict, tarp.TarpConfig]:
  """The difference of ``config.tarp`` (targets "" = the family's defaults) for ``params``."""
  tcfg = tarp_config(run, cfg)
  dense = models.dense_paths(run.model)
  difference = tarp.init(run.rngs["tarp"], params, tcfg, dense)
  log.info(
    "TARP %s rank %d on %d Dense kernels: %d difference parameters",
    tcfg.kind,
    tcfg.rank,
    len(tarp.target_paths(params, tcfg.targets, dense)),
    tarp.num_params(difference),
  )
  return difference, tcfg


# ---- TAMS' meta-step time overhead (the rest of TAMS in a run: `mltd_jax.tams_run`) -------------------------------

TAMS_OVERHEAD = "tams_overhead.json"


def _time_step(fn: Callable, state: TrainState, batch: Any, rng: jax.Array, n: int, shardings=None) -> float:
  """Seconds per call of ``fn`` (a `jit_step`: it donates the state) over ``n`` calls after a compiling one; each
  call gets a fresh copy of ``state`` (placed with ``shardings``), which is left as it was."""

  def fresh():
    copy = jax.tree.map(jnp.copy, state)
    return copy if shardings is None else sharding.put_global(copy, shardings.state)

  if shardings is not None:
    batch = sharding.put_local(batch, shardings.batch)
  jax.block_until_ready(fn(fresh(), batch, rng))
  seconds = 0.0
  for _ in range(n):
    copy = jax.block_until_ready(fresh())
    t0 = time.perf_counter()
    jax.block_until_ready(fn(copy, batch, rng))
    seconds += time.perf_counter() - t0
  return seconds / n


def tams_overhead(
  run: Run,
  state: TrainState,
  step_fn: Callable,
  batch: dict,
  inner: meta.InnerLoop,
  config,
  tcfg: tams.TamsConfig,
  resumed: bool,
  shardings: sharding.PhaseShardings | None = None,
) -> dict:
  """TAMS' parameter overhead and its meta-step time overhead, logged before meta-training and kept in
  ``tams_overhead.json`` (read back when the phase resumes: ``resumed``, it has a checkpoint).

  The time is ``config.tams.overhead_steps`` steps on ``batch`` (the first meta-batch) of the phase's jitted
  ``step_fn`` (its compilation is the phase's) against the step without TAMS (the same variables less ``'tams'``,
  the inner loop's regex without the cells), each after a compiling call; 0 steps: not measured.
  """
  path, cfg = run.workdir / TAMS_OVERHEAD, config.meta
  out = tams_run.param_overhead(state.variables)
  if path.exists() and resumed:
    return {**json.loads(path.read_text()), **out}
  n = int(config.tams.get("overhead_steps", 0))
  if n > 0:
    plain = TrainState.create({k: v for k, v in state.variables.items() if k != "tams"}, meta_tx(cfg))
    field = "config.meta.tasks_per_step"
    plain_sh = None if run.mesh is None else sharding.phase_shardings(run.mesh, plain, batch, "tasks", field)
    plain_inner = dataclasses.replace(inner, fast_regex=meta_inner(cfg).fast_regex)  # the user's, without cells
    plain_fn = jit_step(meta_step_fn(run, plain_inner, config), plain_sh)
    out["step_seconds_plain"] = _time_step(plain_fn, plain, batch, run.rngs["meta"], n, plain_sh)
    out["step_seconds_tams"] = _time_step(step_fn, state, batch, run.rngs["meta"], n, shardings)
    out["step_time_overhead"] = out["step_seconds_tams"] / out["step_seconds_plain"] - 1
  timing = (
    f"{out['step_seconds_tams']:.3f} s against {out['step_seconds_plain']:.3f} s without TAMS "
    f"({100 * out['step_time_overhead']:+.1f}%, mean of {n} steps each)"
    if n > 0
    else "time not measured (config.tams.overhead_steps=0)"
  )
  log.info(
    "TAMS overhead: %d parameters = %.2f%% of the base model's %d; meta-step %s",
    out["tams_params"],
    100 * out["param_overhead"],
    out["base_params"],
    timing,
  )
  if sharding.is_main_process():
    path.write_text(json.dumps(out, indent=2))
  return out


def open_inputs(config, seed: int) -> tuple[tuple[Any, Any], models.Family]:
  """``((tokenizer, task source), model family)``, before any compute; when several inputs are missing (e.g. the
  hub model and the data directory on an offline machine) one error names them all."""
  problems, out = [], []
  for what, make in (
    ("data", lambda: data.build(config.data, seed=seed)),
    ("model", lambda: models.family_for(config.model)),
  ):
    try:
      out.append(make())
    except (OSError, ValueError) as e:
      problems.append((what, e))
  if len(problems) == 1:
    raise problems[0][1]
  if problems:
    raise OSError("cannot start:\n" + "\n".join(f"  {what}: {e}" for what, e in problems))
  return out[0], out[1]


def eval_config(config, tcfg: tams.TamsConfig | None) -> Any:
  """``config.eval``; with TAMS (``tcfg``) a copy whose regexes also adapt the cells (`tams_run.with_cells`)."""
  if tcfg is None:
    return config.eval
  ecfg = ml_collections.ConfigDict(config.eval.to_dict())
  ecfg.methods = {m: tams_run.with_cells(regex, config.tams) for m, regex in config.eval.methods.items()}
  return ecfg


def meta_test(run: Run, variables: dict, config, tcfg: tams.TamsConfig | None = None) -> tuple[dict, str]:
  """Phase 3: the loss-based meta-test, then (with ``config.eval.decode.metrics``) decoding metrics at the chosen
  setting, predictions written to ``predictions.jsonl``. Returns (the eval.json dict, the console report).

  With TAMS (``tcfg``) each held-out task adapts and decodes with its fixed argmax architecture (noise off, only
  the chosen operations computed); the architectures of the test tasks go into the result's ``"tams"`` entry."""
  loss_fn = run.family.make_loss(run.model)
  ecfg = eval_config(config, tcfg)
  prepare = None
  if tcfg is not None:
    prepare = tams.make_prepare(tcfg, run.family.embedding, run.family.task_tokens, fixed=True)
  result = evaluate.meta_test(
    loss_fn, run.encoder, variables, run.source, ecfg, run.rngs["eval"], sharding.scorer_on(run.mesh), prepare
  )
  result["workdir"] = str(run.workdir)
  report = evaluate.report(result)
  if tcfg is not None:
    chosen = tams_run.tams_architectures(run, variables, tcfg, list(run.source.eval_tasks("test")))
    distinct = collections.Counter(json.dumps(t["arch"], sort_keys=True) for t in chosen)
    result["tams"] = {
      "ops": list(tcfg.ops),
      "edges": [f"{i}->{j}" for i, j in tcfg.spec.edges],
      "per_layer": tcfg.per_layer,
      "distinct_architectures": len(distinct),
      "tasks": chosen,
    }
    top, count = distinct.most_common(1)[0]
    report += (
      f"\nTAMS: {len(distinct)} distinct architectures over {len(chosen)} test tasks; most common ({count}): {top}"
    )
  dcfg = config.eval.get("decode")
  if dcfg is not None and dcfg.metrics:
    inners = {m: evaluate.eval_inner(ecfg, m, regex) for m, regex in ecfg.methods.items()}
    tasks = run.source.eval_tasks("test")
    result["decode"], records = decode_eval.decode_eval(
      run.model, loss_fn, run.encoder, run.tokenizer, variables, tasks, result, inners, dcfg, run.rngs["eval"], prepare
    )
    if sharding.is_main_process():
      with open(run.workdir / "predictions.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    report += (
      f"\nDecoded test outputs ({', '.join(dcfg.metrics)}; beam {dcfg.num_beams}) before and after adaptation at the "
      f"validation-chosen (lr, k); outputs in {run.workdir / 'predictions.jsonl'}:\n"
      + decode_eval.format_table(result["decode"])
    )
  return result, report


def open_data(config: Any, rngs: dict[str, jax.Array]) -> tuple[Any, Any, models.Family, Any]:
  """``(tokenizer, task source, model family, encoder)`` of a run: the source seeded from the run's "data" stream
  (`data_seed`), so `mltd_jax.runs.open_run` reopens the same tasks. Inputs that are missing fail together."""
  (tokenizer, source), family = open_inputs(config, data_seed(rngs["data"]))
  return tokenizer, source, family, data.build_encoder(family.encoder, tokenizer, config.data)


def open_model(config: Any, tokenizer, encoder, rngs: dict[str, jax.Array], tcfg) -> tuple[Any, dict, models.Family]:
  """``(model, params, family)`` of a run: loaded or fresh (`models.build`), with TAMS cells in every FFN sublayer
  when ``tcfg`` (without a 'tams' collection, as in pretraining, they are the plain model)."""
  model, params, family = models.build(config.model, tokenizer, encoder.max_len, rngs["init"])
  return (model if tcfg is None else tams.attach(model, tcfg)), params, family


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
  """Run every phase of ``config`` in ``workdir`` (resuming what is there) and return the eval.json dict."""
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh(config.get("mesh"))
  log.info("mesh: %s", sharding.describe(mesh))
  if advice := hostmem.hint(jax.default_backend()):
    log.info("%s", advice)
  if config.meta.steps > 0:
    sharding.check_divisible(config.meta.tasks_per_step, mesh, "config.meta.tasks_per_step")
  rngs = rng_streams(config.seed)
  check_loop(config)
  inner = meta_inner(config.meta) if config.meta.steps > 0 else None  # a bad field fails before any compute
  for name in (n for n in PHASE_SECTIONS if config[n].steps > 0):  # before any phase runs: a later one may refuse
    done = latest_step(workdir, name)
    check_resume(config, workdir, name, done is not None, record=False)
    check_steps(name, config[name].steps, done, workdir / "checkpoints" / name)
  tcfg = tams_run.tams_config(config.get("tams"))
  user_fast = None if inner is None else inner.fast_regex  # config.meta.fast_params, before the cells join it
  if tcfg is not None and inner is not None:  # the cells' weights adapt with the user's variables
    inner = dataclasses.replace(inner, fast_regex=tams_run.with_cells(inner.fast_regex, config.tams))
  evaluate.check_config(eval_config(config, tcfg))
  tokenizer, source, family, encoder = open_data(config, rngs)
  if config.eval.get("decode") is not None and config.eval.decode.metrics:
    decode_eval.check_pairs(source.train_task(0))  # a text source fails here, not after training
  training = any(config[n].steps > 0 for n in PHASE_SECTIONS)  # a phase draws meta-training examples
  evaluate.check_data(encoder, source, eval_config(config, tcfg), training)  # e.g. too long texts: before training
  model, params, family = open_model(config, tokenizer, encoder, rngs, tcfg)
  if tcfg is not None:
    tams_run.check_run(model, tcfg, config, user_fast)
  run = Run(model, family, tokenizer, encoder, source, rngs, workdir, mesh)
  check_methods(run, params, config, tcfg)
  if sharding.is_main_process():  # this run's settings, once nothing refused them
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  log.info(
    "model: %s (%s), %.2fM parameters; tokenizer: %d tokens; data: %s",
    type(model).__name__,
    family.model_type,
    tarp.num_params(params) / 1e6,
    len(tokenizer),
    config.data.source,
  )
  writer = sharding.main_process_writer(workdir)
  variables = {"params": params}
  if config.pretrain.steps > 0:
    variables = pretrain(run, params, config, writer)
  difference, tarp_cfg = init_tarp(run, variables["params"], config.tarp)
  variables = {**variables, "tarp": difference}
  if tcfg is not None:
    variables = {**variables, "tams": tams_run.init_tams(run, variables["params"], tcfg)}
  if inner is not None:
    variables = meta_train(run, variables, inner, config, writer, tcfg)
  variables = sharding.put_global(variables, sharding.state_shardings(mesh, variables))  # onto the mesh in any case
  result, report = meta_test(run, variables, config, tcfg)
  if tcfg is not None:  # the step time measured before meta-training (none without it)
    measured = run.workdir / TAMS_OVERHEAD
    timing = json.loads(measured.read_text()) if inner is not None and measured.exists() else {}
    result["tams"]["overhead"] = {**timing, **tams_run.param_overhead(variables)}
  if sharding.is_main_process():
    (workdir / "eval.json").write_text(json.dumps(result, indent=2))
  sel, k = result["select_by"][0], config.eval.adapt_steps
  scalars = {
    f"eval/{m}_{metric}_ppl_k{k}": r["selections"][sel][metric]["ppl_mean"][-1]
    for m, r in result["methods"].items()
    for metric in result["metrics"]
  }
  if "decode" in result:
    for m, r in [("before", result["decode"]["before"]), *result["decode"]["methods"].items()]:
      scalars.update({f"eval/{m}_{s.replace('@', '_at_')}": v for s, v in r["mean"].items()})
  writer.rewind("eval", config.meta.steps, only=True)  # a rerun's results replace this step's, others' stay
  writer.write(config.meta.steps, scalars)
  writer.close()
  print(
    f"\nTrained in {workdir}: pretrain {config.pretrain.steps} steps, meta-train {config.meta.steps} steps "
    f"({'first' if config.meta.first_order else 'second'}-order, TARP {tarp_cfg.kind} r={tarp_cfg.rank}"
    f"{', TAMS' if tcfg else ''}).\n"
    f"Held-out test tasks: mean perplexity ± s.e. after k adaptation steps.\n{report}\n"
    f"Wrote {workdir / 'eval.json'}, {workdir / 'metrics.jsonl'}, TensorBoard events in "
    f"{workdir / 'tensorboard'}, checkpoints in {workdir / 'checkpoints'}.",
    flush=True,
  )
  return result
