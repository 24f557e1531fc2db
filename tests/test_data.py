"""Task sources, tokenizers and episodes: properties of the facts family, loading paths and clear errors."""

import collections
import json
import logging

import ml_collections
import numpy as np
import pytest
import tokenizers
import tokenizers.models
import tokenizers.pre_tokenizers
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


def test_episode_shapes_and_overlong_text(caplog, monkeypatch):
  tok = data.word_level_tokenizer(["a", "b"])
  task = Task("t", ("a b", "b"), ("a",))
  enc = episodes.task_arrays(data.CausalLMEncoder(tok, seq_len=4), task)
  assert enc["support"]["ids"].shape == (2, 4) and enc["query"]["ids"].shape == (1, 4)  # [S, L], [Q, L]
  assert enc["support"]["ids"].dtype == enc["support"]["mask"].dtype == np.int32
  assert enc["support"]["ids"].tolist() == [[tok.bos_token_id, 4, 5, tok.pad_token_id], [tok.bos_token_id, 5, 0, 0]]
  assert enc["support"]["mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
  with pytest.raises(ValueError, match=r"task 't' support: text 0 has 3 tokens.*config.data.seq_len=2.*truncate=True"):
    episodes.task_arrays(data.CausalLMEncoder(tok, seq_len=2), task)
  monkeypatch.setattr("mltd_jax.data.encoders._CUT_LOGGED", set())
  with caplog.at_level(logging.WARNING, logger="mltd_jax"):
    for _ in range(2):  # the first cut is logged, once
      cut = data.CausalLMEncoder(tok, seq_len=3, add_eos=True, truncate=True).encode(["a b a b", "b"])
  assert cut["ids"].tolist() == [[tok.bos_token_id, 4, 5], [tok.bos_token_id, 5, tok.eos_token_id]]
  assert cut["mask"].tolist() == [[1, 1, 1], [1, 1, 1]]
  cuts = [r.getMessage() for r in caplog.records if "cuts texts" in r.getMessage()]
  assert cuts == ["config.data.truncate=True cuts texts to config.data.seq_len=3 (first: text 0: 6 tokens); later "
                  "cuts are not logged"]  # fmt: skip


def bare_word_tokenizer(**special):
  """A word-level tokenizer over <pad>=0 <eos>=1 <unk>=2 a=3 b=4 that declares only the ``special`` tokens."""
  vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, "a": 3, "b": 4}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def test_tasks_of_different_sizes_are_not_stacked_silently():
  same = {"support": {"ids": np.zeros((2, 5))}, "query": {"ids": np.zeros((1, 5))}}
  assert episodes.stack([same, same])["support"]["ids"].shape == (2, 2, 5)
  other = {"support": {"ids": np.zeros((3, 5))}, "query": {"ids": np.zeros((1, 5))}}
  with pytest.raises(ValueError, match=r"support/ids of different shapes \(a: \(2, 5\), b: \(3, 5\)\).*fixed sizes"):
    episodes.stack([same, other], ["a", "b"])


