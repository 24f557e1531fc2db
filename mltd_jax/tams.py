"""TAMS: task-adaptive model search (paper section 2.2), a Gumbel-softmax controller over a DARTS-style cell.

Every transformer block's FFN sublayer is expanded by a small cell that reads the sublayer's (normalized) input
h [b, t, D]:

  * two input nodes project h down to ``width``: node0 = h W_a, node1 = h W_b;
  * ``nodes`` intermediate nodes (3 by default): node_j = sum over its incoming edges i < j of op_ij(node_i), every
    earlier node feeding every later one, so 2 + 3 + 4 = 9 edges;
  * the output, mean(intermediate nodes) W_out, is added to the residual stream next to the FFN's output.

Each edge picks one operation from `OPS` (linear, causal conv 3x1 / 5x1, GLU, zero, skip). The edge weights, the
architecture ``alpha`` [edges, ops], come from a controller: a 2-layer MLP (``hidden`` units, ReLU) of the task
embedding z (the mean token embedding of the task's support inputs, gradient stopped, as in the released code)
gives logits [edges, ops] (or [cells, edges, ops] with ``per_layer``), and straight-through Gumbel-softmax turns
them into a one-hot ``alpha`` whose gradient is the soft sample's. At meta-test time the architecture is the
argmax (`discretize`), given to the cells as integer indices, and only the chosen operation of each edge is
computed (`jax.lax.switch`; when tasks are vmapped, XLA computes every branch and selects).

Where the variables live (model code is the same with or without TAMS, as for TARP):
  * ``'tams'``: the cells' weights keyed by each cell's module path (e.g. ``transformer/h/0/tams``), plus
    ``'tams'/'controller'``. Every candidate operation of every edge has its own weights (weight sharing across
    tasks, not across edges). ``W_out`` starts at zero, so a freshly initialized cell adds exactly nothing and the
    pretrained model is unchanged at init.
  * ``'arch'``: what each cell reads, ``{cell path...: {'alpha': [edges, ops] float or [edges] int}}``, written by
    `make_prepare` (once per task, before the inner loop) or `with_arch`. It is not a fast variable: the query
    loss's gradient reaches the controller through it, and the inner loop never adapts the controller.

The model only needs the cell's static structure (`CellSpec`: the operations and the number of nodes): `attach`
returns the model with it; a model without it, or variables without ``'tams'``, is the plain model. Operations:
linear, the convolutions and GLU end in a smooth non-linearity (GELU; GLU is its own), so the meta-loss stays
smooth for finite-difference checks. Convolutions are causal (left context only) in decoders and centered in
T5's encoder (which is bidirectional); node values at padded positions are zeroed, so padding never leaks into
a convolution and a padded sequence gives the same cell outputs as the unpadded one. A cached decoder keeps, per
cell, the last (kernel - 1) values of every node that feeds an edge (``history`` [b, sources, kernel - 1, width]):
the cell's receptive field compounds over its nodes, so caching its input alone would not be enough.

This module imports only jax, flax and numpy: it knows nothing of model families, data or training.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

Path = tuple[str, ...]
Params = Mapping[str, Any]
SCHEDULES = ("constant", "linear", "exponential", "cosine")
# The inner loop's regex for the cells' weights (not the controller): e.g. fast_regex = "^tarp/|" + FAST_REGEX.
FAST_REGEX = r"^tams/(?!controller/)"


def _gelu(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=True)


# A layout: {path: (shape, std)} of tensors to draw (std 0: zeros). Drawn with one Gaussian sample for the whole
# collection (`_draw`): one random-number program instead of one per tensor shape (each would be compiled).
Layout = dict[Path, tuple[tuple[int, ...], float]]


def _draw(rng: jax.Array, layout: Layout) -> dict:
  """The tensors of ``layout`` as a nested dict: std * N(0, 1) from one draw of ``rng`` (zeros where std is 0)."""
  sizes = [math.prod(shape) for shape, _ in layout.values()]
  flat = np.asarray(jax.random.normal(rng, (sum(sizes),), jnp.float32))
  out, offset = {}, 0
  for (path, (shape, std)), n in zip(layout.items(), sizes):
    out[path] = jnp.asarray(flat[offset : offset + n].reshape(shape) * std if std else np.zeros(shape, np.float32))
    offset += n
  return traverse_util.unflatten_dict(out)


# ---- the candidate operations ---------------------------------------------------------------------------------


class Op(NamedTuple):
  """One candidate operation, applied to a group of edges at once.

  ``init(edges, width) -> {name: (shape, std)}`` lays out every edge's own weights (leading axis ``edges``; {}
  for none), Gaussian with that std (0: zeros);
  ``apply(params, x, history, causal) -> y`` maps source nodes x [S, b, t, w] through the weights of their
  outgoing edges (params leaves [S, D, ...]: D edges per source) to y [S, D or 1, b, t, w]. ``history``
  [S, b, H, w] holds a cached decoder's values of x before its first position (None: zeros).
  """

  init: Callable[[int, int], dict]
  apply: Callable[[dict, jax.Array, Any, bool], jax.Array]


def _bias(p: dict, x: jax.Array) -> jax.Array:
  return p["b"].astype(x.dtype)[:, :, None, None, :]  # [S, D, 1, 1, out]


def _init_linear(edges: int, w: int) -> dict:
  return {"w": ((edges, w, w), w**-0.5), "b": ((edges, w), 0.0)}


def _linear(p: dict, x: jax.Array, history: Any, causal: bool) -> jax.Array:
  return _gelu(jnp.einsum("sbti,sdij->sdbtj", x, p["w"].astype(x.dtype)) + _bias(p, x))


def _init_conv(k: int) -> Callable[[int, int], dict]:
  return lambda edges, w: {"w": ((edges, k, w, w), (k * w) ** -0.5), "b": ((edges, w), 0.0)}


def _conv(p: dict, x: jax.Array, history: Any, causal: bool) -> jax.Array:
  """A k x 1 convolution over time: causal (positions t-k+1..t, the earlier ones from ``history``) or centered."""
  k, t = p["w"].shape[2], x.shape[2]
  if causal:
    past = jnp.zeros((*x.shape[:2], k - 1, x.shape[3]), x.dtype) if history is None else history
    padded = jnp.concatenate([past[:, :, past.shape[2] - (k - 1) :].astype(x.dtype), x], 2)  # [S, b, t + k - 1, w]
  else:
    padded = jnp.pad(x, ((0, 0), (0, 0), ((k - 1) // 2, k // 2), (0, 0)))
  windows = jnp.stack([padded[:, :, j : j + t] for j in range(k)], axis=3)  # [S, b, t, k, w]
  return _gelu(jnp.einsum("sbtki,sdkij->sdbtj", windows, p["w"].astype(x.dtype)) + _bias(p, x))


def _init_glu(edges: int, w: int) -> dict:
  return {"w": ((edges, w, 2 * w), w**-0.5), "b": ((edges, 2 * w), 0.0)}


def _glu(p: dict, x: jax.Array, history: Any, causal: bool) -> jax.Array:
  h = jnp.einsum("sbti,sdij->sdbtj", x, p["w"].astype(x.dtype)) + _bias(p, x)
  a, g = jnp.split(h, 2, axis=-1)
  return a * jax.nn.sigmoid(g)


OPS: dict[str, Op] = {
  "linear": Op(_init_linear, _linear),
  "conv3": Op(_init_conv(3), _conv),
  "conv5": Op(_init_conv(5), _conv),
  "glu": Op(_init_glu, _glu),
  "zero": Op(lambda edges, w: {}, lambda p, x, history, causal: jnp.zeros_like(x)[:, None]),
  "skip": Op(lambda edges, w: {}, lambda p, x, history, causal: x[:, None]),
}
KERNELS = {"conv3": 3, "conv5": 5}  # positions an operation reads (1 for the others)


# ---- configuration ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TamsConfig:
  """The search space, the controller and the Gumbel-softmax schedule (``config.tams``).

  Attributes:
    enabled: whether the experiment uses TAMS (read by the caller; the functions here assume it is on).
    ops: the candidate operations, names of `OPS`; the last axis of ``alpha`` follows this order.
    width: the cell's width (the input nodes project d_model down to it).
    tau: (start, end, schedule) of the Gumbel-softmax temperature over ``anneal_steps`` outer steps; schedule one
      of `SCHEDULES` ("exponential": geometric from start to end; "constant": start throughout).
    per_layer: one alpha per cell (the controller outputs [cells, edges, ops]) instead of one shared by all.
    noise: sample Gumbel noise (False: hard argmax of the logits, straight-through, as the released code).
    nodes: intermediate nodes of the cell (3: 9 edges).
    hidden: the controller's hidden units.
    anneal_steps: outer steps over which tau goes from start to end (then it stays at end).
    init_scale: standard deviation of the controller's output layer at init (small: near-uniform at first).
  """

  enabled: bool = False
  ops: tuple[str, ...] = tuple(OPS)
  width: int = 64
  tau: tuple = (10.0, 0.1, "exponential")
  per_layer: bool = False
  noise: bool = True
  nodes: int = 3
  hidden: int = 128
  anneal_steps: int = 1000
  init_scale: float = 0.02

  def __post_init__(self):
    object.__setattr__(self, "ops", tuple(self.ops))
    object.__setattr__(self, "tau", tuple(self.tau))
    unknown = [o for o in self.ops if o not in OPS]
    if not self.ops or unknown or len(set(self.ops)) != len(self.ops):
      raise ValueError(f"config.tams.ops={self.ops!r} must be distinct names among {tuple(OPS)}.")
    for name in ("width", "nodes", "hidden", "anneal_steps"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:  # True is no width
        raise ValueError(f"config.tams.{name}={value!r} must be an integer >= 1.")
    if len(self.tau) != 3 or self.tau[2] not in SCHEDULES:
      raise ValueError(f"config.tams.tau={self.tau!r} must be (start, end, schedule) with schedule in {SCHEDULES}.")
    if not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in self.tau[:2]):
      raise ValueError(f"config.tams.tau={self.tau!r}: start and end must be finite temperatures > 0.")

  @property
  def spec(self) -> "CellSpec":
    return CellSpec(self.ops, self.nodes)


@dataclasses.dataclass(frozen=True)
class CellSpec:
  """The static structure of a cell (a model attribute, hashable): operation names and intermediate nodes."""

  ops: tuple[str, ...] = tuple(OPS)
  nodes: int = 3

  @property
  def edges(self) -> list[tuple[int, int]]:
    """(source node, target node) of every edge, in alpha's order: (0, 2), (1, 2), (0, 3), (1, 3), (2, 3), ..."""
    return [(i, j) for j in range(2, 2 + self.nodes) for i in range(j)]

  @property
  def history(self) -> int:
    """How many past values of a node a cached decoder keeps: the widest kernel among the ops, minus one."""
    return max([KERNELS.get(o, 1) for o in self.ops]) - 1


