"""Persona-Chat (ParlAI / ConvAI2) as few-shot personalization tasks: one persona = one task.

The paper's first experiment (MLtD section 4.1, after Madotto et al. 2019): a model prepared by meta-learning adapts
to a new persona from a few of its dialogues. Here a dialogue turn is a ``(context, response)`` example for a causal
LM (`mltd_jax.data.encoders.CausalLMEncoder` scores the response only):

* context: the persona lines (``include_persona``), then the dialogue history up to and including the partner's
  utterance of that turn, oldest first, joined by "\\n" (`encoders.SEPARATOR`, which also separates the context from
  the response). ``max_history_turns > 0`` keeps only that many most recent utterances (either speaker's; the
  partner's current one counts). The encoder cuts what is still too long from the left.
* response: the gold response. Its candidates (when the file has them) are kept with the gold one last.

Files (``path`` is a file or a directory holding them; ``format="auto"`` tells them apart):

* ``txt``: ParlAI's ``{train,valid,test}_self_original.txt``. Lines ``N your persona: ...`` then ``N utterance<TAB>
  response`` or ``N utterance<TAB>response<TAB><TAB>cand1|cand2|...``; ``N`` counts lines within a dialogue and
  restarts at 1 for each new one. ``partner's persona:`` lines are ignored (the "self" view). A directory is read
  as ``<dir>/<split>_self_original.txt``; a file path ``<dir>/<split><rest>`` names its siblings
  ``<dir>/<other split><rest>`` (e.g. ``valid_self_revised.txt``).
* ``json``: ``personachat_self_original.json``, ``{"train": [{"personality": [...], "utterances": [{"history":
  [...], "candidates": [..., gold]}]}], "valid": [...]}``; the history's last item is the partner's utterance.

Tasks: dialogues are grouped by their persona set (frozenset of persona lines); a task's name is ``persona-`` and a
hash of the sorted lines (the same lines give the same name in both formats). An episode draws
``support_dialogues + query_dialogues`` distinct dialogues of one persona: support examples come from the first
ones, query examples from the others, so support and query never share a dialogue. ``support_size`` /
``query_size`` turns are drawn from those dialogues (fixed shapes for batching; if the dialogues hold fewer turns,
turns repeat); 0 takes every turn, in order (shapes then vary across tasks). Candidates (for hits@1) are kept for
held-out query examples only; ``Task.candidates`` is () when any query turn has none.

Splits: meta-training draws personas of ``train_split``; validation and test tasks are ``eval_episodes`` episodes
of each persona of ``validation_split`` / ``test_split`` (the first ``max_eval_personas`` by name; 0 = all), named
``<persona>#<episode>``. When ``test_split`` is not in the data (the JSON file has none) or equals
``validation_split``, the validation split's personas are split in two by name order: the first half (rounded up)
validates, the second half tests. Held-out personas are removed from meta-training.

Bad data: a malformed line is a ValueError naming ``file:line`` and what was expected. Non-UTF-8 bytes raise
(``encoding_errors="strict"``) or are replaced (``"replace"``, logged). Lines (txt) or text fields (json) longer
than ``max_line_chars`` (> 0) raise, unless ``long_lines="truncate"`` cuts them (logged). A persona with fewer than
``support_dialogues + query_dialogues`` dialogues is skipped with a count in the log (logger "mltd_jax"); a split
with no persona left is an error. Identical dialogues of one persona are kept once (logged).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from mltd_jax.data.encoders import SEPARATOR
from mltd_jax.data.tasks import Task, check_encodable

logger = logging.getLogger("mltd_jax")

JSON_NAME = "personachat_self_original.json"
TXT_SUFFIX = "_self_original.txt"
FIELD = "config.data.personachat"
_TXT_LINE = "'N your persona: ...' or 'N utterance<TAB>response[<TAB><TAB>cand1|cand2|...]'"


@dataclasses.dataclass(frozen=True)
class Turn:
  """One of the persona's turns: the history before it, its gold response, its candidates (gold last, or ())."""

  history: tuple[str, ...]  # utterances oldest first; the last one is the partner's
  response: str
  candidates: tuple[str, ...] = ()
  where: str = dataclasses.field(default="", compare=False)  # its line (file:line) or JSON path, for errors


