"""Shared fixtures: every test runs offline on files it makes itself (never ../shared, never the hub)."""

import atexit
import os
import re
import shutil
import tempfile

# Forced, not defaulted: a user's HF_HUB_OFFLINE=0 (README, online use) or a 4-device XLA_FLAGS would let tests reach
# the hub or change what they measure, and pass here but not in CI. Other XLA flags of yours are kept.
os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"
_flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", "")).split()
os.environ["XLA_FLAGS"] = " ".join([*_flags, "--xla_force_host_platform_device_count=1"])

# One persistent compilation cache for the session, shared with the subprocess runs of `mltd_jax.main`: the suite
# compiles the same tiny steps many times (each end-to-end run, each resume), and XLA:CPU reads them back instead.
# Set in pytest-xdist's controller too, so both workers share it: JAX writes entries without a lock, and a half-written
# entry read by the other worker only gives a warning and a recompilation.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="mltd-jax-test-cache-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)
