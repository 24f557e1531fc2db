"""Persona-Chat readers (txt, JSON), persona tasks, dialogue examples in the causal-LM encoder, synthetic personas."""

import json
import logging

import ml_collections
import numpy as np
import pytest

from mltd_jax import data
from mltd_jax.data import episodes
from mltd_jax.data.persona_chat import PersonaChatTasks, persona_name
from mltd_jax.data.synthetic_personas import SyntheticPersonas
from mltd_jax.data.tasks import GOLD_INDEX, Task

A = ("i like cats.", "i am a nurse.")
B = ("i ski.", "my car is red.")
C = ("i sing.",)


def dialogue(persona, d, turns=2, cands=True, partner=()):
  """A txt dialogue: utterances ``d<id>u<t>`` and responses ``d<id>r<t>``; the gold is the 2nd of 3 candidates."""
  lines = [f"your persona: {p}" for p in persona] + [f"partner's persona: {p}" for p in partner]
  for t in range(turns):
    utt, resp = f"d{d}u{t}", f"d{d}r{t}"
    lines.append(f"{utt}\t{resp}" + (f"\t\tx{d}{t}|{resp} |y{d}{t}" if cands else ""))  # spaces are stripped
  return [f"{n} {text}" for n, text in enumerate(lines, 1)]


def write_txt(root, split, dialogues):
  path = root / f"{split}_self_original.txt"
  path.write_text("\n".join(line for d in dialogues for line in d) + "\n")
  return path


def as_json(persona, d, turns=2):
  """The same dialogue in the JSON format (history up to the partner's utterance, gold last)."""
  history, utterances = [], []
  for t in range(turns):
    history.append(f"d{d}u{t}")
    utterances.append({"history": list(history), "candidates": [f"x{d}{t}", f"y{d}{t}", f"d{d}r{t}"]})
    history.append(f"d{d}r{t}")
  return {"personality": list(persona), "utterances": utterances}


@pytest.fixture
def corpus(tmp_path):
  """train: A x3 (one with reordered persona lines), B x3, C x1 (too small); valid: 4 personas x2; test: 2 x2."""
  write_txt(
    tmp_path,
    "train",
    [
      dialogue(A, 0),
      dialogue(A[::-1], 1, partner=("i hate cats.",)),
      dialogue(A, 2, cands=False),
      *[dialogue(B, d) for d in (3, 4, 5)],
      dialogue(C, 6),
    ],
  )
  held = [(f"v{i} likes tea.",) for i in range(6)]
  valid = [dialogue(held[i], 10 + 2 * i + j, cands=i < 3) for i in range(4) for j in range(2)]  # v3: none
  write_txt(tmp_path, "valid", valid)
  write_txt(tmp_path, "test", [dialogue(held[4 + i], 20 + 2 * i + j) for i in range(2) for j in range(2)])
  return tmp_path, held


def source(path, **kw):
  kw = {"support_dialogues": 1, "query_dialogues": 1, "support_size": 0, "query_size": 0, **kw}
  return PersonaChatTasks(str(path), **kw)


def dialogues_of(examples):
  """The dialogue ids an episode's examples come from (their responses are ``d<id>r<t>``)."""
  return {r.split("r")[0] for _, r in examples}


