"""AdaptSum, JSONL pairs and TFDS task sources on tiny files the tests write: task semantics and clear errors."""

import json

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
import tensorflow_datasets.summarization  # noqa: F401  (registers legacy builders before mocking)
import tensorflow_datasets.text  # noqa: F401

from mltd_jax import data
from mltd_jax.data.adaptsum import AdaptSumTasks
from mltd_jax.data.jsonl import JsonlTasks
from mltd_jax.data.tfds_source import TfdsTasks

LOW = "AdaptSum300sample"


def write_split(folder, split, n, tag):
  """``n`` lines "<tag> <split> doc i" / "<tag> <split> sum i" into folder/split.{source,target}."""
  folder.mkdir(parents=True, exist_ok=True)
  (folder / f"{split}.source").write_text("".join(f"{tag} {split} doc {i}\n" for i in range(n)))
  (folder / f"{split}.target").write_text("".join(f"{tag} {split} sum {i}\n" for i in range(n)))


def adaptsum_tree(root, domains=("dialog", "email", "science")):
  """Full train/valid/test of 12/6/6 lines per domain and a low-resource train of 5 (tag "low")."""
  for d in domains:
    for split, n in (("train", 12), ("valid", 6), ("test", 6)):
      write_split(root / d, split, n, d)
    write_split(root / d / LOW, "train", 5, f"{d} low")
  return root


def lines(path):
  return path.read_text().splitlines()


def test_adaptsum_tasks(tmp_path):
  root = adaptsum_tree(tmp_path)
  kw = dict(domains=("dialog", "email", "science"), support_size=2, query_size=3, eval_episodes=3)
  src = AdaptSumTasks(str(root), **kw)
  assert src.train_domains == ["dialog", "email"] and src.held_out == {"validation": "science", "test": "science"}
  for i in range(8):
    task = src.train_task(i)
    assert task.name in ("dialog", "email") and len(task.support) == 2 and len(task.query) == 3
    assert not set(task.support) & set(task.query)
    full = set(zip(lines(root / task.name / "train.source"), lines(root / task.name / "train.target")))
    assert set(task.support + task.query) <= full
  low = set(zip(lines(root / "science" / LOW / "train.source"), lines(root / "science" / LOW / "train.target")))
  for split, stem in (("test", "test"), ("validation", "valid")):
    tasks = src.eval_tasks(split)
    assert [t.name for t in tasks] == ["science#0", "science#1", "science#2"]
    held = set(zip(lines(root / "science" / f"{stem}.source"), lines(root / "science" / f"{stem}.target")))
    assert all(set(t.support) <= low and set(t.query) <= held for t in tasks)
  again = AdaptSumTasks(str(root), **kw)
  assert [again.train_task(i) for i in range(4)] == [src.train_task(i) for i in range(4)]
  assert again.eval_tasks("test") == src.eval_tasks("test") != src.eval_tasks("validation")
  assert AdaptSumTasks(str(root), **kw, seed=1).train_task(0) != src.train_task(0)
  assert src.split_examples("email", "low_resource")[4] == ("email low train doc 4", "email low train sum 4")
  assert len(src.split_examples("email", "train")) == 12
  cfg = ml_collections.ConfigDict(dict(source="adaptsum", tokenizer="bytes", adaptsum=dict(root=str(root), **kw)))
  assert data.build(cfg, seed=0)[1].train_task(2) == src.train_task(2)


def test_adaptsum_validation_domain_text_mode_and_caps(tmp_path):
  root, domains = adaptsum_tree(tmp_path), ("dialog", "email", "science")
  write_split(root / "email" / LOW, "valid", 4, "email low")  # the low-resource folder's valid split wins
  src = AdaptSumTasks(
    str(root),
    domains=domains,
    validation_domain="email",
    mode="text",
    text_fields=("source", "target"),
    support_size=2,
    query_size=2,
    max_examples=4,
  )
  assert src.train_domains == ["dialog"] and src.held_out == {"validation": "email", "test": "science"}
  assert src.train_task(0).support[0] in {f"dialog train doc {i}\ndialog train sum {i}" for i in range(4)}
  query = {q for t in src.eval_tasks("validation") for q in t.query}
  assert all(q.startswith("email low valid doc") for q in query) and len(src.split_examples("dialog", "train")) == 4
  source_only = AdaptSumTasks(str(root), domains=domains, mode="text", support_size=2, query_size=2)
  task = source_only.train_task(3)
  assert all(x == f"{task.name} train doc {x.split()[-1]}" for x in task.support + task.query)


