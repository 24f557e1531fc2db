"""MLtD on low-resource abstractive summarization over AdaptSum's six domains with T5 (paper section 4.2).

Paper setup (needs the hub model `t5-small` or a local save_pretrained directory, and AdaptSum on disk):
  git clone https://github.com/TysonYu/AdaptSum   # its data: <root>/<domain>/{train,valid,test}.{source,target}
  python -m mltd_jax.main --config=configs/adaptsum.py --workdir=runs/adaptsum \
      --config.data.adaptsum.root=/path/to/AdaptSum/dataset
  # hold out another domain:  --config=configs/adaptsum.py:domain=email   (or --config.data.adaptsum.test_domain)
  # each domain in turn: one run per :domain=NAME (README has the loop); eval.json of each has its ROUGE
  # t5-base:                  --config.model.name_or_dir=t5-base --config.data.tokenizer=t5-base
Meta-training draws tasks from the five other domains' training data; the held-out domain adapts on its
low-resource split (AdaptSum300sample) and is scored on its test split: query loss, and ROUGE-1/2/L of beam-search
summaries before and after adaptation at the (learning rate, steps) chosen on its validation split.
Your own (source, target) data: --config.data.source=jsonl --config.data.jsonl.path=FILE (lines
{"task": ..., "source": ..., "target": ...}) --config.data.jsonl.validation_tasks='("a",)'
--config.data.jsonl.test_tasks='("b",)' --config.model.name_or_dir=DIR --config.data.tokenizer=tokenizer.json

Tiny (offline: synthetic seq2seq facts tasks, a fresh 2+2-layer d=64 T5; a few minutes on 2 CPU cores):
  python -m mltd_jax.main --config=configs/adaptsum.py:tiny --workdir=runs/adaptsum_tiny
Expected on :tiny (README has the measured table): adaptation raises ROUGE-1/2/L of the held-out tasks' summaries.

Every field not set here is documented in configs/multidomain_lm.py, whose defaults this config starts from.
"""

from pathlib import Path

import ml_collections

from mltd_jax import config_files

DOMAINS = ("dialog", "email", "movie_review", "debate", "social_media", "science")


def _base() -> ml_collections.ConfigDict:
  """configs/multidomain_lm.py's defaults: every field of the pipeline, documented there once."""
  return config_files.load(Path(__file__).with_name("multidomain_lm.py")).get_config()


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = _base()
  c.model.name_or_dir = "t5-small"  # t5-base: one field away (and its tokenizer)
  c.model.family = "t5"
  c.model.init = ml_collections.ConfigDict(
    dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
         relative_attention_max_distance=32)
  )  # fmt: skip

  c.data.source = "adaptsum"
  c.data.tokenizer = "t5-small"
  c.data.source_len = 512  # the paper truncates sources at 1024 tokens; T5 was trained on 512
  c.data.target_len = 128
  c.data.truncate = True  # long documents are cut (keeping eos), as summarization systems do
  c.data.jsonl.kind = "pair"  # --config.data.source=jsonl reads {"task", "source", "target"} lines
  c.data.adaptsum.support_size = 16
  c.data.adaptsum.query_size = 16

  c.tarp.kind = "dynamic"
  c.tarp.rank = 16  # paper

  c.meta.steps = 3000
  c.tams.anneal_steps = 3000  # = config.meta.steps (with --config.tams.enabled=True)
  c.meta.tasks_per_step = 4
  c.meta.task_chunk = 1
  c.meta.inner_steps = 20  # paper's T_in
  c.meta.inner_lr = 5e-4
  c.meta.inner_optimizer = "adam"
  c.meta.outer_lr = 1e-4
  c.meta.outer_warmup_steps = 300  # Adam with warmup and inverse-sqrt decay (paper)
  c.meta.outer_schedule = "inverse_sqrt"
  c.meta.support_chunks = 4

  c.eval.adapt_steps = 20
  c.eval.optimizer = "adam"
  c.eval.lr_grid = {"default": (1e-4, 3e-4, 1e-3, 3e-3), "full": (1e-5, 3e-5, 1e-4, 3e-4)}
  c.eval.tasks_per_batch = 1
  c.eval.metrics = ("query",)
  c.eval.select_by = ("query",)
  c.eval.support_chunks = 4
  c.eval.decode.metrics = ("rouge",)
  c.eval.decode.num_beams = 4  # paper
  c.eval.decode.max_new_tokens = 128
  c.eval.decode.batch_size = 8

  if arg == "tiny":
    tiny(c)
  elif arg and arg.startswith("domain="):
    domain = arg.split("=", 1)[1]
    if domain not in DOMAINS:
      raise ValueError(f"configs/adaptsum.py:domain={domain!r} is not one of {DOMAINS}.")
    c.data.adaptsum.test_domain = domain
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of configs/adaptsum.py; use ':tiny', ':domain=<name>' or nothing.")
  return c


def tiny(c: ml_collections.ConfigDict) -> None:
  """Offline: the facts family as (text without objects, its facts) pairs and a fresh tiny T5."""
  c.log_every = 50
  c.checkpoint_every = 100
  c.model.name_or_dir = ""
  c.data.source = "facts"
  c.data.tokenizer = "facts"
  c.data.facts.mode = "summary"
  c.data.facts.words_per_text = 20
  c.data.facts.facts_per_text = 2
  c.data.facts.num_eval_tasks = 8
  c.data.source_len = 24
  c.data.target_len = 8
  c.data.truncate = False
  c.tarp.kind = "bilinear"
  c.tarp.rank = 4
  c.tarp.init_scale = 0.1
  c.pretrain.steps = 400
  c.pretrain.tasks_per_step = 8
  c.pretrain.lr = 3e-3
  c.pretrain.warmup_steps = 50
  c.meta.steps = 150
  c.meta.tasks_per_step = 4
  c.meta.task_chunk = 0
  c.meta.inner_steps = 3
  c.meta.inner_lr = 0.3  # 1.0 (the GPT-2 facts setting) diverges on this T5: k = 0 ROUGE-1 fell to 0.25
  c.meta.inner_optimizer = "sgd"
  c.meta.outer_lr = 1e-3
  c.meta.outer_warmup_steps = 0
  c.meta.outer_schedule = "constant"
  c.meta.support_chunks = 1
  c.eval.adapt_steps = 5
  c.eval.optimizer = "sgd"
  c.eval.lr_grid = {"default": (0.1, 0.3, 1.0), "full": (0.01, 0.03, 0.1)}
  c.eval.tasks_per_batch = 8
  c.eval.support_chunks = 1
  c.eval.decode.num_beams = 4
  c.eval.decode.max_new_tokens = 8
  c.eval.decode.batch_size = 0
  c.tams.width = 8  # d_model / 8, as the paper's 768 -> 64 (TAMS stays off unless config.tams.enabled=True)
  c.tams.hidden = 32
  c.tams.anneal_steps = 150  # = config.meta.steps