def num_edges(nodes: int) -> int:
  """Edges of a cell with ``nodes`` intermediate nodes: 2 + 3 + ... + (nodes + 1)."""
  return nodes * (nodes + 3) // 2


def tau_at(cfg: TamsConfig, step: Any) -> jax.Array:
  """The Gumbel-softmax temperature at outer step ``step`` (an int or a traced scalar)."""
  start, end, schedule = cfg.tau
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / cfg.anneal_steps, 0.0, 1.0)
  if schedule == "constant":
    return jnp.asarray(start, jnp.float32)
  if schedule == "linear":
    return start + (end - start) * frac
  if schedule == "cosine":
    return end + (start - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
  return start * (end / start) ** frac  # exponential


# ---- Gumbel-softmax, task embedding, controller ----------------------------------------------------------------


def gumbel_softmax(key: jax.Array, logits: jax.Array, tau: Any, hard: bool = True, noise: bool = True) -> jax.Array:
  """A (straight-through) Gumbel-softmax sample over the last axis of ``logits`` [..., n].

  Args:
    key: PRNG key for the Gumbel noise (unused without ``noise``).
    logits: unnormalized log-probabilities [..., n].
    tau: the temperature (> 0).
    hard: return the one-hot of the sample's argmax in the forward pass, with the soft sample's gradient.
    noise: add Gumbel(0, 1) noise; False gives the argmax of ``logits`` (with the gradient of softmax(logits/tau)).

  Returns:
    [..., n]: the soft sample softmax((logits + g) / tau), or (``hard``) its exact one-hot argmax whose gradient
    is the soft sample's.
  """
  x = logits + jax.random.gumbel(key, logits.shape, logits.dtype) if noise else logits
  soft = jax.nn.softmax(x / tau, axis=-1)
  if not hard:
    return soft
  onehot = jax.nn.one_hot(jnp.argmax(x, -1), logits.shape[-1], dtype=soft.dtype)
  return onehot + (soft - jax.lax.stop_gradient(soft))  # forward: exactly one-hot (soft - soft is exactly 0)


def task_embedding(table: jax.Array, ids: jax.Array, mask: jax.Array) -> jax.Array:
  """z [D]: the mean token embedding over every real token of a task's support inputs, gradient stopped.

  Args:
    table: the token embedding table [V, D].
    ids: token ids [..., L] (any leading axes: examples, inner steps).
    mask: [..., L], nonzero on real tokens.
  """
  m = (mask != 0).astype(table.dtype)[..., None]  # [..., L, 1]
  total = (jnp.take(table, ids, axis=0) * m).reshape(-1, table.shape[-1]).sum(0)  # [D]
  return jax.lax.stop_gradient(total / jnp.maximum(m.sum(), 1.0))


def controller_layout(dim: int, outputs: int, cfg: TamsConfig) -> Layout:
  """The controller's tensors: z [dim] -> ReLU(z w1 + b1) [hidden] -> logits [outputs] = h w2 + b2."""
  return {
    ("w1",): ((dim, cfg.hidden), dim**-0.5),
    ("b1",): ((cfg.hidden,), 0.0),
    ("w2",): ((cfg.hidden, outputs), cfg.init_scale),
    ("b2",): ((outputs,), 0.0),
  }


def controller(params: Params, z: jax.Array, cfg: TamsConfig) -> jax.Array:
  """Architecture logits from the task embedding z [D]: [edges, ops], or [cells, edges, ops] with ``per_layer``."""
  h = jax.nn.relu(z @ params["w1"] + params["b1"])
  logits = h @ params["w2"] + params["b2"]
  shape = (num_edges(cfg.nodes), len(cfg.ops))
  return logits.reshape((-1, *shape) if cfg.per_layer else shape)


def discretize(alpha: jax.Array) -> jax.Array:
  """The fixed architecture: the index of the chosen operation of every edge, int32 [..., edges]."""
  return jnp.argmax(alpha, axis=-1).astype(jnp.int32)


# ---- the cell ---------------------------------------------------------------------------------------------------


def cell_layout(features: int, cfg: TamsConfig) -> Layout:
  """One cell's tensors: ``in_a``, ``in_b`` [features, width], ``out`` [width, features] (zero: the cell adds
  nothing at init), and for every operation with weights its weights for every edge (leading axis: edges)."""
  w, spec = cfg.width, cfg.spec
  layout = {
    ("in_a",): ((features, w), features**-0.5),
    ("in_b",): ((features, w), features**-0.5),
    ("out",): ((w, features), 0.0),
  }
  for name in spec.ops:
    layout.update({(name, k): v for k, v in OPS[name].init(len(spec.edges), w).items()})
  return layout


def _stages(spec: CellSpec) -> list[tuple[list[int], np.ndarray]]:
  """Groups of edges computed together: (source nodes, edge indices [sources, targets]). The two input nodes feed
  every intermediate node; intermediate node i feeds the nodes after it."""
  index = {edge: e for e, edge in enumerate(spec.edges)}
  last = 1 + spec.nodes
  groups = [[0, 1]] + [[i] for i in range(2, last)]
  return [(g, np.array([[index[(i, j)] for j in range(g[-1] + 1, last + 1)] for i in g])) for g in groups]


def _edge_outputs(weights, alpha, x, history, idx: np.ndarray, spec: CellSpec, causal: bool) -> jax.Array:
  """The outputs [S, D, b, t, w] of edges ``idx`` [S, D] from their source nodes x [S, b, t, w].

  Float ``alpha`` [edges, ops]: every operation, weighted (the soft path, batched over the edges). Integer
  ``alpha`` [edges]: only the chosen operation of each edge (`jax.lax.switch`).
  """
  if jnp.issubdtype(alpha.dtype, jnp.integer):
    rows = []
    for s, row in enumerate(idx):
      hist = None if history is None else history[s : s + 1]
      outs = []
      for e in row:
        branch = lambda name, e=int(e): lambda x, h: _one(weights, name, e, x, h, causal)  # noqa: E731
        outs.append(jax.lax.switch(alpha[e], [branch(name) for name in spec.ops], x[s : s + 1], hist))
      rows.append(jnp.concatenate(outs, 1))
    return jnp.concatenate(rows, 0)
  out = jnp.zeros((*idx.shape, *x.shape[1:]), x.dtype)
  for o, name in enumerate(spec.ops):
    if name == "zero":  # adds exactly nothing, for every alpha
      continue
    p = jax.tree.map(lambda a: a[idx], weights.get(name, {}))  # leaves [S, D, ...]
    out = out + alpha[idx, o].astype(x.dtype)[..., None, None, None] * OPS[name].apply(p, x, history, causal)
  return out


def _one(weights: Params, name: str, e: int, x: jax.Array, history: Any, causal: bool) -> jax.Array:
  """Operation ``name`` of edge ``e`` on its source x [1, b, t, w] -> [1, 1, b, t, w]."""
  p = jax.tree.map(lambda a: a[e][None, None], weights.get(name, {}))
  return jnp.broadcast_to(OPS[name].apply(p, x, history, causal), (1, 1, *x.shape[1:]))


def cell(
  weights: Params,
  alpha: jax.Array,
  h: jax.Array,
  spec: CellSpec,
  causal: bool = True,
  token_mask: jax.Array | None = None,
  history: jax.Array | None = None,
  dtype: Any = jnp.float32,
) -> tuple[jax.Array, jax.Array | None]:
  """The cell's output for h [b, t, D] (to be added to the residual stream), and its updated decoding history.

  Args:
    weights: one cell's entry of the ``'tams'`` collection (laid out by `cell_layout`).
    alpha: float [edges, ops] edge weights (a one-hot for a sampled architecture), or int32 [edges] operation
      indices (a fixed architecture: only the chosen operations are computed).
    h: the FFN sublayer's input [b, t, D].
    spec: the operations and node count (``alpha``'s layout).
    causal: causal convolutions (decoders) or centered ones (a bidirectional encoder).
    token_mask: [b or 1, t], nonzero on real tokens; the nodes are zero elsewhere (None: all real).
    history: [b, sources, spec.history, width], the nodes' values before position 0 (a cached decoder), or None
      (zeros, and no history is returned).
    dtype: the computation's dtype.

  Returns:
    (output [b, t, D], the history after position t - 1, or None when ``history`` was None).
  """
  x = h.astype(dtype)
  m = 1.0 if token_mask is None else (token_mask != 0).astype(dtype)[..., None]  # [b, t, 1]
  nodes = [(x @ weights["in_a"].astype(dtype)) * m, (x @ weights["in_b"].astype(dtype)) * m]  # each [b, t, w]
  incoming = [jnp.zeros_like(nodes[0]) for _ in range(spec.nodes)]  # sums into intermediate nodes 2, 3, ...
  for sources, idx in _stages(spec):  # sources are complete when their stage runs
    src = jnp.stack([nodes[i] for i in sources])  # [S, b, t, w]
    past = None if history is None else jnp.moveaxis(history[:, sources[0] : sources[-1] + 1], 1, 0)
    out = _edge_outputs(weights, alpha, src, past, idx, spec, causal)  # [S, D, b, t, w]
    for d, j in enumerate(range(sources[-1] + 1, 2 + spec.nodes)):
      incoming[j - 2] = incoming[j - 2] + out[:, d].sum(0)
    nodes.append(incoming[len(nodes) - 2] * m)
  y = jnp.mean(jnp.stack(nodes[2:]), 0) @ weights["out"].astype(dtype)  # [b, t, D]
  if history is None:
    return y, None
  sources = jnp.stack(nodes[: 1 + spec.nodes], 1)  # [b, sources, t, w]: every node that feeds an edge
  joined = jnp.concatenate([history.astype(dtype), sources], 2)
  return y, joined[:, :, joined.shape[2] - spec.history :]


def empty_history(batch: int, weights: Params, spec: CellSpec, dtype: Any) -> jax.Array:
  """Zeros [batch, sources, spec.history, width]: a cached decoder's history before its first token."""
  return jnp.zeros((batch, 1 + spec.nodes, spec.history, weights["in_a"].shape[1]), dtype)


class Cell(nn.Module):
  """The cell of one FFN sublayer; reads its weights from ``'tams'`` and its architecture from ``'arch'``.

  ``__call__(h, token_mask, history=None, decoding=False) -> (output or None, history)``: the output is None
  (nothing to add) when the variables have no ``'tams'`` entry for this cell. ``decoding`` returns the updated
  history (starting from zeros when ``history`` is None).
  """

  spec: CellSpec
  causal: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, token_mask=None, history=None, decoding: bool = False):
    weights = self.variables.get("tams")
    if weights is None:
      return None, history
    alpha = self.variables.get("arch", {}).get("alpha")
    if alpha is None:
      raise ValueError(
        f"TAMS cell {'/'.join(self.scope.path)} has weights but no architecture: put one into the variables' "
        "'arch' collection with tams.make_prepare(...) or tams.with_arch(variables, alpha)."
      )
    if decoding and history is None and self.causal:
      history = empty_history(h.shape[0], weights, self.spec, self.dtype)
    return cell(weights, alpha, h, self.spec, self.causal, token_mask, history, self.dtype)


