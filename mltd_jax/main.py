"""Command line: ``python -m mltd_jax.main --config=configs/multidomain_lm.py:tiny --workdir=DIR``.

Fields of the config can be overridden with ``--config.meta.steps=100`` and the like (the config is locked: a
misspelt field is an error that names it). Everything else happens in `mltd_jax.train`.
"""

from __future__ import annotations

import logging
import os

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config", None, "Path to a get_config() file, e.g. configs/multidomain_lm.py:tiny.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for config.json, metrics.jsonl, TensorBoard, checkpoints, eval.json.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
  for noisy in ("absl", "orbax", "jax"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  from mltd_jax import train  # after flag parsing, so --help is fast

  train.train_and_evaluate(FLAGS.config, os.path.expanduser(FLAGS.workdir))


if __name__ == "__main__":
  app.run(main)
