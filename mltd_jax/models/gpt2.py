"""GPT-2 as Flax linen modules with transformers' parameter names (``transformer/h/0/attn/c_attn/weight`` ...).

Parameters are float32; activations are computed in ``dtype`` (bfloat16 on accelerators), while layer norms,
attention softmax and logits stay in float32. Every attention and MLP projection is a `layers.Dense`, so the TARP
difference (the ``'tarp'`` collection) reaches them without this file knowing about it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mltd_jax.models.layers import ACTIVATIONS, Dense, Embed, LayerNorm, normal, wide


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
  bos_token_id: int = 50256
  eos_token_id: int = 50256

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
  """Causal multi-head self-attention; ``c_attn`` makes q, k, v in one [d, 3d] projection, as in GPT-2."""

  config: GPT2Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool) -> jax.Array:
    cfg = self.config
    b, t, d = x.shape
    heads, head_dim = cfg.n_head, d // cfg.n_head
    proj_std = cfg.initializer_range / math.sqrt(2 * cfg.n_layer)
    qkv = Dense(3 * d, dtype=self.dtype, weight_init=normal(cfg.initializer_range), name="c_attn")(x)
    q, k, v = jnp.split(qkv.reshape(b, t, 3, heads, head_dim), 3, axis=2)  # each [b, t, 1, h, hd]
    wdt = wide(self.dtype)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q[:, :, 0], k[:, :, 0]).astype(wdt) / math.sqrt(head_dim)
    scores = jnp.where(mask, scores, jnp.finfo(wdt).min)  # mask [b, 1, q, k]
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    probs = nn.Dropout(cfg.attn_pdrop)(probs, deterministic=deterministic)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v[:, :, 0]).reshape(b, t, d)
    out = Dense(d, dtype=self.dtype, weight_init=normal(proj_std), name="c_proj")(out)
    return nn.Dropout(cfg.resid_pdrop)(out, deterministic=deterministic)


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
  """Pre-LayerNorm transformer block."""

  config: GPT2Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool) -> jax.Array:
    eps = self.config.layer_norm_epsilon
    x = x + Attention(self.config, self.dtype, name="attn")(
      LayerNorm(eps, self.dtype, name="ln_1")(x), mask, deterministic
    )
    return x + MLP(self.config, self.dtype, name="mlp")(LayerNorm(eps, self.dtype, name="ln_2")(x), deterministic)


class Blocks(nn.Module):
  """The ``h`` list of blocks, named "0", "1", ... like transformers' ModuleList.

  With ``remat`` each block is a `jax.checkpoint`: its activations are recomputed in the backward pass instead
  of stored (same parameters, same outputs).
  """

  config: GPT2Config
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool) -> jax.Array:
    block = nn.remat(Block, static_argnums=(3,)) if self.remat else Block  # argnum 3: `deterministic`
    for i in range(self.config.n_layer):
      x = block(self.config, self.dtype, name=str(i))(x, mask, deterministic)
    return x


class GPT2Model(nn.Module):
  """Embeddings, blocks and the final layer norm; returns hidden states [batch, length, n_embd]."""

  config: GPT2Config
  dtype: Any = jnp.float32
  remat: bool = False

  def setup(self):
    cfg = self.config
    self.wte = Embed(cfg.vocab_size, cfg.n_embd, self.dtype, cfg.initializer_range)
    self.wpe = Embed(cfg.n_positions, cfg.n_embd, self.dtype, 0.01)
    self.drop = nn.Dropout(cfg.embd_pdrop)
    self.h = Blocks(cfg, self.dtype, self.remat)
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


class GPT2LMHeadModel(nn.Module):
  """GPT-2 with the output projection tied to ``wte``.

  ``apply({'params': params}, input_ids, attention_mask=None)`` returns float32 logits [batch, length, vocab].
  Pass ``{'params': ..., 'tarp': ...}`` to run the TARP-reparameterized model; pass ``deterministic=False`` and
  a ``'dropout'`` rng to train with dropout. ``remat=True`` checkpoints every block (less memory, more compute).
  """

  config: GPT2Config
  dtype: Any = jnp.float32
  remat: bool = False

  def setup(self):
    self.transformer = GPT2Model(self.config, self.dtype, self.remat)

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
    """Random parameters (GPT-2's initialization scheme)."""
    ids = jnp.zeros((1, min(8, self.config.n_positions)), jnp.int32)
    return self.init(rng, ids)["params"]