# ---- the collections: init, architecture, prepare --------------------------------------------------------------


def attach(model: nn.Module, cfg: TamsConfig) -> nn.Module:
  """``model`` with TAMS cells in its FFN sublayers (its ``tams`` attribute set to ``cfg.spec``)."""
  if not hasattr(model, "tams"):
    raise ValueError(f"{type(model).__name__} has no TAMS cells (no 'tams' attribute): its family does not support it.")
  return model.clone(tams=cfg.spec)


def _layer_order(path: Path) -> tuple:
  """Sort key of a module path with its numbers as numbers: block 2 before block 10 (cell c is layer c)."""
  return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in path)


def cell_sites(model: nn.Module) -> list[tuple[Path, int]]:
  """(module path, input features) of every `Cell` the model calls, in `_layer_order`; traced abstractly like
  `models.layers.dense_paths` (``model.init_params`` under `jax.eval_shape`: nothing is computed)."""
  found = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, Cell) and context.method_name == "__call__":
      found[tuple(context.module.scope.path)] = args[0].shape[-1]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(model.init_params, jax.random.key(0))
  return sorted(found.items(), key=lambda site: _layer_order(site[0]))


def cell_paths(collection: Params) -> list[Path]:
  """The cells' module paths in a ``'tams'`` collection, in `_layer_order` (the order of ``per_layer`` alphas)."""
  flat = traverse_util.flatten_dict(collection)
  return sorted({k[:-1] for k in flat if k[-1] == "in_a" and k[0] != "controller"}, key=_layer_order)