def test_adaptsum_errors_name_file_line_and_fix(tmp_path):
  domains = ("dialog", "email", "science")
  kw = dict(domains=domains, support_size=2, query_size=2)
  with pytest.raises(FileNotFoundError, match=r"github.com/TysonYu/AdaptSum.*config.data.adaptsum.root"):
    AdaptSumTasks(str(tmp_path / "nowhere"), **kw)
  root = adaptsum_tree(tmp_path / "a", domains=("dialog", "science"))
  with pytest.raises(FileNotFoundError, match=r"domains \['email'\]; it holds \['dialog', 'science'\]"):
    AdaptSumTasks(str(root), **kw)
  with pytest.raises(ValueError, match=r"config.data.adaptsum.eval_episodes=True must be an int >= 1"):
    AdaptSumTasks(str(root), **kw, eval_episodes=True)  # a bool is not read as 1
  with pytest.raises(ValueError, match=r"test_domain='news' is not one of the domains"):
    AdaptSumTasks(str(root), domains=("dialog", "science"), test_domain="news")
  root = adaptsum_tree(tmp_path / "b")
  text = (root / "science" / "test.source").read_text().splitlines(keepends=True)
  (root / "science" / "test.source").write_text("".join(text[:3] + ["  \n"] + text[4:]))
  with pytest.raises(ValueError, match=r"science/test.source:4: empty line"):
    AdaptSumTasks(str(root), **kw)
  root = adaptsum_tree(tmp_path / "c")
  (root / "science" / "valid.target").write_text("only one\n")
  with pytest.raises(ValueError, match=r"valid.source has 6 lines but .*valid.target has 1"):
    AdaptSumTasks(str(root), **kw)
  (root / "science" / "valid.target").unlink()
  with pytest.raises(FileNotFoundError, match=r"science/valid.source has no valid.target beside it"):
    AdaptSumTasks(str(root), **kw)
  root = adaptsum_tree(tmp_path / "d")
  with pytest.raises(ValueError, match=rf"{LOW}/train.source .* has 5 examples, fewer than the 6 .*support_size"):
    AdaptSumTasks(str(root), domains=domains, support_size=6, query_size=2)
  (root / "email" / "train.target").write_text("x\n" * 12 + "\n")  # a training domain's file: read at first use
  src = AdaptSumTasks(str(root), **kw)
  with pytest.raises(ValueError, match=r"email/train.target:13: empty line"):
    [src.train_task(i) for i in range(20)]


def test_adaptsum_training_examples_are_checked_up_front_by_file_and_line(tmp_path):
  """`AdaptSumTasks.check_examples` (called by `evaluate.check_data` before training) encodes every training
  domain's train split: a document too long for config.data.source_len is named by both files' line."""
  root = adaptsum_tree(tmp_path)
  docs = lines(root / "email" / "train.source")
  docs[8] = " ".join(["word"] * 20)  # line 9 of a training domain's full train split: no task need draw it
  (root / "email" / "train.source").write_text("".join(d + "\n" for d in docs))
  src = AdaptSumTasks(str(root), domains=("dialog", "email", "science"), support_size=2, query_size=2)
  tok = data.byte_level_tokenizer()
  where = r"email/train.source:9 / .*email/train.target:9: example 0 source has 10\d tokens .* > config.data.source_len"
  for chunk in (4, 256):
    with pytest.raises(ValueError, match=where):
      src.check_examples(data.Seq2SeqEncoder(tok, source_len=64, target_len=32), chunk=chunk)
  src.check_examples(data.Seq2SeqEncoder(tok, source_len=128, target_len=32))
  for folder in (root / "science", root / "science" / LOW):  # the held-out domain's splits: encoded as its tasks
    docs = lines(folder / "train.source")
    (folder / "train.source").write_text("".join(d + "\n" for d in [docs[0] + " long" * 40, *docs[1:]]))
  src = AdaptSumTasks(str(root), domains=("dialog", "email", "science"), support_size=2, query_size=2)  # rereads
  src.check_examples(data.Seq2SeqEncoder(tok, source_len=128, target_len=32))


def write_jsonl(path, rows):
  path.write_text("\n".join(json.dumps(r) if isinstance(r, dict) else r for r in rows) + "\n")
  return path


