"""oneDNN's matmul as an XLA:CPU custom call (XLA FFI), for the products XLA:CPU runs slowly.

XLA:CPU gives its fast matmul library (YNNPACK) only products whose left operand contracts its minor axis. Every
weight gradient x^T g contracts the token axis, the major one, and goes to Eigen: 132-150 GFLOP/s with bfloat16
operands (no AMX) against 545-985 through oneDNN on the same 2-core Xeon, and the thin low-rank ones x^T (g V) run
at 9-15 GFLOP/s against 33-83 (`python benchmarks/xla_cpu_dots.py --part onednn`, README "Changed: oneDNN for the
transposed products"). `csrc/onednn_matmul.cc` is a custom call computing op(a) @ op(c) with oneDNN's matmul
primitive (its AMX kernels for bfloat16, AVX-512 ones for float32), float32 sums and result; `mltd_jax.matmul` uses it
for those products on XLA:CPU.

The kernel is compiled on first use with the system's C++ compiler against the headers and library of the
``onednn-devel-cpu-gomp`` / ``onednn-cpu-gomp`` wheels (requirements.txt) and XLA's FFI headers (jaxlib), into
``$MLTD_JAX_CACHE`` (default ``~/.cache/mltd_jax``), one file per source and jaxlib version. Without a compiler or
the wheels, or with ``MLTD_JAX_ONEDNN=0`` in the environment, `available` is False (with one warning naming what is
missing) and `mltd_jax.matmul` lets XLA compute every product, as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp

TARGET = "mltd_onednn_matmul"
SOURCE = Path(__file__).parent / "csrc" / "onednn_matmul.cc"
ENV = "MLTD_JAX_ONEDNN"
_FIX = (
  "pip install onednn-cpu-gomp==2023.2.0 onednn-devel-cpu-gomp==2023.2.0 (requirements.txt) and a C++17 compiler "
  f"(c++ on PATH, or $CXX); {ENV}=0 turns the kernel off"
)
_enabled = True


class Unavailable(RuntimeError):
  """The kernel cannot be built or loaded here; the message says what is missing and how to fix it."""


def cache_dir() -> Path:
  return Path(os.environ.get("MLTD_JAX_CACHE") or Path.home() / ".cache" / "mltd_jax")


def _prefix() -> Path:
  """The environment prefix where pip put the oneDNN wheels' ``include/`` and ``lib/`` (their data files)."""
  prefix = Path(sys.prefix)
  for need in (prefix / "include" / "oneapi" / "dnnl" / "dnnl.hpp", prefix / "lib" / "libdnnl.so"):
    if not need.is_file():
      raise Unavailable(f"oneDNN kernel: {need} is missing; {_FIX}.")
  return prefix


def library_path() -> Path:
  """Where the compiled kernel for this source and jaxlib lies (whether built or not)."""
  tag = hashlib.sha256(SOURCE.read_bytes() + jax.__version__.encode()).hexdigest()[:16]
  return cache_dir() / f"libmltd_onednn-{tag}.so"


def build(path: Path | None = None) -> Path:
  """Compiles the kernel to ``path`` (default `library_path`), atomically; returns the path. Raises `Unavailable`."""
  path = path or library_path()
  prefix = _prefix()
  cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
  if not cxx:
    raise Unavailable(f"oneDNN kernel: no C++ compiler (c++ or g++ on PATH, or $CXX); {_FIX}.")
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
  os.close(fd)
  cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-Wno-attributes", "-Wno-return-type",
         f"-I{jax.ffi.include_dir()}", f"-I{prefix / 'include'}", str(SOURCE),
         f"-L{prefix / 'lib'}", "-ldnnl", f"-Wl,-rpath,{prefix / 'lib'}", "-o", tmp]  # fmt: skip
  done = subprocess.run(cmd, capture_output=True, text=True)
  if done.returncode != 0:
    os.unlink(tmp)
    raise Unavailable(f"oneDNN kernel: {' '.join(cmd)} failed:\n{done.stderr[-2000:]}\n{_FIX}.")
  os.replace(tmp, path)
  return path


@functools.cache
def _load() -> str | None:
  """Builds (when not cached) and registers the kernel once per process: None, or why it is unavailable."""
  try:
    path = library_path()
    if not path.is_file():
      build(path)
    lib = ctypes.cdll.LoadLibrary(str(path))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.MltdOnednnMatmul), platform="cpu")
  except (Unavailable, OSError) as e:
    logging.warning("%s XLA computes those products instead.", e)
    return str(e)
  return None


def available() -> bool:
  """Whether `product` may be used: the default backend is XLA:CPU, the kernel is on (``MLTD_JAX_ONEDNN`` not 0,
  not inside `disabled`) and it builds and loads (once per process)."""
  if not _enabled or os.environ.get(ENV, "1") == "0" or jax.default_backend() != "cpu":
    return False
  return _load() is None


@contextlib.contextmanager
def disabled() -> Iterator[None]:
  """Within it, functions traced see `available` False (XLA computes every product): for A/B measurements."""
  global _enabled
  before, _enabled = _enabled, False
  try:
    yield
  finally:
    _enabled = before


def product(a: jax.Array, c: jax.Array, *, transpose_a: bool = False, transpose_b: bool = False) -> jax.Array:
  """op(a) @ op(c) batched over equal leading axes, by the kernel (call only where `available`).

  a [*b, M, K] ([*b, K, M] with ``transpose_a``), c [*b, K, N] ([*b, N, K] with ``transpose_b``), both float32 or
  both bfloat16 -> [*b, M, N] float32 (products summed in float32).
  """
  m = a.shape[-1] if transpose_a else a.shape[-2]
  n = c.shape[-2] if transpose_b else c.shape[-1]
  out = jax.ShapeDtypeStruct((*a.shape[:-2], m, n), jnp.float32)
  return jax.ffi.ffi_call(TARGET, out)(a, c, transpose_a=transpose_a, transpose_b=transpose_b)