def init(rng: jax.Array, model: nn.Module, cfg: TamsConfig) -> dict:
  """The ``'tams'`` collection: every cell's weights at its module path, and ``'controller'``.

  Args:
    rng: PRNG key.
    model: a linen model of a TAMS-ready family (with or without `attach`; its cells must match ``cfg``).
    cfg: the configuration.

  Returns:
    ``{path...: cell weights, 'controller': {...}}``; the model's ``'params'`` are not touched, so hub import and
    export are unchanged.
  """
  if getattr(model, "tams", None) is None:
    model = attach(model, cfg)
  elif model.tams != cfg.spec:
    raise ValueError(f"the model's cells {model.tams} differ from config.tams ({cfg.spec}); attach it with cfg.")
  sites = cell_sites(model)
  if not sites:
    raise ValueError(f"{type(model).__name__} calls no TAMS cell; its family does not support config.tams.")
  features = {f for _, f in sites}
  if len(features) != 1:
    raise ValueError(f"TAMS cells with different input sizes {sorted(features)}: one controller cannot serve them.")
  if any(path[0] == "controller" for path, _ in sites):
    raise ValueError("the model has a top-level module named 'controller', which the 'tams' collection reserves.")
  outputs = num_edges(cfg.nodes) * len(cfg.ops) * (len(sites) if cfg.per_layer else 1)
  layout = {("controller", *k): v for k, v in controller_layout(features.pop(), outputs, cfg).items()}
  for path, f in sites:
    layout.update({path + k: v for k, v in cell_layout(f, cfg).items()})
  return _draw(rng, layout)


