"""Meta-testing: adapt-and-score columns, select_lr on a hand-made table, and the eval.json fields."""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mltd_jax import evaluate, meta, models, tarp
from mltd_jax.data import CausalLMEncoder
from mltd_jax.data.synthetic import REL, FactsFamily
from mltd_jax.data.tokenizers import word_level_tokenizer
from mltd_jax.models import gpt2
from tests.helpers import tiny_gpt2


def test_select_lr_picks_the_exact_argmin_per_k():
  grid = [0.01, 0.1, 1.0]
  table = np.array(  # [lr, k]
    [
      [3.0, 2.9, 2.8, 2.7],
      [3.0, 2.5, 2.6, 2.65],
      [3.0, 2.6, 2.4, 2.9],
    ]
  )
  assert evaluate.select_lr(grid, table) == [0.01, 0.1, 1.0, 0.1]  # k=0: a tie goes to the first rate
  with pytest.raises(ValueError, match="3 rows of losses for a grid of 2"):
    evaluate.select_lr(grid[:2], table)
  diverged = table.copy()
  diverged[2, 1:] = np.nan  # lr 1.0 blew up: never chosen, although argmin alone would pick a NaN
  assert evaluate.select_lr(grid, diverged) == [0.01, 0.1, 0.1, 0.1]
  diverged[:, 3] = np.nan
  with pytest.raises(ValueError, match="every learning rate .* NaN loss after 3 steps"):
    evaluate.select_lr(grid, diverged)


def test_meta_testing_adam_is_plain_adam():
  """eps_root is for differentiating through Adam only: meta-testing's first Adam step is lr * sign(g) even for a
  tiny gradient, while the meta-training inner loop's (eps_root 1e-8) shrinks it to about 0.1 lr at |g| = 1e-5."""
  loss = lambda v, batch, rng: 1e-5 * v["params"]["w"].sum()  # noqa: E731
  variables = {"params": {"w": jnp.zeros(3)}}
  plain = evaluate.eval_inner(eval_config(optimizer="adam", adapt_steps=1), "full", "^params/")
  step = lambda inner: meta.adapt(loss, variables, None, inner, jax.random.key(0), lr=0.1)[0]["params"]["w"]  # noqa: E731
  np.testing.assert_allclose(step(plain), -0.1 * 1e-5 / (1e-5 + 1e-8), rtol=1e-5)  # Adam's eps = 1e-8
  shrunk = meta.InnerLoop(steps=1, lr=0.1, optimizer="adam", adam_eps_root=1e-8, fast_regex="^params/")
  np.testing.assert_allclose(step(shrunk), -0.1 * 1e-5 / (np.sqrt(1e-10 + 1e-8) + 1e-8), rtol=1e-5)


def test_lr_grid_values_are_checked():
  with pytest.raises(ValueError, match=r"config.eval.lr_grid\['full'\]=\(0.1, -1.0\)"):
    evaluate.lr_grid(eval_config(lr_grid={"default": (0.1,), "full": (0.1, -1.0)}), "full")
  assert evaluate.lr_grid(eval_config(), "tarp") == [0.0, 0.5]


def test_summarize_means_and_standard_errors():
  loss = np.log(np.array([[2.0, 1.0], [4.0, 3.0]]))
  s = evaluate.summarize(loss)
  np.testing.assert_allclose(s["ppl_mean"], [3.0, 2.0])
  np.testing.assert_allclose(s["ppl_se"], [1.0, 1.0])  # std (ddof 1) sqrt(2) / sqrt(2)


def facts_setup(n=3):
  fam = FactsFamily(num_eval_tasks=n, words_per_text=11, facts_per_text=2)
  tok = word_level_tokenizer(fam.vocabulary())
  model, params = tiny_gpt2(vocab=len(tok), d=16)
  cfg = tarp.TarpConfig(rank=2, targets=gpt2.DEFAULT_TARGETS)
  variables = {"params": params, "tarp": tarp.init(jax.random.key(0), params, cfg, models.dense_paths(model))}
  return fam, CausalLMEncoder(tok, seq_len=12), model, variables


