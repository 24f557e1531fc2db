"""What a model family provides to the rest of the code: one `Family` record per module (`gpt2.py`, ...).

Generic code (loading, saving, building, training) only ever talks to a `Family`; adding a family is one new
module that defines its `FAMILY` and one line in `registry.FAMILIES`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

# loss_fn(variables, batch, rng) -> (summed loss, weight): the mean is sum / weight; a pair lets chunked and
# multi-task means be exact (see mltd_jax.meta).
LossFn = Callable[[dict, Any, Any], Any]


@dataclasses.dataclass(frozen=True)
class Family:
  """A model family: its config, linen model, Hugging Face conversion, default TARP targets, loss and encoder.

  Attributes:
    model_type: the ``model_type`` of its transformers ``config.json`` (e.g. ``"gpt2"``).
    config_cls: frozen dataclass with transformers' field names (hashable, so jit can close over it).
    model: ``(config, dtype, remat) -> linen module`` with ``init_params(rng) -> params``.
    from_hf_config: ``config.json`` dict -> config (unsupported options are an error).
    to_hf_config: config -> ``config.json`` dict that transformers reads.
    from_state_dict: ``(transformers state dict (numpy, '.'-joined names), config) ->`` our flat '.'-joined param
      dict (prefixes, transposes, buffers and tied copies dropped, each copy checked to equal what it copies);
      names and shapes are then checked generically.
    to_state_dict: our flat '.'-joined params -> what transformers' ``from_pretrained`` reads.
    fresh_config: ``(fields, tokenizer, max_len, dropout) -> config`` of a randomly initialized model whose size is
      ``fields`` (config.model.init) and whose vocabulary and special tokens fit ``tokenizer``.
    default_targets: regex over Dense module paths that TARP reparameterizes when config.tarp.targets is "".
    make_loss: ``(model, train) -> loss_fn(variables, batch, rng) -> (sum, weight)``; ``train`` turns dropout on.
    encoder: the name of the `mltd_jax.data.ENCODERS` entry that makes its batches ("causal_lm", "seq2seq").
    task_tokens: ``batch -> (ids [..., L], mask [..., L])``, the input tokens whose mean embedding describes a task
      (TAMS' task embedding, `mltd_jax.tams.task_embedding`); None: the family does not support TAMS.
    embedding: ``params -> token embedding table [V, D]`` (the table ``task_tokens`` index); None as above.
    max_len: ``config -> the longest sequence its encoder may make`` (GPT-2: n_positions + 1, the last token
      only a target), or None for no limit (T5's relative positions); checked when a saved model is loaded.
  """

  model_type: str
  config_cls: type
  model: Callable[..., Any]
  from_hf_config: Callable[[dict], Any]
  to_hf_config: Callable[[Any], dict]
  from_state_dict: Callable[[dict[str, np.ndarray], Any], dict[str, np.ndarray]]
  to_state_dict: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
  fresh_config: Callable[..., Any]
  default_targets: str
  make_loss: Callable[..., LossFn]
  encoder: str
  task_tokens: Callable[[Any], tuple[Any, Any]] | None = None
  embedding: Callable[[dict], Any] | None = None
  max_len: Callable[[Any], int | None] = lambda config: None