def with_arch(variables: Params, alpha: jax.Array, per_layer: bool = False) -> dict:
  """``variables`` with an ``'arch'`` collection for every cell of ``variables['tams']``.

  Args:
    variables: model variables with a ``'tams'`` collection.
    alpha: float [edges, ops] (or int [edges]) shared by every cell; with ``per_layer`` [cells, ...] in the
      order of `cell_paths`.
    per_layer: whether ``alpha`` has one entry per cell.
  """
  paths = cell_paths(variables["tams"])
  if per_layer and alpha.shape[0] != len(paths):
    raise ValueError(f"a per-layer alpha of {alpha.shape[0]} cells for a model with {len(paths)} cells.")
  arch = {p + ("alpha",): (alpha[i] if per_layer else alpha) for i, p in enumerate(paths)}
  return {**variables, "arch": traverse_util.unflatten_dict(arch)}


def task_logits(
  variables: Params,
  support: Any,
  cfg: TamsConfig,
  embedding_fn: Callable[[Params], jax.Array],
  task_tokens_fn: Callable[[Any], tuple[jax.Array, jax.Array]],
) -> jax.Array:
  """The controller's architecture logits for a task with support batch ``support``: [edges, ops] or
  [cells, edges, ops] (``per_layer``). ``embedding_fn(params) -> [V, D]`` and ``task_tokens_fn(batch) -> (ids,
  mask)`` are the family's (`Family.embedding`, `Family.task_tokens`)."""
  ids, mask = task_tokens_fn(support)
  z = task_embedding(embedding_fn(variables["params"]), ids, mask)
  return controller(variables["tams"]["controller"], z, cfg)


