"""Dialogue personalization end to end (configs/personachat.py): hits@1, BLEU, the :tiny run, real-format files."""

import json
from pathlib import Path

import numpy as np
import pytest
import sacrebleu

from mltd_jax import decode_eval
from mltd_jax.data.tasks import Task
from tests.helpers import experiment_config

ROOT = Path(__file__).resolve().parents[1]


def personachat_config(arg=None):
  return experiment_config("personachat", arg)


def shrink(config, steps=2):
  config.pretrain.steps, config.meta.steps, config.log_every = steps, 1, 1
  config.eval.adapt_steps = 1
  config.eval.methods = {"tarp": "^tarp/"}  # one method: half the compilations
  config.eval.lr_grid = {"default": (0.3,)}
  config.eval.decode.max_new_tokens = 4
  config.eval.decode.num_beams = 2
  return config


def test_candidate_hits_rank_by_summed_response_loss():
  task = Task("p#0", ("s",), (("c1", "gold1"), ("c2", "gold2")), candidates=(("a", "b", "gold1"), ("x", "gold2")))
  losses = np.array([3.0, 2.0, 1.0, 0.5, 0.7])  # example 1: gold lowest (hit); example 2: a distractor (miss)

  class Encoder:
    def encode(self, pairs, where=""):
      assert pairs == [("c1", "a"), ("c1", "b"), ("c1", "gold1"), ("c2", "x"), ("c2", "gold2")]
      return {"ids": np.zeros((5, 1))}

  assert decode_eval.candidate_hits(lambda v, b: losses, Encoder(), {}, task) == [True, False]
  assert decode_eval.candidate_hits(lambda v, b: losses, Encoder(), {}, Task("q", ("s",), ("t",))) == []
  golds = ["i like green tea very much", "my dog is called rex"]
  task = Task("p#0", ("s",), (("c1", golds[0]), ("c2", golds[1])), candidates=((golds[0],), (golds[1],)))
  summary = decode_eval.summarize(["bleu"], [task], [golds], {"hits@1": [[1.0, 0.0]]})
  assert summary["per_domain"]["p"] == pytest.approx({"bleu": 100.0, "hits@1": 0.5})


def test_sequence_losses_are_each_rows_summed_response_loss():
  """`decode_eval.make_sequence_losses` on a real GPT-2 against each row's NLL summed over its weighted targets,
  computed from the model's logits here; hits@1 through it ranks candidates by those sums."""
  import jax

  from mltd_jax.data import CausalLMEncoder, word_level_tokenizer
  from mltd_jax.models import gpt2
  from tests.helpers import tiny_gpt2

  tok = word_level_tokenizer(["hi", "there", "tea", "dog", "rex", "red", "sky"])
  model, params = tiny_gpt2(vocab=len(tok), d=16, seed=3)
  variables = {"params": params}
  encoder = CausalLMEncoder(tok, seq_len=10)
  pairs = [("hi there", "tea dog"), ("hi", "red sky rex"), ("dog", "hi"), ("sky red", "rex rex tea")]
  def summed_nll(rows):  # each row's NLL over its weighted targets, from the model's logits
    logp = np.asarray(jax.nn.log_softmax(model.apply(variables, rows["ids"], attention_mask=rows["mask"]), -1))
    return -(np.take_along_axis(logp[:, :-1], rows["ids"][:, 1:, None], -1)[..., 0] * rows["weights"][:, 1:]).sum(1)

  batch = encoder.encode(pairs)
  got = np.asarray(decode_eval.make_sequence_losses(gpt2.make_loss(model))(variables, batch))
  want = summed_nll(batch)
  assert (batch["weights"][:, 1:].sum(1) >= 1).all()  # every response counts
  assert len(set(np.round(want, 4))) == 4  # the rows differ
  np.testing.assert_allclose(got, want, rtol=1e-5)

  def direct(context, responses):
    return summed_nll(encoder.encode([(context, r) for r in responses]))

  options = ["red sky rex", "hi", "tea dog", "rex rex tea"]
  best = options[int(np.argmin(direct("hi there", options)))]  # its gold is the likeliest: a hit
  worst = options[int(np.argmax(direct("sky red", options)))]  # its gold is the least likely: a miss
  task = Task("p#0", ("s",), (("hi there", best), ("sky red", worst)),
              candidates=(tuple(o for o in options if o != best) + (best,),
                          tuple(o for o in options if o != worst) + (worst,)))  # fmt: skip
  scores = decode_eval.make_sequence_losses(gpt2.make_loss(model))
  assert decode_eval.candidate_hits(scores, encoder, variables, task) == [True, False]


