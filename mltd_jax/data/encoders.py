"""Encoders: a task's examples -> fixed-shape int32 arrays in one model family's input convention.

An encoder owns everything that depends on the tokenizer and the model family: which special tokens frame a
sequence, padding, over-long examples. Task sources only produce examples (`mltd_jax.data.tasks.Example`).

* `CausalLMEncoder` (decoder-only LMs such as GPT-2): an example is a text; a sequence is
  ``[bos] + tokens (+ [eos])``, with bos only when the tokenizer declares one.
  Batch: ``{"ids": [N, seq_len], "mask": [N, seq_len]}``.
  Or a dialogue turn, a ``(context, response)`` pair of texts (one kind per batch): the sequence is
  ``[bos] + context + separator + response (+ [eos])``, the separator being the tokens of ``SEPARATOR`` ("\n",
  which also joins the context's turns; none for whitespace-splitting tokenizers). The context is cut from the
  left to fit (the most recent turns stay); the response is never cut unless ``truncate``. The batch adds
  ``"weights": [N, seq_len]``, 1 on the response tokens (and eos) only, so the loss is the response's NLL.
  ``prompts`` gives the left-padded ``[bos] + context + separator`` for generating responses.
* `Seq2SeqEncoder` (encoder-decoders such as T5): an example is a ``(source, target)`` pair; each side is
  ``tokens + [eos]`` with no bos (the decoder start token is the model's business, T5's convention).
  Batch: ``{"source_ids", "source_mask": [N, source_len], "target_ids", "target_mask": [N, target_len]}``.

Padding uses the tokenizer's pad id and ``mask`` is 0 there, so the pad id itself never matters to a loss.
`build_encoder(kind, tokenizer, config.data)` makes the encoder named by ``kind`` (registered in `ENCODERS`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, Sequence

import numpy as np

log = logging.getLogger("mltd_jax")
_CUT_LOGGED: set[str] = set()  # what `_note_cut` has logged in this process


def _note_cut(what: str, where: str, tokens: int, limit: str) -> None:
  """Log the first cut of each kind (``config.data.truncate``) once per process: a silent cut changes what the
  losses cover (e.g. a perplexity over each document's first ``seq_len`` tokens)."""
  if what not in _CUT_LOGGED:
    _CUT_LOGGED.add(what)
    log.warning("config.data.truncate=True cuts %s to %s (first: %s%d tokens); later cuts are not logged", what,
                limit, where, tokens)  # fmt: skip

Batch = dict[str, np.ndarray]
SEPARATOR = "\n"  # between a dialogue's context and its response (task sources join the context's turns with it)


def _token_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
  """Token ids of each text, without the tokenizer's own special tokens (the encoder adds its own)."""
  if not texts:
    return []
  return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def _pack(seqs: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Right-pad ``seqs`` (each at most ``length`` long) to ids and mask, both int32 [len(seqs), length]."""
  ids = np.full((len(seqs), length), pad_id, dtype=np.int32)
  mask = np.zeros((len(seqs), length), dtype=np.int32)
  for i, seq in enumerate(seqs):
    ids[i, : len(seq)] = seq
    mask[i, : len(seq)] = 1
  return ids, mask


def _is_pair(example: Any) -> bool:
  return isinstance(example, (tuple, list)) and len(example) == 2 and all(isinstance(s, str) for s in example)


def _check_one_kind(examples: Sequence[Any], pairs: bool, where: str) -> None:
  """Raise a TypeError at the first example that is not of the batch's kind: a text, or a pair if ``pairs``."""
  for i, example in enumerate(examples):
    if _is_pair(example) if pairs else isinstance(example, str):
      continue
    first = "a (context, response) pair" if pairs else "a text"
    raise TypeError(
      f"{where}example {i} is a {type(example).__name__}; causal-LM examples are texts (str) or (context, response) "
      f"pairs of texts, one kind per batch (example 0 is {first})."
    )


def _left_cut(tokens: Sequence[int], room: int) -> list[int]:
  """The last ``room`` (>= 0) tokens: a dialogue history keeps its most recent turns."""
  return list(tokens[max(len(tokens) - room, 0) :]) if room > 0 else []


def _check_tokenizer(tokenizer, length_fields: Mapping[str, int], need_eos: bool, what: str) -> None:
  """Refuse a tokenizer without the special tokens the encoder uses, and non-positive lengths."""
  for role, needed in (("pad", True), ("eos", need_eos)):
    if needed and getattr(tokenizer, f"{role}_token_id") is None:
      raise ValueError(
        f"the {what} encoder needs a tokenizer with {'an' if role == 'eos' else 'a'} {role} token; "
        "this one has none (config.data.tokenizer)."
      )
  for name, value in length_fields.items():
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
      raise ValueError(f"config.data.{name}={value!r} must be a positive integer.")


@dataclasses.dataclass(frozen=True)
class CausalLMEncoder:
  """Texts, or (context, response) pairs, -> ``{"ids", "mask"(, "weights")}`` [N, seq_len] for a causal LM.

  See the module docstring for the sequence layouts.

  Attributes:
    tokenizer: a transformers tokenizer with a pad token (and an eos token if ``add_eos``).
    seq_len: tokens per sequence, bos and eos included.
    add_eos: end every sequence with eos (so the model learns where texts end).
    truncate: cut over-long sequences to ``seq_len`` instead of raising.
  """

  tokenizer: Any
  seq_len: int
  add_eos: bool = False
  truncate: bool = False

  def __post_init__(self):
    _check_tokenizer(self.tokenizer, {"seq_len": self.seq_len}, self.add_eos, "causal-LM")

  def _specials(self) -> tuple[list[int], list[int]]:
    """The ids before (bos) and after (eos) every sequence."""
    tok = self.tokenizer
    # No bos is made up for a tokenizer that declares none: the model was trained without one.
    prefix = [] if tok.bos_token_id is None else [tok.bos_token_id]
    return prefix, [tok.eos_token_id] if self.add_eos else []

  def encode(self, examples: Sequence[str] | Sequence[tuple[str, str]], where: str = "") -> Batch:
    """Encode texts, or (context, response) pairs, into int32 arrays of shape [len(examples), seq_len].

    Args:
      examples: texts, or (context, response) pairs of texts (not both in one call).
      where: a prefix for error messages that says where the examples come from (e.g. "task 'x' support: ").

    Returns:
      ``ids`` (pad id after the end) and ``mask`` (1 on real tokens); for pairs also ``weights`` (1 on the
      response tokens and eos, the tokens the loss counts).

    Raises:
      TypeError: an example that is neither a text nor a pair of texts, or a batch mixing the two.
      ValueError: a text, or a response with bos, separator and eos, longer than ``seq_len`` (unless
        ``truncate``); the message names it and the fix. A long context is cut from the left, never an error.
    """
    if examples and _is_pair(examples[0]):
      return self._encode_pairs(examples, where)
    _check_one_kind(examples, False, where)
    tok = self.tokenizer
    prefix, suffix = self._specials()
    seqs = []
    for i, toks in enumerate(_token_ids(tok, examples)):
      seq = [*prefix, *toks, *suffix]
      if len(seq) > self.seq_len:
        if not self.truncate:
          raise ValueError(
            f"{where}text {i} has {len(seq)} tokens (with bos/eos) > config.data.seq_len={self.seq_len}; "
            "raise config.data.seq_len or set config.data.truncate=True."
          )
        _note_cut("texts", f"{where}text {i}: ", len(seq), f"config.data.seq_len={self.seq_len}")
        seq = seq[: self.seq_len]  # a cut text did not end here, so it keeps no eos
      seqs.append(seq)
    ids, mask = _pack(seqs, self.seq_len, tok.pad_token_id)
    return {"ids": ids, "mask": mask}

  def _frame(self) -> tuple[list[int], list[int], list[int]]:
    """bos, separator and eos ids of a dialogue sequence; refuses a ``seq_len`` with no room for a response."""
    prefix, suffix = self._specials()
    sep = _token_ids(self.tokenizer, [SEPARATOR])[0]
    if self.seq_len <= len(prefix) + len(sep):
      raise ValueError(f"config.data.seq_len={self.seq_len} leaves no room for a response after bos and separator.")
    return prefix, sep, suffix

  def _encode_pairs(self, examples: Sequence[tuple[str, str]], where: str) -> Batch:
    """``encode`` of (context, response) pairs: the context cut from the left, weights on the response."""
    _check_one_kind(examples, True, where)
    prefix, sep, suffix = self._frame()
    frame = len(prefix) + len(sep)
    contexts = _token_ids(self.tokenizer, [c for c, _ in examples])
    responses = _token_ids(self.tokenizer, [r for _, r in examples])
    seqs, starts = [], []
    for i, (context, response) in enumerate(zip(contexts, responses)):
      target = [*response, *suffix]
      if frame + len(target) > self.seq_len:
        if not self.truncate:
          raise ValueError(
            f"{where}example {i}: its response has {len(target)} tokens (with eos), {frame + len(target)} with bos "
            f"and separator > config.data.seq_len={self.seq_len}; raise config.data.seq_len or set "
            "config.data.truncate=True (which cuts the response)."
          )
        _note_cut("responses", f"{where}example {i}: ", frame + len(target), f"config.data.seq_len={self.seq_len}")
        target = response[: self.seq_len - frame]  # a cut response did not end here, so it keeps no eos
      head = [*prefix, *_left_cut(context, self.seq_len - frame - len(target)), *sep]
      seqs.append(head + target)
      starts.append(len(head))
    ids, mask = _pack(seqs, self.seq_len, self.tokenizer.pad_token_id)
    weights = np.zeros_like(mask)  # [N, L]: 1 on the response's tokens (and eos), the targets the loss counts
    for i, (start, seq) in enumerate(zip(starts, seqs)):
      weights[i, start : len(seq)] = 1
    return {"ids": ids, "mask": mask, "weights": weights}

  def prompts(
    self, examples: Sequence[Any], where: str = "", *, prompt_len: int | None = None, max_new_tokens: int = 0
  ) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded decoding prompts ``[bos] + context + separator``: what a model continues with a response.

    Args:
      examples: (context, response) pairs (the response is not used) or context texts.
      where: a prefix for error messages.
      prompt_len: P, the prompt length (default ``seq_len - max_new_tokens``); the context is cut from the left to
        fit. Leave room for the generated tokens: P + max_new_tokens - 1 must fit the model's positions.
      max_new_tokens: the tokens that will be generated after the prompt (sets the default P).

    Returns:
      ``ids`` [N, P] (pad id on the left) and ``mask`` [N, P] (0 on the padding), int32. Row i's real tokens are
      exactly the tokens that precede the response in ``encode``'s row i when both keep the whole context.
    """
    length = self.seq_len - max_new_tokens if prompt_len is None else prompt_len
    contexts = []
    for i, example in enumerate(examples):
      if not (isinstance(example, str) or _is_pair(example)):
        raise TypeError(f"{where}example {i} is a {type(example).__name__}; prompts take (context, response) pairs.")
      contexts.append(example if isinstance(example, str) else example[0])
    prefix, sep, _ = self._frame()
    if not isinstance(length, (int, np.integer)) or isinstance(length, bool) or length <= len(prefix) + len(sep):
      raise ValueError(f"prompt_len={length!r} must exceed the {len(prefix) + len(sep)} tokens of bos and separator.")
    ids = np.full((len(contexts), length), self.tokenizer.pad_token_id, dtype=np.int32)  # [N, P]
    mask = np.zeros((len(contexts), length), dtype=np.int32)  # [N, P]
    for i, context in enumerate(_token_ids(self.tokenizer, contexts)):
      seq = [*prefix, *_left_cut(context, length - len(prefix) - len(sep)), *sep]
      ids[i, length - len(seq) :] = seq
      mask[i, length - len(seq) :] = 1
    return ids, mask

  @property
  def max_len(self) -> int:
    """The longest sequence a model must take."""
    return self.seq_len

  def positions(self, batch: Batch) -> int:
    """Token positions (padding included) of a batch, for tokens/s."""
    return int(np.size(batch["ids"]))

  def focus(self, batch: Batch, token: str) -> Batch:
    """``batch`` with ``weights`` on the tokens that follow ``token`` (e.g. the fact objects after "is").

    Args:
      batch: ``{"ids", "mask"}`` of shape [..., L] (e.g. [N, L] or [T, N, L]), with optional ``weights`` (a
        dialogue batch's response tokens), which the focus narrows.
      token: a token of the tokenizer's vocabulary.

    Returns:
      ``{**batch, "weights": w}`` with ``w[..., j] = m[..., j] * (ids[..., j - 1] == id(token))`` and
      ``w[..., 0] = 0``, int32 like the mask; ``m`` is the batch's ``weights`` if it has them, else its ``mask``.

    Raises:
      ValueError: ``token`` is not in the vocabulary.
    """
    token_id = self.tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == self.tokenizer.unk_token_id:
      raise ValueError(f"config.eval.focus_token={token!r} is not a token of the tokenizer.")
    ids, mask = np.asarray(batch["ids"]), np.asarray(batch.get("weights", batch["mask"]))
    weights = np.zeros_like(mask)  # [..., L]
    weights[..., 1:] = mask[..., 1:] * (ids[..., :-1] == token_id)
    return {**batch, "weights": weights}


@dataclasses.dataclass(frozen=True)
class Seq2SeqEncoder:
  """``(source, target)`` pairs -> source and target ids and masks for an encoder-decoder (see the module docstring).

  Attributes:
    tokenizer: a transformers tokenizer with pad and eos tokens.
    source_len: source tokens per example, eos included.
    target_len: target tokens per example, eos included.
    truncate: cut over-long sides (keeping eos last) instead of raising.
  """

  tokenizer: Any
  source_len: int
  target_len: int
  truncate: bool = False

  def __post_init__(self):
    lengths = {"source_len": self.source_len, "target_len": self.target_len}
    _check_tokenizer(self.tokenizer, lengths, True, "seq2seq")

  @property
  def max_len(self) -> int:
    """The longest sequence a model must take."""
    return max(self.source_len, self.target_len)

  def positions(self, batch: Batch) -> int:
    """Token positions (padding included) of a batch, sources and targets, for tokens/s."""
    return int(np.size(batch["source_ids"]) + np.size(batch["target_ids"]))

  def focus(self, batch: Batch, token: str) -> Batch:
    raise ValueError(
      f"config.eval.focus_token={token!r}: the focus metric scores causal-LM texts; seq2seq tasks have none yet. "
      "Remove 'query_focus' from config.eval.metrics."
    )

  def _side(self, texts: Sequence[str], length: int, side: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    eos = self.tokenizer.eos_token_id
    seqs = []
    for i, toks in enumerate(_token_ids(self.tokenizer, texts)):
      seq = [*toks, eos]
      if len(seq) > length:
        if not self.truncate:
          raise ValueError(
            f"{where}example {i} {side} has {len(seq)} tokens (with eos) > config.data.{side}_len={length}; "
            f"raise config.data.{side}_len or set config.data.truncate=True."
          )
        _note_cut(f"{side}s", f"{where}example {i}: ", len(seq), f"config.data.{side}_len={length}")
        seq = [*toks[: length - 1], eos]  # eos stays last: T5 reads it as the end of the input
      seqs.append(seq)
    return _pack(seqs, length, self.tokenizer.pad_token_id)

  def encode(self, examples: Sequence[tuple[str, str]], where: str = "") -> Batch:
    """Encode pairs into int32 source arrays [N, source_len] and target arrays [N, target_len].

    Args:
      examples: ``(source, target)`` pairs of texts.
      where: a prefix for error messages that says where the examples come from.

    Returns:
      ``{"source_ids", "source_mask", "target_ids", "target_mask"}``; ids are pad after the end, masks 1 on
      real tokens.

    Raises:
      TypeError: an example that is not a pair of texts.
      ValueError: a side longer than its length (unless ``truncate``); the message names it and the fix.
    """
    for i, example in enumerate(examples):
      if not (isinstance(example, (tuple, list)) and len(example) == 2 and all(isinstance(s, str) for s in example)):
        raise TypeError(
          f"{where}example {i} is {type(example).__name__} {example!r:.80}; seq2seq examples are "
          "(source, target) pairs of texts."
        )
    source_ids, source_mask = self._side([s for s, _ in examples], self.source_len, "source", where)
    target_ids, target_mask = self._side([t for _, t in examples], self.target_len, "target", where)
    return {"source_ids": source_ids, "source_mask": source_mask, "target_ids": target_ids, "target_mask": target_mask}

  def prompts(
    self, examples: Sequence[tuple[str, str]], where: str = "", *, max_new_tokens: int = 0
  ) -> tuple[np.ndarray, np.ndarray]:
    """The decoder's inputs for generating each example's target: source ids and mask [N, source_len]
    (``max_new_tokens`` does not matter: the encoder reads the whole source, the decoder has its own positions)."""
    del max_new_tokens
    batch = self.encode(examples, where)
    return batch["source_ids"], batch["source_mask"]


ENCODERS: dict[str, type] = {"causal_lm": CausalLMEncoder, "seq2seq": Seq2SeqEncoder}


def _config_field(data_cfg: Any, name: str, kind: str) -> Any:
  try:
    return data_cfg[name] if isinstance(data_cfg, Mapping) else getattr(data_cfg, name)
  except (AttributeError, KeyError):
    raise ValueError(f"config.data.{name} is missing; the {kind!r} encoder needs it.") from None


def build_encoder(kind: str, tokenizer, data_cfg: Any):
  """The encoder ``ENCODERS[kind]`` with its settings read from ``data_cfg`` (a ``config.data`` block).

  Every field of the encoder but the tokenizer is read by name: ``seq_len, add_eos, truncate`` for "causal_lm",
  ``source_len, target_len, truncate`` for "seq2seq".

  Raises:
    ValueError: an unknown ``kind``, or a field missing from ``data_cfg``.
  """
  if kind not in ENCODERS:
    raise ValueError(f"unknown encoder kind {kind!r}; known kinds: {sorted(ENCODERS)}.")
  cls = ENCODERS[kind]
  names = [f.name for f in dataclasses.fields(cls) if f.name != "tokenizer"]
  return cls(tokenizer, **{name: _config_field(data_cfg, name, kind) for name in names})