@dataclasses.dataclass(frozen=True)
class Dialogue:
  """A dialogue from the persona's side; ``where`` is its first line (``file:line``) or JSON path."""

  persona: tuple[str, ...]
  turns: tuple[Turn, ...]
  where: str


@dataclasses.dataclass(frozen=True)
class _Reading:
  """How text is read: the constructor's encoding and line-length fields."""

  encoding_errors: str
  max_line_chars: int
  long_lines: str
  keep_candidates: bool = True


def persona_name(persona: Sequence[str]) -> str:
  """A short stable name of a persona set: ``persona-`` + 10 hex digits of the hash of its sorted lines."""
  digest = hashlib.sha1("\n".join(sorted(set(persona))).encode()).hexdigest()
  return f"persona-{digest[:10]}"


def _gold_last(candidates: Sequence[str], gold: str) -> tuple[str, ...]:
  """Candidates with ``gold`` moved (or added) to the end: the `Task.candidates` convention."""
  return (*[c for c in candidates if c != gold], gold)


def _fit(text: str, where: str, reading: _Reading, counts: dict) -> str:
  """``text`` within ``max_line_chars``: an error, or cut when ``long_lines="truncate"`` (counted)."""
  if reading.max_line_chars <= 0 or len(text) <= reading.max_line_chars:
    return text
  if reading.long_lines != "truncate":
    raise ValueError(
      f"{where}: {len(text)} characters > {FIELD}.max_line_chars={reading.max_line_chars}; raise it, set it to 0 "
      f"(no limit) or set {FIELD}.long_lines='truncate'."
    )
  counts["truncated"] = counts.get("truncated", 0) + 1
  return text[: reading.max_line_chars]


def _decode(raw: bytes, where: str, reading: _Reading, counts: dict) -> str:
  """UTF-8 text of ``raw``; undecodable bytes raise (naming ``where``) or are replaced (counted)."""
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    if reading.encoding_errors != "replace":
      raise ValueError(
        f"{where}: bytes {raw[e.start : e.end]!r} at offset {e.start} are not UTF-8; fix the file or set "
        f"{FIELD}.encoding_errors='replace'."
      ) from None
    counts["replaced"] = counts.get("replaced", 0) + 1
    return raw.decode("utf-8", errors="replace")


def _log_counts(file: Path, counts: dict) -> None:
  if counts.get("replaced"):
    logger.warning("%s: replaced undecodable bytes in %d lines (encoding_errors='replace').", file, counts["replaced"])
  if counts.get("truncated"):
    logger.warning("%s: cut %d texts to max_line_chars (long_lines='truncate').", file, counts["truncated"])


def _lines(file: Path, reading: _Reading) -> Iterator[tuple[int, str]]:
  """(line number, text) of each line of ``file``, decoded and length-checked as ``reading`` says."""
  counts: dict = {}
  with open(file, "rb") as f:
    for n, raw in enumerate(f, 1):
      where = f"{file}:{n}"
      yield n, _fit(_decode(raw, where, reading, counts).rstrip("\r\n"), where, reading, counts)
  _log_counts(file, counts)


class _TxtDialogue:
  """A dialogue being read from a txt file: persona lines, then turns."""

  def __init__(self, where: str):
    self.where, self.persona, self.turns, self.history = where, [], [], []

  def add_persona(self, line: str, where: str) -> None:
    if self.turns:
      raise ValueError(f"{where}: a persona line after the dialogue's utterances; expected {_TXT_LINE}.")
    self.persona.append(line.strip())

  def add_turn(self, text: str, where: str, keep_candidates: bool) -> None:
    fields = text.split("\t")
    if not (len(fields) == 2 or (len(fields) == 3 and not fields[2]) or len(fields) == 4):
      raise ValueError(f"{where}: {len(fields)} tab-separated fields; expected {_TXT_LINE}.")
    utterance, response = fields[0].strip(), fields[1].strip()
    if not utterance or not response:
      raise ValueError(f"{where}: an empty utterance or response; expected {_TXT_LINE}.")
    cands = [c.strip() for c in fields[3].split("|")] if len(fields) == 4 and keep_candidates else []
    cands = [c for c in cands if c]
    self.history.append(utterance)
    self.turns.append(Turn(tuple(self.history), response, _gold_last(cands, response) if cands else (), where))
    self.history.append(response)

  def done(self) -> Dialogue:
    if not self.turns:
      raise ValueError(f"{self.where}: a dialogue with no utterance line; expected {_TXT_LINE}.")
    return Dialogue(tuple(self.persona), tuple(self.turns), self.where)