def test_generate_texts_in_batches_equals_one_at_a_time():
  """`decode_eval.generate_texts` with batch_size 2 over 5 examples (a short last batch padded with copies) gives
  what one call over all of them gives, and what `decode.generate` gives for each example alone."""
  import ml_collections

  from mltd_jax import decode
  from mltd_jax.data import CausalLMEncoder, word_level_tokenizer
  from tests.helpers import tiny_gpt2

  tok = word_level_tokenizer(["hi", "there", "tea", "dog", "rex", "red", "sky"])
  model, params = tiny_gpt2(vocab=len(tok), d=16, seed=5)
  variables = {"params": params}
  encoder = CausalLMEncoder(tok, seq_len=10)
  examples = [("hi there", "x"), ("dog", "x"), ("red sky rex", "x"), ("tea", "x"), ("sky dog hi", "x")]
  cfg = ml_collections.ConfigDict(dict(num_beams=2, max_new_tokens=3, length_penalty=1.0, batch_size=2))
  batched = decode_eval.generate_texts(model, variables, encoder, tok, examples, cfg)
  cfg.batch_size = 0
  assert batched == decode_eval.generate_texts(model, variables, encoder, tok, examples, cfg)
  alone = []
  for ex in examples:
    ids, mask = encoder.prompts([ex], max_new_tokens=3)
    out = decode.generate(model, variables, ids, mask, num_beams=2, max_new_tokens=3, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)  # fmt: skip
    alone.append(tok.batch_decode(np.asarray(out), skip_special_tokens=True)[0].strip())
  assert batched == alone and len(set(alone)) > 1


def check_decoded(workdir, metrics=("bleu", "hits@1")):
  """eval.json has perplexity, each metric before and after adaptation, and BLEU equals sacrebleu's on the outputs."""
  result = json.loads((workdir / "eval.json").read_text())
  before = [s["query"]["ppl_mean"][0] for m in result["methods"].values() for s in m["selections"].values()]
  assert np.isfinite(before).all() and np.allclose(before, before[0], rtol=1e-6)  # k = 0: nothing adapted yet
  decoded = result["decode"]
  records = [json.loads(line) for line in (workdir / "predictions.jsonl").read_text().splitlines()]
  for label, entry in [("before", decoded["before"]), *decoded["methods"].items()]:
    assert set(entry["mean"]) == set(metrics)
    rows = [r for r in records if r["method"] == label]
    domains = {decode_eval.domain_of(r["task"]) for r in rows}
    for domain in domains:
      mine = [r for r in rows if decode_eval.domain_of(r["task"]) == domain]
      bleu = sacrebleu.corpus_bleu([r["prediction"] for r in mine], [[r["reference"] for r in mine]]).score
      assert entry["per_domain"][domain]["bleu"] == pytest.approx(bleu)
  return decoded


def test_tiny_end_to_end_writes_perplexity_bleu_and_hits(tmp_path):
  """configs/personachat.py:tiny (shrunk; the multitask model pretrained enough to speak the family's sentences):
  eval.json has response perplexity and BLEU and hits@1 before and after adaptation, and three full fine-tuning steps
  on a held-out persona's support dialogues lower the perplexity at every step and raise BLEU and hits@1 (the facts
  asked about are the persona's own: before adaptation it cannot know them)."""
  from mltd_jax import train

  config = shrink(personachat_config("tiny"), steps=150)
  config.data.personas.num_eval_tasks = 2
  config.eval.methods, config.eval.adapt_steps = {"full": "^params/"}, 3  # the difference barely moves at 1 meta step
  train.train_and_evaluate(config, tmp_path)
  decoded = check_decoded(tmp_path)
  assert list(decoded["before"]["per_domain"]) == ["personas-test"]
  (ppl,) = [s["query"]["ppl_mean"] for s in json.loads((tmp_path / "eval.json").read_text())["methods"]["full"]
            ["selections"].values()]  # fmt: skip
  assert len(ppl) == 4 and all(b < a for a, b in zip(ppl, ppl[1:])), ppl  # k = 0..3
  before, after = decoded["before"]["mean"], decoded["methods"]["full"]["mean"]
  assert after["bleu"] > before["bleu"] and after["hits@1"] > before["hits@1"], (before, after)


def convai2_dialogue(persona, d, words):
  lines = [f"your persona: {p}" for p in persona]
  for t in range(2):
    gold = f"{words[(d + t) % len(words)]} {words[(d + 2 * t) % len(words)]}"
    lines.append(f"hello {words[t]} ?\t{gold}\t\t{words[0]} {words[1]}|{words[2]}|{gold}")
  return [f"{n} {text}" for n, text in enumerate(lines, 1)]