def test_txt_groups_by_persona_set_and_keeps_candidates(corpus, caplog):
  root, held = corpus
  with caplog.at_level(logging.WARNING, logger="mltd_jax"):
    src = source(root)
  assert "skipped 1 of 3 train personas with fewer than support_dialogues + query_dialogues = 2" in caplog.text
  assert src.train_names == sorted([persona_name(A), persona_name(B)])  # A and A[::-1] are one persona
  pool = src.pools["train"][persona_name(A)]
  assert [d.where.rsplit(":", 1)[1] for d in pool] == ["1", "5", "10"]  # first lines of the three dialogues
  assert pool[1].persona == A[::-1]  # the partner's persona is not the speaker's
  (first, c1), (second, c2) = src.examples(pool[0])
  assert first == ("i like cats.\ni am a nurse.\nd0u0", "d0r0")
  assert second == ("i like cats.\ni am a nurse.\nd0u0\nd0r0\nd0u1", "d0r1")
  assert c1 == c2 == ()  # candidates are kept for held-out splits only
  val = src.pools["validation"][persona_name(held[0])][0]
  assert val.turns[1].candidates == ("x101", "y101", "d10r1")  # the gold moved last
  assert list(src.pools["test"]) == sorted(persona_name(h) for h in held[4:])
  tasks = {t.name.split("#")[0]: t for t in src.eval_tasks("validation")}
  assert tasks[persona_name(held[3])].candidates == () and len(tasks[persona_name(held[0])].candidates) == 2
  with pytest.raises(ValueError, match=r"config.data.personachat.query_size=-1 must be an integer >= 0"):
    source(root, query_size=-1)
  with pytest.raises(ValueError, match=r"config.data.personachat.support_dialogues=True must be an integer >= 1"):
    source(root, support_dialogues=True)  # a bool is not read as 1


def test_episodes_never_share_a_dialogue_and_are_seeded(corpus):
  root, _ = corpus
  src = source(root, seed=3)
  for i in range(6):
    task = src.train_task(i)
    assert task == src.train_task(i)  # a pure function of (seed, index)
    assert len(dialogues_of(task.support)) == len(dialogues_of(task.query)) == 1
    assert not dialogues_of(task.support) & dialogues_of(task.query)
  assert [src.train_task(i) for i in range(6)] == [source(root, seed=3).train_task(i) for i in range(6)]
  assert [src.train_task(i) for i in range(6)] != [source(root, seed=4).train_task(i) for i in range(6)]
  tests = source(root, eval_episodes=2).eval_tasks("test")
  assert [t.name.split("#")[1] for t in tests] == ["0", "1", "0", "1"]
  for task in tests:
    assert not dialogues_of(task.support) & dialogues_of(task.query)
    assert [c[GOLD_INDEX] for c in task.candidates] == [r for _, r in task.query]
  sized = source(root, support_size=3, query_size=1).eval_tasks("validation")[0]
  assert len(sized.support) == 3 and len(sized.query) == 1  # 2 turns, repeated to 3 (each at least once)
  assert set(sized.support) == set(source(root).eval_tasks("validation")[0].support)


def test_json_reader_gives_the_txt_tasks_and_halves_validation(corpus, tmp_path_factory):
  root, held = corpus
  dialogues = {"train": [as_json(A, 0), as_json(A[::-1], 1), as_json(A, 2), *[as_json(B, d) for d in (3, 4, 5)]]}
  dialogues["valid"] = [as_json(held[i], 10 + 2 * i + j) for i in range(4) for j in range(2)]
  path = tmp_path_factory.mktemp("json") / "personachat_self_original.json"
  path.write_text(json.dumps(dialogues))
  src = source(path.parent, max_history_turns=2, include_persona=False)  # a directory holding the JSON file
  txt = source(root, max_history_turns=2, include_persona=False)
  assert src.train_names == txt.train_names
  for name in src.train_names:
    assert [src.examples(d)[-1][0] for d in src.pools["train"][name]] == [
      txt.examples(d)[-1][0] for d in txt.pools["train"][name]
    ]
  assert src.examples(src.pools["train"][persona_name(B)][0])[-1][0] == ("d3r0\nd3u1", "d3r1")  # last 2 utterances
  # no "test" key: the validation personas (4, by name) split in halves
  names = sorted(persona_name(h) for h in held[:4])
  assert list(src.pools["validation"]) == names[:2] and list(src.pools["test"]) == names[2:]
  task = src.eval_tasks("test")[0]
  for (_, gold), cands in zip(task.query, task.candidates):  # the file's order: gold last
    d, t = gold[1:].split("r")
    assert cands == (f"x{d}{t}", f"y{d}{t}", gold)


