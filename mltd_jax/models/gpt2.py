"""The GPT-2 family: config, Flax linen model, Hugging Face conversion, default TARP targets, causal-LM loss.

Parameter names are transformers' (``transformer/h/0/attn/c_attn/weight`` ...), kernels [in, out] like GPT-2's
Conv1D, so a state dict maps onto the param tree by its key names. Parameters are float32; activations are
computed in ``dtype`` (bfloat16 on accelerators), while layer norms, attention softmax and logits stay in float32.
On XLA:CPU a bfloat16 ``dtype`` rounds only the operands of the products (dense layers, attention's two, the LM
head), summed and returned in float32 (`mltd_jax.matmul`: AMX), so activations and the softmax stay float32 there.
Every attention and MLP projection is a `layers.Dense`, so the TARP difference (the ``'tarp'`` collection) reaches
them without this file knowing about it. A model built with TAMS cells (``tams`` set by `mltd_jax.tams.attach`)
expands every block's MLP sublayer with a cell that reads the same normalized input, ``x + mlp(h) + cell(h)`` with
``h = ln_2(x)`` (`layers.ffn_cell`; causal convolutions); without a ``'tams'`` collection it is the plain model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mltd_jax import losses, matmul, onednn
from mltd_jax.models.family import Family
from mltd_jax.models.layers import (
  ACTIVATIONS,
  Dense,
  Embed,
  LayerNorm,
  ffn_cell,
  fold_for_decoding,
  heads_first,
  heads_last,
  normal,
  remat_policy,
  wide,
)

# Every attention and MLP projection of every block (the paper's targets for GPT-2).
DEFAULT_TARGETS = r"(attn/c_attn|attn/c_proj|mlp/c_fc|mlp/c_proj)$"


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  """The subset of `transformers.GPT2Config` that defines the computation (hashable, so jit can close over it)."""

  vocab_size: int = 50257
  n_positions: int = 1024
  n_embd: int = 768
  n_layer: int = 12
  n_head: int = 12
  n_inner: int | None = None
  activation_function: str = "gelu_new"
  layer_norm_epsilon: float = 1e-5
  embd_pdrop: float = 0.1
  resid_pdrop: float = 0.1
  attn_pdrop: float = 0.1
  initializer_range: float = 0.02
  bos_token_id: int | None = 50256
  eos_token_id: int | None = 50256

  def __post_init__(self):
    if self.n_embd % self.n_head:
      raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}.")
    if self.activation_function not in ACTIVATIONS:
      raise ValueError(
        f"activation_function={self.activation_function!r} is not supported; use one of {sorted(ACTIVATIONS)}."
      )

  @property
  def inner_dim(self) -> int:
    return self.n_inner or 4 * self.n_embd


class Attention(nn.Module):
  """Causal multi-head self-attention; ``c_attn`` makes q, k, v in one [d, 3d] projection, as in GPT-2.

  With ``kv`` (decoding) this call's keys and values are first written into the fixed-size cache
  ``kv = {'k', 'v'}`` (each [b, T, h, hd]) at slot ``index``, the queries attend over all T slots (``mask``
  [b, 1, q, T] hides the padded and the not yet written ones), and the updated cache is returned too.
  """

  config: GPT2Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool, kv: dict | None = None, index=None):
    cfg = self.config
    b, t, d = x.shape
    heads, head_dim = cfg.n_head, d // cfg.n_head
    proj_std = cfg.initializer_range / math.sqrt(2 * cfg.n_layer)
    qkv = Dense(3 * d, dtype=self.dtype, weight_init=normal(cfg.initializer_range), name="c_attn")(x)
    q, k, v = jnp.split(qkv.reshape(b, t, 3, heads, head_dim), 3, axis=2)  # each [b, t, 1, h, hd]
    q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]  # each [b, t, h, hd]
    if kv is not None:  # decoding: keys/values of slots [index, index + t) are this call's; attend to all T
      k = jax.lax.dynamic_update_slice(kv["k"], k.astype(kv["k"].dtype), (0, index, 0, 0))  # [b, T, h, hd]
      v = jax.lax.dynamic_update_slice(kv["v"], v.astype(kv["v"].dtype), (0, index, 0, 0))
      kv = {"k": k, "v": v}
    wdt = wide(self.dtype)
    q, k, v = heads_first(q), heads_first(k), heads_first(v)  # [b * h, t or T, hd]
    # Both products in the compute dtype (`matmul`: on XLA:CPU with bfloat16, bfloat16 operands summed in float32,
    # AMX, like the dense layers; elsewhere a plain dot); the softmax in float32.
    scores = matmul.matmul(q.astype(self.dtype), k, transpose_y=True).astype(wdt) / math.sqrt(head_dim)  # [b*h, t, T]
    mask = jnp.broadcast_to(mask, (b, heads, *mask.shape[2:])).reshape(-1, *mask.shape[2:])  # from [b or 1, 1, ..]
    scores = jnp.where(mask, scores, jnp.finfo(wdt).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, heads, *scores.shape[1:])
    probs = nn.Dropout(cfg.attn_pdrop)(probs, deterministic=deterministic).reshape(scores.shape)
    out = heads_last(matmul.matmul(probs.astype(self.dtype), v), b)  # [b * h, t, hd] -> [b, t, d]
    out = Dense(d, dtype=self.dtype, weight_init=normal(proj_std), name="c_proj")(out)
    out = nn.Dropout(cfg.resid_pdrop)(out, deterministic=deterministic)
    return out if kv is None else (out, kv)


class MLP(nn.Module):
  config: GPT2Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    cfg = self.config
    proj_std = cfg.initializer_range / math.sqrt(2 * cfg.n_layer)
    h = Dense(cfg.inner_dim, dtype=self.dtype, weight_init=normal(cfg.initializer_range), name="c_fc")(x)
    h = ACTIVATIONS[cfg.activation_function](h)
    h = Dense(cfg.n_embd, dtype=self.dtype, weight_init=normal(proj_std), name="c_proj")(h)
    return nn.Dropout(cfg.resid_pdrop)(h, deterministic=deterministic)


class Block(nn.Module):
  """Pre-LayerNorm transformer block; with TAMS cells (``tams``) the MLP sublayer also adds the block's cell.

  While decoding, ``kv`` also carries the cell's history (``'tams'``, see `mltd_jax.tams.cell`).
  """

  config: GPT2Config
  dtype: Any = jnp.float32
  tams: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool, kv: dict | None = None, index=None):
    eps = self.config.layer_norm_epsilon
    # Each sublayer's residual cotangent computed once on XLA:CPU (`onednn.materialized_cotangent`), in float32: the
    # second-order meta-step 1.026x [1.010-1.036], updates bit-identical there; in bfloat16 0.981x [0.933-1.024], so
    # not there.
    barrier = onednn.materialized_cotangent if jnp.dtype(self.dtype) == jnp.float32 else (lambda v: v)
    x = barrier(x)
    h = Attention(self.config, self.dtype, name="attn")(
      LayerNorm(eps, self.dtype, name="ln_1")(x), mask, deterministic, kv, index
    )
    if kv is not None:  # decoding: the attention also returns its updated keys/values (other entries kept)
      h, new_kv = h
      kv = {**kv, **new_kv}
    x = barrier(x + h)
    h = LayerNorm(eps, self.dtype, name="ln_2")(x)
    out = MLP(self.config, self.dtype, name="mlp")(h, deterministic)
    cell, kv = ffn_cell(self, h, mask, index, True, kv)
    x = x + (out if cell is None else out + cell)
    return x if kv is None else (x, kv)


class Blocks(nn.Module):
  """The ``h`` list of blocks, named "0", "1", ... like transformers' ModuleList.

  With ``remat`` each block is a `jax.checkpoint`: its activations are recomputed in the backward pass instead
  of stored (same parameters, same outputs).
  """

  config: GPT2Config
  dtype: Any = jnp.float32
  remat: bool = False
  tams: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool, kv: tuple | None = None, index=None):
    policy = remat_policy(self.remat)  # a `jax.checkpoint_policies` name, or None
    block = nn.remat(Block, static_argnums=(3,), policy=policy) if self.remat else Block  # 3: `deterministic`
    if kv is None:
      for i in range(self.config.n_layer):
        x = block(self.config, self.dtype, self.tams, name=str(i))(x, mask, deterministic)
      return x
    new_kv = []  # decoding: kv is a tuple of per-layer caches
    for i in range(self.config.n_layer):
      x, layer_kv = block(self.config, self.dtype, self.tams, name=str(i))(x, mask, deterministic, kv[i], index)
      new_kv.append(layer_kv)
    return x, tuple(new_kv)


class GPT2Model(nn.Module):
  """Embeddings, blocks and the final layer norm; returns hidden states [batch, length, n_embd]."""

  config: GPT2Config
  dtype: Any = jnp.float32
  remat: bool = False
  tams: Any = None

  def setup(self):
    cfg = self.config
    self.wte = Embed(cfg.vocab_size, cfg.n_embd, self.dtype, cfg.initializer_range)
    self.wpe = Embed(cfg.n_positions, cfg.n_embd, self.dtype, 0.01)
    self.drop = nn.Dropout(cfg.embd_pdrop)
    self.h = Blocks(cfg, self.dtype, self.remat, self.tams)
    self.ln_f = LayerNorm(cfg.layer_norm_epsilon, self.dtype)

  def __call__(self, input_ids, attention_mask=None, position_ids=None, deterministic=True):
    _, t = input_ids.shape
    if t > self.config.n_positions:
      raise ValueError(
        f"sequence length {t} exceeds n_positions={self.config.n_positions}; "
        "shorten the data's seq_len or use a model with more positions."
      )
    if position_ids is None:
      position_ids = jnp.arange(t)[None, :]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))[None, None]  # [1, 1, q, k]
    mask = causal if attention_mask is None else causal & attention_mask.astype(bool)[:, None, None, :]
    x = self.wte(input_ids) + self.wpe(position_ids)
    x = self.drop(x, deterministic=deterministic)
    return self.ln_f(self.h(x, mask, deterministic))

  def cached(self, input_ids, position_ids, mask, kv, index):
    """The forward pass for decoding: ``input_ids`` [b, t] at ``position_ids`` [b, t] read and write the key/value
    cache ``kv`` (a tuple of per-layer ``{'k', 'v'}`` [b, T, h, hd]) at slots [index, index + t), attending as
    ``mask`` [b, 1, t, T] allows. Returns (hidden states [b, t, n_embd], the updated kv)."""
    x = self.wte(input_ids) + self.wpe(position_ids)
    x, kv = self.h(x, mask, True, kv, index)
    return self.ln_f(x), kv


class GPT2LMHeadModel(nn.Module):
  """GPT-2 with the output projection tied to ``wte``.

  ``apply({'params': params}, input_ids, attention_mask=None)`` returns float32 logits [batch, length, vocab].
  Pass ``{'params': ..., 'tarp': ...}`` to run the TARP-reparameterized model; pass ``deterministic=False`` and
  a ``'dropout'`` rng to train with dropout. ``remat=True`` checkpoints every block (less memory, more compute).
  ``tams`` (a `mltd_jax.tams.CellSpec`, set by `tams.attach`) adds TAMS cells, which read the ``'tams'`` and
  ``'arch'`` collections.
  """

  config: GPT2Config
  dtype: Any = jnp.float32
  remat: bool = False
  tams: Any = None

  def setup(self):
    self.transformer = GPT2Model(self.config, self.dtype, self.remat, self.tams)

  def __call__(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    position_ids: jax.Array | None = None,
    deterministic: bool = True,
  ) -> jax.Array:
    hidden = self.transformer(input_ids, attention_mask, position_ids, deterministic)
    return self.transformer.wte.attend(hidden)  # [batch, length, vocab], float32

  def init_params(self, rng: jax.Array) -> dict:
    """Random parameters: GPT-2's initialization (normal(initializer_range) weights, the residual projections'
    scaled by 1/sqrt(2 n_layer)), with the position table at std 0.01 as in OpenAI's original code (transformers
    uses initializer_range there)."""
    ids = jnp.zeros((1, min(8, self.config.n_positions)), jnp.int32)
    return self.init(rng, ids)["params"]

  # ---- decoding (the `mltd_jax.decode.Decoder` protocol) -------------------------------------------------------
  # The cache is {'mask': the prompt's attention mask [B, P] (bool), 'kv': per layer {'k', 'v'} [B, P + N, h, hd]
  # (and, with TAMS cells, 'tams': the cell's history [B, sources, kernel - 1, width], added by the prompt's pass)}:
  # every leaf has the batch first, so beam search reorders it with one gather; the step index stays outside.

  def forward_cached(self, input_ids, position_ids, mask, kv, index):
    """Next-token logits [b, vocab] (float32) after the last of ``input_ids`` [b, t], and the updated cache."""
    hidden, kv = self.transformer.cached(input_ids, position_ids, mask, kv, index)
    return self.transformer.wte.attend(hidden[:, -1]), kv

  def check_decode_inputs(self, input_ids: jax.Array, attention_mask: jax.Array | None):
    """Refuses a right-padded ``attention_mask`` (the cache continues after the prompt's last slot), checked only
    when concrete (not under an outer jit); `decode.generate` calls it before compiling."""
    del input_ids
    if attention_mask is None:
      return
    try:
      m = np.asarray(attention_mask).astype(bool)
    except jax.errors.TracerArrayConversionError:
      return
    if (m[:, 1:] < m[:, :-1]).any():
      raise ValueError("attention_mask has padding after a real token: pad prompts on the left for decoding.")

  def prepare_decode(self, variables: dict) -> dict:
    """Static TARP parts folded into the kernels once before decoding (`layers.fold_for_decoding`)."""
    return fold_for_decoding(variables)

  def init_decode(self, variables: dict, input_ids: jax.Array, attention_mask: jax.Array | None, max_new_tokens: int):
    """Runs the prompt ``input_ids`` [B, P] (left-padded: ``attention_mask`` [B, P] has its zeros first) into a
    cache with room for the ``max_new_tokens - 1`` generated tokens that are fed back (the last one never is).

    Positions are cumsum(mask) - 1 (0 on padding), as transformers' ``generate`` makes them for GPT-2, so a padded
    prompt continues exactly like the unpadded one; the last token fed sits at position P + max_new_tokens - 2 at
    most, so P + max_new_tokens may reach n_positions + 1, as in transformers. Returns (logits [B, vocab] for the
    first new token, cache).
    """
    cfg = self.config
    b, p = input_ids.shape
    fed = max_new_tokens - 1  # generated tokens fed back into the cache
    total = p + fed  # T: cache slots
    if total > cfg.n_positions:
      raise ValueError(
        f"prompt length {p} + max_new_tokens {max_new_tokens} exceeds n_positions + 1 = {cfg.n_positions + 1}; "
        "shorten the prompt or generate fewer tokens."
      )
    mask = jnp.ones((b, p), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
    positions = jnp.maximum(jnp.cumsum(mask, -1) - 1, 0)  # [B, P]
    keys = jnp.concatenate([mask, jnp.zeros((b, fed), bool)], -1)  # [B, T]: the prompt's real tokens
    attend = jnp.tril(jnp.ones((p, total), bool))[None, None] & keys[:, None, None, :]  # [B, 1, P, T], causal
    head_dim = cfg.n_embd // cfg.n_head
    empty = jnp.zeros((b, total, cfg.n_head, head_dim), matmul.result_dtype(self.dtype))  # as the layers make k, v
    kv = tuple({"k": empty, "v": empty} for _ in range(cfg.n_layer))
    logits, kv = self.apply(variables, input_ids, positions, attend, kv, 0, method="forward_cached")
    return logits, {"mask": mask, "kv": kv}

  def decode_step(self, variables: dict, cache: dict, tokens: jax.Array, index: jax.Array):
    """Feeds ``tokens`` [B], the generated token number ``index`` (0-based), into the cache (slot P + index, position
    one past the prompt's last plus ``index``). Returns (logits [B, vocab] for the next token, cache)."""
    mask = cache["mask"]  # [B, P]
    b, p = mask.shape
    total = cache["kv"][0]["k"].shape[1]  # T = P + max_new_tokens - 1
    last = jnp.maximum(mask.sum(-1) - 1, 0)  # [B]: position of the prompt's last token (0 for an empty prompt)
    positions = (last + 1 + index)[:, None]  # [B, 1]
    written = jnp.arange(total - p) <= index  # [N]: generated slots filled so far, this one included
    keys = jnp.concatenate([mask, jnp.broadcast_to(written, (b, total - p))], -1)  # [B, T]
    args = (tokens[:, None], positions, keys[:, None, None, :], cache["kv"], p + index)
    logits, kv = self.apply(variables, *args, method="forward_cached")
    return logits, {"mask": mask, "kv": kv}


# ---- Hugging Face conversion ----------------------------------------------------------------------------------

# State-dict entries that are buffers, not parameters (``lm_head.weight``, wte's tied copy, is checked, then dropped).
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
_HEAD, _WTE = "lm_head.weight", "transformer.wte.weight"
_UNSUPPORTED = ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn")


def from_hf_config(hf: dict) -> GPT2Config:
  """``config.json`` (transformers' GPT2Config) -> GPT2Config; options we do not implement are an error."""
  unsupported = {k: hf[k] for k in _UNSUPPORTED if hf.get(k)}
  for flag in ("scale_attn_weights", "tie_word_embeddings"):  # an untied head: its own weights, not wte's
    if hf.get(flag) is False:
      unsupported[flag] = False
  if unsupported:
    raise ValueError(f"GPT-2 options {unsupported} are not supported by mltd_jax's GPT-2.")
  return GPT2Config(**{f: hf[f] for f in GPT2Config.__dataclass_fields__ if hf.get(f) is not None})


def to_hf_config(cfg: GPT2Config) -> dict:
  fields = {k: getattr(cfg, k) for k in GPT2Config.__dataclass_fields__}
  return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "tie_word_embeddings": True, **fields}


def from_state_dict(state: dict[str, np.ndarray], cfg: GPT2Config | None = None) -> dict[str, np.ndarray]:
  """transformers' GPT2LMHeadModel (or GPT2Model) state dict -> our flat names: the same keys, under
  ``transformer.``, without the attention-mask buffers and the tied ``lm_head.weight`` (which must equal wte: our
  GPT-2 scores with wte). No transposes: GPT-2's Conv1D already stores [in, out]. ``cfg`` is not needed."""
  del cfg
  if not any(k.startswith("transformer.") for k in state):  # saved from the base GPT2Model class
    state = {("transformer." + k if k != _HEAD else k): v for k, v in state.items()}
  state = dict(state)
  head = state.pop(_HEAD, None)
  if head is not None and _WTE in state and not np.array_equal(np.asarray(head), np.asarray(state[_WTE])):
    raise ValueError(
      f"{_HEAD} differs from {_WTE}: an untied output head, which mltd_jax's GPT-2 (scoring with wte) does not "
      "support; use a checkpoint with tied embeddings (tie_word_embeddings=true)."
    )
  return {k: v for k, v in state.items() if not k.endswith(_IGNORED_SUFFIXES)}


def to_state_dict(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return dict(flat)  # the tied lm_head.weight is not stored (transformers ties it on load)


def fresh_config(fields: dict, tokenizer, max_len: int, dropout: float) -> GPT2Config:
  """A randomly initialized GPT-2 of ``fields``' size (config.model.init) that fits ``tokenizer``."""
  fields = dict(fields)
  fields["n_positions"] = max(max_len, fields.get("n_positions") or 0)
  fields["n_inner"] = fields.get("n_inner") or None
  unknown = sorted(set(fields) - set(GPT2Config.__dataclass_fields__))
  if unknown:
    raise ValueError(f"config.model.init has fields {unknown} that GPT2Config does not have.")
  return GPT2Config(
    **fields,
    vocab_size=len(tokenizer),
    embd_pdrop=dropout,
    resid_pdrop=dropout,
    attn_pdrop=dropout,
    bos_token_id=tokenizer.bos_token_id,
    eos_token_id=tokenizer.eos_token_id,
  )


def make_loss(model: GPT2LMHeadModel, train: bool = False):
  """Next-token loss ``(variables, batch, rng) -> (summed NLL, token count)`` of a causal-LM batch
  ``{"ids": [B, L], "mask": [B, L]}`` (`mltd_jax.data.CausalLMEncoder`).

  An optional ``batch["weights"]`` [B, L] selects the target tokens that count (default: ``mask``), e.g. only
  the objects of facts; attention always uses ``mask``. With ``train`` dropout is on, driven by ``rng``.
  """

  def loss_fn(variables, batch, rng):
    ids, mask = batch["ids"], batch["mask"]
    kw = {"deterministic": False, "rngs": {"dropout": rng}} if train else {}
    logits = model.apply(variables, ids[..., :-1], attention_mask=mask[..., :-1], **kw)
    return losses.token_nll(logits, ids[..., 1:], batch.get("weights", mask)[..., 1:])

  return loss_fn


FAMILY = Family(
  model_type="gpt2",
  config_cls=GPT2Config,
  model=lambda config, dtype=jnp.float32, remat=False: GPT2LMHeadModel(config, dtype, remat),
  from_hf_config=from_hf_config,
  to_hf_config=to_hf_config,
  from_state_dict=from_state_dict,
  to_state_dict=to_state_dict,
  fresh_config=fresh_config,
  default_targets=DEFAULT_TARGETS,
  make_loss=make_loss,
  encoder="causal_lm",
  task_tokens=lambda batch: (batch["ids"], batch["mask"]),
  embedding=lambda params: params["transformer"]["wte"]["weight"],
  max_len=lambda config: config.n_positions + 1,  # the loss feeds ids[..., :-1]
)
