"""Greedy and beam-search decoding over a model family's cached decoder, compiled once per shape.

`generate` works for any linen model class that implements the `Decoder` protocol (two plain Python methods: run
the prompt into a key/value cache, then feed one token per row). The search itself is pure JAX: the first token
is chosen from the prompt's logits, the rest inside one `jax.lax.while_loop`, which stops as soon as every row is
finished, so a batch costs at most ``max_new_tokens - 1`` cached steps after the prompt.

Beam search follows transformers' (``GenerationMixin._beam_search``, transformers 5) exactly, written for JAX:
  * each step keeps the top ``2 * num_beams`` continuations (``max(2, 1 + number of EOS ids) * num_beams``) of all
    beams by summed log-probability; the best ``num_beams`` of them that did not just end continue;
  * a continuation of one of the top ``num_beams`` candidates that ends (an EOS id, or the length limit) becomes a
    finished hypothesis scored ``sum_logprobs / length ** length_penalty``, where ``length`` counts the generated
    tokens, the EOS included (not the prompt); the best ``num_beams`` finished hypotheses are kept;
  * ``early_stopping=False`` (transformers' default): a row stops collecting hypotheses once its best running beam,
    divided by the current length ** length_penalty, cannot beat its worst finished one; ``True``: once it holds
    ``num_beams`` finished hypotheses; ``"never"``: the bound uses the maximum length when length_penalty > 0;
  * the result is each row's best finished hypothesis; tokens after its EOS are padding.
Scores are float32 and "impossible" is -1e9 (added, not assigned), as in transformers, so ranking ties break alike.

Two differences in form, not in the chosen tokens: the result is always ``max_new_tokens`` wide (transformers crops
to the longest row), and after EOS beam search writes ``pad_token_id`` even when it is 0 (transformers' beam
search then writes the first EOS id instead, through ``pad_token_id or eos_token_id``; its greedy search pads).

This module imports only jax and numpy: a model family plugs in through `Decoder`, never by name.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

NEG = -1.0e9  # transformers' "impossible" score, added to float32 scores


class Decoder(Protocol):
  """What a model family's linen model class provides for `generate` (plain Python methods that call ``apply``).

  The cache is any pytree whose leaves ALL have the batch as leading axis (beam search reorders and expands it
  with ``jax.tree.map``); the number of generated tokens is kept by `generate`, not in the cache. A family may also
  define ``check_decode_inputs(input_ids, attention_mask)``, which `generate` calls on the arrays before compiling
  to refuse inputs it cannot decode (e.g. GPT-2: right-padded prompts), and ``prepare_decode(variables) ->
  variables``, which `generate` applies once before decoding (GPT-2 and T5: the static TARP parts folded into the
  kernels with `mltd_jax.tarp.fold`, so they cost nothing per token; the dynamic kind runs per token).
  """

  def init_decode(
    self, variables: dict, input_ids: jax.Array, attention_mask: jax.Array | None, max_new_tokens: int
  ) -> tuple[jax.Array, Any]:
    """Runs the prompt (causal LM: left-padded ids [B, P]; seq2seq: the source [B, S]) with room in the cache for
    the tokens `generate` feeds back while making ``max_new_tokens`` (all but the last; T5 feeds its start token
    too). Returns (float32 logits [B, V] for the first new token, cache)."""

  def decode_step(self, variables: dict, cache: Any, tokens: jax.Array, index: jax.Array) -> tuple[jax.Array, Any]:
    """Feeds ``tokens`` [B] int32, generated token number ``index`` (0-based, an int32 scalar), into ``cache``.
    Returns (float32 logits [B, V] for the next token, the updated cache)."""


def generate(
  model: Decoder,
  variables: dict,
  input_ids: jax.Array,
  attention_mask: jax.Array | None = None,
  *,
  num_beams: int = 1,
  max_new_tokens: int = 20,
  length_penalty: float = 1.0,
  early_stopping: bool | str = False,
  eos_token_id: int | Sequence[int] | None = None,
  pad_token_id: int | None = None,
) -> jax.Array:
  """Greedy (``num_beams == 1``) or beam-search decoding; compiled once per shapes and settings.

  Args:
    model: a linen model implementing `Decoder` (e.g. `mltd_jax.models.gpt2.GPT2LMHeadModel`).
    variables: its variables, e.g. ``{'params': p}`` or ``{'params': p, 'tarp': d}`` (the model's
      ``prepare_decode`` folds static TARP kinds into the kernels once; a dynamic difference runs per token).
    input_ids: [B, P] int prompts (left-padded for a causal LM; any padding for a seq2seq source).
    attention_mask: [B, P], 1 on real tokens (for a causal LM the zeros must come first); None: all real.
    num_beams: 1 for greedy search, > 1 for beam search.
    max_new_tokens: N, the number of tokens to generate at most.
    length_penalty: exponent on the hypothesis length in beam scores (> 0 favours longer hypotheses).
    early_stopping: False, True or "never", as in transformers (beam search only).
    eos_token_id: an id or ids that end a sequence; None: every row generates N tokens. Pass the model's
      ``config.eos_token_id`` for transformers' default behaviour.
    pad_token_id: the id written after a row's EOS; None: the first EOS id (transformers' choice), or 0.

  Returns:
    int32 [B, N]: the new tokens only; after a row's EOS (included), ``pad_token_id``.

  Raises:
    ValueError: for ``num_beams`` < 1, ``max_new_tokens`` < 1, or inputs the model's ``check_decode_inputs``
      refuses (GPT-2: a right-padded ``attention_mask`` given as a concrete array).
  """
  if num_beams < 1 or max_new_tokens < 1:
    raise ValueError(f"num_beams={num_beams} and max_new_tokens={max_new_tokens} must be >= 1.")
  if early_stopping not in (False, True, "never"):
    raise ValueError(f"early_stopping={early_stopping!r} must be False, True or 'never'.")
  eos = () if eos_token_id is None else tuple(int(e) for e in np.atleast_1d(eos_token_id))
  pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
  input_ids = jnp.asarray(input_ids, jnp.int32)
  if hasattr(model, "check_decode_inputs"):
    model.check_decode_inputs(input_ids, attention_mask)
  if hasattr(model, "prepare_decode"):  # e.g. static TARP folded into the kernels, once per call, not per token
    variables = model.prepare_decode(variables)
  settings = dict(max_new_tokens=max_new_tokens, eos=eos, pad=int(pad))
  if num_beams == 1:
    return _greedy(model, variables, input_ids, attention_mask, **settings)
  return _beam(
    model,
    variables,
    input_ids,
    attention_mask,
    num_beams=num_beams,
    length_penalty=float(length_penalty),
    early_stopping=early_stopping,
    **settings,
  )


def _is_eos(tokens: jax.Array, eos: tuple[int, ...]) -> jax.Array:
  """Whether each token is one of the EOS ids (all False without any)."""
  if not eos:
    return jnp.zeros(tokens.shape, bool)
  return jnp.isin(tokens, jnp.asarray(eos, tokens.dtype))


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "eos", "pad"))
def _greedy(model, variables, input_ids, attention_mask, *, max_new_tokens, eos, pad):
  """Greedy search: argmax at every step; a row that emitted an EOS gets ``pad`` from then on."""
  n = max_new_tokens
  logits, cache = model.init_decode(variables, input_ids, attention_mask, n)  # [B, V]
  b = input_ids.shape[0]

  def pick(tokens, done, logits, i):  # choose token i of every row
    tok = jnp.where(done, pad, jnp.argmax(logits, -1).astype(jnp.int32))  # [B]
    return tokens.at[:, i].set(tok), done | _is_eos(tok, eos), tok

  tokens, done, tok = pick(jnp.full((b, n), pad, jnp.int32), jnp.zeros((b,), bool), logits, 0)

  def cond(state):
    i, _, done, _, _ = state
    return (i < n) & ~jnp.all(done)

  def body(state):
    i, tokens, done, tok, cache = state
    logits, cache = model.decode_step(variables, cache, tok, i - 1)  # feed token i - 1, get logits for token i
    tokens, done, tok = pick(tokens, done, logits, i)
    return i + 1, tokens, done, tok, cache

  _, tokens, *_ = jax.lax.while_loop(cond, body, (jnp.int32(1), tokens, done, tok, cache))
  return tokens


def _gather(x: jax.Array, idx: jax.Array) -> jax.Array:
  """x [B, K, ...] at beam indices idx [B, J] -> [B, J, ...]."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _penalized(scores: jax.Array, length: Any, n: int, length_penalty: float) -> jax.Array:
  """``scores / length ** length_penalty`` rounded as transformers does on CPU: the power in float64 (a Python float
  there), rounded to float32, then a true float32 division (torch's CUDA kernel multiplies by the reciprocal). The
  table of powers is a constant (``n`` and the penalty are static); the barrier keeps XLA from turning the division
  by a broadcast into a product with its reciprocal, which differs in the last bit (for 27-98% of float32 scores,
  by penalty, over lengths 1-128)."""
  table = jnp.asarray((np.arange(1, n + 1, dtype=np.float64) ** length_penalty).astype(np.float32))  # length 1..n
  denom = jnp.broadcast_to(table[length - 1], scores.shape)
  return scores / jax.lax.optimization_barrier(denom)


