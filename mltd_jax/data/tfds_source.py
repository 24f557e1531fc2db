"""Domains from TensorFlow Datasets (aeslc, samsum, reddit_tifu, scientific_papers, lm1b, ...) as task sources.

Why: the summarization and LM domains of the paper's experiments exist as TFDS builders, and TFDS's array_record
format gives random access without TensorFlow (not installed here): `tfds.data_source` reads single records by
index, so an episode reads only the records it draws and a large corpus is never iterated.

A domain is one TFDS dataset (``datasets`` maps a domain name to a TFDS name such as "reddit_tifu/short" or
"scientific_papers/arxiv:1.1.1"). Tasks follow the AdaptSum protocol (`mltd_jax.data.adaptsum.DomainEpisodes`):
meta-training tasks draw disjoint support and query examples from the ``train_split`` of a domain that is neither
the test nor the validation domain; a held-out domain's ``eval_episodes`` episodes take their support from its
``train_split`` and their query from its ``validation_split`` / ``test_split``. ``test_domain`` "" is the last
domain in sorted order; ``validation_domain`` "" is the test domain itself (with its ``validation_split``).

Split names accept TFDS slicing ("train[:90%]"), and every split or field argument is either one string for all
domains or a mapping domain -> string. E.g. reddit_tifu has only a train split: hold it out with
``train_split={"reddit": "train[:90%]", ...}`` and ``test_split={"reddit": "train[90%:]"}`` (support and query
would overlap if both read the same records).

Examples: ``mode="pair"``: ``(record[source_field], record[target_field])``; ``mode="text"``:
``record[text_field]``; bytes are decoded as UTF-8 and records are used as stored (an empty field stays empty).
``max_examples`` > 0 restricts each split to its first ``max_examples`` records. Training records are not encoded
up front (other sources' ``check_examples``): without config.data.truncate, a record too long for the encoder stops
the run when a step draws it.

Datasets must be prepared in array_record format first: ``tfds build <name> --file_format=array_record``;
the error for an unprepared one says the exact command (and, for datasets that need a manual download, where the
files go).
"""

from __future__ import annotations

import collections.abc
import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

from mltd_jax.data.adaptsum import MODES, DomainEpisodes
from mltd_jax.data.tasks import Example

FIELD = "config.data.tfds"
_SPLIT_OF_ROLE = {"train": "train_split", "support": "train_split", "validation": "validation_split"}


def _tfds():
  """The tensorflow_datasets module, imported on first use (it takes a while), with the legacy builders registered.

  cnn_dailymail, xsum, wikipedia, c4 and others are registered only by importing their package.
  """
  import tensorflow_datasets as tfds
  import tensorflow_datasets.summarization  # noqa: F401
  import tensorflow_datasets.text  # noqa: F401

  return tfds


def per_domain(value: str | Mapping[str, str], domains: Sequence[str], name: str) -> dict[str, str]:
  """A config value given once for all domains (a string) or per domain (a mapping), as a per-domain dict.

  Args:
    value: the config value.
    domains: the domains that need an entry.
    name: the config field, for errors.

  Returns:
    ``{domain: value}`` for every domain of ``domains``.
  """
  if isinstance(value, str):
    return {d: value for d in domains}
  if not hasattr(value, "keys"):
    raise ValueError(f"{FIELD}.{name}={value!r} must be a string or a mapping domain -> string.")
  table = {str(k): value[k] for k in value.keys()}
  missing = [d for d in domains if d not in table]
  if missing:
    raise ValueError(
      f"{FIELD}.{name} has no entry for domains {missing} (it has {sorted(table)}); give one per domain or one "
      "string for all."
    )
  return {d: table[d] for d in domains}


def _text(value: Any, where: str) -> str:
  """A record's text field as str: bytes decoded as UTF-8 (0-d arrays unwrapped)."""
  if hasattr(value, "ndim") and value.ndim == 0:
    value = value.item()
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, str):
    return value
  raise TypeError(f"{where} holds a {type(value).__name__}, not a text; choose a Text feature.")


@dataclasses.dataclass(frozen=True)
class _Records(collections.abc.Sequence):
  """The examples of one split, read record by record on access (random access into array_record files)."""

  source: Any  # a tfds random-access data source: len() and source[i] -> dict of features
  fields: tuple[str, ...]  # one field (text mode) or (source_field, target_field)
  size: int
  where: str

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index: int) -> Example:
    if not 0 <= index < self.size:
      raise IndexError(f"{self.where}: index {index} out of range [0, {self.size}).")
    record = self.source[index]
    texts = [_text(record[f], f"{self.where} record {index} field {f!r}") for f in self.fields]
    return texts[0] if len(texts) == 1 else (texts[0], texts[1])