def test_adapt_and_score_columns():
  fam, encoder, model, variables = facts_setup()
  arrays = evaluate.encode_tasks(encoder, fam.eval_tasks("test"), eval_config())
  inner = meta.InnerLoop(steps=4, lr=0.0, fast_regex="^tarp/")
  loss_fn = gpt2.make_loss(model)
  scorer = evaluate.make_scorer(loss_fn, inner)
  keys = jax.random.split(jax.random.key(0), 3)
  result = jax.device_get(scorer(variables, arrays, keys, 0.5))
  assert result["query"].shape == result["query_focus"].shape == (3, 5)
  for i in range(3):
    for name in ("query", "query_focus"):
      batch = jax.tree.map(lambda x: x[i], arrays["eval"][name])
      np.testing.assert_allclose(result[name][i, 0], meta.mean_loss(loss_fn(variables, batch, None)), rtol=1e-5)
  assert not np.allclose(result["query_focus"], result["query"])
  mean = jax.jit(lambda t, batch: meta.mean_loss(loss_fn({**variables, "tarp": t}, batch, None)))  # compiled once
  grad = jax.jit(jax.grad(mean))
  for i in range(3):  # columns k >= 1: k plain SGD steps on the support's mean loss, by hand, outside meta.adapt
    support = jax.tree.map(lambda x: x[i], arrays["support"])
    fast = variables["tarp"]
    for k in range(1, 5):
      fast = jax.tree.map(lambda f, g: f - 0.5 * g, fast, grad(fast, support))
      for name in ("query", "query_focus"):
        batch = jax.tree.map(lambda x: x[i], arrays["eval"][name])
        np.testing.assert_allclose(result[name][i, k], mean(fast, batch), rtol=1e-5)
  assert (result["query"][:, 4] < result["query"][:, 0]).all()  # the support's facts are the query's: it adapts
  zero = jax.device_get(scorer(variables, arrays, keys, 0.0))["query"]
  np.testing.assert_allclose(zero, np.repeat(zero[:, :1], 5, axis=1), rtol=1e-6)
  chunked = evaluate.make_scorer(loss_fn, inner, query_chunks=2)(variables, arrays, keys, 0.5)  # same means
  np.testing.assert_allclose(jax.device_get(chunked)["query"], result["query"], rtol=1e-5)
  alone = scorer(variables, jax.tree.map(lambda x: x[1:2], arrays), keys[1:2], 0.5)  # one task: not vmapped
  np.testing.assert_allclose(jax.device_get(alone)["query"], result["query"][1:2], rtol=1e-5)


def eval_config(**kw):
  fields = dict(
    adapt_steps=2,
    optimizer="sgd",
    methods={"tarp": "^tarp/", "full": "^params/"},
    tasks_per_batch=2,
    lr_grid={"default": (0.0, 0.5), "full": (0.0, 0.1)},
    focus_token=REL,
    metrics=("query", "query_focus"),
    select_by=("query", "query_focus"),
    support_chunks=1,
  )
  return ml_collections.ConfigDict({**fields, **kw})


def test_meta_test_picks_lr_on_validation_and_reports_every_task():
  fam, encoder, model, variables = facts_setup()
  loss_fn = gpt2.make_loss(model)
  result = evaluate.meta_test(loss_fn, encoder, variables, fam, eval_config(), jax.random.key(0))
  assert result["metrics"] == ["query", "query_focus"] and result["select_by"] == ["query", "query_focus"]
  for m in result["methods"].values():
    for sel, s in m["selections"].items():
      assert len(s["lr"]) == 3 and set(s["lr"]) <= set(m["lr_grid"])
      assert len(s["tasks"]) == 3 and len(s["query"]["ppl_mean"]) == len(s["query_focus"]["ppl_mean"]) == 3
      per_task = np.exp([t["query_loss"] for t in s["tasks"]])
      np.testing.assert_allclose(s["query"]["ppl_mean"], per_task.mean(0), rtol=1e-6)
  # The chosen rates are exactly select_lr of the validation losses, recomputed here by hand for one method.
  scorer = evaluate.make_scorer(loss_fn, evaluate.eval_inner(eval_config(), "tarp", "^tarp/"))
  val = evaluate.encode_tasks(encoder, fam.eval_tasks("validation"), eval_config())
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(3))
  means = np.stack([jax.device_get(scorer(variables, val, keys, lr))["query_focus"].mean(0) for lr in (0.0, 0.5)])
  assert result["methods"]["tarp"]["selections"]["query_focus"]["lr"] == [(0.0, 0.5)[i] for i in means.argmin(0)]
  report = evaluate.report(result)
  assert "chosen by validation query_focus loss" in report and "±" in report


def test_method_regex_that_matches_nothing_is_an_error():
  fam, encoder, model, variables = facts_setup(n=2)
  cfg = eval_config()
  cfg.methods = {"adapters": "^adapter/"}
  with pytest.raises(ValueError, match=r"config.eval.methods\['adapters'\]='\^adapter/' matches no variable"):
    evaluate.meta_test(gpt2.make_loss(model), encoder, variables, fam, cfg, jax.random.key(0))
  cfg = eval_config(select_by=("bleu",))
  with pytest.raises(ValueError, match="config.eval.select_by"):
    evaluate.meta_test(gpt2.make_loss(model), encoder, variables, fam, cfg, jax.random.key(0))


