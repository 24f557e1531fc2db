"""AdaptSum (Yu et al., NAACL 2021): low-resource abstractive summarization in six domains, as task sources.

Why: MLtD's summarization experiments (paper Sec. 5) meta-train on some AdaptSum domains and adapt to a held-out
one from its 300-example low-resource training split. The data (https://github.com/TysonYu/AdaptSum) is laid out as

    <root>/<domain>/{train,valid,test}.{source,target}              one example per line; source line i pairs
    <root>/<domain>/AdaptSum300sample/train.{source,target}        with target line i (valid/test optional here)

Tasks (`DomainEpisodes`, which `mltd_jax.data.tfds_source.TfdsTasks` shares):

* meta-training: ``train_task(i)`` picks one of the domains that are neither the test nor the validation domain
  and draws ``support_size + query_size`` distinct examples from its full train split (the low-resource train split
  where the full one is missing); the task's name is the domain.
* test: ``eval_episodes`` episodes of ``test_domain``, support drawn from its low-resource train split and query
  from its test split; validation likewise from its valid split, or from ``validation_domain``'s when one is given
  (that domain then leaves meta-training too). Names ``f"{domain}#{k}"``. The valid and test files of the
  low-resource folder are used where present, else the domain folder's.
* every draw is a numpy stream keyed by (seed, split, index), so tasks are pure functions of the seed.

Examples are ``(source, target)`` pairs (``mode="pair"``, summarization) or texts (``mode="text"``, the
multi-domain LM protocol: the ``text_fields`` of a line joined by "\\n", by default the document alone).

Files are read only when needed (held-out domains' files at construction, so that a damaged test file shows up
before training; a training domain's train files at its first task, or before training when the encoder does not
truncate, to encode them all: `AdaptSumTasks.check_examples`) and at most ``max_examples`` lines each.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Sequence

import numpy as np

from mltd_jax.data.tasks import Example, Task, check_encodable

DOMAINS = ("dialog", "email", "movie_review", "debate", "social_media", "science")
MODES = ("pair", "text")
FIELDS = ("source", "target")
SPLITS = ("train", "low_resource", "valid", "test")  # split_examples' names; "low_resource" = the 300-example train
_SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}
_ROLE_OF_SPLIT = {"train": "train", "low_resource": "support", "valid": "validation", "test": "test"}


def names(value: str | Sequence[str]) -> tuple[str, ...]:
  """A config value that lists names, with one name given as a string meaning that name (not its characters)."""
  return (value,) if isinstance(value, str) else tuple(value)


class DomainEpisodes:
  """Tasks = domains: meta-train on some, adapt to a held-out one from its training split (see module docstring).

  Subclasses set ``field`` (the config block, for errors), call `_init_episodes`, and implement `_pool`
  (the examples of a domain in a role: "train", "support", "validation" or "test") and `_where` (what a pool is
  read from, for errors).
  """

  field = "config.data"

  def _init_episodes(
    self,
    domains: Sequence[str],
    test_domain: str,
    validation_domain: str,
    sizes: tuple[int, int, int, int],
    seed: int,
  ) -> None:
    """Check and set the held-out and training domains and the episode sizes.

    Args:
      domains: all domain names, in the order ``train_task`` indexes them.
      test_domain: the held-out test domain.
      validation_domain: a second held-out domain for validation, or "" for the test domain's own valid split.
      sizes: (support_size, query_size, eval_episodes, max_examples).
      seed: the data seed.
    """
    for name, value in zip(("support_size", "query_size", "eval_episodes", "max_examples"), sizes):
      least = 0 if name == "max_examples" else 1
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < least:
        raise ValueError(f"{self.field}.{name}={value!r} must be an int >= {least}.")
    self.support_size, self.query_size, self.eval_episodes, self.max_examples = (int(v) for v in sizes)
    self.domains, self.seed = list(dict.fromkeys(domains)), seed
    for name, value in (("test_domain", test_domain), ("validation_domain", validation_domain)):
      if value not in self.domains and (value or name == "test_domain"):
        raise ValueError(
          f"{self.field}.{name}={value!r} is not one of the domains {self.domains}; pick one of them"
          + (" or '' (the test domain's valid split)." if name == "validation_domain" else ".")
        )
    self.held_out = {"validation": validation_domain or test_domain, "test": test_domain}
    self.train_domains = [d for d in self.domains if d not in self.held_out.values()]
    if not self.train_domains:
      raise ValueError(
        f"{self.field}: no domain is left for meta-training after holding out {sorted(set(self.held_out.values()))}; "
        "list more domains."
      )

  def _pool(self, domain: str, role: str) -> Sequence[Example]:
    raise NotImplementedError

  def _where(self, domain: str, role: str) -> str:
    raise NotImplementedError

  def _check_size(self, domain: str, role: str, sizes: tuple[str, ...]) -> Sequence[Example]:
    """The pool of (domain, role), refused when it holds fewer examples than the size fields ``sizes`` add up to."""
    pool = self._pool(domain, role)
    need = sum(getattr(self, s) for s in sizes)
    if len(pool) < need:
      fields = " + ".join(f"{self.field}.{s}" for s in sizes)
      cap = f", or raise {self.field}.max_examples={self.max_examples}" if self.max_examples else ""
      raise ValueError(
        f"{self._where(domain, role)} has {len(pool)} examples, fewer than the {need} ({fields}) that a task of "
        f"domain {domain!r} draws from it; lower {fields}{cap}."
      )
    return pool

  # Held-out episode sizes: -1 = support_size / query_size; 0 = the whole split (in file order), e.g. fine-tuning
  # on a held-out domain's entire training split and scoring its entire test split (the paper's Table 3).
  eval_support_size: int = -1
  eval_query_size: int = -1

  def _eval_size(self, role: str) -> tuple[str, ...]:
    """The size field(s) of held-out ``role`` ("support" or "query"); () = the whole split."""
    size = self.eval_support_size if role == "support" else self.eval_query_size
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < -1:
      raise ValueError(f"{self.field}.eval_{role}_size={size!r} must be -1 (as {role}_size), 0 (all) or > 0.")
    return (f"eval_{role}_size",) if size > 0 else () if size == 0 else (f"{role}_size",)

  def _check_held_out(self) -> None:
    """Read the held-out pools now, so that a missing or small evaluation split fails before training."""
    for split, domain in self.held_out.items():
      self._check_size(domain, "support", self._eval_size("support"))
      self._check_size(domain, split, self._eval_size("query"))

  def _draw(self, rng: np.random.Generator, domain: str, role: str, sizes: tuple[str, ...]) -> tuple[Example, ...]:
    """Distinct examples of (domain, role), as many as the size fields ``sizes`` add up to (no fields: all)."""
    pool = self._check_size(domain, role, sizes)
    if not sizes:
      return tuple(pool)
    pick = rng.choice(len(pool), size=sum(getattr(self, s) for s in sizes), replace=False)
    return tuple(pool[int(i)] for i in pick)

  def train_task(self, index: int) -> Task:
    """Meta-training task ``index``: disjoint support and query drawn from one training domain's train split.

    Args:
      index: position in the endless meta-training stream; the task is a pure function of (seed, index).

    Returns:
      The task, named after its domain.
    """
    rng = np.random.default_rng([self.seed, _SPLIT_IDS["train"], index])
    domain = self.train_domains[int(rng.integers(len(self.train_domains)))]
    drawn = self._draw(rng, domain, "train", ("support_size", "query_size"))
    return Task(domain, drawn[: self.support_size], drawn[self.support_size :])

  def eval_tasks(self, split: str) -> list[Task]:
    """``eval_episodes`` episodes of the held-out domain: support from its training split, query from ``split``.

    Args:
      split: "validation" or "test".

    Returns:
      The tasks, named ``f"{domain}#{k}"``.
    """
    if split not in self.held_out:
      raise ValueError(f"split={split!r} must be 'validation' or 'test'.")
    domain, tasks = self.held_out[split], []
    for k in range(self.eval_episodes):
      rng = np.random.default_rng([self.seed, _SPLIT_IDS[split], 0, k])
      support = self._draw(rng, domain, "support", self._eval_size("support"))
      tasks.append(Task(f"{domain}#{k}", support, self._draw(rng, domain, split, self._eval_size("query"))))
    return tasks


class AdaptSumTasks(DomainEpisodes):
  """A TaskSource over an AdaptSum folder; see the module docstring. Keyword arguments = ``config.data.adaptsum``."""

  field = "config.data.adaptsum"

  def __init__(
    self,
    root: str,
    *,
    domains: Sequence[str] = DOMAINS,
    test_domain: str = "science",
    validation_domain: str = "",
    low_resource_dir: str = "AdaptSum300sample",
    support_size: int = 8,
    query_size: int = 8,
    eval_episodes: int = 4,
    mode: str = "pair",
    text_fields: Sequence[str] = ("source",),
    max_examples: int = 0,
    eval_support_size: int = -1,
    eval_query_size: int = -1,
    seed: int = 0,
  ):
    self.eval_support_size, self.eval_query_size = eval_support_size, eval_query_size
    self.root = Path(root).expanduser() if root else None
    if self.root is None or not self.root.is_dir():
      raise FileNotFoundError(
        f"AdaptSum folder {root!r} not found (config.data.adaptsum.root). Get the data from "
        "https://github.com/TysonYu/AdaptSum (its dataset folder has one directory per domain: "
        f"{', '.join(DOMAINS)}) and set config.data.adaptsum.root to that folder."
      )
    if mode not in MODES:
      raise ValueError(f"{self.field}.mode={mode!r} is not one of {MODES} (pair: summarization, text: LM).")
    self.mode, self.text_fields = mode, names(text_fields)
    if not self.text_fields or set(self.text_fields) - set(FIELDS):
      raise ValueError(f"{self.field}.text_fields={text_fields!r} must be a non-empty subset of {FIELDS}.")
    self.low_resource_dir = low_resource_dir
    sizes = (support_size, query_size, eval_episodes, max_examples)
    self._init_episodes(names(domains), test_domain, validation_domain, sizes, seed)
    self._check_domain_dirs()
    self._cache: dict[tuple[Path, Path], list[Example]] = {}
    for domain in self.train_domains:
      self._files(domain, "train")  # a missing file shows up now; the lines are read at the domain's first task
    self._check_held_out()

  def _check_domain_dirs(self) -> None:
    missing = [d for d in self.domains if not (self.root / d).is_dir()]
    if missing:
      there = sorted(p.name for p in self.root.iterdir() if p.is_dir())
      raise FileNotFoundError(
        f"{self.root}: no folder for domains {missing}; it holds {there}. Fix config.data.adaptsum.domains or "
        "config.data.adaptsum.root (the folder whose subfolders are the domains)."
      )

  def _files(self, domain: str, role: str) -> tuple[Path, Path]:
    """The (.source, .target) files of a domain in a role; the first folder that has the split wins."""
    base = self.root / domain
    low = base / self.low_resource_dir
    stem = {"train": "train", "support": "train", "validation": "valid", "test": "test"}[role]
    folders = {"train": [base, low], "support": [low], "validation": [low, base], "test": [low, base]}[role]
    for folder in folders:
      source, target = folder / f"{stem}.source", folder / f"{stem}.target"
      if source.is_file() != target.is_file():
        have, lack = (source, target) if source.is_file() else (target, source)
        raise FileNotFoundError(
          f"{have} has no {lack.name} beside it; line i of {stem}.source pairs with line i of {stem}.target, so "
          "both files are needed: restore the missing one from https://github.com/TysonYu/AdaptSum."
        )
      if source.is_file():
        return source, target
    raise FileNotFoundError(
      f"no {stem}.source / {stem}.target for domain {domain!r} in {[str(f) for f in folders]}; restore them from "
      "https://github.com/TysonYu/AdaptSum (or check config.data.adaptsum.low_resource_dir)."
    )

  def _lines(self, path: Path) -> list[str]:
    """The first ``max_examples`` lines of ``path`` (all if 0), without their line ends; an empty line is an error."""
    lines = []
    # newline="\n": only "\n" ends a line, so a stray "\r" or U+2028 inside a document cannot shift the pairing.
    with path.open(encoding="utf-8", newline="\n") as f:
      for n, line in enumerate(itertools.islice(f, self.max_examples or None), 1):
        text = line.removesuffix("\n").removesuffix("\r")
        if not text.strip():
          raise ValueError(
            f"{path}:{n}: empty line; AdaptSum files have none, so this file is damaged: restore it from "
            "https://github.com/TysonYu/AdaptSum."
          )
        lines.append(text)
    return lines

  def _read(self, source: Path, target: Path) -> list[Example]:
    """The examples of one (.source, .target) pair of files, read once and cached."""
    if (source, target) not in self._cache:
      sources, targets = self._lines(source), self._lines(target)
      if len(sources) != len(targets):
        cap = f" (within the first {self.max_examples}, config.data.adaptsum.max_examples)" if self.max_examples else ""
        raise ValueError(
          f"{source} has {len(sources)} lines but {target} has {len(targets)}{cap}; line i of one pairs with line i "
          "of the other, so the counts must match: restore both from https://github.com/TysonYu/AdaptSum."
        )
      self._cache[(source, target)] = [self._example(s, t) for s, t in zip(sources, targets)]
    return self._cache[(source, target)]

  def _example(self, source: str, target: str) -> Example:
    if self.mode == "pair":
      return (source, target)
    return "\n".join({"source": source, "target": target}[f] for f in self.text_fields)

  def _pool(self, domain: str, role: str) -> list[Example]:
    return self._read(*self._files(domain, role))

  def _where(self, domain: str, role: str) -> str:
    return "{} / {}".format(*self._files(domain, role))

  def check_examples(self, encoder, chunk: int = 256) -> None:
    """Encode every example of the training domains' train splits before training (`check_encodable`): one the
    encoder refuses stops the run here, named by the line of both files, not when its step draws it. The held-out
    domain's examples are encoded as its tasks (`mltd_jax.evaluate.check_data`)."""
    for domain in self.train_domains:
      source, target = self._files(domain, "train")
      check_encodable(encoder, self._pool(domain, "train"), lambda i: f"{source}:{i + 1} / {target}:{i + 1}", chunk)

  def split_examples(self, domain: str, split: str) -> list[Example]:
    """All examples of a domain's split (at most ``max_examples``), e.g. to fine-tune on every training document.

    Args:
      domain: one of ``domains``.
      split: "train" (the full train split, or the low-resource one where it is missing), "low_resource" (the
        low-resource train split), "valid" or "test" (the low-resource folder's where present, else the domain's).

    Returns:
      The examples in file order, pairs or texts as ``mode`` says.
    """
    if domain not in self.domains:
      raise ValueError(f"domain {domain!r} is not one of {self.field}.domains {self.domains}.")
    if split not in SPLITS:
      raise ValueError(f"split {split!r} is not one of {SPLITS}.")
    return list(self._pool(domain, _ROLE_OF_SPLIT[split]))