def read_txt(file: Path, reading: _Reading) -> list[Dialogue]:
  """The dialogues of a ParlAI ``*_self_original.txt`` file (format in the module docstring)."""
  dialogues, current, last = [], None, 0
  for n, line in _lines(file, reading):
    if not line.strip():
      continue
    where = f"{file}:{n}"
    number, _, text = line.partition(" ")
    if not number.isdigit():
      raise ValueError(f"{where}: no line number; expected {_TXT_LINE}, got {line[:80]!r}.")
    if int(number) == 1:
      if current is not None:
        dialogues.append(current.done())
      current = _TxtDialogue(where)
    elif current is None or int(number) != last + 1:
      raise ValueError(f"{where}: line number {number} after {last}; expected {last + 1} or 1 (a new dialogue).")
    last = int(number)
    if text.startswith("your persona:"):
      current.add_persona(text[len("your persona:") :], where)
    elif not text.startswith("partner's persona:"):
      current.add_turn(text, where, reading.keep_candidates)
  if current is not None:
    dialogues.append(current.done())
  return dialogues


def _texts(value: Any, where: str, reading: _Reading, counts: dict, allow_empty: bool = False) -> tuple[str, ...]:
  if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or (not value and not allow_empty):
    raise ValueError(f"{where}: expected a {'' if allow_empty else 'non-empty '}list of strings, got {value!r:.80}.")
  return tuple(_fit(v.strip(), where, reading, counts) for v in value)


def _json_dialogue(d: Any, where: str, reading: _Reading, counts: dict) -> Dialogue:
  """One dialogue of the JSON format; errors name its JSON path."""
  if not isinstance(d, dict) or not isinstance(d.get("utterances"), list) or not d["utterances"]:
    raise ValueError(f'{where}: expected {{"personality": [...], "utterances": [{{"history": [...], ...}}, ...]}}.')
  persona = _texts(d.get("personality", []), f"{where}.personality", reading, counts, allow_empty=True)
  turns = []
  for t, u in enumerate(d["utterances"]):
    at = f"{where}.utterances[{t}]"
    if not isinstance(u, dict) or "history" not in u or "candidates" not in u:
      raise ValueError(f'{at}: expected {{"history": [..., partner utterance], "candidates": [..., gold]}}.')
    cands = u["candidates"]
    if isinstance(cands, list) and not reading.keep_candidates:
      cands = cands[-1:]  # only the gold one is used: skip reading the others
    cands = _texts(cands, f"{at}.candidates", reading, counts)
    history = _texts(u["history"], f"{at}.history", reading, counts)
    turns.append(Turn(history, cands[-1], cands if reading.keep_candidates else (), at))
  return Dialogue(persona, tuple(turns), where)


def read_json(file: Path, splits: Sequence[str], reading: dict[str, _Reading]) -> dict[str, list[Dialogue]]:
  """The dialogues of each of ``splits`` found in a ``personachat_self_original.json`` file (absent: no key)."""
  raw = file.read_bytes()
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    line = raw.count(b"\n", 0, e.start) + 1
    text = _decode(raw, f"{file}:{line}", next(iter(reading.values())), {})
    logger.warning("%s: replaced undecodable bytes (encoding_errors='replace').", file)
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{file}:{e.lineno}:{e.colno}: {e.msg}; expected a JSON object of splits.") from None
  if not isinstance(data, dict):
    raise ValueError(f'{file}: expected a JSON object {{"train": [...], "valid": [...]}}, got a {type(data).__name__}.')
  out = {}
  for split in splits:
    if split in data:
      if not isinstance(data[split], list):
        raise ValueError(f"{file}: {split!r} must be a list of dialogues.")
      counts: dict = {}
      out[split] = [
        _json_dialogue(d, f"{file}: {split}[{i}]", reading[split], counts) for i, d in enumerate(data[split])
      ]
      _log_counts(file, counts)
  return out