def test_jsonl_pairs(tmp_path):
  rows = [{"task": d, "source": f"{d} doc {i}\u2028more", "target": f"{d} sum {i}"} for d in "abcd" for i in range(5)]
  path = tmp_path / "p.jsonl"
  path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")  # a raw U+2028 in a string
  src = JsonlTasks(str(path), kind="pair", support_size=2, query_size=2)
  task = src.train_task(0)
  assert task.name in "ab" and all(s == (f"{task.name} doc {s[1].split()[-1]}\u2028more", s[1]) for s in task.support)
  assert not set(task.support) & set(task.query) and [t.name for t in src.eval_tasks("test")][0] == "d#0"
  rows = [{"task": d, "text": f"{d} {i}"} for d in "abc" for i in range(4)]
  texts = JsonlTasks(str(write_jsonl(tmp_path / "t.jsonl", rows)), support_size=2, query_size=2)
  task = texts.train_task(0)
  assert texts.kind == "text" and task.name == "a" and set(task.support + task.query) == {f"a {i}" for i in range(4)}


def test_jsonl_pair_errors_name_file_line(tmp_path):
  good = {"task": "a", "source": "s", "target": "t"}
  cases = [
    ([good, {"task": "a", "text": "x"}], "pair", r"m.jsonl:2: missing key\(s\) \['source', 'target'\].*kind='text'"),
    ([{"task": "a", "text": "x"}, good], "text", r"m.jsonl:2: missing key\(s\) \['text'\].*kind='pair'"),
    ([good, "", {"task": "a", "source": "s", "target": 3}], "pair", r"m.jsonl:3: 'target' must be a string"),
    ([good, {"task": "a", "source": " ", "target": "t"}], "pair", r"m.jsonl:2: 'source' is empty"),
    ([good, "[1, 2]"], "pair", r"m.jsonl:2: expected a JSON object"),
    ([{"task": "a", "text": "x"}, {"task": "a", "text": "  "}], "text", r"m.jsonl:2: 'text' is empty"),
    ([good, {"task": 1, "source": "s", "target": "t"}], "pair", r"m.jsonl:2: the task name 'task' must be a non-emp"),
    ([good, {"task": None, "source": "s", "target": "t"}], "pair", r"m.jsonl:2: .*got NoneType"),
  ]
  for rows, kind, message in cases:
    with pytest.raises(ValueError, match=message):
      JsonlTasks(str(write_jsonl(tmp_path / "m.jsonl", rows)), kind=kind)
  with pytest.raises(ValueError, match=r"config.data.jsonl.kind='pairs' is not one of"):
    JsonlTasks(str(tmp_path / "m.jsonl"), kind="pairs")


def mocked_tfds(**kw):
  return TfdsTasks(**kw, support_size=2, query_size=2, eval_episodes=2)


def test_tfds_mock_pairs_and_texts():
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    datasets = {"email": "aeslc", "dialog": "samsum", "reddit": "reddit_tifu/short"}
    fields = {
      "email": ("email_body", "subject_line"),
      "dialog": ("dialogue", "summary"),
      "reddit": ("documents", "tldr"),
    }
    cfg = ml_collections.ConfigDict(
      dict(
        source="tfds",
        tokenizer="bytes",
        tfds=dict(
          datasets=datasets,
          source_field={d: f[0] for d, f in fields.items()},
          target_field={d: f[1] for d, f in fields.items()},
          test_domain="dialog",
          validation_split={"dialog": "test"},
          support_size=2,
          query_size=2,
          eval_episodes=2,
        ),
      )
    )
    _, src = data.build(cfg, seed=3)
    assert isinstance(src, TfdsTasks) and src.train_domains == ["email", "reddit"]
    task = src.train_task(0)
    assert task.name in ("email", "reddit") and all(isinstance(s, str) and isinstance(t, str) for s, t in task.support)
    assert [t.name for t in src.eval_tasks("test")] == ["dialog#0", "dialog#1"] and len(
      src.eval_tasks("test")[1].query
    ) == 2
    lm = mocked_tfds(datasets={"a": "lm1b", "b": "lm1b", "c": "lm1b"}, mode="text", max_examples=4)
    assert lm.held_out["test"] == "c" and lm.train_domains == ["a", "b"]
    assert all(isinstance(x, str) for t in lm.eval_tasks("validation") for x in t.support + t.query)
    assert len(lm._pool("a", "train")) == 4
    with pytest.raises(ValueError, match=r"target_field='summary'.*features: email_body: Text, subject_line: Text"):
      mocked_tfds(datasets={"a": "aeslc", "b": "lm1b", "c": "lm1b"}, source_field="email_body")


