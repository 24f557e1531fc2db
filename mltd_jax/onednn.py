"""oneDNN's matmul as an XLA:CPU custom call (XLA FFI), for the products XLA:CPU runs slowly.

XLA:CPU gives its fast matmul library (YNNPACK) only products whose left operand contracts its minor axis. Every weight
gradient x^T g contracts the token axis, the major one, and goes to Eigen, without AMX: the bfloat16 model's weight
gradients (`mltd_jax.matmul`) ran there in float32 at 96-182 GFLOP/s, against 463-906 for oneDNN with bfloat16 operands
on the same 2-core Xeon, and its thin low-rank ones x^T (g V) at 6-32 against 37-72 (`python benchmarks/xla_cpu_dots.py
--part onednn`, benchmarks/PERFORMANCE_LOG.md "Changed 2026-11-27 (session 11): oneDNN for the weight gradients").
`csrc/onednn_matmul.cc` is a custom call computing op(a) @ op(c) with oneDNN's matmul primitive (AMX kernels for
bfloat16 where the CPU has them), float32 sums and result; `mltd_jax.matmul` uses it for the weight gradients of
bfloat16 and (since session 14) float32 products on XLA:CPU, and (since session 15) for every float32 product there. It
cuts a product into pieces for the threads of XLA's intra-op pool, each piece single-threaded oneDNN (its OpenMP threads
beside XLA's slowed the meta-step down: the source says how).

The kernel is compiled on first use with the system's C++ compiler against the headers and library of the
``onednn-devel-cpu-gomp`` / ``onednn-cpu-gomp`` wheels in this Python environment (requirements.txt) and XLA's FFI
headers (jaxlib), into ``$MLTD_JAX_CACHE`` (default ``~/.cache/mltd_jax``), one file per source, environment,
oneDNN and jaxlib version and compile command. Without a compiler or the wheels, or on a CPU without native bfloat16
arithmetic (oneDNN would emulate bfloat16; float32 then keeps XLA's products too, a conservative choice: the float32
gain was measured on an AMX Xeon only), `available` is False with one warning saying why; with ``MLTD_JAX_ONEDNN=0``
in the environment it is False silently. It is False too where the process has more than one device: the custom call
has no partitioning rule, so under a mesh XLA would gather its operands onto every device (each would compute every
task's weight gradients). Then `mltd_jax.matmul` lets XLA compute every product, as before.

The same library holds a second, trivial custom call, an aliasing identity: `materialized_cotangent` passes a
cotangent through it so that XLA:CPU computes that value once rather than fusing it into each consumer (GPT-2's
residual stream, session 19).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

TARGET = "mltd_onednn_matmul"
MATERIALIZE = "mltd_materialize"  # the same library's identity custom call (`materialized_cotangent`)
SOURCE = Path(__file__).parent / "csrc" / "onednn_matmul.cc"
ENV = "MLTD_JAX_ONEDNN"
_FIX = (
  "pip install onednn-cpu-gomp==2023.2.0 onednn-devel-cpu-gomp==2023.2.0 (requirements.txt) and a C++17 compiler "
  f"(c++ on PATH, or $CXX); {ENV}=0 turns the kernel off"
)
_enabled = True
# Where requirements.txt installs the oneDNN wheels (they exist for x86-64 Linux only).
WHEELS_HERE = sys.platform == "linux" and platform.machine() == "x86_64"


class Unavailable(RuntimeError):
  """The kernel cannot be built or loaded here; the message says what is missing and how to fix it."""


class UnsupportedCPU(Unavailable):
  """This CPU lacks what the kernel is for (native bfloat16 arithmetic): the machine's property, not the set-up's."""


def cache_dir() -> Path:
  return Path(os.environ.get("MLTD_JAX_CACHE") or Path.home() / ".cache" / "mltd_jax")


def _prefix() -> Path:
  """The environment prefix where pip put the oneDNN wheels' ``include/`` and ``lib/`` (their data files)."""
  prefix = Path(sys.prefix)
  for need in (prefix / "include" / "oneapi" / "dnnl" / "dnnl.hpp", prefix / "lib" / "libdnnl.so"):
    if not need.is_file():
      raise Unavailable(f"oneDNN kernel: {need} is missing; {_FIX}.")
  return prefix


def _command(prefix: Path, out: str) -> list[str]:
  cxx = shlex.split(os.environ.get("CXX", "")) or [shutil.which("c++") or shutil.which("g++") or ""]  # "ccache g++"
  if not cxx[0]:
    raise Unavailable(f"oneDNN kernel: no C++ compiler (c++ or g++ on PATH, or $CXX); {_FIX}.")
  return [*cxx, "-O2", "-std=c++17", "-shared", "-fPIC",  # jaxlib's headers as system ones: their warnings only
          f"-isystem{jax.ffi.include_dir()}", f"-I{prefix / 'include'}", str(SOURCE),
          f"-L{prefix / 'lib'}", "-ldnnl", "-lgomp", f"-Wl,-rpath,{prefix / 'lib'}", "-o", out]  # fmt: skip