def make_prepare(
  cfg: TamsConfig,
  embedding_fn: Callable[[Params], jax.Array],
  task_tokens_fn: Callable[[Any], tuple[jax.Array, jax.Array]],
  fixed: bool = False,
) -> Callable[..., dict]:
  """TAMS' ``prepare(variables, support, rng, step=None) -> variables`` for `mltd_jax.meta` (run once per task
  before the inner loop): the task's architecture goes into ``'arch'``.

  Args:
    cfg: the configuration (tau schedule, noise, per_layer).
    embedding_fn: ``params -> token embedding table [V, D]`` (`Family.embedding`).
    task_tokens_fn: ``support batch -> (ids [..., L], mask [..., L])`` (`Family.task_tokens`).
    fixed: meta-testing: the argmax architecture as integer indices (only the chosen operations computed; no
      noise, no gradient to the controller). Otherwise a straight-through Gumbel-softmax sample at tau(step)
      (``cfg.noise`` False: the hard argmax, still straight-through).
  """

  def prepare(variables: Params, support: Any, rng: jax.Array, step: Any = None) -> dict:
    logits = task_logits(variables, support, cfg, embedding_fn, task_tokens_fn)
    if fixed:
      alpha = discretize(logits)
    else:
      alpha = gumbel_softmax(rng, logits, tau_at(cfg, 0 if step is None else step), hard=True, noise=cfg.noise)
    return with_arch(variables, alpha, cfg.per_layer)

  return prepare


