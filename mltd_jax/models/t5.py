"""The T5 family: config, Flax linen encoder-decoder, Hugging Face conversion, default TARP targets, seq2seq loss.

Parameter names are transformers' (``shared/weight``, ``encoder/block/0/layer/0/SelfAttention/q/weight``,
``decoder/block/0/layer/1/EncDecAttention/k/weight``, ``.../layer/2/DenseReluDense/wi_0/weight``, ``lm_head/weight``
...), so a state dict maps onto the param tree by its key names; torch's ``nn.Linear`` stores [out, in] and our
`layers.Dense` [in, out], so the conversion transposes every projection. Both variants are supported:

* original T5: ReLU feed-forward (``wi``, ``wo``), output logits from the shared embedding with the decoder output
  scaled by d_model**-0.5 (``tie_word_embeddings=True``);
* T5 v1.1 / Flan-T5: gated-GELU feed-forward (``wi_0``, ``wi_1``, ``wo``), its own unscaled ``lm_head``
  (``tie_word_embeddings=False``).

Positions enter only as a learned bias on the attention scores, looked up by a bucketed relative distance
(bidirectional buckets in the encoder, causal ones in the decoder); block 0 of each stack owns the bias table and
the other blocks reuse its bias. Scores are not scaled by 1/sqrt(d_kv) (T5's initialization absorbs it).
Parameters are float32; activations are computed in ``dtype``, while layer norms, softmax and logits stay in
float32. Every projection (q, k, v, o, wi, wi_0, wi_1, wo, lm_head) is a `layers.Dense`, so the TARP difference
(the ``'tarp'`` collection) reaches them without this file knowing about it.

TAMS (`mltd_jax.tams`): a model built with cells (``tams`` set by `tams.attach`) expands the feed-forward sublayer
of every encoder and decoder block with a cell reading the same normalized input, ``x + dropout(ff(h)) + cell(h)``
(`layers.ffn_cell`); its convolutions are causal in the decoder and centered in the (bidirectional) encoder.
Without a ``'tams'`` collection it is the plain model.

Decoding (`mltd_jax.decode`): ``init_decode`` encodes the source once and projects it into each decoder block's
cross-attention keys/values; ``decode_step`` feeds one target token, whose self-attention keys/values go into a
fixed-size cache and whose position bias is the full sequence's row for its position.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mltd_jax import losses, matmul
from mltd_jax.models.family import Family
from mltd_jax.models.layers import (
  ACTIVATIONS,
  Dense,
  Embed,
  RMSNorm,
  ffn_cell,
  fold_for_decoding,
  heads_first,
  heads_last,
  normal,
  remat_policy,
  wide,
)

# Self-attention, cross-attention and feed-forward projections of every encoder and decoder block (not lm_head).
DEFAULT_TARGETS = r"((SelfAttention|EncDecAttention)/(q|k|v|o)|DenseReluDense/(wi|wi_0|wi_1|wo))$"


@dataclasses.dataclass(frozen=True)
class T5Config:
  """The subset of `transformers.T5Config` that defines the computation (hashable, so jit can close over it).

  ``tie_word_embeddings`` chooses the output layer as in the original T5 code: True, logits from ``shared`` with
  the decoder output scaled by d_model**-0.5; False, a separate, unscaled ``lm_head`` (v1.1, Flan-T5).
  ``num_decoder_layers`` None means ``num_layers``; ``decoder_start_token_id`` None means ``pad_token_id``.
  """

  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 6
  num_decoder_layers: int | None = None
  num_heads: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.1
  layer_norm_epsilon: float = 1e-6
  initializer_factor: float = 1.0
  feed_forward_proj: str = "relu"
  tie_word_embeddings: bool = True
  pad_token_id: int | None = 0
  eos_token_id: int | tuple[int, ...] | None = 1
  decoder_start_token_id: int | None = None

  def __post_init__(self):
    if self.num_decoder_layers is None:
      object.__setattr__(self, "num_decoder_layers", self.num_layers)
    if self.decoder_start_token_id is None:
      object.__setattr__(self, "decoder_start_token_id", self.pad_token_id)
    if isinstance(self.eos_token_id, list):  # transformers allows a list; a tuple keeps the config hashable
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
    activation(self.feed_forward_proj)  # raises on an unsupported feed_forward_proj
    buckets, distance = self.relative_attention_num_buckets, self.relative_attention_max_distance
    if buckets < 4 or distance <= buckets // 2:
      raise ValueError(
        f"relative_attention_num_buckets={buckets} must be >= 4 and relative_attention_max_distance={distance} "
        f"> relative_attention_num_buckets // 2 (the buckets of exact distances)."
      )

  @property
  def is_gated(self) -> bool:
    """Gated feed-forward (``wi_0``, ``wi_1``) instead of one input projection ``wi``."""
    return self.feed_forward_proj.startswith("gated-")


def activation(feed_forward_proj: str) -> str:
  """The activation (a key of `layers.ACTIVATIONS`) named by ``feed_forward_proj`` ("relu", "gated-gelu", ...).

  Like transformers: the part after "gated-", except that "gated-gelu" means the tanh approximation (gelu_new).
  """
  parts = feed_forward_proj.split("-")
  act = "gelu_new" if feed_forward_proj == "gated-gelu" else parts[-1]
  if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated") or act not in ACTIVATIONS:
    raise ValueError(
      f"feed_forward_proj={feed_forward_proj!r} is not supported; use 'ACT' or 'gated-ACT' with ACT one of "
      f"{sorted(ACTIVATIONS)}."
    )
  return act


def relative_position_bucket(
  relative_position: jax.Array, bidirectional: bool, num_buckets: int, max_distance: int
) -> jax.Array:
  """T5's bucket of each relative position (key position - query position), int32 in [0, num_buckets).

  Distances below half of the (per direction) buckets get one bucket each; larger ones share logarithmically wider
  buckets up to ``max_distance``, beyond which they all fall in the last bucket. Bidirectional: keys after the
  query use the upper half of the buckets. Causal: keys after the query share bucket 0 (the mask hides them).
  The logarithm is taken in float32 whatever the precision, as the reference does, so the buckets agree.
  """
  if bidirectional:
    num_buckets //= 2
    offset = jnp.where(relative_position > 0, num_buckets, 0)
    distance = jnp.abs(relative_position)
  else:
    offset = 0
    distance = jnp.maximum(-relative_position, 0)
  exact = num_buckets // 2
  ratio = jnp.maximum(distance, exact).astype(jnp.float32) / exact  # >= 1: the log branch is only used there
  far = exact + (jnp.log(ratio) / math.log(max_distance / exact) * (num_buckets - exact)).astype(jnp.int32)
  far = jnp.minimum(far, num_buckets - 1)
  return (offset + jnp.where(distance < exact, distance, far)).astype(jnp.int32)


class Attention(nn.Module):
  """Multi-head attention of ``x`` over ``kv`` (``kv = x`` for self-attention), T5-style.

  With ``relative_bias`` this layer owns the bucketed position-bias table (``relative_attention_bias``, [buckets,
  heads]) and returns the bias it computed, which the later blocks of its stack reuse.

  Decoding reads and writes projected keys and values (``cache`` = {'k', 'v'}, each [b, T, heads, d_kv]):
  with ``index`` (decoder self-attention) this call's keys/values are written into the T cache slots at slot
  ``index`` and the queries attend over all T (``mask`` hides the slots not written yet), their bias computed for
  query positions ``index, index + 1, ...``; with ``kv=None`` (cross-attention) the cached keys/values, projected
  once from the encoder output, are used as they are.
  """

  config: T5Config
  causal: bool = False
  relative_bias: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, kv, mask, bias, deterministic: bool, cache: dict | None = None, index=None):
    """x [b, q, d], kv [b, k, d] or None, mask bool [b or 1, 1, q or 1, k], bias [1, h, q, k] or None.

    Returns (output [b, q, d], the position bias used: [1, h, q, k] or None, the keys/values attended over:
    {'k', 'v'} [b, k, h, d_kv]).
    """
    cfg = self.config
    b, tq, _ = x.shape
    heads, dk, f = cfg.num_heads, cfg.d_kv, cfg.initializer_factor
    dense = lambda n, std, name: Dense(n, False, self.dtype, normal(f * std), name=name)  # noqa: E731
    q = dense(heads * dk, (cfg.d_model * dk) ** -0.5, "q")(x).reshape(b, tq, heads, dk)
    if kv is None:  # cross-attention while decoding: keys/values projected once from the encoder output
      k, v = cache["k"], cache["v"]  # [b, k, h, dk]
    else:
      k = dense(heads * dk, cfg.d_model**-0.5, "k")(kv).reshape(b, kv.shape[1], heads, dk)
      v = dense(heads * dk, cfg.d_model**-0.5, "v")(kv).reshape(b, kv.shape[1], heads, dk)
    if index is not None:  # self-attention while decoding: this call's keys/values go to slots [index, index + q)
      k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, index, 0, 0))  # [b, T, h, dk]
      v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, index, 0, 0))
    tk = k.shape[1]
    wdt = wide(self.dtype)
    # Both products in the compute dtype (`matmul`: on XLA:CPU with bfloat16, bfloat16 operands summed in float32,
    # like the dense layers; elsewhere a plain dot), over one (batch x head) axis; the softmax in float32.
    qh, kh, vh = heads_first(q), heads_first(k), heads_first(v)  # [b * h, q or k, dk]
    scores = matmul.matmul(qh.astype(self.dtype), kh, transpose_y=True).astype(wdt)  # no 1/sqrt(d_kv) in T5
    scores = scores.reshape(b, heads, tq, tk)
    if self.relative_bias:
      bias = self.position_bias(tq, tk, 0 if index is None else index)
    if bias is not None:
      scores = scores + bias
    scores = jnp.where(mask, scores, jnp.finfo(wdt).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    probs = nn.Dropout(cfg.dropout_rate)(probs, deterministic=deterministic)
    out = heads_last(matmul.matmul(probs.reshape(b * heads, tq, tk).astype(self.dtype), vh), b)  # [b, q, h * dk]
    return dense(cfg.d_model, (heads * dk) ** -0.5, "o")(out), bias, {"k": k, "v": v}

  def position_bias(self, q_len: int, k_len: int, q_offset=0) -> jax.Array:
    """The learned bias of every (query, key) pair, [1, heads, q_len, k_len], in float32 (or wider).

    The queries sit at positions ``q_offset + [0, q_len)`` (an int or a traced scalar: the decoding step), the keys
    at ``[0, k_len)``, so one query decoded at position i gets row i of the full sequence's bias.
    """
    cfg = self.config
    relative = jnp.arange(k_len)[None, :] - (q_offset + jnp.arange(q_len))[:, None]  # [q, k]: key - query
    buckets = relative_position_bucket(
      relative, not self.causal, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
    )
    table = Embed(
      cfg.relative_attention_num_buckets,
      cfg.num_heads,
      wide(self.dtype),
      cfg.initializer_factor * cfg.d_model**-0.5,
      name="relative_attention_bias",
    )
    return table(buckets).transpose(2, 0, 1)[None]  # [q, k, h] -> [1, h, q, k]


class FeedForward(nn.Module):
  """``DenseReluDense``: wo(act(wi x)), or wo(act(wi_0 x) * wi_1 x) when gated."""

  config: T5Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    cfg, f = self.config, self.config.initializer_factor
    act = ACTIVATIONS[activation(cfg.feed_forward_proj)]
    dense = lambda n, std, name: Dense(n, False, self.dtype, normal(f * std), name=name)  # noqa: E731
    if cfg.is_gated:
      h = act(dense(cfg.d_ff, cfg.d_model**-0.5, "wi_0")(x)) * dense(cfg.d_ff, cfg.d_model**-0.5, "wi_1")(x)
    else:
      h = act(dense(cfg.d_ff, cfg.d_model**-0.5, "wi")(x))  # [b, t, d_ff]
    h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    return dense(cfg.d_model, cfg.d_ff**-0.5, "wo")(h)


class SelfAttentionLayer(nn.Module):
  """Pre-norm residual self-attention; returns (x, position bias, keys/values attended over)."""

  config: T5Config
  causal: bool = False
  relative_bias: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask, bias, deterministic: bool, cache: dict | None = None, index=None):
    cfg = self.config
    h = RMSNorm(cfg.layer_norm_epsilon, self.dtype, name="layer_norm")(x)
    attention = Attention(cfg, self.causal, self.relative_bias, self.dtype, name="SelfAttention")
    out, bias, kv = attention(h, h, mask, bias, deterministic, cache, index)
    return x + nn.Dropout(cfg.dropout_rate)(out, deterministic=deterministic), bias, kv


class CrossAttentionLayer(nn.Module):
  """Pre-norm residual attention of the decoder over the encoder output (no position bias).

  ``encoded`` None: attend over ``cache``, the keys/values a previous call returned (decoding). Returns (x, the
  keys/values attended over).
  """

  config: T5Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, encoded, encoder_mask, deterministic: bool, cache: dict | None = None):
    cfg = self.config
    h = RMSNorm(cfg.layer_norm_epsilon, self.dtype, name="layer_norm")(x)
    attention = Attention(cfg, dtype=self.dtype, name="EncDecAttention")
    out, _, kv = attention(h, encoded, encoder_mask, None, deterministic, cache)
    return x + nn.Dropout(cfg.dropout_rate)(out, deterministic=deterministic), kv


class FeedForwardLayer(nn.Module):
  """Pre-norm residual feed-forward, plus the TAMS cell (``tams``; ``causal`` convolutions in the decoder).

  ``__call__(x, deterministic, mask, index, cache) -> (x, cache)``: ``mask`` is the block's self-attention mask
  (the cell zeroes padded tokens); while decoding, ``cache`` (the block's) carries the cell's history.
  """

  config: T5Config
  dtype: Any = jnp.float32
  tams: Any = None
  causal: bool = False

  @nn.compact
  def __call__(self, x, deterministic: bool, mask=None, index=None, cache=None):
    cfg = self.config
    h = RMSNorm(cfg.layer_norm_epsilon, self.dtype, name="layer_norm")(x)
    out = FeedForward(cfg, self.dtype, name="DenseReluDense")(h, deterministic)
    x = x + nn.Dropout(cfg.dropout_rate)(out, deterministic=deterministic)
    cell, cache = ffn_cell(self, h, mask, index, self.causal, cache)
    return (x if cell is None else x + cell), cache


class Sublayers(nn.Module):
  """A block's ``layer`` list: "0" self-attention, then ("1" cross-attention in the decoder and) feed-forward.

  Decoding (decoder only) passes ``cache`` = {'self': {'k', 'v'} [b, N, h, dk], written at slot ``index``,
  'cross': {'k', 'v'} [b, S, h, dk] or None to project ``encoded`` now} and gets the updated cache back.
  """

  config: T5Config
  decoder: bool = False
  relative_bias: bool = False
  dtype: Any = jnp.float32
  tams: Any = None

  @nn.compact
  def __call__(self, x, bias, mask, encoded, encoder_mask, deterministic: bool, cache=None, index=None):
    cfg, dt = self.config, self.dtype
    attention = SelfAttentionLayer(cfg, self.decoder, self.relative_bias, dt, name="0")
    x, bias, self_kv = attention(x, mask, bias, deterministic, None if cache is None else cache["self"], index)
    cross_kv = None
    if self.decoder:
      cross = CrossAttentionLayer(cfg, dt, name="1")
      x, cross_kv = cross(x, encoded, encoder_mask, deterministic, None if cache is None else cache["cross"])
    feed_forward = FeedForwardLayer(cfg, dt, self.tams, self.decoder, name="2" if self.decoder else "1")
    x, cache = feed_forward(x, deterministic, mask, index, cache)  # cache: keeps the TAMS cell's history
    if cache is None:
      return x, bias
    return x, bias, {**cache, "self": self_kv, "cross": cross_kv}


class Block(nn.Module):
  """One transformer block (its sublayers live under ``layer``, as in transformers' T5Block)."""

  config: T5Config
  decoder: bool = False
  relative_bias: bool = False
  dtype: Any = jnp.float32
  tams: Any = None

  @nn.compact
  def __call__(self, x, bias, mask, encoded, encoder_mask, deterministic: bool, cache=None, index=None):
    layer = Sublayers(self.config, self.decoder, self.relative_bias, self.dtype, self.tams, name="layer")
    return layer(x, bias, mask, encoded, encoder_mask, deterministic, cache, index)


class Blocks(nn.Module):
  """The ``block`` list, named "0", "1", ...; block 0 computes the position bias that the others reuse.

  With ``remat`` each block is a `jax.checkpoint` (same parameters and outputs, activations recomputed). With
  ``cache`` (decoding: a tuple of per-block caches, see `Sublayers`) returns (x, the updated caches).
  """

  config: T5Config
  decoder: bool = False
  dtype: Any = jnp.float32
  remat: bool = False
  tams: Any = None

  @nn.compact
  def __call__(self, x, mask, encoded, encoder_mask, deterministic: bool, cache: tuple | None = None, index=None):
    policy = remat_policy(self.remat)  # a `jax.checkpoint_policies` name, or None
    block = nn.remat(Block, static_argnums=(6,), policy=policy) if self.remat else Block  # 6: `deterministic`
    cfg = self.config
    bias, new_cache = None, []
    for i in range(cfg.num_decoder_layers if self.decoder else cfg.num_layers):
      layer = block(cfg, self.decoder, i == 0, self.dtype, self.tams, name=str(i))
      if cache is None:
        x, bias = layer(x, bias, mask, encoded, encoder_mask, deterministic)
      else:
        x, bias, layer_cache = layer(x, bias, mask, encoded, encoder_mask, deterministic, cache[i], index)
        new_cache.append(layer_cache)
    return x if cache is None else (x, tuple(new_cache))


class T5Stack(nn.Module):
  """The encoder or the decoder: embedded tokens [b, t, d] -> blocks -> final RMS norm -> hidden states [b, t, d].

  With ``cache`` (decoding, see `Blocks`) returns (hidden states, the updated cache).
  """

  config: T5Config
  decoder: bool = False
  dtype: Any = jnp.float32
  remat: bool = False
  tams: Any = None

  @nn.compact
  def __call__(
    self, embedded, mask, encoded=None, encoder_mask=None, deterministic: bool = True, cache=None, index=None
  ):
    drop = nn.Dropout(self.config.dropout_rate)
    x = drop(embedded, deterministic=deterministic)
    x = Blocks(self.config, self.decoder, self.dtype, self.remat, self.tams, name="block")(
      x, mask, encoded, encoder_mask, deterministic, cache, index
    )
    if cache is not None:
      x, cache = x
    x = RMSNorm(self.config.layer_norm_epsilon, self.dtype, name="final_layer_norm")(x)
    x = drop(x, deterministic=deterministic)
    return x if cache is None else (x, cache)


def _key_mask(mask: jax.Array | None, batch: int, length: int) -> jax.Array:
  """A [b, L] 0/1 mask (None: all ones) as bool [b, 1, 1, L], to broadcast over heads and queries."""
  if mask is None:
    return jnp.ones((batch, 1, 1, length), bool)
  return mask.astype(bool)[:, None, None, :]


class T5ForConditionalGeneration(nn.Module):
  """T5 encoder-decoder with its output layer.

  ``apply({'params': params}, input_ids, decoder_input_ids, attention_mask=None, decoder_attention_mask=None)``
  returns float32 logits [batch, target_len, vocab]; ``method=model.encode`` / ``method=model.decode`` run the
  halves. Pass ``{'params': ..., 'tarp': ...}`` for the TARP-reparameterized model, ``deterministic=False`` and a
  ``'dropout'`` rng to train with dropout; ``remat=True`` checkpoints every block; ``tams`` (set by
  `mltd_jax.tams.attach`) adds TAMS cells. ``init_decode`` and ``decode_step`` implement `mltd_jax.decode.Decoder`
  (a source batch in, target tokens out).
  """

  config: T5Config
  dtype: Any = jnp.float32
  remat: bool = False
  tams: Any = None

  def setup(self):
    cfg = self.config
    self.shared = Embed(cfg.vocab_size, cfg.d_model, self.dtype, cfg.initializer_factor)
    self.encoder = T5Stack(cfg, False, self.dtype, self.remat, self.tams)
    self.decoder = T5Stack(cfg, True, self.dtype, self.remat, self.tams)
    if not cfg.tie_word_embeddings:  # logits in float32 (or wider), like the tied `attend`
      self.lm_head = Dense(cfg.vocab_size, False, wide(self.dtype), normal(cfg.initializer_factor))

  def encode(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, deterministic: bool = True):
    """Source ids [b, s] (mask [b, s], 1 on tokens) -> encoder hidden states [b, s, d_model]."""
    b, s = input_ids.shape
    return self.encoder(self.shared(input_ids), _key_mask(attention_mask, b, s), deterministic=deterministic)

  def decode(
    self,
    decoder_input_ids: jax.Array,
    encoded: jax.Array,
    attention_mask: jax.Array | None = None,
    decoder_attention_mask: jax.Array | None = None,
    deterministic: bool = True,
  ) -> jax.Array:
    """Decoder ids [b, t] over the encoder output [b, s, d] (source mask [b, s]) -> logits [b, t, vocab]."""
    b, t = decoder_input_ids.shape
    causal = jnp.tril(jnp.ones((t, t), bool))[None, None]  # [1, 1, q, k]
    mask = causal & _key_mask(decoder_attention_mask, b, t)  # [b, 1, q, k]
    encoder_mask = _key_mask(attention_mask, b, encoded.shape[1])  # [b, 1, 1, s]
    hidden = self.decoder(self.shared(decoder_input_ids), mask, encoded, encoder_mask, deterministic)
    return self.head(hidden)

  def head(self, hidden: jax.Array) -> jax.Array:
    """Decoder hidden states [..., d] -> float32 (or wider) logits [..., vocab]."""
    if self.config.tie_word_embeddings:  # the original T5 rescales before reusing the input embedding
      return self.shared.attend(hidden.astype(wide(self.dtype)) * self.config.d_model**-0.5)
    return self.lm_head(hidden)

  def __call__(
    self,
    input_ids: jax.Array,
    decoder_input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    decoder_attention_mask: jax.Array | None = None,
    deterministic: bool = True,
  ) -> jax.Array:
    encoded = self.encode(input_ids, attention_mask, deterministic)
    return self.decode(decoder_input_ids, encoded, attention_mask, decoder_attention_mask, deterministic)

  def init_params(self, rng: jax.Array) -> dict:
    """Random parameters (T5's initialization scheme, scaled by ``initializer_factor``)."""
    ids = jnp.zeros((1, 2), jnp.int32)
    return self.init(rng, ids, ids)["params"]

  # ---- decoding (the `mltd_jax.decode.Decoder` protocol) -------------------------------------------------------
  # The cache is {'mask': the source mask [B, S] (bool), 'layers': per decoder block {'self': {'k', 'v'} [B, N, h,
  # dk], the target's keys/values, one slot per fed token, 'cross': {'k', 'v'} [B, S, h, dk], the encoder output
  # projected once, and with TAMS cells 'tams': the cell's history, added by the first step}}. Every leaf has the
  # batch first, so beam search expands and reorders it like any other cache; the encoder output itself is not kept
  # (only its projections are read after the first step).

  def decode_cached(self, tokens, encoded, encoder_mask, cache, index):
    """Feeds ``tokens`` [b] at target position ``index`` (cache slot ``index``); ``encoded`` [b, S, d] projects the
    cross-attention keys/values into the cache (the first step), None reads them from it. ``encoder_mask`` [b, S].
    Returns (logits [b, vocab] for the next token, float32, and the updated cache)."""
    slots = cache[0]["self"]["k"].shape[1]
    mask = (jnp.arange(slots) <= index)[None, None, None, :]  # [1, 1, 1, N]: the slots written so far
    embedded = self.shared(tokens[:, None])  # [b, 1, d]
    hidden, cache = self.decoder(
      embedded, mask, encoded, _key_mask(encoder_mask, *encoder_mask.shape), True, cache, index
    )
    return self.head(hidden[:, 0]), cache

  def prepare_decode(self, variables: dict) -> dict:
    """Static TARP parts folded into the kernels once before decoding (`layers.fold_for_decoding`)."""
    return fold_for_decoding(variables)

  def init_decode(self, variables: dict, input_ids: jax.Array, attention_mask: jax.Array | None, max_new_tokens: int):
    """Encodes the source ``input_ids`` [B, S] once (``attention_mask`` [B, S]: any padding, right-padding is the
    usual) and feeds ``decoder_start_token_id`` into a cache with ``max_new_tokens`` target slots: the start token
    and the generated tokens but the last, which is never fed. Returns (logits [B, vocab] of the first new token,
    cache)."""
    cfg = self.config
    b, s = input_ids.shape
    mask = jnp.ones((b, s), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
    encoded = self.apply(variables, input_ids, mask, method="encode")  # [B, S, d]
    empty = jnp.zeros((b, max_new_tokens, cfg.num_heads, cfg.d_kv), matmul.result_dtype(self.dtype))  # as k, v
    layers = tuple({"self": {"k": empty, "v": empty}, "cross": None} for _ in range(cfg.num_decoder_layers))
    start = jnp.full((b,), cfg.decoder_start_token_id, jnp.int32)
    logits, layers = self.apply(variables, start, encoded, mask, layers, 0, method="decode_cached")
    return logits, {"mask": mask, "layers": layers}

  def decode_step(self, variables: dict, cache: dict, tokens: jax.Array, index: jax.Array):
    """Feeds ``tokens`` [B], generated token number ``index`` (0-based), at target position ``index + 1`` (after the
    start token). Returns (logits [B, vocab] for the next token, cache)."""
    args = (tokens, None, cache["mask"], cache["layers"], index + 1)
    logits, layers = self.apply(variables, *args, method="decode_cached")
    return logits, {"mask": cache["mask"], "layers": layers}


# ---- Hugging Face conversion ----------------------------------------------------------------------------------

# torch nn.Linear weights ([out, in]); every other tensor (embeddings, the bias table, norms) keeps its layout.
_LINEAR = re.compile(r"(\.(q|k|v|o|wi|wi_0|wi_1|wo)|^lm_head)\.weight$")
# Tied copies of shared.weight (each checked to equal it), and a cross-attention bias table that old checkpoints
# store but T5 never uses.
_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
_DROPPED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)


def from_hf_config(hf: dict) -> T5Config:
  """``config.json`` (transformers' T5Config) -> T5Config; options we do not implement are an error.

  The output variant is read as transformers does: transformers 5 writes ``tie_word_embeddings: true`` for every
  T5 and keeps the variant in ``scale_decoder_outputs``, which then decides; older files say it with
  ``tie_word_embeddings`` (absent: True).
  """
  if hf.get("is_encoder_decoder") is False:
    raise ValueError("T5 option is_encoder_decoder=False is not supported by mltd_jax's T5 (an encoder-decoder).")
  fields = {f: hf[f] for f in T5Config.__dataclass_fields__ if hf.get(f) is not None}
  if hf.get("scale_decoder_outputs") is not None:
    fields["tie_word_embeddings"] = bool(hf["scale_decoder_outputs"])
  act = activation(fields.get("feed_forward_proj", T5Config.feed_forward_proj))
  derived = {"dense_act_fn": act, "is_gated_act": fields.get("feed_forward_proj", "").startswith("gated-")}
  clash = {k: hf[k] for k, v in derived.items() if k in hf and hf[k] != v}
  if clash:
    raise ValueError(
      f"T5 options {clash} disagree with feed_forward_proj={fields.get('feed_forward_proj', 'relu')!r}, "
      "which mltd_jax's T5 (and transformers) derive them from; fix config.json."
    )
  return T5Config(**fields)


def to_hf_config(cfg: T5Config) -> dict:
  fields = {k: getattr(cfg, k) for k in T5Config.__dataclass_fields__}
  return {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "is_encoder_decoder": True, **fields}


def from_state_dict(state: dict[str, np.ndarray], cfg: T5Config) -> dict[str, np.ndarray]:
  """transformers' T5ForConditionalGeneration state dict -> our flat names: the same keys with the projections
  transposed to [in, out], without the embeddings' tied copies (which must equal ``shared.weight``) and the unused
  cross-attention bias table.

  The output head follows ``cfg``: a tied (scaled) T5 has none, so a stored ``lm_head.weight`` must equal
  ``shared.weight`` and is dropped; an unscaled one has its own, and where the file has none (transformers 5 ties
  every T5's head to ``shared`` and does not store it, also for an unscaled, v1.1-style one, whose logits are then
  ``shared``'s, unscaled) it starts as a copy of ``shared.weight``: the same logits, but trained apart from it.
  """
  state = dict(state)
  if "shared.weight" not in state and _COPIES[0] in state:
    state["shared.weight"] = state[_COPIES[0]]
  shared = state.get("shared.weight")
  if shared is None:
    raise ValueError("no shared.weight (nor encoder.embed_tokens.weight): not a T5ForConditionalGeneration state.")
  for key in _COPIES:
    if key in state and not np.array_equal(np.asarray(state.pop(key)), np.asarray(shared)):
      raise ValueError(
        f"{key} differs from shared.weight: untied input embeddings, which mltd_jax's T5 (one shared table) does "
        "not support; use a checkpoint whose embeddings are tied."
      )
  head = state.get("lm_head.weight")
  if cfg.tie_word_embeddings and head is not None:
    if not np.array_equal(np.asarray(head), np.asarray(shared)):
      raise ValueError(
        "lm_head.weight differs from shared.weight, but config.json makes the head tied and scaled (scale_decoder_"
        "outputs, else tie_word_embeddings, true): fix config.json (scale_decoder_outputs=false for a T5 v1.1)."
      )
    del state["lm_head.weight"]
  elif not cfg.tie_word_embeddings and head is None:
    state["lm_head.weight"] = shared
  return {k: (np.asarray(v).T if _LINEAR.search(k) else v) for k, v in state.items() if k not in _DROPPED}


def to_state_dict(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Our flat params -> transformers' state dict (projections back to [out, in]); the embeddings' tied copies are
  not stored, as transformers' own save_pretrained does (it ties them to ``shared.weight`` on load)."""
  return {k: (np.asarray(v).T if _LINEAR.search(k) else v) for k, v in flat.items()}


_FROM_TOKENIZER = ("vocab_size", "pad_token_id", "eos_token_id", "decoder_start_token_id", "dropout_rate")


def fresh_config(fields: dict, tokenizer, max_len: int, dropout: float) -> T5Config:
  """A randomly initialized T5 of ``fields``' size (config.model.init) that fits ``tokenizer``.

  The vocabulary, pad and eos come from the tokenizer, the decoder starts with pad (T5's convention), every
  dropout rate is ``dropout``. ``max_len`` does not matter: relative positions work at any length.
  """
  del max_len  # relative position buckets have no length limit
  unknown = sorted(set(fields) - set(T5Config.__dataclass_fields__))
  if unknown:
    raise ValueError(f"config.model.init has fields {unknown} that T5Config does not have.")
  fixed = sorted(set(fields) & set(_FROM_TOKENIZER))
  if fixed:
    raise ValueError(
      f"config.model.init sets {fixed}, which come from the tokenizer (config.data.tokenizer) and "
      "config.model.dropout; remove them."
    )
  if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
    raise ValueError("a fresh T5 needs a tokenizer with pad and eos tokens (config.data.tokenizer).")
  return T5Config(
    **fields,
    vocab_size=len(tokenizer),
    dropout_rate=dropout,
    pad_token_id=tokenizer.pad_token_id,
    eos_token_id=tokenizer.eos_token_id,
    decoder_start_token_id=tokenizer.pad_token_id,
  )


def shift_right(ids: jax.Array, start: int) -> jax.Array:
  """[..., L] -> [..., L]: ``start`` first, then ``ids`` without its last position (teacher forcing)."""
  return jnp.concatenate([jnp.full_like(ids[..., :1], start), ids[..., :-1]], axis=-1)


def make_loss(model: T5ForConditionalGeneration, train: bool = False):
  """Seq2seq loss ``(variables, batch, rng) -> (summed NLL, token count)`` of a batch ``{"source_ids",
  "source_mask": [B, S], "target_ids", "target_mask": [B, T]}`` (`mltd_jax.data.Seq2SeqEncoder`).

  The labels are the targets; the decoder reads them shifted right after ``decoder_start_token_id``, as
  transformers' ``labels=`` does (padding replaced by pad, so ids there never matter). An optional
  ``batch["weights"]`` [B, T] selects the target tokens that count (default: ``target_mask``); attention always
  uses the masks. With ``train`` dropout is on, driven by ``rng``.
  """
  cfg = model.config

  def loss_fn(variables, batch, rng):
    mask = batch["target_mask"]
    labels = jnp.where(mask > 0, batch["target_ids"], cfg.pad_token_id)  # [B, T]
    kw = {"deterministic": False, "rngs": {"dropout": rng}} if train else {}
    logits = model.apply(
      variables,
      batch["source_ids"],
      shift_right(labels, cfg.decoder_start_token_id),
      attention_mask=batch["source_mask"],
      decoder_attention_mask=shift_right(mask, 1),
      **kw,
    )
    return losses.token_nll(logits, labels, batch.get("weights", mask))

  return loss_fn


FAMILY = Family(
  model_type="t5",
  config_cls=T5Config,
  model=lambda config, dtype=jnp.float32, remat=False: T5ForConditionalGeneration(config, dtype, remat),
  from_hf_config=from_hf_config,
  to_hf_config=to_hf_config,
  from_state_dict=from_state_dict,
  to_state_dict=to_state_dict,
  fresh_config=fresh_config,
  default_targets=DEFAULT_TARGETS,
  make_loss=make_loss,
  encoder="seq2seq",
  task_tokens=lambda batch: (batch["source_ids"], batch["source_mask"]),
  embedding=lambda params: params["shared"]["weight"],
)