def library_path() -> Path:
  """Where the compiled kernel lies (built or not): named by a hash of everything it is built from (the source, this
  environment, its oneDNN version header, jaxlib's version and the compile command), since it links the
  environment's ``libdnnl`` by path."""
  prefix = _prefix()
  version = prefix / "include" / "oneapi" / "dnnl" / "dnnl_version.h"
  key = [SOURCE.read_bytes(), str(prefix).encode(), version.read_bytes(), jaxlib.__version__.encode(),
         " ".join(_command(prefix, "OUT")).encode()]  # fmt: skip
  digest = hashlib.sha256(b"\0".join(key)).hexdigest()[:16]
  return cache_dir() / f"libmltd_onednn-{digest}.so"


def _sizes(path: Path) -> Path:
  """The file recording a built library's size: a copy cut short (a full disk, a killed copy) is rebuilt, never
  loaded (loading a truncated library can kill the process with SIGBUS)."""
  return path.with_suffix(".size")


def _intact(path: Path) -> bool:
  try:
    return int(_sizes(path).read_text()) == path.stat().st_size
  except (OSError, ValueError):
    return False


def build(path: Path | None = None) -> Path:
  """Compiles the kernel to ``path`` (default `library_path`), atomically; returns the path. Raises `Unavailable`."""
  path = path or library_path()
  prefix = _prefix()
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
  except OSError as e:
    raise Unavailable(f"oneDNN kernel: cannot write into {path.parent} ({e}); set MLTD_JAX_CACHE to a writable "
                      f"directory, or {ENV}=0.") from e  # fmt: skip
  os.close(fd)
  try:
    cmd = _command(prefix, tmp)
    try:
      done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
      raise Unavailable(f"oneDNN kernel: {' '.join(cmd)} failed: {e}\n{_FIX}.") from e
    if done.returncode != 0:
      raise Unavailable(f"oneDNN kernel: {' '.join(cmd)} failed:\n{done.stderr[-2000:]}\n{_FIX}.")
    record = Path(tmp).with_suffix(".size")  # written before the library: an existing .so always has its record
    record.write_text(str(os.path.getsize(tmp)))
    os.replace(record, _sizes(path))
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return path


# oneDNN's effective CPU ISA (dnnl_cpu_isa_t, dnnl_types.h): bit masks, each ISA containing the ones below it. Native
# bfloat16 arithmetic: avx512_core_bf16 (0xe7; AMX, 0xfef, contains it) or avx2_vnni_2 (0x1f).
_BF16_ISAS = (0xE7, 0x1F)


def _open(path: Path) -> ctypes.CDLL:
  lib = ctypes.CDLL(str(path))
  isa = lib.dnnl_get_effective_cpu_isa()  # found through the kernel's link to libdnnl
  if not any(isa & bits == bits for bits in _BF16_ISAS):
    raise UnsupportedCPU(f"oneDNN kernel: this CPU has no native bfloat16 arithmetic (oneDNN's ISA {isa:#x}; "
                         f"emulated it would be slower than XLA); {ENV}=0 silences this.")  # fmt: skip
  return lib


@contextlib.contextmanager
def _building(path: Path) -> Iterator[None]:
  """An exclusive lock on ``path``'s ``.lock`` file while it is built (nothing when the folder is not writable:
  `build` then says so)."""
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = open(path.with_suffix(".lock"), "w")  # noqa: SIM115  held for the block
  except OSError:
    yield
    return
  with lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    yield


@functools.cache
def _load() -> Exception | None:
  """Builds (when not cached or not intact) and registers the kernel once per process: None, or why it is
  unavailable (the exception; its message says why and the fix). A loaded library stays loaded for the process
  (dlopen hands back the same one), so a damaged file that did load is replaced for the next process only."""
  try:
    path = library_path()
    if not (path.is_file() and _intact(path)):
      with _building(path):  # one process builds; another (a pytest-xdist worker) waits, then finds it built
        if not (path.is_file() and _intact(path)):
          build(path)
    try:
      lib = _open(path)
    except OSError:  # damaged (dlopen loaded nothing): build it again once
      lib = _open(build(path))
    targets = lib.MltdOnednnMatmul, lib.MltdMaterialize  # a library without them: the warning names the symbol
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(targets[0]), platform="cpu")
    jax.ffi.register_ffi_target(MATERIALIZE, jax.ffi.pycapsule(targets[1]), platform="cpu")
  except Exception as e:  # noqa: BLE001  whatever it is, XLA computes the products; the warning says why
    logging.warning("%s XLA computes those products instead.", e)
    return e
  return None


