"""A finished (or running) training run opened from its workdir: the model, data and variables it used.

Why: after `python -m mltd_jax.main --workdir=W`, a researcher wants to adapt the prepared model to a held-out task
in a notebook, or score it on other tasks. Rebuilding the pieces by hand is easy to get silently wrong: the run's
task source is seeded by a number drawn from ``config.seed`` (`mltd_jax.train.data_seed`), so ``seed=0`` gives
other held-out tasks without any error. `open_run` builds everything the way `mltd_jax.train.train_and_evaluate`
did, from ``W/config.json``, and reads the variables back with `mltd_jax.checkpoint.load` (any mesh saved them).

  run = runs.open_run("W")
  task = run.source.eval_tasks("test")[0]
  arrays = episodes.task_arrays(run.encoder, task)
  adapted, _ = meta.adapt(run.loss_fn, run.variables, arrays["support"], meta.InnerLoop(...), rng)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import ml_collections

from mltd_jax import checkpoint, data, models, tams, tams_run, train


@dataclasses.dataclass(frozen=True)
class Run:
  """What a run trained and on what: its config, model (with TAMS cells when it had them), the model's family,
  tokenizer, encoder, task source (the run's seed), and the variables of the checkpoint read (``step``)."""

  config: ml_collections.ConfigDict
  model: Any
  family: models.Family
  tokenizer: Any
  encoder: Any
  source: Any
  variables: dict
  step: int

  @property
  def loss_fn(self):
    """The family's ``(variables, batch, rng) -> (summed NLL, token count)`` for this model."""
    return self.family.make_loss(self.model)


def open_run(workdir: str | Path, phase: str = "meta", step: int | None = None) -> Run:
  """Open the run in ``workdir`` at a phase's checkpoint.

  Args:
    workdir: the run's ``--workdir`` (it holds ``config.json`` and ``checkpoints/``).
    phase: "meta" (after meta-training) or "pretrain" (the multitask model, without a difference).
    step: the checkpoint's step; the latest by default.

  Returns:
    The `Run`. A hub model is loaded again for its architecture (its weights are replaced by the checkpoint's).
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
  (tokenizer, source), family = train.open_inputs(config, train.data_seed(rngs["data"]))
  encoder = data.build_encoder(family.encoder, tokenizer, config.data)
  model, _, family = models.build(config.model, tokenizer, encoder.max_len, rngs["init"])
  tcfg = tams_run.tams_config(config.get("tams"))
  if tcfg is not None and phase == "meta":
    model = tams.attach(model, tcfg)
  state = checkpoint.load(workdir / "checkpoints" / phase, step)
  return Run(config, model, family, tokenizer, encoder, source, state["variables"], int(state["step"]))