def test_malformed_files_name_file_and_line(tmp_path):
  good = dialogue(A, 0) + dialogue(A, 1)
  cases = {
    "1 your persona: a\nhello there": r":2: no line number",
    "1 your persona: a\n3 hi\tho": r":2: line number 3 after 1; expected 2 or 1",
    "1 hi\tho\textra": r":1: 3 tab-separated fields; expected 'N your persona",
    "1 hi\tho\n2 your persona: a": r":2: a persona line after the dialogue's utterances",
    "1 your persona: a\n1 hi\tho": r":1: a dialogue with no utterance line",
    "1 hi\t ": r":1: an empty utterance or response",
  }
  for i, (text, message) in enumerate(cases.items()):
    root = tmp_path / str(i)
    root.mkdir()
    write_txt(root, "valid", [good])
    (root / "train_self_original.txt").write_text(text + "\n" + "\n".join(good) + "\n")
    with pytest.raises(ValueError, match=f"train_self_original.txt{message}"):
      source(root)
  bad = tmp_path / "bad.json"
  bad.write_text('{"train": [\n  {"personality": ["a"],}\n]}')
  with pytest.raises(ValueError, match=r"bad.json:2:\d+: "):
    source(bad)
  bad.write_text(json.dumps({"train": [as_json(A, 0), {"personality": ["a"], "utterances": [{"history": ["x"]}]}]}))
  with pytest.raises(ValueError, match=r"bad.json: train\[1\].utterances\[0\]: expected .*candidates"):
    source(bad)


def test_too_small_personas_and_missing_splits(corpus):
  root, _ = corpus
  with pytest.raises(ValueError, match=r"no persona has support_dialogues \+ query_dialogues = 4 dialogues"):
    source(root, support_dialogues=3)
  with pytest.raises(FileNotFoundError, match=r"no 'dev' split \(config.data.personachat.validation_split\)"):
    source(root, validation_split="dev")
  with pytest.raises(FileNotFoundError, match="config.data.personachat.path"):
    source(root / "nothere")
  src = source(root / "valid_self_original.txt")  # a split file names its siblings
  assert src.train_names == source(root).train_names


def test_non_utf8_and_long_lines(corpus, caplog):
  root, _ = corpus
  path = root / "train_self_original.txt"
  lines = path.read_bytes().split(b"\n")
  lines[3] = lines[3].replace(b"d0u1", b"d0u\xff1")
  path.write_bytes(b"\n".join(lines))
  with pytest.raises(ValueError, match=r"train_self_original.txt:4: bytes b'\\xff'.*encoding_errors='replace'"):
    source(root)
  with caplog.at_level(logging.WARNING, logger="mltd_jax"):
    src = source(root, encoding_errors="replace")
  assert "replaced undecodable bytes in 1 lines" in caplog.text
  assert src.pools["train"][persona_name(A)][0].turns[1].history[-1] == "d0u\ufffd1"
  valid = root / "valid_self_original.txt"
  valid.write_text(valid.read_text().replace("x100|", "x100" + "z" * 40 + "|"))  # line 2: 71 characters
  with pytest.raises(ValueError, match=r"valid_self_original.txt:2: 71 characters > .*max_line_chars=40.*'truncate'"):
    source(root, encoding_errors="replace", max_line_chars=40)
  cut = source(root, encoding_errors="replace", max_line_chars=40, long_lines="truncate")
  turn = cut.pools["validation"][persona_name(("v0 likes tea.",))][0].turns[0]
  assert (turn.response, turn.candidates) == ("d10r0", ("x100" + "z" * 21, "d10r0"))  # cut inside the candidates