def _beam_select(state: dict, log_probs: jax.Array, i: jax.Array, *, n, eos, length_penalty, early_stopping):
  """One step of beam search on log_probs [B, K, V] of generated token number ``i``.

  Returns the new state and ``source`` [B, K], the beam each surviving running beam continues (to reorder the
  cache with), and ``stop``: whether the whole search is over.
  """
  b, k, v = log_probs.shape
  c = max(2, 1 + len(eos)) * k  # candidates kept per row
  scores = (log_probs + state["run_scores"][:, :, None]).reshape(b, k * v)  # [B, K*V] summed log-probs
  top_scores, top = jax.lax.top_k(scores, c)  # [B, C], best first
  beam, tok = top // v, (top % v).astype(jnp.int32)
  cand = _gather(state["run_seqs"], beam).at[:, :, i].set(tok)  # [B, C, N]
  ends = _is_eos(tok, eos) | (i + 1 >= n)  # [B, C]: candidates that end here (EOS or the length limit)
  # Running beams: the best K candidates that did not end.
  run_all = top_scores + ends.astype(jnp.float32) * NEG
  _, keep = jax.lax.top_k(run_all, k)  # [B, K]
  run_seqs, run_scores, source = _gather(cand, keep), _gather(run_all, keep), _gather(beam, keep)
  # Finished hypotheses: ended candidates among the top K, length-penalized, merged with the kept ones.
  just = ends & (jnp.arange(c) < k)[None]  # [B, C]
  fin = _penalized(top_scores, i + 1, n, length_penalty)
  full = jnp.all(state["fin_done"], -1, keepdims=True) & (early_stopping is True)  # [B, 1]
  fin = fin + full.astype(jnp.float32) * NEG
  fin = fin + (~state["open"]).astype(jnp.float32)[:, None] * NEG
  fin = fin + (~just).astype(jnp.float32) * NEG
  merged = jnp.concatenate([state["fin_scores"], fin], 1)  # [B, K + C]
  _, best = jax.lax.top_k(merged, k)  # [B, K]
  fin_seqs = _gather(jnp.concatenate([state["fin_seqs"], cand], 1), best)
  fin_scores = _gather(merged, best)
  fin_done = _gather(jnp.concatenate([state["fin_done"], just], 1), best)
  # Can a row still improve? Its best running beam at the most hopeful length against its worst finished one.
  length = n if (early_stopping == "never" and length_penalty > 0.0) else i + 1
  best_possible = _penalized(run_scores[:, :1], length, n, length_penalty)  # [B, 1]
  worst = jnp.where(fin_done, jnp.min(fin_scores, 1, keepdims=True), NEG)  # [B, K]
  is_open = state["open"] & jnp.any(best_possible > worst, -1)  # [B]
  stop = ~jnp.any(is_open) | (jnp.all(fin_done) & (early_stopping is True)) | jnp.all(ends)
  new = dict(run_seqs=run_seqs, run_scores=run_scores, fin_seqs=fin_seqs, fin_scores=fin_scores)
  return {**new, "fin_done": fin_done, "open": is_open}, source, stop