def _locate(path: str, fmt: str) -> tuple[str, Path]:
  """The format and the JSON file, or the txt directory/pattern file, that ``path`` names."""
  p = Path(path).expanduser()
  if not p.exists():
    raise FileNotFoundError(
      f"{p} not found; set {FIELD}.path to ParlAI's ConvAI2/Persona-Chat directory (*{TXT_SUFFIX} files, e.g. "
      f"from `parlai display_data -t convai2`) or to {JSON_NAME} (HuggingFace's transfer-learning-conv-ai)."
    )
  if fmt == "auto":
    is_json = p.suffix == ".json" if p.is_file() else (p / JSON_NAME).is_file()
    fmt = "json" if is_json else "txt"
  if fmt == "json" and p.is_dir():
    p = p / JSON_NAME
  return fmt, p


def _txt_file(p: Path, split: str, splits: Sequence[str]) -> Path:
  """``<dir>/<split>_self_original.txt``, or for a file ``<dir>/<s><rest>`` its sibling ``<dir>/<split><rest>``."""
  if p.is_dir():
    return p / f"{split}{TXT_SUFFIX}"
  for s in sorted(splits, key=len, reverse=True):
    if p.name.startswith(s):
      return p.with_name(split + p.name[len(s) :])
  raise ValueError(
    f"{FIELD}.path={str(p)!r}: a txt file's name must start with a split name {sorted(splits)} (e.g. "
    f"valid{TXT_SUFFIX}), so that the other splits' files can be found next to it; or give the directory."
  )


