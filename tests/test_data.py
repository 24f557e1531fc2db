"""Task sources, tokenizers and episodes: properties of the facts family, loading paths and clear errors."""

import collections
import json

import ml_collections
import numpy as np
import pytest
import transformers

from mltd_jax import data
from mltd_jax.data import episodes
from mltd_jax.data.jsonl import JsonlTasks
from mltd_jax.data.synthetic import REL, FactsFamily
from mltd_jax.data.tasks import Task


def facts_of(texts):
  out = []
  for text in texts:
    words = text.split()
    out += [(words[i - 1], words[i + 1]) for i, w in enumerate(words) if w == REL]
  return out


def test_facts_family_properties():
  fam = FactsFamily(seed=3)
  task = fam.train_task(7)
  assert task == fam.train_task(7)  # a pure function of (seed, index)
  assert task != fam.train_task(8)
  support, query = facts_of(task.support), facts_of(task.query)
  counts = collections.Counter(support)
  assert len(counts) == fam.facts_per_task and set(counts.values()) == {3}  # every fact 3 times
  assert set(query) == set(support)  # the query asks about the same facts
  assert len(dict(support)) == fam.facts_per_task  # each subject has exactly one object within a task
  for text in task.support + task.query:
    words = text.split()
    assert len(words) == fam.words_per_text
    subjects = [w for w in words if w.startswith("s")]
    assert len(subjects) == len(set(subjects)) == fam.facts_per_text  # no in-context copying
  val, test = fam.eval_tasks("validation"), fam.eval_tasks("test")
  assert len(val) == len(test) == 20 and val[0] != test[0]
  assert np.allclose(fam.transitions.sum(1), 1.0)


def test_tokenizers_built_in_code_round_trip(tmp_path):
  tok = data.byte_level_tokenizer()
  text = "héllo, wörld ✓"
  ids = tok(text, add_special_tokens=False)["input_ids"]
  assert len(ids) == len(text.encode()) and tok.decode(ids) == text
  tok.save_pretrained(tmp_path / "bytes")
  again = data.load_tokenizer(str(tmp_path / "bytes"))
  assert again(text, add_special_tokens=False)["input_ids"] == ids
  words = data.word_level_tokenizer(["a", "b"])
  assert words("a b a", add_special_tokens=False)["input_ids"] == [4, 5, 4]


def test_load_tokenizer_from_json_file(tmp_path):
  tok = data.byte_level_tokenizer()
  tok.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
  loaded = data.load_tokenizer(str(tmp_path / "tokenizer.json"))
  assert isinstance(loaded, transformers.PreTrainedTokenizerFast) and loaded.pad_token is not None
  assert loaded("abc", add_special_tokens=False)["input_ids"] == tok("abc", add_special_tokens=False)["input_ids"]


def test_missing_tokenizer_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothere.json"):
    data.load_tokenizer(str(tmp_path / "nothere.json"))
  with pytest.raises(FileNotFoundError, match="no_dir"):
    data.load_tokenizer(str(tmp_path / "no_dir"))


def test_episode_shapes_and_overlong_text():
  tok = data.word_level_tokenizer(["a", "b"])
  task = Task("t", ("a b", "b"), ("a",))
  enc = episodes.encode_task(tok, task, seq_len=4, inner_steps=3)
  assert enc["support"]["ids"].shape == (3, 2, 4) and enc["query"]["ids"].shape == (1, 4)
  assert enc["support"]["ids"][0, 0].tolist() == [tok.bos_token_id, 4, 5, tok.pad_token_id]
  assert enc["support"]["mask"][0].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
  with pytest.raises(ValueError, match=r"task 't' support: text 0 has 3 tokens.*config.data.seq_len=2"):
    episodes.encode_task(tok, task, seq_len=2, inner_steps=1)
  cut = episodes.encode(tok, ["a b a b"], 3, truncate=True)
  assert cut["mask"].tolist() == [[1, 1, 1]]


def test_empty_task_is_refused():
  with pytest.raises(ValueError, match="'empty' has an empty support"):
    Task("empty", (), ("x",))


def write_jsonl(path, rows):
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  return path


def test_jsonl_source(tmp_path):
  rows = [{"task": d, "text": f"{d} text {i}"} for d in "abcd" for i in range(6)]
  src = JsonlTasks(str(write_jsonl(tmp_path / "x.jsonl", rows)), support_size=2, query_size=2, eval_episodes=3)
  assert src.test_names == ["d"] and src.validation_names == ["c"] and src.train_names == ["a", "b"]
  task = src.train_task(5)
  assert task == src.train_task(5) and task.name in "ab"
  assert not set(task.support) & set(task.query)
  assert all(t.startswith(task.name) for t in task.support + task.query)
  assert [t.name for t in src.eval_tasks("test")] == ["d#0", "d#1", "d#2"]
  cfg = ml_collections.ConfigDict(
    dict(
      source="jsonl",
      tokenizer="bytes",
      jsonl=dict(
        path=str(tmp_path / "x.jsonl"),
        task_key="task",
        text_key="text",
        support_size=2,
        query_size=2,
        validation_tasks=("a",),
        test_tasks=("b",),
        eval_episodes=1,
      ),
    )
  )
  tok, source = data.build(cfg)
  assert source.train_names == ["c", "d"] and tok.pad_token is not None


def test_jsonl_errors_name_the_file_and_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.data.jsonl.path"):
    JsonlTasks(str(tmp_path / "none.jsonl"))
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"task": "a", "text": "x"}\n{"txt": 1}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2"):
    JsonlTasks(str(bad))
  small = write_jsonl(tmp_path / "small.jsonl", [{"task": "a", "text": "x"}] * 3)
  with pytest.raises(ValueError, match=r"\['a'\].*support_size"):
    JsonlTasks(str(small), support_size=2, query_size=2)
