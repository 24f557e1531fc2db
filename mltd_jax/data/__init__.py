"""Task sources (a task = support texts + query texts), tokenizers, and episodes of token ids.

Data knows nothing of models beyond a tokenizer. `build(config.data)` returns the tokenizer and task source that
the training loop uses; sources are registered in `SOURCES`.
"""

from mltd_jax.data.sources import SOURCES, build
from mltd_jax.data.synthetic import FactsFamily
from mltd_jax.data.tasks import Task, TaskSource
from mltd_jax.data.tokenizers import byte_level_tokenizer, load_tokenizer, word_level_tokenizer

__all__ = [
  "SOURCES",
  "FactsFamily",
  "Task",
  "TaskSource",
  "build",
  "byte_level_tokenizer",
  "load_tokenizer",
  "word_level_tokenizer",
]