def unsupported_cpu() -> bool:
  """Whether the kernel is unavailable because of this CPU (`UnsupportedCPU`), not of the set-up."""
  return jax.default_backend() == "cpu" and isinstance(_load(), UnsupportedCPU)


def available() -> bool:
  """Whether `product` may be used: the default backend is XLA:CPU with one device (the call has no partitioning
  rule), the kernel is on (``MLTD_JAX_ONEDNN`` not 0, not inside `disabled`), and it builds and loads (once per
  process) on a CPU with native bfloat16 arithmetic."""
  if not _enabled or os.environ.get(ENV, "1") == "0" or jax.default_backend() != "cpu" or jax.device_count() != 1:
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


# A float32 result at most this many columns wide, from a^T c, is computed transposed (`product`).
THIN = 16


def product(a: jax.Array, c: jax.Array, *, transpose_a: bool = False, transpose_b: bool = False) -> jax.Array:
  """op(a) @ op(c) batched over equal leading axes, by the kernel (call only where `available`).

  a [*b, M, K] ([*b, K, M] with ``transpose_a``), c [*b, K, N] ([*b, N, K] with ``transpose_b``), both float32 or
  both bfloat16 -> [*b, M, N] float32 (products summed in float32).
  """
  m = a.shape[-1] if transpose_a else a.shape[-2]
  n = c.shape[-2] if transpose_b else c.shape[-1]
  if transpose_a and not transpose_b and n <= THIN < m and a.dtype == c.dtype == jnp.float32:
    # a^T c with a thin result (a difference's x^T (dY V) [C_in, r]) as (c^T a)^T, XLA transposing the small result:
    # oneDNN runs that form faster on this project's Xeon (one core, hot operands, 508 rows, r 8: [1024 | 768 | 256, 8]
    # in 170 / 76 / 26 µs against 251 / 171 / 59: 1.5-2.3x), the float32 second-order meta-step 1.025x [0.986-1.055]
    # (experiments/results/session18_cpu.jsonl). Not in bfloat16: alone 1.2-1.4x faster too, but that step 0.992x.
    return jnp.swapaxes(product(c, a, transpose_a=True), -1, -2)
  out = jax.ShapeDtypeStruct((*a.shape[:-2], m, n), jnp.float32)
  return jax.ffi.ffi_call(TARGET, out)(a, c, transpose_a=transpose_a, transpose_b=transpose_b)


# The cotangent barrier: an identity on the forward pass whose cotangent goes through the library's identity custom
# call (``now``: lowered to that call; else a no-op). XLA:CPU duplicates cheap elementwise producers into every
# consuming fusion; a transformer's residual-stream cotangent is a sum over all later sublayers, so without a
# barrier each block's backward recomputed the whole sum inside its own fusions (fusions of 39-80 operands, the
# work growing with the square of the depth). Through the call, each block's cotangent is computed once.
_barrier_p = Primitive("mltd_cotangent_barrier")
_barrier_p.def_impl(lambda x, *, now: x)
_barrier_p.def_abstract_eval(lambda x, *, now: x)
ad.deflinear2(_barrier_p, lambda ct, x, *, now: [_barrier_p.bind(ct, now=True)])
batching.defvectorized(_barrier_p)
mlir.register_lowering(_barrier_p, lambda ctx, x, *, now: [x])  # accelerators, and the forward pass: nothing


def _materialize_cpu(x, *, now):
  if not now:
    return x
  out = jax.ShapeDtypeStruct(x.shape, x.dtype)
  return jax.ffi.ffi_call(MATERIALIZE, out, input_output_aliases={0: 0})(x)


mlir.register_lowering(_barrier_p, mlir.lower_fun(_materialize_cpu, multiple_results=False), platform="cpu")


def materialized_cotangent(x: jax.Array) -> jax.Array:
  """x itself; its cotangent (and, under forward-over-reverse, that cotangent's tangent) is computed once into a
  buffer of its own on XLA:CPU with the kernel (`available`), not re-fused into each consumer. Elsewhere x, untouched.

  GPT-2's float32 blocks call it on the residual stream, before each sublayer: the second-order float32 meta-step at
  the peer's shapes 1.026x [1.010-1.036] in one process (12 pairs), first order 1.010x [0.981-1.062], its updates
  bit-identical there (elsewhere equal up to the order of float32 sums: XLA fuses differently, e.g. 4e-7 relative in
  a tiny model's Hessian-vector product); the same with the forward value materialized too measured 1.034x against
  1.030x for the cotangent alone (noise apart: not done). In bfloat16 0.981x [0.933-1.024]
  (experiments/results/session19_cpu.jsonl). It needs the kernel's library, so it is on and off with the kernel
  (`available`, `disabled`, ``MLTD_JAX_ONEDNN``): an A/B of the kernel on and off includes it.
  """
  return _barrier_p.bind(x, now=False) if available() else x