def _draw(items: list, size: int, rng: np.random.Generator) -> list:
  """``size`` of ``items`` in their order (0: all); when there are fewer, each repeats equally, the rest at random."""
  if size == 0:
    return items
  n = len(items)
  idx = list(range(n)) * (size // n) + list(rng.choice(n, size=size % n, replace=False))
  return [items[i] for i in sorted(idx)]


class PersonaChatTasks:
  """A TaskSource over Persona-Chat files: one persona = one task; see the module docstring.

  Args:
    path: a directory of split files, a txt split file, or the JSON file (``config.data.personachat.path``).
    format: "auto", "txt" or "json".
    support_dialogues: dialogues per episode whose turns form the support set (k-shot dialogues per persona).
    query_dialogues: other dialogues of the same persona whose turns form the query set.
    support_size: support turns per episode, drawn from the support dialogues (0: all of their turns).
    query_size: query turns per episode, drawn from the query dialogues (0: all of their turns).
    max_history_turns: most recent utterances kept in a context (0: all).
    include_persona: put the persona lines first in every context. Madotto et al. (2019), which the paper follows,
      hide them (False): the model has to learn the persona from the support dialogues.
    train_split, validation_split, test_split: split names (txt file prefixes, JSON keys).
    eval_episodes: episodes per held-out persona.
    max_eval_personas: held-out personas per split, the first ones by name (0: all).
    seed: the episodes' seed.
    encoding_errors: "strict" (non-UTF-8 bytes raise, naming file:line) or "replace".
    max_line_chars: the longest line (txt) or text field (json) accepted; 0: no limit.
    long_lines: "error" or "truncate", for a line longer than ``max_line_chars``.
  """

  def __init__(
    self,
    path: str,
    *,
    format: str = "auto",
    support_dialogues: int = 3,
    query_dialogues: int = 1,
    support_size: int = 18,
    query_size: int = 6,
    max_history_turns: int = 0,
    include_persona: bool = True,
    train_split: str = "train",
    validation_split: str = "valid",
    test_split: str = "test",
    eval_episodes: int = 1,
    max_eval_personas: int = 0,
    seed: int = 0,
    encoding_errors: str = "strict",
    max_line_chars: int = 0,
    long_lines: str = "error",
  ):
    self._check_options(format, encoding_errors, long_lines)
    counts = dict(support_dialogues=support_dialogues, query_dialogues=query_dialogues, eval_episodes=eval_episodes)
    sizes = dict(support_size=support_size, query_size=query_size, max_history_turns=max_history_turns)
    for name, value in {**counts, **sizes, "max_eval_personas": max_eval_personas}.items():
      if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name in counts else 0):
        raise ValueError(f"{FIELD}.{name}={value!r} must be an integer >= {1 if name in counts else 0}.")
    self.support_dialogues, self.query_dialogues = support_dialogues, query_dialogues
    self.support_size, self.query_size = support_size, query_size
    self.max_history_turns, self.include_persona = max_history_turns, include_persona
    self.eval_episodes, self.seed = eval_episodes, seed
    splits = {"train": train_split, "validation": validation_split, "test": test_split}
    reading = {
      s: _Reading(encoding_errors, max_line_chars, long_lines, keep_candidates=s != train_split)
      for s in splits.values()
    }
    read = self._read(path, format, splits, reading)
    self.pools = self._split(read, splits, max_eval_personas)

  @staticmethod
  def _check_options(fmt: str, encoding_errors: str, long_lines: str) -> None:
    for name, value, allowed in (
      ("format", fmt, ("auto", "txt", "json")),
      ("encoding_errors", encoding_errors, ("strict", "replace")),
      ("long_lines", long_lines, ("error", "truncate")),
    ):
      if value not in allowed:
        raise ValueError(f"{FIELD}.{name}={value!r} must be one of {allowed}.")

  def _read(self, path: str, fmt: str, splits: dict, reading: dict) -> dict[str, tuple[str, list[Dialogue]]]:
    """Split name -> (where it was read, its dialogues), for the splits present; train and validation must be."""
    fmt, p = _locate(path, fmt)
    names = list(dict.fromkeys(splits.values()))
    if fmt == "json":
      read = {s: (f"{p} [{s!r}]", d) for s, d in read_json(p, names, reading).items()}
    else:
      files = {s: _txt_file(p, s, names) for s in names}
      read = {s: (str(f), read_txt(f, reading[s])) for s, f in files.items() if f.is_file()}
    for role in ("train", "validation"):
      if splits[role] not in read:
        raise FileNotFoundError(
          f"{p}: no {splits[role]!r} split ({FIELD}.{role}_split) in the {fmt} data; its splits: {sorted(read)}."
        )
    return read

  def _group(self, where: str, dialogues: list[Dialogue], role: str) -> dict[str, list[Dialogue]]:
    """Persona name -> its distinct dialogues, for the personas with enough of them (by name)."""
    groups: dict[str, dict] = {}
    for d in dialogues:
      key = tuple((t.history, t.response) for t in d.turns)
      groups.setdefault(persona_name(d.persona), {}).setdefault(key, d)
    copies = len(dialogues) - sum(len(g) for g in groups.values())
    if copies:
      logger.info("%s: %d dialogues repeat another of the same persona; each is kept once.", where, copies)
    need = self.support_dialogues + self.query_dialogues
    kept = {name: list(g.values()) for name, g in sorted(groups.items()) if len(g) >= need}
    if len(kept) < len(groups):
      logger.warning(
        "%s: skipped %d of %d %s personas with fewer than support_dialogues + query_dialogues = %d dialogues.",
        *(where, len(groups) - len(kept), len(groups), role, need),
      )
    if not kept:
      raise ValueError(
        f"{where}: no persona has support_dialogues + query_dialogues = {need} dialogues ({len(groups)} personas); "
        f"lower {FIELD}.support_dialogues / {FIELD}.query_dialogues."
      )
    return kept

  def _split(self, read: dict, splits: dict, max_eval: int) -> dict[str, dict[str, list[Dialogue]]]:
    """Role ("train", "validation", "test") -> persona name -> dialogues; held-out personas out of training."""
    pools = {"validation": self._group(*read[splits["validation"]], "validation")}
    if splits["test"] in read and splits["test"] != splits["validation"]:
      pools["test"] = self._group(*read[splits["test"]], "test")
    else:
      names = list(pools["validation"])
      if len(names) < 2:
        raise ValueError(f"{read[splits['validation']][0]}: need 2 personas to make validation and test halves.")
      half = (len(names) + 1) // 2
      logger.info(
        "personachat: no %r split; validation = %d, test = %d validation personas.",
        *(splits["test"], half, len(names) - half),
      )
      pools["test"] = {n: pools["validation"].pop(n) for n in names[half:]}
    held_out = {*pools["validation"], *pools["test"]}  # out of meta-training even beyond max_eval_personas
    for role in ("validation", "test"):
      if max_eval:
        pools[role] = dict(list(pools[role].items())[:max_eval])
    train = self._group(*read[splits["train"]], "train")
    held = [n for n in train if n in held_out]
    if held:
      logger.info("personachat: %d held-out personas also in %r left out of meta-training.", len(held), splits["train"])
    pools["train"] = {n: d for n, d in train.items() if n not in held}
    if not pools["train"]:
      raise ValueError(f"{read[splits['train']][0]}: no meta-training persona is left after holding out the others.")
    return pools

  def examples(self, dialogue: Dialogue) -> list[tuple[tuple[str, str], tuple[str, ...]]]:
    """The dialogue's ``((context, response), candidates)`` turns (context as in the module docstring)."""
    persona = list(dialogue.persona) if self.include_persona else []
    out = []
    for turn in dialogue.turns:
      history = turn.history[-self.max_history_turns :] if self.max_history_turns else turn.history
      out.append(((SEPARATOR.join([*persona, *history]), turn.response), turn.candidates))
    return out

  def _episode(self, dialogues: list[Dialogue], rng: np.random.Generator, name: str) -> Task:
    pick = rng.choice(len(dialogues), size=self.support_dialogues + self.query_dialogues, replace=False)
    support = [ex for i in pick[: self.support_dialogues] for ex in self.examples(dialogues[i])]
    query = [ex for i in pick[self.support_dialogues :] for ex in self.examples(dialogues[i])]
    support, query = _draw(support, self.support_size, rng), _draw(query, self.query_size, rng)
    candidates = tuple(c for _, c in query)
    persona = tuple(dialogues[int(pick[0])].persona)
    return Task(
      name, tuple(e for e, _ in support), tuple(e for e, _ in query), candidates if all(candidates) else (), persona
    )

  @property
  def train_names(self) -> list[str]:
    return list(self.pools["train"])

  def check_examples(self, encoder: Any, chunk: int = 256) -> None:
    """Encode every turn of the meta-training personas' dialogues before training (`check_encodable`): a response
    the encoder refuses stops the run here, named by its line (txt) or JSON path, not when a step draws it (the
    contexts are cut from the left, never refused). Held-out personas are not meta-training data."""
    for dialogues in self.pools["train"].values():
      turns = [(turn.where, example) for d in dialogues for turn, (example, _) in zip(d.turns, self.examples(d))]
      check_encodable(encoder, [example for _, example in turns], lambda i: turns[i][0], chunk)

  # TaskSource interface
  def train_task(self, index: int) -> Task:
    """A meta-training episode: a training persona and its dialogues, drawn from (seed, index)."""
    rng = np.random.default_rng([self.seed, 0, index])
    name = self.train_names[int(rng.integers(len(self.pools["train"])))]
    return self._episode(self.pools["train"][name], rng, name)

  def eval_tasks(self, split: str) -> list[Task]:
    """``eval_episodes`` episodes ``<persona>#<k>`` of every held-out persona of ``split``."""
    if split not in ("validation", "test"):
      raise ValueError(f"split must be 'validation' or 'test', not {split!r}.")
    split_id = {"validation": 1, "test": 2}[split]
    return [
      self._episode(dialogues, np.random.default_rng([self.seed, split_id, i, k]), f"{name}#{k}")
      for i, (name, dialogues) in enumerate(self.pools[split].items())
      for k in range(self.eval_episodes)
    ]