def test_tokenizer_without_bos_gets_no_bos(tmp_path):
  tok = bare_word_tokenizer(pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")  # many LMs declare no bos
  assert tok.bos_token_id is None
  batch = data.CausalLMEncoder(tok, seq_len=4, add_eos=True).encode(["b a", "a"])
  assert batch["ids"].tolist() == [[4, 3, 1, 0], [3, 1, 0, 0]]  # the first id is the first word
  assert batch["mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
  tok.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
  loaded = data.load_tokenizer(str(tmp_path / "tokenizer.json"))  # a bare file: specials found by name
  assert loaded.bos_token is None and loaded.eos_token == "<eos>" and loaded.pad_token == "<pad>"
  assert data.CausalLMEncoder(loaded, seq_len=4).encode(["b a"])["ids"].tolist() == [[4, 3, 0, 0]]


def test_gpt2_style_tokenizer_json_declares_endoftext_as_bos_eos_pad(tmp_path):
  vocab = {"<|endoftext|>": 0, "a": 1, "b": 2}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.save(str(tmp_path / "tokenizer.json"))
  loaded = data.load_tokenizer(str(tmp_path / "tokenizer.json"))
  assert loaded.bos_token == loaded.eos_token == loaded.pad_token == "<|endoftext|>"
  assert data.CausalLMEncoder(loaded, seq_len=4).encode(["b a"])["ids"].tolist() == [[0, 2, 1, 0]]


def test_seq2seq_encoder():
  tok = data.word_level_tokenizer(["a", "b", "c"])  # <pad>=0 <bos>=1 <eos>=2 <unk>=3 a=4 b=5 c=6
  enc = data.Seq2SeqEncoder(tok, source_len=4, target_len=3)
  batch = enc.encode([("a b", "c"), ("a", "b a")])
  assert set(batch) == {"source_ids", "source_mask", "target_ids", "target_mask"}
  assert all(v.dtype == np.int32 for v in batch.values())
  assert batch["source_ids"].tolist() == [[4, 5, 2, 0], [4, 2, 0, 0]]  # tokens + eos, no bos, pad after
  assert batch["source_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
  assert batch["target_ids"].tolist() == [[6, 2, 0], [5, 4, 2]]
  assert batch["target_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
  with pytest.raises(ValueError, match=r"^x: example 1 source has 5 tokens \(with eos\) > config.data.source_len=4"):
    enc.encode([("a", "b"), ("a b c a", "b")], where="x: ")
  with pytest.raises(ValueError, match=r"example 0 target has 4 tokens.*config.data.target_len=3.*truncate=True"):
    enc.encode([("a", "a b c")])
  cut = data.Seq2SeqEncoder(tok, source_len=4, target_len=3, truncate=True).encode([("a b c a", "c b a")])
  assert cut["source_ids"].tolist() == [[4, 5, 6, 2]] and cut["target_ids"].tolist() == [[6, 5, 2]]  # eos kept last
  assert cut["source_mask"].tolist() == [[1, 1, 1, 1]] and cut["target_mask"].tolist() == [[1, 1, 1]]
  for bad in ("a b", ("a",), ("a", 3)):
    with pytest.raises(TypeError, match=r"^task 'p' query: example 1 .*\(source, target\) pairs"):
      enc.encode([("a", "b"), bad], where="task 'p' query: ")


def test_non_text_example_is_a_type_error():
  tok = data.word_level_tokenizer(["a", "b"])
  task = Task("p", ("a", ("a", "b")), ("a",))
  with pytest.raises(TypeError, match=r"^task 'p' support: example 1 is a tuple; causal-LM examples are texts"):
    episodes.task_arrays(data.CausalLMEncoder(tok, seq_len=4), task)


def test_focus_weights_follow_the_token():
  tok = data.word_level_tokenizer(["a", "is", "b"])  # a=4 is=5 b=6
  enc = data.CausalLMEncoder(tok, seq_len=6)
  ids = np.array([[5, 4, 5, 6, 4, 5], [1, 5, 6, 5, 4, 0]], np.int32)
  mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], np.int32)
  expected = [[0, 1, 0, 1, 0, 0], [0, 0, 1, 0, 0, 0]]  # never position 0; never a masked position
  out = enc.focus({"ids": ids, "mask": mask}, "is")
  assert out["weights"].tolist() == expected and out["weights"].dtype == np.int32
  assert out["ids"] is ids and out["mask"] is mask
  stacked = enc.focus({"ids": np.stack([ids, ids[::-1]]), "mask": np.stack([mask, mask[::-1]])}, "is")  # [T, N, L]
  assert stacked["weights"].tolist() == [expected, expected[::-1]]
  with pytest.raises(ValueError, match=r"config.eval.focus_token='nope'"):
    enc.focus({"ids": ids, "mask": mask}, "nope")


def test_meta_and_pretrain_batches_on_facts():
  fam = FactsFamily(seed=0)
  tok = data.word_level_tokenizer(fam.vocabulary())
  enc = data.CausalLMEncoder(tok, seq_len=48)
  batch = episodes.meta_batch(enc, fam, step=2, tasks_per_step=3)
  assert batch["support"]["ids"].shape == batch["support"]["mask"].shape == (3, 8, 48)  # [tasks, S, L]
  assert batch["query"]["ids"].shape == (3, 8, 48)  # [tasks, Q, L]
  assert batch["support"]["mask"].min() == 1  # bos + 47 words fill the 48 positions
  one = episodes.task_arrays(enc, fam.train_task(7))  # task 2 * 3 + 1
  assert np.array_equal(batch["support"]["ids"][1], one["support"]["ids"])
  assert np.array_equal(batch["query"]["ids"][1], one["query"]["ids"])
  focus = enc.focus(batch["query"], REL)["weights"]  # exactly the objects of the 3 facts in each text
  assert (focus.sum(-1) == fam.facts_per_text).all()
  objects = set(tok.convert_tokens_to_ids(fam.objects))
  assert set(batch["query"]["ids"][focus == 1].tolist()) <= objects
  lm = episodes.pretrain_batch(enc, fam, step=2, tasks_per_step=3)
  assert lm["ids"].shape == (3 * 16, 48)
  assert np.array_equal(lm["ids"][16:24], one["support"]["ids"]) and np.array_equal(
    lm["ids"][24:32], one["query"]["ids"]
  )


def test_build_encoder_reads_config_data():
  tok = data.word_level_tokenizer(["a"])
  cfg = ml_collections.ConfigDict(dict(seq_len=8, add_eos=True, truncate=False, source_len=5, target_len=3))
  assert data.build_encoder("causal_lm", tok, cfg) == data.CausalLMEncoder(tok, 8, add_eos=True, truncate=False)
  assert data.build_encoder("seq2seq", tok, cfg) == data.Seq2SeqEncoder(tok, 5, 3, truncate=False)
  assert data.build_encoder("seq2seq", tok, dict(source_len=5, target_len=3, truncate=True)).truncate
  with pytest.raises(ValueError, match=r"config.data.source_len is missing"):
    data.build_encoder("seq2seq", tok, ml_collections.ConfigDict(dict(target_len=3, truncate=False)))
  with pytest.raises(ValueError, match=r"'bert'.*\['causal_lm', 'seq2seq'\]"):
    data.build_encoder("bert", tok, cfg)
  for bad in (0, True):  # a bool is not read as 1
    with pytest.raises(ValueError, match=rf"config.data.seq_len={bad} must be a positive integer"):
      data.CausalLMEncoder(tok, bad)
  no_eos = bare_word_tokenizer(pad_token="<pad>")
  assert data.CausalLMEncoder(no_eos, 4).encode(["a"])["ids"].tolist() == [[3, 0, 0, 0]]
  for make in (lambda: data.CausalLMEncoder(no_eos, 4, add_eos=True), lambda: data.Seq2SeqEncoder(no_eos, 4, 4)):
    with pytest.raises(ValueError, match=r"needs a tokenizer with an eos token"):
      make()


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
  for field, value in (("eval_episodes", 0), ("support_size", 0), ("query_size", -1)):
    with pytest.raises(ValueError, match=rf"config.data.jsonl.{field}={value} must be an int >= 1"):
      JsonlTasks(str(small), **{field: value})
  with pytest.raises(ValueError, match="config.data.jsonl.path is not set"):
    JsonlTasks("")
  (tmp_path / "empty.jsonl").write_text("\n")
  with pytest.raises(ValueError, match="empty.jsonl has no records"):
    JsonlTasks(str(tmp_path / "empty.jsonl"))
  rows = [{"task": d, "text": f"{d} {i}"} for d in "abc" for i in range(4)]
  bom = tmp_path / "bom.jsonl"
  bom.write_bytes(b"\xef\xbb\xbf" + write_jsonl(tmp_path / "plain.jsonl", rows).read_bytes())  # an editor's mark
  assert JsonlTasks(str(bom), support_size=2, query_size=2).examples == JsonlTasks(
    str(tmp_path / "plain.jsonl"), support_size=2, query_size=2
  ).examples


def test_jsonl_meta_training_examples_are_checked_up_front_by_file_and_line(tmp_path):
  """`JsonlTasks.check_examples` (called by `evaluate.check_data` before training) encodes every meta-training
  example: one too long for the encoder is named by its file and line; with truncate it passes."""
  rows = [{"task": d, "text": f"{d} {i}"} for d in "abcd" for i in range(4)]
  rows[5]["text"] = " ".join(["word"] * 40)  # line 6, task b (meta-training: c and d are held out)
  src = JsonlTasks(str(write_jsonl(tmp_path / "x.jsonl", rows)), support_size=2, query_size=2)
  assert src.train_names == ["a", "b"]
  tok = data.byte_level_tokenizer()
  with pytest.raises(ValueError, match=r"x.jsonl:6: text 0 has \d+ tokens .* > config.data.seq_len=16"):
    src.check_examples(data.CausalLMEncoder(tok, seq_len=16), chunk=3)
  src.check_examples(data.CausalLMEncoder(tok, seq_len=16, truncate=True))
  src.check_examples(data.CausalLMEncoder(tok, seq_len=256))


def test_jsonl_validation_and_test_tasks_are_disjoint(tmp_path):
  path = str(write_jsonl(tmp_path / "x.jsonl", [{"task": d, "text": f"{d} {i}"} for d in "abcd" for i in range(4)]))
  with pytest.raises(ValueError, match=r"\['b'\] are in both config.data.jsonl.validation_tasks and .*test_tasks"):
    JsonlTasks(path, support_size=2, query_size=2, validation_tasks=("a", "b"), test_tasks=("b", "c"))
  only_val = JsonlTasks(path, support_size=2, query_size=2, validation_tasks=("d",))  # test default skips "d"
  assert only_val.validation_names == ["d"] and only_val.test_names == ["c"] and only_val.train_names == ["a", "b"]
  only_test = JsonlTasks(path, support_size=2, query_size=2, test_tasks=("d",))
  assert only_test.validation_names == ["c"] and only_test.test_names == ["d"] and only_test.train_names == ["a", "b"]
  one = JsonlTasks(path, support_size=2, query_size=2, validation_tasks="a", test_tasks=("b", "b"))  # a str is one name
  assert one.validation_names == ["a"] and one.test_names == ["b"] and one.train_names == ["c", "d"]


def test_directory_with_a_bare_tokenizer_json_finds_its_specials(tmp_path):
  """A directory holding only a tokenizer.json (as ../shared/data/gpt2-tokenizer) loads like the file itself: its
  special tokens found by name (AutoTokenizer would declare none, and there would be no eos or pad)."""
  vocab = {"<|endoftext|>": 0, "a": 1, "b": 2}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  (tmp_path / "tok").mkdir()
  tok.save(str(tmp_path / "tok" / "tokenizer.json"))
  loaded = data.load_tokenizer(str(tmp_path / "tok"))
  assert loaded.bos_token == loaded.eos_token == loaded.pad_token == "<|endoftext|>"


def test_directory_tokenizer_keeps_its_declared_specials(tmp_path):
  """A tokenizer saved with eos = <|endoftext|> and no bos loads with no bos (nothing made up from eos)."""
  vocab = {"<|endoftext|>": 0, "a": 1, "b": 2}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  wrapped = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
  wrapped.save_pretrained(tmp_path / "tok")
  loaded = data.load_tokenizer(str(tmp_path / "tok"))
  assert loaded.bos_token is None and loaded.eos_token == "<|endoftext|>"
  assert data.CausalLMEncoder(loaded, seq_len=3).encode(["a b"])["ids"].tolist() == [[1, 2, 0]]


def test_encoders_report_lengths_and_positions():
  tok = data.word_level_tokenizer(["a", "b"])
  causal, s2s = data.CausalLMEncoder(tok, seq_len=5), data.Seq2SeqEncoder(tok, source_len=6, target_len=3)
  assert causal.max_len == 5 and causal.positions(causal.encode(["a", "b a"])) == 10
  assert s2s.max_len == 6 and s2s.positions(s2s.encode([("a", "b")])) == 9
  with pytest.raises(ValueError, match="config.eval.focus_token='a'"):
    s2s.focus(s2s.encode([("a", "b")]), "a")