@functools.partial(
  jax.jit, static_argnames=("model", "num_beams", "max_new_tokens", "length_penalty", "early_stopping", "eos", "pad")
)
def _beam(
  model, variables, input_ids, attention_mask, *, num_beams, max_new_tokens, length_penalty, early_stopping, eos, pad
):
  """Beam search (module docstring); the prompt runs once per row, then its cache is copied to the beams."""
  k, n = num_beams, max_new_tokens
  b = input_ids.shape[0]
  logits, cache = model.init_decode(variables, input_ids, attention_mask, n)  # [B, V]
  cache = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), cache)  # [B*K, ...], beam j of row r at r*K + j
  select = functools.partial(_beam_select, n=n, eos=eos, length_penalty=length_penalty, early_stopping=early_stopping)
  seqs = jnp.full((b, k, n), pad, jnp.int32)
  state = dict(
    run_seqs=seqs,
    run_scores=jnp.zeros((b, k), jnp.float32).at[:, 1:].set(NEG),  # only beam 0 starts (no duplicates)
    fin_seqs=seqs,
    fin_scores=jnp.full((b, k), NEG, jnp.float32),
    fin_done=jnp.zeros((b, k), bool),
    open=jnp.ones((b,), bool),
  )
  log_probs = jnp.repeat(jax.nn.log_softmax(logits, -1), k, axis=0).reshape(b, k, -1)  # [B, K, V]
  state, source, stop = select(state, log_probs, jnp.int32(0))

  def reorder(cache, source):  # cache rows of the beams that continue
    rows = (jnp.arange(b)[:, None] * k + source).reshape(-1)  # [B*K]
    return jax.tree.map(lambda x: x[rows], cache)

  def cond(carry):
    i, _, _, stop = carry
    return (i < n) & ~stop

  def body(carry):
    i, state, cache, _ = carry
    tokens = state["run_seqs"][:, :, i - 1].reshape(-1)  # [B*K]
    logits, cache = model.decode_step(variables, cache, tokens, i - 1)  # [B*K, V]
    log_probs = jax.nn.log_softmax(logits, -1).reshape(b, k, -1)
    state, source, stop = select(state, log_probs, i)
    return i + 1, state, reorder(cache, source), stop

  carry = (jnp.int32(1), state, reorder(cache, source), stop)
  _, state, _, _ = jax.lax.while_loop(cond, body, carry)
  return state["fin_seqs"][:, 0]  # [B, N], the best hypothesis of each row
