"""The side effects: build data and model, run the phases with checkpoints and logs, write eval.json.

Phases (paper section 2 and Algorithm 1):
  1. ``pretrain``: multitask language modelling on the meta-training tasks (Adam on the base model).
  2. ``meta``: MLtD meta-training: per task, T_in inner steps on the TARP difference over the support set, then the
     query loss; Adam on the base model and the difference's initialization (`meta.make_meta_step`).
  3. meta-testing: K adaptation steps on each held-out task (`evaluate.meta_test`) -> ``eval.json``.

Each phase checkpoints under ``WORKDIR/checkpoints/<phase>``; a rerun restores the latest checkpoint of each phase
and continues from its step (a finished phase is only restored). Batches are pure functions of the step, so no
iterator state needs saving.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mltd_jax import data, evaluate, lm, meta, models, tarp
from mltd_jax.checkpoint import Checkpointer
from mltd_jax.data import episodes
from mltd_jax.metric_writer import MetricWriter
from mltd_jax.state import TrainState

log = logging.getLogger("mltd_jax")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def build_model(cfg: Any, tokenizer, seq_len: int, rng: jax.Array):
  """(model, params): from ``cfg.name_or_dir`` when set, else a fresh GPT-2 of ``cfg.init``'s size that fits
  ``tokenizer`` (vocabulary and special tokens)."""
  vocab_size = len(tokenizer)
  if cfg.dtype not in DTYPES:
    raise ValueError(f"config.model.dtype={cfg.dtype!r} is not one of {sorted(DTYPES)}.")
  dtype = DTYPES[cfg.dtype]
  if cfg.name_or_dir:
    model, params = models.from_pretrained(cfg.name_or_dir, dtype=dtype, allow_pickle=cfg.allow_pickle)
    if model.config.vocab_size < vocab_size:
      raise ValueError(
        f"the tokenizer has {vocab_size} tokens but {cfg.name_or_dir} has vocab_size="
        f"{model.config.vocab_size}; use the model's own tokenizer (config.data.tokenizer)."
      )
    return model, params
  gpt = models.GPT2Config(
    vocab_size=vocab_size,
    n_positions=max(seq_len, cfg.init.n_positions),
    n_embd=cfg.init.n_embd,
    n_layer=cfg.init.n_layer,
    n_head=cfg.init.n_head,
    n_inner=cfg.init.n_inner or None,
    embd_pdrop=cfg.dropout,
    resid_pdrop=cfg.dropout,
    attn_pdrop=cfg.dropout,
    bos_token_id=tokenizer.bos_token_id,
    eos_token_id=tokenizer.eos_token_id,
  )
  model = models.GPT2LMHeadModel(gpt, dtype=dtype)
  return model, model.init_params(rng)


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
) -> TrainState:
  """The Python loop of one phase: restore, step, log, checkpoint; stops with a clear error on a NaN loss."""
  ckpt = Checkpointer(workdir / "checkpoints" / name, max_to_keep=config.keep_checkpoints)
  state = ckpt.restore_or(state)
  start = int(state.step)
  if start >= num_steps:
    log.info("%s: restored finished phase at step %d from %s", name, start, ckpt.directory)
    ckpt.close()
    return state
  if start:
    log.info("%s: resuming from step %d (%s)", name, start, ckpt.directory)
  base_rng = jax.random.wrap_key_data(np.asarray(state.rng))  # a copy: state is donated to step_fn
  t_start, t_last, s_last = time.time(), time.time(), start
  try:
    for step, batch in zip(range(start, num_steps), _prefetch(make_batch, range(start, num_steps))):
      state, metrics = step_fn(state, batch, jax.random.fold_in(base_rng, step))
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
        shown = " ".join(f"{k.split('/')[-1]}={v:.4f}" for k, v in metrics.items())
        log.info("%s step %d/%d %s tokens/s=%.0f eta=%.0fs", name, done, num_steps, shown, tok_s, eta)
        t_last, s_last = now, done
      if save:
        ckpt.save(done, state)
  finally:
    ckpt.close()  # waits for the last (asynchronous) save, also when the loop stops with an error
  return state


def pretrain(model, params, tokenizer, source, config, workdir, writer) -> dict:
  """Phase 1, multitask LM training on the meta-training tasks; returns ``{"params": ...}``."""
  cfg = config.pretrain
  decay_steps = max(cfg.steps, cfg.warmup_steps + 1)
  tx = optax.adamw(
    optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps, decay_steps), weight_decay=cfg.weight_decay
  )
  state = TrainState.create({"params": params}, tx, jax.random.key(config.seed + 1))
  step_fn = lm.make_lm_step(model.apply, tx, dropout=config.model.dropout > 0)
  make = functools.partial(  # step -> batch
    episodes.lm_batch,
    tokenizer,
    source,
    tasks_per_step=cfg.tasks_per_step,
    seq_len=config.data.seq_len,
    **_encode_kw(config),
  )
  support, query = _episode_sizes(config)
  tokens = cfg.tasks_per_step * (support + query) * config.data.seq_len
  state = run_phase("pretrain", state, step_fn, make, cfg.steps, tokens, workdir, writer, config)
  return state.variables


def _check_meta_origin(config, workdir: Path) -> None:
  """Meta-training resumes only on top of the pretraining it started from (``checkpoints/meta_origin.json``)."""
  origin = workdir / "checkpoints" / "meta_origin.json"
  has_meta = Checkpointer(workdir / "checkpoints" / "meta").latest_step() is not None
  if has_meta and origin.exists():
    started_from = json.loads(origin.read_text())["pretrain_steps"]
    if started_from != config.pretrain.steps:
      raise ValueError(
        f"{workdir}/checkpoints/meta was meta-trained from {started_from} pretraining steps, but "
        f"config.pretrain.steps={config.pretrain.steps}: resuming would silently drop the new pretraining. Use a "
        f"new --workdir, set config.pretrain.steps={started_from}, or delete {workdir}/checkpoints/meta."
      )
  origin.parent.mkdir(parents=True, exist_ok=True)
  origin.write_text(json.dumps({"pretrain_steps": config.pretrain.steps}))


def meta_train(model, variables, tokenizer, source, config, workdir, writer) -> dict:
  """Phase 2, MLtD meta-training of ``{"params", "tarp"}``; returns the meta-trained variables."""
  cfg = config.meta
  _check_meta_origin(config, workdir)
  tx = optax.chain(optax.clip_by_global_norm(cfg.clip_grad_norm), optax.adam(cfg.outer_lr))
  state = TrainState.create(variables, tx, jax.random.key(config.seed + 2))
  step_fn = meta.make_meta_step(
    model.apply,
    tx,
    fast_regex=cfg.fast_params,
    inner_lr=cfg.inner_lr,
    first_order=cfg.first_order,
    remat=cfg.remat,
    optimizer=cfg.inner_optimizer,
    task_chunk=cfg.task_chunk or None,
    support_chunks=cfg.support_chunks,
  )
  make = functools.partial(  # step -> meta-batch
    episodes.meta_batch,
    tokenizer,
    source,
    tasks_per_step=cfg.tasks_per_step,
    seq_len=config.data.seq_len,
    inner_steps=cfg.inner_steps,
    **_encode_kw(config),
  )
  support, query = _episode_sizes(config)
  tokens = cfg.tasks_per_step * (cfg.inner_steps * support + query) * config.data.seq_len
  state = run_phase("meta", state, step_fn, make, cfg.steps, tokens, workdir, writer, config)
  return state.variables


def _episode_sizes(config) -> tuple[int, int]:
  """Texts per task in the support and query sets, from the data source's config block."""
  source = config.data[config.data.source]
  return source.support_size, source.query_size


