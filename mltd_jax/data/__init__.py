"""Task sources (a task = support examples + query examples), tokenizers, and encoders of examples into arrays.

Sources: `FactsFamily` (synthetic, offline), `JsonlTasks` (a JSON Lines file of texts or pairs), `AdaptSumTasks`
(the AdaptSum summarization domains), `TfdsTasks` (TFDS datasets through array_record random access).
Data knows nothing of models beyond a tokenizer. `build(config.data)` returns the tokenizer and task source that
the training loop uses; sources are registered in `SOURCES`. `build_encoder(kind, tokenizer, config.data)` returns
the encoder (registered in `ENCODERS`) that turns a model family's examples into fixed-shape arrays; `episodes`
assembles those into task, meta-training and pretraining batches.
"""

from mltd_jax.data.adaptsum import AdaptSumTasks
from mltd_jax.data.encoders import ENCODERS, CausalLMEncoder, Seq2SeqEncoder, build_encoder
from mltd_jax.data.jsonl import JsonlTasks
from mltd_jax.data.sources import SOURCES, build
from mltd_jax.data.synthetic import FactsFamily
from mltd_jax.data.tasks import Example, Task, TaskSource
from mltd_jax.data.tfds_source import TfdsTasks
from mltd_jax.data.tokenizers import byte_level_tokenizer, load_tokenizer, word_level_tokenizer

__all__ = [
  "ENCODERS",
  "SOURCES",
  "AdaptSumTasks",
  "CausalLMEncoder",
  "Example",
  "FactsFamily",
  "JsonlTasks",
  "Seq2SeqEncoder",
  "Task",
  "TaskSource",
  "TfdsTasks",
  "build",
  "build_encoder",
  "byte_level_tokenizer",
  "load_tokenizer",
  "word_level_tokenizer",
]