class MltdTinyPairs(tfds.core.GeneratorBasedBuilder):
  """A real array_record dataset prepared in the test (records come back as bytes, split slicing works)."""

  VERSION = tfds.core.Version("1.0.0")
  # A one-part module name keeps tfds from locating this file through importlib_resources (not installed here).
  __module__ = "mltd_tiny_pairs"

  def _info(self):
    features = {"doc": tfds.features.Text(), "summ": tfds.features.Text(), "n": tfds.features.Scalar(dtype=np.int32)}
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(10, "tr"), "validation": self._generate_examples(4, "va")}

  def _generate_examples(self, n, tag):
    for i in range(n):
      yield f"{tag}{i}", {"doc": f"{tag} doc {i} é", "summ": f"{tag} sum {i}", "n": i}


def test_tfds_prepared_array_record_and_errors(tmp_path):
  MltdTinyPairs(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  kw = dict(datasets={"a": "mltd_tiny_pairs", "b": "mltd_tiny_pairs", "c": "mltd_tiny_pairs"}, data_dir=str(tmp_path))
  src = mocked_tfds(**kw, source_field="doc", target_field="summ", train_split="train[:6]", test_split="validation")
  assert all(
    s.startswith("tr doc") and s.endswith("é") and t.startswith("tr sum") for s, t in src.train_task(1).support
  )
  first6 = {r["doc"].decode() for r in tfds.data_source("mltd_tiny_pairs", split="train[:6]", data_dir=str(tmp_path))}
  assert len(first6) == 6 and {s for t in src.eval_tasks("test") for s, _ in t.support} <= first6
  assert all(s.startswith("va doc") for t in src.eval_tasks("test") for s, _ in t.query)
  assert not hasattr(src, "check_examples")  # no up-front scan of a TFDS corpus: records are read when drawn
  with pytest.raises(ValueError, match=r"target_field='n'.*is a Scalar, not a Text"):
    mocked_tfds(**kw, source_field="doc", target_field="n")
  with pytest.raises(ValueError, match=r"test_split='test' for TFDS 'mltd_tiny_pairs'.*Unknown split 'test'"):
    mocked_tfds(**kw, source_field="doc", target_field="summ")
  empty = str(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match=rf"`tfds build aeslc --file_format=array_record --data_dir={empty}`"):
    mocked_tfds(
      datasets={"a": "aeslc", "b": "aeslc"}, data_dir=empty, source_field="email_body", target_field="subject_line"
    )
  manual = rf"tfds build samsum --file_format=array_record.* manual download first, into {empty}/downloads/manual"
  with pytest.raises(FileNotFoundError, match=manual):
    mocked_tfds(datasets={"a": "samsum", "b": "samsum"}, data_dir=empty, source_field="dialogue")
  with pytest.raises(ValueError, match=r"datasets\['a'\]='no_such_set': Dataset no_such_set not found"):
    mocked_tfds(datasets={"a": "no_such_set", "b": "aeslc"}, data_dir=empty)


def test_adaptsum_table3_protocol_uses_whole_held_out_splits(tmp_path):
  """configs/multidomain_lm.py:adaptsum: one episode of the held-out domain with its whole low-resource training
  split as support and its whole test split as query, in file order; texts for the causal LM."""
  from tests.helpers import experiment_config

  root = adaptsum_tree(tmp_path)
  cfg = experiment_config("multidomain_lm", "adaptsum")
  assert (cfg.eval.lr_schedule, cfg.eval.optimizer, cfg.data.adaptsum.mode) == ("linear", "adam", "text")
  cfg.data.adaptsum.update(root=str(root), domains=("dialog", "email", "science"), support_size=2, query_size=2)
  cfg.data.tokenizer = "bytes"
  (task,) = data.build(cfg.data, seed=0)[1].eval_tasks("test")
  assert task.support == tuple(lines(root / "science" / LOW / "train.source"))
  assert task.query == tuple(lines(root / "science" / "test.source"))
  for bad in (-2, True):  # a bool is not read as 1
    with pytest.raises(ValueError, match=f"eval_support_size={bad}"):
      AdaptSumTasks(str(root), domains=("dialog", "email", "science"), eval_support_size=bad)
