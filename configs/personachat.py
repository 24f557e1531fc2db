"""MLtD on few-shot dialogue personalization (Persona-Chat) with GPT-2 (paper section 4.1, Table 1).

Each persona is a task: a model prepared by MLtD adapts to a new persona from a few of its dialogues (the support
set) and is scored on its other dialogues: perplexity of the gold responses, BLEU of beam-search responses
(sacrebleu) and hits@1 over the file's candidates, before and after adaptation, with adaptation wall-clock seconds.
The paper used a GloVe Transformer; we use GPT-2, our causal-LM family.

Paper scale (needs the hub model `gpt2` or a local save_pretrained directory, and ConvAI2's files, e.g. ParlAI's
`{train,valid,test}_self_original.txt` or `personachat_self_original.json`):
  python -m mltd_jax.main --config=configs/personachat.py --workdir=runs/personachat \
      --config.data.personachat.path=/path/to/personachat_dir
Local model and tokenizer file:
  python -m mltd_jax.main --config=configs/personachat.py --workdir=W --config.data.source=personachat \
      --config.data.personachat.path=FILE --config.model.name_or_dir=DIR --config.data.tokenizer=tokenizer.json
Tiny (offline: synthetic personas whose answers reveal their facts, a fresh 2-layer d=64 GPT-2; minutes on 2 CPUs):
  python -m mltd_jax.main --config=configs/personachat.py:tiny --workdir=runs/personachat_tiny

Every field not set here is documented in configs/multidomain_lm.py, whose defaults this config starts from.
The optional C-score (persona consistency by an NLI model, mltd_jax/consistency.py) is computed when
--config.eval.decode.nli_model names a transformers NLI checkpoint, and skipped otherwise.
"""

from pathlib import Path

import ml_collections

from mltd_jax import config_files


def _base() -> ml_collections.ConfigDict:
  """configs/multidomain_lm.py's defaults: every field of the pipeline, documented there once."""
  return config_files.load(Path(__file__).with_name("multidomain_lm.py")).get_config()


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = _base()
  c.model.name_or_dir = "gpt2"
  c.model.family = "gpt2"

  c.data.source = "personachat"
  c.data.tokenizer = "gpt2"
  c.data.seq_len = 256  # context (cut from the left) + response + eos
  c.data.add_eos = True
  # ConvAI2 / ParlAI Persona-Chat (mltd_jax/data/persona_chat.py documents every field).
  c.data.personachat = ml_collections.ConfigDict(
    dict(
      path="",
      format="auto",  # auto | txt | json
      support_dialogues=3,  # k-shot: dialogues of the persona to adapt on
      query_dialogues=1,
      support_size=18,  # turns per episode (fixed batch shapes); 0 = all turns of the chosen dialogues
      query_size=6,
      max_history_turns=0,
      include_persona=False,  # Madotto et al. (2019), whom the paper follows: the persona is learned, not read
      train_split="train",
      validation_split="valid",
      test_split="test",
      eval_episodes=1,
      max_eval_personas=0,
      encoding_errors="strict",  # strict | replace (non-UTF-8 bytes)
      max_line_chars=0,
      long_lines="error",  # error | truncate
    )
  )
  # The offline synthetic personas (mltd_jax/data/synthetic_personas.py documents every field).
  c.data.personas = ml_collections.ConfigDict(
    dict(
      n_slots=12,
      n_values=30,
      facts_per_persona=4,
      turns_per_dialogue=3,
      support_dialogues=4,
      query_dialogues=2,
      n_candidates=10,
      num_train_personas=0,
      num_eval_tasks=20,
    )
  )

  c.tarp.kind = "dynamic"
  c.tarp.rank = 4  # paper

  c.meta.steps = 2000
  c.meta.tasks_per_step = 16  # paper
  c.meta.task_chunk = 1
  c.meta.inner_steps = 10  # paper's T_in
  c.meta.inner_lr = 0.01  # paper: inner SGD
  c.meta.inner_optimizer = "sgd"
  c.meta.outer_lr = 3e-4  # paper: outer Adam

  c.eval.adapt_steps = 10
  c.eval.optimizer = "sgd"
  c.eval.lr_grid = {"default": (0.003, 0.01, 0.03, 0.1), "full": (1e-4, 3e-4, 1e-3, 3e-3)}
  c.eval.metrics = ("query",)  # perplexity of the gold responses (the encoder weights response tokens only)
  c.eval.select_by = ("query",)
  c.eval.decode.metrics = ("bleu",)  # hits@1 is added whenever the held-out tasks have candidates
  c.eval.decode.num_beams = 5  # paper
  c.eval.decode.max_new_tokens = 32
  c.eval.decode.batch_size = 8

  if arg == "tiny":
    tiny(c)
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of configs/personachat.py; use ':tiny' or nothing.")
  return c


def tiny(c: ml_collections.ConfigDict) -> None:
  """Offline: synthetic personas and a fresh 2-layer d=64 GPT-2 with the personas' word-level tokenizer."""
  c.log_every = 50
  c.checkpoint_every = 100
  c.model.name_or_dir = ""
  c.data.source = "personas"
  c.data.tokenizer = "personas"
  c.data.seq_len = 32  # the longest synthetic example is 32 tokens with bos and eos
  c.data.personas.num_eval_tasks = 8
  c.tarp.kind = "bilinear"
  c.tarp.rank = 4
  c.tarp.init_scale = 0.1
  c.pretrain.steps = 400
  c.pretrain.tasks_per_step = 8
  c.pretrain.lr = 3e-3
  c.pretrain.warmup_steps = 50
  c.meta.steps = 150
  c.tams.anneal_steps = 150  # = config.meta.steps (with --config.tams.enabled=True)
  c.meta.tasks_per_step = 4
  c.meta.task_chunk = 0
  c.meta.inner_steps = 3
  c.meta.inner_lr = 0.3
  c.meta.outer_lr = 1e-3
  c.eval.adapt_steps = 5
  c.eval.lr_grid = {"default": (0.1, 0.3, 1.0), "full": (0.03, 0.1, 0.3)}
  c.eval.tasks_per_batch = 8
  c.eval.decode.num_beams = 4
  c.eval.decode.max_new_tokens = 8
  c.eval.decode.batch_size = 0