def test_meta_training_turns_are_checked_up_front(corpus, tmp_path):
  """`PersonaChatTasks.check_examples` (called by `evaluate.check_data`) encodes every meta-training turn: a response
  too long for config.data.seq_len is named by its line (txt) or JSON path; held-out personas and personas left out
  of meta-training (too few dialogues) are not meta-training data."""
  path, _ = corpus
  long = " " + "z" * 40
  for split, response in (("train", "d4r1"), ("train", "d6r0"), ("valid", "d10r1")):  # B's turn; C's (skipped); v0's
    file = path / f"{split}_self_original.txt"
    file.write_text(file.read_text().replace(f"\t{response}\t", f"\t{response}{long}\t"))
  src = source(path)
  tok = data.byte_level_tokenizer()
  src.check_examples(data.CausalLMEncoder(tok, seq_len=64))
  for chunk in (2, 256):  # B's dialogue 4 starts at line 18: 2 persona lines, turn 0 on line 20, turn 1 on 21
    with pytest.raises(ValueError, match=r"train_self_original.txt:21: example 0: its response has 4\d tokens"):
      src.check_examples(data.CausalLMEncoder(tok, seq_len=32), chunk=chunk)
  dialogues = {"train": [as_json(A, 0), as_json(A, 1), as_json(B, 3), as_json(B, 4)]}
  dialogues["valid"] = [as_json(p, d) for p in (C, A[:1]) for d in (7, 8)]
  dialogues["train"][3]["utterances"][1]["candidates"][-1] += long
  (tmp_path / "personachat_self_original.json").write_text(json.dumps(dialogues))
  src = source(tmp_path / "personachat_self_original.json")
  with pytest.raises(ValueError, match=r"json: train\[3\].utterances\[1\]: example 0: its response has 4\d tokens"):
    src.check_examples(data.CausalLMEncoder(tok, seq_len=32))


