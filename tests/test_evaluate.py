"""Meta-testing: focus weights, learning-rate choice on validation tasks, and the eval.json fields."""

import jax
import ml_collections
import numpy as np

from mltd_jax import evaluate, tarp
from mltd_jax.data.synthetic import REL, FactsFamily
from mltd_jax.data.tokenizers import word_level_tokenizer
from tests.helpers import tiny_gpt2


def test_focus_weights_mark_the_tokens_after_the_focus_token():
  fam = FactsFamily(num_eval_tasks=3)
  tok = word_level_tokenizer(fam.vocabulary())
  arrays = evaluate.encode_tasks(tok, fam.eval_tasks("test"), 48, focus_token=REL)
  query, focus = arrays["eval"]["query"], arrays["eval"]["query_focus"]
  assert focus["weights"].shape == query["ids"].shape == (3, 8, 48)
  assert (focus["weights"].sum(-1) == fam.facts_per_text).all()
  objects = set(tok.convert_tokens_to_ids(fam.objects))
  marked = query["ids"][focus["weights"].astype(bool)]
  assert set(marked.tolist()) <= objects


def test_meta_test_picks_lr_on_validation_and_reports_every_task():
  fam = FactsFamily(num_eval_tasks=3, words_per_text=11, facts_per_text=2)
  tok = word_level_tokenizer(fam.vocabulary())
  model, params = tiny_gpt2(vocab=len(tok), d=16)
  variables = {"params": params, "tarp": tarp.init(jax.random.key(0), params, tarp.TarpConfig(rank=2))}
  cfg = ml_collections.ConfigDict(
    dict(
      adapt_steps=2,
      optimizer="sgd",
      methods={"tarp": "^tarp/", "full": "^params/"},
      tasks_per_batch=2,
      lr_grid={"default": (0.0, 0.5), "full": (0.0, 0.1)},
      focus_token=REL,
    )
  )
  result = evaluate.meta_test(model.apply, variables, tok, fam, cfg, seq_len=12)
  for name, m in result["methods"].items():
    assert len(m["lr"]) == 3 and m["lr"][0] in m["lr_grid"]
    assert len(m["tasks"]) == 3 and len(m["query_ppl_mean"]) == len(m["query_focus_ppl_mean"]) == 3
    np.testing.assert_allclose(m["query_ppl_mean"], np.mean([t["query_ppl"] for t in m["tasks"]], 0), rtol=1e-6)
    # the chosen lr is the one with the lowest validation loss (0.0 = no change is always a candidate)
    assert all(v <= m["validation_query_loss_mean"][0] + 1e-6 for v in m["validation_query_loss_mean"])
  assert "full" in evaluate.format_table(result) and "±" in evaluate.format_table(result, "query_focus")
