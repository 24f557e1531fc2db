"""Command line: ``python -m mltd_jax.main --config=configs/multidomain_lm.py:tiny --workdir=DIR``.

Fields of the config can be overridden with ``--config.meta.steps=100`` and the like (the config is locked: a
misspelt field is an error that names it). Everything else happens in `mltd_jax.train`.

Devices: every device is used (``config.mesh``; on CPU ``XLA_FLAGS=--xla_force_host_platform_device_count=4``
makes 4). Multi-host: run the same command on every host; `jax.distributed.initialize` is called when the
environment is a TPU pod or a SLURM job (or ``--config.mesh.coordinator_address`` etc. are set), and only process
0 logs, prints and writes metrics and eval.json.
"""

from __future__ import annotations

import logging
import os
import sys

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
  from mltd_jax import sharding, train  # after flag parsing, so --help is fast

  sharding.initialize_distributed(FLAGS.config.get("mesh"))  # multi-host: before anything touches a device
  if not sharding.is_main_process():  # only process 0 logs progress and prints the report
    logging.getLogger("mltd_jax").setLevel(logging.WARNING)
    sys.stdout = open(os.devnull, "w")
  train.train_and_evaluate(FLAGS.config, os.path.expanduser(FLAGS.workdir))


if __name__ == "__main__":
  app.run(main)