# ---- reporting ----------------------------------------------------------------------------------------------------


def arch_summary(alpha_logits: Any, ops: Sequence[str] = tuple(OPS)) -> dict[str, tuple[str, float, float]]:
  """``{"i->j": (chosen op, its probability, entropy in nats)}`` per edge, for logging.

  ``alpha_logits`` is [edges, ops], or [tasks, edges, ops] (the tasks' softmax probabilities are averaged; the
  chosen op is the argmax of the mean). For per-layer logits, call it once per cell.
  """
  logits = np.asarray(alpha_logits, np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs = probs / probs.sum(-1, keepdims=True)
  probs = probs.reshape(-1, *probs.shape[-2:]).mean(0)  # [edges, ops]
  spec = CellSpec(tuple(ops), nodes=_nodes_of(probs.shape[0]))
  entropy = -(probs * np.log(np.maximum(probs, 1e-30))).sum(-1)
  return {
    f"{i}->{j}": (ops[int(probs[e].argmax())], float(probs[e].max()), float(entropy[e]))
    for e, (i, j) in enumerate(spec.edges)
  }


def _nodes_of(edges: int) -> int:
  nodes = [n for n in range(1, edges + 1) if num_edges(n) == edges]
  if nodes:
    return nodes[0]
  raise ValueError(f"{edges} edges is not the edge count of any cell (2 + 3 + ... per node).")


def num_params(tree: Any) -> int:
  """Number of scalars in a pytree (TAMS' parameter overhead)."""
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))