def test_real_convai2_file_with_a_local_gpt2_and_a_tokenizer_file(tmp_path):
  """The paper-scale command's path, on a ConvAI2-format file, a transformers save_pretrained GPT-2 and a bare
  tokenizer.json."""
  import transformers

  from mltd_jax import train
  from mltd_jax.data import word_level_tokenizer

  words = [f"w{i}" for i in range(12)]
  tokenizer = word_level_tokenizer([*words, "hello", "?", "i", "like", "tea", "am", "a", "cook", "."])
  tokenizer.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
  personas = [("i like tea .",), ("i am a cook .",), ("i like w3 .",), ("i am w4 .",), ("i am w5 .",)]
  for split, chosen in (("train", personas[:3]), ("valid", personas[3:4]), ("test", personas[4:])):
    lines = [line for i, p in enumerate(chosen) for d in range(3) for line in convai2_dialogue(p, 3 * i + d, words)]
    (tmp_path / f"{split}_self_original.txt").write_text("\n".join(lines) + "\n")
  hf = transformers.GPT2Config(
    vocab_size=len(tokenizer), n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=2
  )
  transformers.GPT2LMHeadModel(hf).eval().save_pretrained(tmp_path / "gpt2", safe_serialization=True)
  config = shrink(personachat_config())
  config.model.name_or_dir = str(tmp_path / "gpt2")
  config.data.tokenizer = str(tmp_path / "tokenizer.json")
  config.data.seq_len = 32
  config.data.personachat.path = str(tmp_path)
  config.data.personachat.update(support_dialogues=2, query_dialogues=1, support_size=4, query_size=2)
  config.meta.tasks_per_step = 2
  config.eval.tasks_per_batch = 1
  config.eval.decode.batch_size = 2
  train.train_and_evaluate(config, tmp_path / "run")
  decoded = check_decoded(tmp_path / "run")
  assert len(decoded["before"]["tasks"]) == 1 and decoded["before"]["tasks"][0]["name"].startswith("persona-")


def test_c_score_sums_nli_labels_over_the_persona(tmp_path, caplog):
  """C(r) = sum over persona sentences of +1 entailment / -1 contradiction / 0 neutral, from a transformers NLI
  checkpoint (here a tiny random one: the test checks the arithmetic against the model's own argmax)."""
  import logging

  import torch
  import transformers

  from mltd_jax import consistency
  from mltd_jax.data import word_level_tokenizer

  words = ["i", "like", "tea", "am", "a", "cook", "my", "dog", "is", "rex", "."]
  tokenizer = word_level_tokenizer(words)
  tokenizer.add_special_tokens({"cls_token": "<bos>", "sep_token": "<eos>"})
  tokenizer.save_pretrained(tmp_path / "nli")
  labels = {0: "ENTAILMENT", 1: "NEUTRAL", 2: "CONTRADICTION"}
  config = transformers.BertConfig(
    vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
    id2label=labels, label2id={v: k for k, v in labels.items()},
  )  # fmt: skip
  torch.manual_seed(0)
  nli = transformers.BertForSequenceClassification(config).eval()
  persona, responses = ["i like tea .", "i am a cook ."], ["my dog is rex .", "i like tea .", "a cook ."]
  tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "nli")
  every = tok([p for _ in responses for p in persona], [r for r in responses for _ in persona], padding=True,
              return_tensors="pt")  # fmt: skip
  with torch.no_grad():  # centre the logits over the pairs: a random head alone says one label for every pair
    nli.classifier.bias.sub_(nli(**every).logits.mean(0))
  nli.save_pretrained(tmp_path / "nli")
  scorer = consistency.load(str(tmp_path / "nli"), batch_size=3)
  model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "nli").eval()
  value = {0: 1, 1: 0, 2: -1}
  expected, seen = [], set()
  for r in responses:
    with torch.no_grad():
      logits = model(**tok(persona, [r] * len(persona), padding=True, return_tensors="pt")).logits
    seen |= set(logits.argmax(-1).tolist())
    expected.append(sum(value[int(i)] for i in logits.argmax(-1)))
  assert len(seen) >= 2, seen  # pairs of different labels: batching and order errors would show
  assert scorer(persona, responses) == expected
  with torch.no_grad():  # every pair entailed: +1 per persona sentence
    nli.classifier.weight.zero_()
    nli.classifier.bias.copy_(torch.tensor([5.0, 0.0, 0.0]))
  nli.save_pretrained(tmp_path / "nli")
  assert consistency.load(str(tmp_path / "nli"), batch_size=4)(persona, responses) == [2, 2, 2]
  with caplog.at_level(logging.INFO, logger="mltd_jax"):
    assert consistency.load("") is None
  assert "C-score skipped" in caplog.text
  config.id2label = {0: "yes", 1: "no", 2: "maybe"}
  with pytest.raises(ValueError, match="'entailment' and a 'contradiction'"):
    consistency._label_values(config.id2label)
