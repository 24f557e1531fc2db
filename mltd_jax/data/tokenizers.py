"""Tokenizers from transformers: a hub name, a local directory, a tokenizer.json file, or one built in code.

The offline default needs no file: `byte_level_tokenizer()` (256 byte symbols + specials) for any text, and
`word_level_tokenizer(words)` for a closed vocabulary such as the synthetic task family's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"


def _wrap(tok: tokenizers.Tokenizer, **special) -> transformers.PreTrainedTokenizerFast:
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def byte_level_tokenizer() -> transformers.PreTrainedTokenizerFast:
  """One token per UTF-8 byte (GPT-2's byte-to-symbol map, no merges) plus <pad>, <bos>, <eos>."""
  symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
  vocab = {s: i for i, s in enumerate([PAD, BOS, EOS] + symbols)}
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  return _wrap(tok, pad_token=PAD, bos_token=BOS, eos_token=EOS)


def word_level_tokenizer(words: Sequence[str]) -> transformers.PreTrainedTokenizerFast:
  """One token per whitespace-separated word of a closed vocabulary, plus <pad>, <bos>, <eos>, <unk>."""
  vocab = {w: i for i, w in enumerate([PAD, BOS, EOS, "<unk>", *words])}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return _wrap(tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token="<unk>")


# Names of special tokens in bare tokenizer.json files. GPT-2's own tokenizer config declares <|endoftext|> as its
# bos, eos and unk token, so in a bare GPT-2 tokenizer.json it is the declared bos, not a guess; a tokenizer loaded
# from a directory or the hub keeps exactly the special tokens its config declares (no bos made up from eos).
SPECIAL_NAMES = {
  "eos": ("<|endoftext|>", "</s>", EOS),
  "pad": (PAD, "<|padding|>"),
  "bos": (BOS, "<s>", "<|endoftext|>"),
}


def _declare_special_tokens(tok) -> None:
  vocab = tok.get_vocab()
  for role, names in SPECIAL_NAMES.items():
    if getattr(tok, f"{role}_token") is None:
      found = next((n for n in names if n in vocab), None)
      if found:
        setattr(tok, f"{role}_token", found)


def load_tokenizer(spec: str) -> transformers.PreTrainedTokenizerBase:
  """A tokenizer from ``spec``: "bytes", a tokenizer.json file, a local directory, or a hub name.

  A bare tokenizer.json (also alone in a directory, without tokenizer_config.json or special_tokens_map.json) names
  no special tokens, so they are found by name in its vocabulary. A tokenizer without a pad token pads with eos;
  one without a bos token keeps none (the encoders then prepend nothing).
  """
  path = Path(spec).expanduser()
  bare = False
  if spec == "bytes":
    return byte_level_tokenizer()
  declared = ("tokenizer_config.json", "special_tokens_map.json")  # files that name the special tokens
  if path.is_dir() and (path / "tokenizer.json").is_file() and not any((path / f).exists() for f in declared):
    spec, path = str(path / "tokenizer.json"), path / "tokenizer.json"  # a directory with a bare tokenizer.json
  if spec.endswith(".json") or path.suffix == ".json":
    if not path.is_file():
      raise FileNotFoundError(
        f"tokenizer file {path} not found; set config.data.tokenizer to an existing "
        "tokenizer.json, a directory, a hub name, or 'bytes'."
      )
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    bare = True
  elif spec.startswith((".", "/", "~")) and not path.is_dir():
    raise FileNotFoundError(
      f"tokenizer directory {path} not found; set config.data.tokenizer to an existing "
      "directory, a tokenizer.json file, a hub name, or 'bytes'."
    )
  else:
    try:
      tok = transformers.AutoTokenizer.from_pretrained(str(path) if path.is_dir() else spec)
    except OSError as e:
      raise OSError(
        f"could not load tokenizer {spec!r} ({e}); offline, pass a local directory or tokenizer.json file, or 'bytes'."
      ) from e
  if bare:  # a bare tokenizer.json declares no special tokens: find them by their usual names
    _declare_special_tokens(tok)
  if tok.pad_token is None:
    # Padding is masked out of every loss and attention, so any real id serves; eos is GPT-2's habit.
    tok.pad_token = tok.eos_token
  if tok.pad_token is None:
    raise ValueError(f"tokenizer {spec!r} has no eos or pad token; give it one (tokenizer.add_special_tokens).")
  return tok