def _encode_kw(config) -> dict:
  return {"add_eos": config.data.add_eos, "truncate": config.data.truncate}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
  """Run every phase of ``config`` in ``workdir`` (resuming what is there) and return the eval.json dict."""
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  tokenizer, source = data.build(config.data, seed=config.seed)
  model, params = build_model(config.model, tokenizer, config.data.seq_len, jax.random.key(config.seed))
  log.info(
    "model: %s, %.2fM parameters; tokenizer: %d tokens; data: %s",
    type(model).__name__,
    tarp.num_params(params) / 1e6,
    len(tokenizer),
    config.data.source,
  )
  writer = MetricWriter(workdir)
  variables = {"params": params}
  if config.pretrain.steps > 0:
    variables = pretrain(model, params, tokenizer, source, config, workdir, writer)
  tcfg = tarp.TarpConfig(**config.tarp)
  variables = {**variables, "tarp": tarp.init(jax.random.key(config.seed + 3), variables["params"], tcfg)}
  log.info(
    "TARP %s rank %d on %d kernels: %d difference parameters",
    tcfg.kind,
    tcfg.rank,
    len(tarp.target_paths(variables["params"], tcfg.targets)),
    tarp.num_params(variables["tarp"]),
  )
  if config.meta.steps > 0:
    variables = meta_train(model, variables, tokenizer, source, config, workdir, writer)
  result = evaluate.meta_test(
    model.apply, variables, tokenizer, source, config.eval, config.data.seq_len, _encode_kw(config)
  )
  result["workdir"] = str(workdir)
  (workdir / "eval.json").write_text(json.dumps(result, indent=2))
  writer.write(
    config.meta.steps,
    {f"eval/{m}_query_ppl_k{config.eval.adapt_steps}": r["query_ppl_mean"][-1] for m, r in result["methods"].items()},
  )
  writer.close()
  table = evaluate.format_table(result)
  if config.eval.focus_token:
    table += (
      f"\nPerplexity of the tokens after {config.eval.focus_token!r} only (same learning rates):\n"
      + evaluate.format_table(result, "query_focus")
    )
  print(
    f"\nTrained in {workdir}: pretrain {config.pretrain.steps} steps, meta-train {config.meta.steps} steps "
    f"({'first' if config.meta.first_order else 'second'}-order, TARP {tcfg.kind} r={tcfg.rank}).\n"
    f"Held-out test tasks: mean query perplexity ± s.e. after k adaptation steps:\n{table}\n"
    f"Wrote {workdir / 'eval.json'}, {workdir / 'metrics.jsonl'}, TensorBoard events in "
    f"{workdir / 'tensorboard'}, checkpoints in {workdir / 'checkpoints'}.",
    flush=True,
  )
  return result