def test_encoder_weights_exactly_on_the_response_and_left_truncation():
  tok = data.word_level_tokenizer(["a", "b", "c", "d", "r", "s"])  # <pad>=0 <bos>=1 <eos>=2 <unk>=3 a=4 .. s=9
  enc = data.CausalLMEncoder(tok, seq_len=6, add_eos=True)
  batch = enc.encode([("a b\nc", "r s"), ("", "r"), ("a b c d\na b", "s")])
  assert batch["ids"].tolist() == [[1, 5, 6, 8, 9, 2], [1, 8, 2, 0, 0, 0], [1, 7, 4, 5, 9, 2]]
  assert batch["mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]]
  assert batch["weights"].tolist() == [[0, 0, 0, 1, 1, 1], [0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1]]
  # the first example lost "a" (its oldest token); the third kept the last 3 of its 6 context tokens
  assert batch["weights"].dtype == np.int32
  with pytest.raises(ValueError, match=r"^q: example 0: its response has 6 tokens .*config.data.seq_len=6"):
    enc.encode([("a", "r s r s r")], where="q: ")
  cut = data.CausalLMEncoder(tok, seq_len=4, truncate=True).encode([("a", "r s r s")])
  assert cut["ids"].tolist() == [[1, 8, 9, 8]] and cut["weights"].tolist() == [[0, 1, 1, 1]]  # no eos, no context
  with pytest.raises(TypeError, match=r"^example 1 is a str; causal-LM examples are texts .* pair\)"):
    enc.encode([("a", "r"), "a b"])
  ids, mask = enc.prompts([("a b\nc", "r s"), ("c", "r")], prompt_len=4)
  assert ids.tolist() == [[1, 4, 5, 6], [0, 0, 1, 6]] and mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
  assert enc.prompts(["a b c d"], prompt_len=3)[0].tolist() == [[1, 6, 7]]  # cut from the left, bos kept
  full = enc.encode([("c", "r")])
  assert full["ids"][0, : int(np.argmax(full["weights"][0]))].tolist() == [1, 6]  # = the prompt's real tokens


def test_encoder_separator_tokens_with_a_byte_tokenizer():
  tok = data.byte_level_tokenizer()  # "\n" is a token here: it ends the prompt and precedes the response
  enc = data.CausalLMEncoder(tok, seq_len=12, add_eos=True)
  batch = enc.encode([("hi\nyo", "ok")])
  ids = tok("hi\nyo\nok", add_special_tokens=False)["input_ids"]
  assert batch["ids"][0].tolist() == [tok.bos_token_id, *ids, tok.eos_token_id, 0, 0]
  assert batch["weights"][0].tolist() == [0] * 7 + [1, 1, 1, 0, 0]
  prompt, _ = enc.prompts([("hi\nyo", "ok")], prompt_len=8)
  assert prompt[0].tolist() == [0, tok.bos_token_id, *ids[:6]]  # ends with the separator


def test_task_candidates_are_checked():
  query = (("c", "r"), ("c", "s"))
  assert Task("t", (("c", "r"),), query).candidates == ()  # existing constructors keep working
  assert Task("t", (("c", "r"),), query, (("x", "r"), ("s",))).candidates[1] == ("s",)
  with pytest.raises(ValueError, match=r"task 't' has 1 candidate lists for 2 query examples"):
    Task("t", (("c", "r"),), query, (("r",),))
  with pytest.raises(ValueError, match=r"candidates of query example 1 must end with its gold response 's'"):
    Task("t", (("c", "r"),), query, (("r",), ("s", "x")))


def test_synthetic_personas_episodes_and_tokenizer():
  fam = SyntheticPersonas(seed=1)
  task = fam.train_task(5)
  assert task == fam.train_task(5) and task != fam.train_task(6)  # deterministic in (seed, index)
  assert fam.eval_tasks("test") == SyntheticPersonas(seed=1).eval_tasks("test")
  assert len(task.support) == 12 and len(task.query) == 6
  facts = {f"my {fam.slots[s]} is {fam.values[v]} ." for s, v in fam.persona("train", 5)}
  support = [r for _, r in task.support]
  assert set(support) == facts and {support.count(f) for f in facts} == {3}  # every fact 3 times
  assert {r for _, r in task.query} <= facts
  for (context, response), cands in zip(task.query, task.candidates):
    assert response not in context.split("\n")  # nothing to copy: it must be learned from the support set
    assert context.split("\n")[-1] == f"what is your {response.split()[1]} ?"
    assert cands[GOLD_INDEX] == response and len(set(cands)) == fam.n_candidates
    assert {c.split()[1] for c in cands} == {response.split()[1]}  # distractors: the same slot, other values
  cfg = ml_collections.ConfigDict({"source": "personas", "tokenizer": "personas", "personas": {"n_values": 12}})
  tok, src = data.build(cfg, seed=1)
  batch = data.CausalLMEncoder(tok, seq_len=32, add_eos=True).encode(src.train_task(0).support)
  assert tok.unk_token_id not in batch["ids"] and batch["weights"].sum(1).tolist() == [6] * 12  # 5 words + eos
  query = episodes.meta_batch(data.CausalLMEncoder(tok, seq_len=32), src, 0, 2)["query"]  # [2, 6, 32]
  assert query["weights"].shape == (2, 6, 32)
  focus = data.CausalLMEncoder(tok, seq_len=32).focus(query, "is")["weights"]  # the response's value, not the context's
  assert (focus.sum(-1) == 1).all() and {w[0] for w in tok.convert_ids_to_tokens(query["ids"][focus == 1])} == {"v"}


def test_personachat_is_registered(corpus):
  root, _ = corpus
  cfg = ml_collections.ConfigDict({"source": "personachat", "tokenizer": "bytes"})
  cfg.personachat = {"path": str(root), "support_dialogues": 1, "query_dialogues": 1, "support_size": 2}
  tok, src = data.build(cfg, seed=0)
  assert isinstance(src, PersonaChatTasks) and src.seed == 0 and len(src.train_task(0).support) == 2
  with pytest.raises(ValueError, match=r"tokenizer='facts' only fits a synthetic source"):
    data.build(ml_collections.ConfigDict({**cfg.to_dict(), "tokenizer": "facts"}))
