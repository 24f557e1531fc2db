"""Tokenized episodes: tasks of texts -> fixed-shape int32 arrays that the jitted steps take.

Every sequence is ``[bos] + tokens (+ [eos])`` padded to ``seq_len``; ``mask`` marks real tokens. Shapes:
  * an LM batch: ``{"ids": [B, L], "mask": [B, L]}``
  * a task: ``{"support": {"ids": [T, S, L], ...}, "query": {"ids": [Q, L], ...}}``, the support set repeated
    once per inner step (the inner loop scans over the leading T axis), and a meta-batch stacks tasks on axis 0.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mltd_jax.data.tasks import Task, TaskSource

Batch = dict[str, np.ndarray]


def encode(
  tokenizer, texts: Sequence[str], seq_len: int, *, add_eos: bool = False, truncate: bool = False, where: str = ""
) -> Batch:
  """Tokenize ``texts`` into ``{"ids", "mask"}`` of shape [len(texts), seq_len].

  Raises:
    ValueError: a text longer than ``seq_len`` tokens (unless ``truncate``); the message names the text.
  """
  pieces = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
  ids = np.full((len(texts), seq_len), tokenizer.pad_token_id, dtype=np.int32)
  mask = np.zeros((len(texts), seq_len), dtype=np.int32)
  for i, toks in enumerate(pieces):
    seq = [tokenizer.bos_token_id, *toks] + ([tokenizer.eos_token_id] if add_eos else [])
    if len(seq) > seq_len:
      if not truncate:
        raise ValueError(
          f"{where}text {i} has {len(seq)} tokens (with bos/eos) > config.data.seq_len={seq_len}; "
          "raise config.data.seq_len or set config.data.truncate=True."
        )
      seq = seq[:seq_len]
    ids[i, : len(seq)] = seq
    mask[i, : len(seq)] = 1
  return {"ids": ids, "mask": mask}


def encode_task(tokenizer, task: Task, seq_len: int, inner_steps: int, **kw) -> dict[str, Batch]:
  """One task's support (repeated ``inner_steps`` times) and query arrays."""
  support = encode(tokenizer, task.support, seq_len, where=f"task {task.name!r} support: ", **kw)
  query = encode(tokenizer, task.query, seq_len, where=f"task {task.name!r} query: ", **kw)
  tiled = {k: np.broadcast_to(v, (inner_steps, *v.shape)).copy() for k, v in support.items()}
  return {"support": tiled, "query": query}


def stack(trees: Sequence[dict]) -> dict:
  """Stack equally shaped nested dicts of arrays on a new leading (task) axis."""
  first = trees[0]
  if isinstance(first, dict):
    return {k: stack([t[k] for t in trees]) for k in first}
  return np.stack(trees)


def meta_batch(
  tokenizer, source: TaskSource, step: int, tasks_per_step: int, seq_len: int, inner_steps: int, **kw
) -> dict:
  """Meta-training batch of ``step``: tasks ``step * tasks_per_step + j`` of the stream (resumable by step)."""
  tasks = [source.train_task(step * tasks_per_step + j) for j in range(tasks_per_step)]
  return stack([encode_task(tokenizer, t, seq_len, inner_steps, **kw) for t in tasks])


def lm_batch(tokenizer, source: TaskSource, step: int, tasks_per_step: int, seq_len: int, **kw) -> Batch:
  """Multitask-pretraining batch of ``step``: all support and query texts of ``tasks_per_step`` stream tasks."""
  texts = []
  for j in range(tasks_per_step):
    task = source.train_task(step * tasks_per_step + j)
    texts += [*task.support, *task.query]
  return encode(tokenizer, texts, seq_len, where="pretraining ", **kw)