class TfdsTasks(DomainEpisodes):
  """A TaskSource over TFDS datasets; see the module docstring. Keyword arguments = ``config.data.tfds``."""

  field = FIELD

  def __init__(
    self,
    datasets: Mapping[str, str],
    *,
    source_field: str | Mapping[str, str] = "document",
    target_field: str | Mapping[str, str] = "summary",
    text_field: str | Mapping[str, str] = "text",
    mode: str = "pair",
    data_dir: str = "",
    train_split: str | Mapping[str, str] = "train",
    validation_split: str | Mapping[str, str] = "validation",
    test_split: str | Mapping[str, str] = "test",
    test_domain: str = "",
    validation_domain: str = "",
    support_size: int = 8,
    query_size: int = 8,
    eval_episodes: int = 4,
    max_examples: int = 0,
    seed: int = 0,
  ):
    if isinstance(datasets, str) or not hasattr(datasets, "keys") or not datasets:
      raise ValueError(f"{FIELD}.datasets={datasets!r} must map domain names to TFDS names, e.g. {{'email': 'aeslc'}}.")
    if mode not in MODES:
      raise ValueError(f"{FIELD}.mode={mode!r} is not one of {MODES} (pair: summarization, text: LM).")
    domains = sorted(str(d) for d in datasets.keys())
    self.datasets = per_domain(datasets, domains, "datasets")
    self.mode, self.data_dir = mode, data_dir
    sizes = (support_size, query_size, eval_episodes, max_examples)
    self._init_episodes(domains, test_domain or domains[-1], validation_domain, sizes, seed)
    fields = (("source_field", source_field), ("target_field", target_field))
    if mode == "text":
      fields = (("text_field", text_field),)
    self.fields = {name: per_domain(value, domains, name) for name, value in fields}
    self.splits = {
      "train_split": per_domain(train_split, domains, "train_split"),
      "validation_split": per_domain(validation_split, [self.held_out["validation"]], "validation_split"),
      "test_split": per_domain(test_split, [self.held_out["test"]], "test_split"),
    }
    self._tfds = _tfds()
    self._builders: dict[str, Any] = {}
    self._pools: dict[tuple[str, str], _Records] = {}
    for domain in self.train_domains:
      self._pool(domain, "train")  # opens the split (reads no record): unprepared data fails now, not mid-run
    self._check_held_out()

  def _split(self, domain: str, role: str) -> tuple[str, str]:
    """(config field, TFDS split) that a role reads in a domain."""
    name = _SPLIT_OF_ROLE.get(role, "test_split")
    return name, self.splits[name][domain]

  def _builder(self, domain: str):
    """The domain's TFDS builder (metadata only; reading goes through its data sources)."""
    if domain not in self._builders:
      name = self.datasets[domain]
      try:
        self._builders[domain] = self._tfds.builder(name, data_dir=self.data_dir or None)
      except self._tfds.core.registered.DatasetNotFoundError as e:
        first = str(e).splitlines()[0]
        raise ValueError(f"{FIELD}.datasets[{domain!r}]={name!r}: {first} (see `tfds build --help`).") from e
    return self._builders[domain]

  def _pool(self, domain: str, role: str) -> _Records:
    """The examples of (domain, role), opened once: fields checked, no record read."""
    field, split = self._split(domain, role)
    if (domain, split) not in self._pools:
      builder = self._builder(domain)
      names = tuple(self.fields[f][domain] for f in self.fields)
      for config_field, feature in zip(self.fields, names):
        self._check_feature(builder, domain, config_field, feature)
      try:
        source = builder.as_data_source(split=split)
      except Exception as e:  # tfds raises NotImplementedError, AssertionError or ValueError here
        better = self._open_error(builder, domain, field, split, e)
        if better is None:
          raise
        raise better from e
      size = len(source) if not self.max_examples else min(len(source), self.max_examples)
      self._pools[(domain, split)] = _Records(source, names, size, self._where(domain, role))
    return self._pools[(domain, split)]

  def _where(self, domain: str, role: str) -> str:
    return f"TFDS {self.datasets[domain]!r} split {self._split(domain, role)[1]!r} (domain {domain!r})"

  def _check_feature(self, builder, domain: str, config_field: str, feature: str) -> None:
    features = builder.info.features
    listing = ", ".join(f"{k}: {type(v).__name__}" for k, v in features.items())
    if feature not in features.keys():
      raise ValueError(
        f"{FIELD}.{config_field}={feature!r}: TFDS {self.datasets[domain]!r} (domain {domain!r}) has no such "
        f"feature; its features: {listing}."
      )
    if not isinstance(features[feature], self._tfds.features.Text):
      raise ValueError(
        f"{FIELD}.{config_field}={feature!r}: feature of TFDS {self.datasets[domain]!r} is a "
        f"{type(features[feature]).__name__}, not a Text; its features: {listing}."
      )

  def _open_error(self, builder, domain: str, field: str, split: str, error: Exception) -> Exception | None:
    """A clearer error for a failed ``builder.as_data_source(split)`` (how to prepare the data), or None."""
    name = self.datasets[domain]
    data_dir = f" --data_dir={self.data_dir}" if self.data_dir else ""
    build = f"tfds build {name} --file_format=array_record{data_dir}"
    array_record = self._tfds.core.file_adapters.FileFormat.ARRAY_RECORD
    if not builder.is_prepared():
      manual = ""
      if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
        manual_dir = Path(builder.data_dir_root) / "downloads" / "manual"
        manual = f" It needs a manual download first, into {manual_dir} (or pass --manual_dir=...): " + " ".join(
          builder.MANUAL_DOWNLOAD_INSTRUCTIONS.split()
        )
      return FileNotFoundError(
        f"TFDS {name!r} (domain {domain!r}) is not prepared in {builder.data_dir_root} ({FIELD}.data_dir). "
        f"Prepare it once with `{build}`; reading it afterwards needs no TensorFlow.{manual}"
      )
    if builder.info.file_format != array_record:
      return ValueError(
        f"TFDS {name!r} is prepared at {builder.data_dir} as {builder.info.file_format}, which has no random "
        f"access; rebuild it with `{build}` (another {FIELD}.data_dir, or delete that folder first)."
      )
    if isinstance(error, ValueError):  # e.g. "Unknown split 'test'. Should be one of ['train', 'validation']."
      return ValueError(f"{FIELD}.{field}={split!r} for TFDS {name!r} (domain {domain!r}): {error}")
    return None
