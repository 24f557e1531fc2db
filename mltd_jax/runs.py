"""A finished (or running) training run opened from its workdir: the model, data and variables it used.

Why: after `python -m mltd_jax.main --workdir=W`, a researcher wants to adapt the prepared model to a held-out task
in a notebook, or score it on other tasks. Rebuilding the pieces by hand is easy to get silently wrong: the run's
task source is seeded by a number drawn from ``config.seed`` (`mltd_jax.train.data_seed`), so ``seed=0`` gives
other held-out tasks without any error. `open_run` builds everything the way `mltd_jax.train.train_and_evaluate`
did, from ``W/config.json``, and reads the variables back with `mltd_jax.checkpoint.load` (any mesh saved them).

  run = runs.open_run("W")
  task = run.source.eval_tasks("test")[0]
  arrays = episodes.task_arrays(run.encoder, task)
  variables = run.variables if run.prepare is None else run.prepare(run.variables, arrays["support"], rng, None)
  inner = meta.InnerLoop(steps=5, lr=0.3, fast_regex=run.fast_regex("^tarp/"))
  adapted, _ = meta.adapt(run.loss_fn, variables, arrays["support"], inner, rng)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import ml_collections

from mltd_jax import checkpoint, models, tams, tams_run, train


@dataclasses.dataclass(frozen=True)
class OpenedRun:
  """What a run trained and on what: its config, model (with TAMS cells when the phase had them), the model's
  family, tokenizer, encoder, task source (the run's seed), TAMS config (None without TAMS), and the variables of
  the checkpoint read (``step``)."""

  config: ml_collections.ConfigDict
  model: Any
  family: models.Family
  tokenizer: Any
  encoder: Any
  source: Any
  tams: tams.TamsConfig | None
  variables: dict
  step: int

  @property
  def loss_fn(self):
    """The family's ``(variables, batch, rng) -> (summed NLL, token count)`` for this model."""
    return self.family.make_loss(self.model)

  @property
  def prepare(self):
    """With TAMS, meta-testing's ``prepare(variables, support, rng, None) -> variables`` (the task's argmax
    architecture, which the cells need before any call); None without TAMS. Pass it to `mltd_jax.meta.adapt`'s
    callers as meta-testing does (`mltd_jax.evaluate.adapt_and_score`): ``variables = run.prepare(...)`` first."""
    if self.tams is None:
      return None
    return tams.make_prepare(self.tams, self.family.embedding, self.family.task_tokens, fixed=True)

  def fast_regex(self, regex: str) -> str:
    """The variables a method adapts (e.g. "^tarp/"), with TAMS's cell weights joined as meta-testing does."""
    return regex if self.tams is None else tams_run.with_cells(regex, self.config.tams)


def open_run(workdir: str | Path, phase: str = "meta", step: int | None = None) -> OpenedRun:
  """Open the run in ``workdir`` at a phase's checkpoint.

  Args:
    workdir: the run's ``--workdir`` (it holds ``config.json`` and ``checkpoints/``).
    phase: "meta" (after meta-training) or "pretrain" (the multitask model, without a difference or TAMS).
    step: the checkpoint's step; the latest by default.

  Returns:
    The `OpenedRun`, built as `mltd_jax.train.train_and_evaluate` built it (`train.open_data`, `train.open_model`),
    its variables read with `mltd_jax.checkpoint.load` (not the optimizer state). Paths in ``config.json`` are read
    from the current directory, as the run read them from its own; a hub model is loaded again for its architecture
    (its weights are replaced by the checkpoint's).
  """
  workdir = Path(workdir)
  config_file = workdir / "config.json"
  if not config_file.is_file():
    raise FileNotFoundError(
      f"{config_file} not found: pass the --workdir of a run (it writes config.json once its checks pass)."
    )
  if phase not in train.PHASE_SECTIONS:
    raise ValueError(f"phase={phase!r} is not one of {tuple(train.PHASE_SECTIONS)}.")
  config = ml_collections.ConfigDict(json.loads(config_file.read_text()))
  rngs = train.rng_streams(config.seed)
  tokenizer, source, family, encoder = train.open_data(config, rngs)
  tcfg = tams_run.tams_config(config.get("tams")) if phase == "meta" else None
  model, _, family = train.open_model(config, tokenizer, encoder, rngs, tcfg)
  state = checkpoint.load(workdir / "checkpoints" / phase, step, keys=("step", "variables"))
  return OpenedRun(config, model, family, tokenizer, encoder, source, tcfg, state["variables"], int(state["step"]))