def test_decoding_domains_and_references_are_checked():
  """`decode_eval.domain_of` splits at the last ``#<digits>`` only; `references` refuses plain-text query examples."""
  from mltd_jax import decode_eval
  from mltd_jax.data.tasks import Task

  assert [decode_eval.domain_of(n) for n in ("c#sharp#0", "c#plus#12", "email#3", "solo", "a#b")] == [
    "c#sharp", "c#plus", "email", "solo", "a#b"
  ]
  pairs = Task("d#0", (("a", "b"),), (("the source", "the target"),))
  assert decode_eval.references([pairs]) == [["the target"]]
  with pytest.raises(ValueError, match="plain texts as query examples.*config.eval.decode.metrics=()"):
    decode_eval.references([Task("d#1", ("a text",), ("the query document",))])


def test_check_data_finds_held_out_problems_before_training(tmp_path):
  """`evaluate.check_data` encodes the held-out tasks up front: chunk counts that do not divide their sets, and a
  decoding budget that leaves no room for the prompt, are refused naming the field."""
  import json

  from mltd_jax.data import byte_level_tokenizer
  from mltd_jax.data.jsonl import JsonlTasks

  rows = [{"task": d, "source": f"{d} says {i}", "target": f"reply {i}"} for d in "abc" for i in range(4)]
  (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  source = JsonlTasks(str(tmp_path / "p.jsonl"), kind="pair", support_size=2, query_size=2, eval_episodes=1)
  encoder = CausalLMEncoder(byte_level_tokenizer(), seq_len=32)
  decoding = ml_collections.ConfigDict(dict(metrics=("rouge",), max_new_tokens=8))
  cfg = eval_config(metrics=("query",), select_by=("query",), decode=decoding)
  evaluate.check_data(encoder, source, cfg)  # fits
  with pytest.raises(ValueError, match=r"config.eval.support_chunks=4 must be .* divides the validation tasks' 2"):
    evaluate.check_data(encoder, source, eval_config(metrics=("query",), select_by=("query",), support_chunks=4))
  decoding.max_new_tokens = 31
  with pytest.raises(ValueError, match=r"decode.max_new_tokens=31 leaves no room .*seq_len=32 \(prompt_len=1 must"):
    evaluate.check_data(encoder, source, cfg)
  rows[1]["target"] = "a reply far too long for thirty-two bytes"  # line 2: task a, meta-training only
  (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  source = JsonlTasks(str(tmp_path / "p.jsonl"), kind="pair", support_size=2, query_size=2, eval_episodes=1)
  cfg = eval_config(metrics=("query",), select_by=("query",))
  with pytest.raises(ValueError, match=r"p.jsonl:2: example 0: its response has 4\d tokens"):
    evaluate.check_data(encoder, source, cfg)  # the source's check_examples
  calls = []

  class Recorded:  # the source, its check_examples recorded
    eval_tasks = source.eval_tasks

    def check_examples(self, enc):
      calls.append(enc.truncate)

  evaluate.check_data(CausalLMEncoder(byte_level_tokenizer(), seq_len=32, truncate=True), Recorded(), cfg)
  evaluate.check_data(encoder, Recorded(), cfg, train_examples=False)  # no phase draws meta-training examples
  evaluate.check_data(encoder, Recorded(), cfg)
  assert calls == [False]  # only the last: a truncating encoder refuses no example for its length


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("num_beams", 0, "config.eval.decode.num_beams=0 must be an integer >= 1"),
    ("max_new_tokens", 0, "config.eval.decode.max_new_tokens=0 must be an integer >= 1"),
    ("batch_size", -1, "config.eval.decode.batch_size=-1 must be an integer >= 0"),
    ("length_penalty", float("nan"), "config.eval.decode.length_penalty=nan must be a finite number"),
  ],
)
def test_decoding_settings_are_checked_up_front(field, value, message):
  decoding = dict(metrics=("rouge",), num_beams=2, max_new_tokens=8, length_penalty=1.0, batch_size=0)
  evaluate.check_config(eval_config(decode=ml_collections.ConfigDict(decoding)))
  with pytest.raises(ValueError, match=re.escape(message)):
    evaluate.check_config(eval_config(decode=ml_collections.ConfigDict({**decoding, field: value})))
