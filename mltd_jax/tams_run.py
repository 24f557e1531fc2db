"""TAMS in a training run (`mltd_jax.train`): its config, the cells' collection, what the controller picks.

`mltd_jax.tams` is the method (cells, controller, Gumbel-softmax); this module is its edge to a run: reading
``config.tams``, initialising the ``'tams'`` collection for the run's model, the per-edge metrics logged during
meta-training and their plot (``tams_ops.png``), the parameter overhead, and each held-out task's fixed (argmax)
architecture for ``eval.json``. The meta-step's time overhead stays in `train.py` (it builds and times steps).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from mltd_jax import models, tams
from mltd_jax.data import episodes

if TYPE_CHECKING:  # only its attributes are read (model, family, rngs, encoder)
  from mltd_jax.train import Run

log = logging.getLogger("mltd_jax")

# config.tams fields that the run reads itself; the others are `tams.TamsConfig`'s.
TAMS_RUN_FIELDS = ("adapt_cells", "overhead_steps")
TAMS_PNG = "tams_ops.png"


def tams_config(cfg: Any) -> tams.TamsConfig | None:
  """``config.tams`` as a `tams.TamsConfig`, or None when it is off (or absent, in configs older than TAMS)."""
  if cfg is None or not cfg.get("enabled", False):
    return None
  return tams.TamsConfig(**{k: v for k, v in dict(cfg).items() if k not in TAMS_RUN_FIELDS})


def with_cells(regex: str, cfg: Any) -> str:
  """A fast-variable regex that also adapts the TAMS cells' weights (never the controller) when
  ``config.tams.adapt_cells``: ``"(?:regex)|" + tams.FAST_REGEX``; ``regex`` itself otherwise."""
  return f"(?:{regex})|{tams.FAST_REGEX}" if cfg.get("adapt_cells", True) else regex


def check_run(model: Any, tcfg: tams.TamsConfig, config: Any, fast_regex: str | None) -> None:
  """Before any training: no user regex (``fast_regex``, meta-training's ``config.meta.fast_params``, None without
  meta-training; ``config.eval.methods``) may adapt the controller or the architecture (``arch/``: the controller's
  choice, an integer at meta-test) in the inner loop; a temperature annealed over more steps than meta-training has
  is logged (it never reaches its end value)."""
  collection = tams.init(jax.random.key(0), model, tcfg)  # small (cells and controller): its paths
  paths = [f"tams/controller/{'/'.join(k)}" for k in traverse_util.flatten_dict(collection["controller"])]
  paths += ["arch/" + "/".join((*p, "alpha")) for p in tams.cell_paths(collection)]
  regexes = {} if fast_regex is None else {"config.meta.fast_params": fast_regex}
  regexes.update({f"config.eval.methods[{m!r}]": r for m, r in config.eval.methods.items()})
  for field, regex in regexes.items():
    hit = [p for p in paths if re.search(regex, p)]
    if hit:
      raise ValueError(
        f"{field}={regex!r} matches {hit[:3]}: the TAMS controller and architecture are never adapted in the inner "
        "loop (the controller is meta-trained, the architecture is its choice); narrow the regex (the cells' "
        "weights adapt with config.tams.adapt_cells)."
      )
  if config.meta.steps > 0 and tcfg.anneal_steps > config.meta.steps:
    log.warning(
      "config.tams.anneal_steps=%d > config.meta.steps=%d: the Gumbel-softmax temperature never reaches its end "
      "value; set them equal to anneal over the whole meta-training", tcfg.anneal_steps, config.meta.steps
    )


def init_tams(run: Run, params: dict, tcfg: tams.TamsConfig) -> dict:
  """The ``'tams'`` collection (cells and controller) for ``run.model`` (built with `tams.attach`); its key is
  folded from the "tarp" stream, so the other streams (and the runs without TAMS) are unchanged."""
  if run.family.embedding is None or run.family.task_tokens is None:
    raise ValueError(
      f"config.tams.enabled=True, but the {run.family.model_type!r} family has no task embedding for TAMS "
      "(Family.embedding / task_tokens); set config.tams.enabled=False."
    )
  collection = tams.init(jax.random.fold_in(run.rngs["tarp"], 1), run.model, tcfg)
  n, base = tams.num_params(collection), tams.num_params(params)
  log.info(
    "TAMS: %d cells of %d edges x %d ops (width %d): %d parameters (controller %d) = %.2f%% of the base model's %d",
    len(tams.cell_paths(collection)),
    tams.num_edges(tcfg.nodes),
    len(tcfg.ops),
    tcfg.width,
    n,
    tams.num_params(collection["controller"]),
    100 * n / base,
    base,
  )
  return collection


def tams_metrics(variables: dict, supports: Any, tcfg: tams.TamsConfig, family: models.Family) -> dict:
  """Per edge: the operation the meta-batch's tasks pick, the entropy of its distribution and each operation's
  probability, from the controller's softmax(logits) averaged over the tasks (the distribution Gumbel-max sampling
  draws from, at any temperature). Keys ``tams/edge{e}_op`` (index into ``config.tams.ops``), ``_entropy``
  (nats), ``_p_{op}``; with ``per_layer`` prefixed ``cell{c}_``.

  Args:
    variables: the variables with ``'params'`` and ``'tams'``.
    supports: the meta-batch's support batches (leading task axis).
    tcfg: the TAMS configuration.
    family: the model family (its embedding and task tokens).
  """
  logits = jax.vmap(lambda s: tams.task_logits(variables, s, tcfg, family.embedding, family.task_tokens))(supports)
  probs = jax.nn.softmax(logits.astype(jnp.float32), -1).mean(0)  # [(cells,) edges, ops]
  probs = probs.reshape(-1, *probs.shape[-2:])  # [cells or 1, edges, ops]
  entropy = -(probs * jnp.log(jnp.maximum(probs, 1e-30))).sum(-1)
  out = {}
  for c in range(probs.shape[0]):
    prefix = f"tams/cell{c}_" if tcfg.per_layer else "tams/"
    for e in range(probs.shape[1]):
      out[f"{prefix}edge{e}_op"] = jnp.argmax(probs[c, e]).astype(jnp.float32)
      out[f"{prefix}edge{e}_entropy"] = entropy[c, e]
      out.update({f"{prefix}edge{e}_p_{op}": probs[c, e, o] for o, op in enumerate(tcfg.ops)})
  return out


def param_overhead(variables: dict) -> dict:
  """TAMS' parameters (cells and controller) against the base model's."""
  base, extra = tams.num_params(variables["params"]), tams.num_params(variables["tams"])
  return {"tams_params": extra, "base_params": base, "param_overhead": extra / base}


def plot_tams(workdir: Path, tcfg: tams.TamsConfig) -> Path:
  """``workdir/tams_ops.png``: each operation's probability per edge (one panel per edge, per cell with
  ``per_layer``) over meta-training, from the ``meta/tams/...`` entries of ``metrics.jsonl``."""
  from matplotlib.figure import Figure  # no pyplot: no global backend state

  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  rows = [r for r in rows if any(k.startswith("meta/tams/") for k in r)]
  cells = len({k.split("_")[0] for r in rows for k in r if k.startswith("meta/tams/cell")}) or 1
  edges = tams.CellSpec(tcfg.ops, tcfg.nodes).edges
  fig = Figure(figsize=(3.2 * len(edges), 2.6 * cells), layout="constrained")
  axes = fig.subplots(cells, len(edges), squeeze=False, sharey=True)
  steps = [r["step"] for r in rows]
  for c in range(cells):
    prefix = f"meta/tams/cell{c}_" if tcfg.per_layer else "meta/tams/"
    for e, (i, j) in enumerate(edges):
      ax = axes[c, e]
      for op in tcfg.ops:
        ax.plot(steps, [r.get(f"{prefix}edge{e}_p_{op}", float("nan")) for r in rows], marker=".", label=op)
      ax.set_title(f"{'cell %d ' % c if tcfg.per_layer else ''}edge {i}->{j}", fontsize=9)
      ax.set_ylim(0, 1)
      ax.set_xlabel("meta-step")
  axes[0, 0].set_ylabel("P(op), mean over tasks")
  axes[0, -1].legend(fontsize=7, loc="upper right")
  path = workdir / TAMS_PNG
  fig.savefig(path, dpi=80)
  return path


def tams_architectures(run: Run, variables: dict, tcfg: tams.TamsConfig, tasks: list) -> list[dict]:
  """The fixed (argmax) architecture of each held-out task: ``{"name", "arch": {"i->j": op}}`` (with
  ``per_layer``, ``"arch"`` is a list of such dicts, one per cell in `tams.cell_paths` order)."""
  arrays = episodes.stack([episodes.task_arrays(run.encoder, t) for t in tasks])
  logits_of = lambda s: tams.task_logits(variables, s, tcfg, run.family.embedding, run.family.task_tokens)  # noqa: E731
  arch = jax.device_get(jax.jit(jax.vmap(lambda s: tams.discretize(logits_of(s))))(arrays["support"]))
  edges = [f"{i}->{j}" for i, j in tcfg.spec.edges]

  def named(row) -> dict:
    return {edge: tcfg.ops[int(o)] for edge, o in zip(edges, row)}

  return [{"name": t.name, "arch": [named(r) for r in a] if tcfg.per_layer else named(a)} for t, a in zip(tasks, arch)]
