"""Host memory of a process that runs XLA:CPU steps: hand the compiler's memory back, back the steps with huge pages.

XLA:CPU allocates each call's temporary buffer afresh (one ``posix_memalign`` of the whole buffer: 408 MB for the
first-order meta-step at the peer's shapes, `benchmarks/meta_step.py`), and glibc serves an allocation that large with a
new ``mmap`` and unmaps it on free. Every call then touches hundreds of MB of new 4 KB pages, each faulted in and zeroed
by the kernel: about 107,000 page faults per first-order step here. glibc's tunable ``glibc.malloc.hugetlb=1`` has it
ask for transparent huge pages (``madvise(MADV_HUGEPAGE)``) on those mappings: about 600 faults per step instead, and on
the project's 2-core VM the plain forward+backward step ran 1.14-1.15x as fast, the adaptation steps 1.15-1.41x and the
first-order meta-step 1.10x (processes run in turn; benchmarks/PERFORMANCE_LOG.md, "Changed 2026-11-27 (session 9): huge
pages"). The tunable is read once, when the process starts, so it has to be in the environment of the Python process
(``./run.sh`` exports it; `benchmarks/meta_step.py` passes it to the processes it measures, the PyTorch peer's
included); it takes effect only where the kernel's transparent huge pages are ``always`` or ``madvise``
(`transparent_hugepages`).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Mapping
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb"
HUGEPAGES = TUNABLE + "=1"
THP_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def release() -> None:
  """Return the C heap's free pages to the operating system (glibc's ``malloc_trim``; a no-op elsewhere)."""
  try:
    trim = getattr(ctypes.CDLL("libc.so.6"), "malloc_trim", None)
  except OSError:  # not glibc
    return
  if trim is not None:
    trim(0)


def with_hugepages(env: Mapping[str, str], on: bool = True) -> dict[str, str]:
  """A copy of ``env`` whose ``GLIBC_TUNABLES`` has ``glibc.malloc.hugetlb=1`` (``on``) or no hugetlb entry.

  Other tunables in the colon-separated list are kept in order; an empty list removes the variable.
  """
  out = dict(env)
  items = [t for t in _tunables(env) if not t.startswith(TUNABLE + "=")] + ([HUGEPAGES] if on else [])
  if items:
    out["GLIBC_TUNABLES"] = ":".join(items)
  else:
    out.pop("GLIBC_TUNABLES", None)
  return out


def transparent_hugepages(path: Path = THP_FILE) -> str | None:
  """The kernel's transparent huge page mode, ``always``, ``madvise`` or ``never`` (None: not Linux, or no THP)."""
  try:
    text = path.read_text()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1 : end] if 0 <= start < end else None


def glibc_version() -> tuple[int, int] | None:
  """This process's glibc version, e.g. (2, 36); None where the C library is not glibc."""
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
    major, minor = version.split(".")[:2]
    return (int(major), int(minor)) if name == "glibc" else None
  except (AttributeError, OSError, ValueError):  # no confstr or no such name (not glibc), or an unexpected form
    return None


def _tunables(env: Mapping[str, str]) -> list[str]:
  """The non-empty ``name=value`` entries of ``env``'s colon-separated GLIBC_TUNABLES, in order."""
  return [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]


def _hugetlb(env: Mapping[str, str]) -> str | None:
  """The value of ``glibc.malloc.hugetlb`` in ``env``'s GLIBC_TUNABLES (the last entry wins, as in glibc)."""
  values = [t.split("=", 1)[1] for t in _tunables(env) if t.startswith(TUNABLE + "=")]
  return values[-1] if values else None


def hugepages(
  env: Mapping[str, str] = os.environ, thp: Path = THP_FILE, glibc: Callable[[], tuple[int, int] | None] | None = None
) -> bool:
  """Whether the large buffers of a process started with ``env`` get transparent huge pages: the kernel (mode read
  from ``thp``) gives them to every large mapping (``always``), or to advised ones (``madvise``) and ``env`` has a
  glibc that knows the tunable (2.35 or later; older ones ignore it) advise them. ``glibc``: the version's source
  (default `glibc_version`)."""
  mode = transparent_hugepages(thp)
  asked = _hugetlb(env) == "1" and ((glibc or glibc_version)() or (0, 0)) >= (2, 35)
  return mode == "always" or (mode == "madvise" and asked)


def hint(platform: str) -> str | None:
  """A one-line suggestion for a CPU run without huge pages that would get them with the tunable (kernel and glibc
  permitting), unless the user chose a ``glibc.malloc.hugetlb`` value (None otherwise)."""
  if platform != "cpu" or _hugetlb(os.environ) is not None or not hugepages(with_hugepages(os.environ)):
    return None
  if hugepages():  # the kernel gives them unasked (``always``)
    return None
  return (
    f"XLA:CPU steps run faster with huge pages for their buffers: start the process with "
    f"GLIBC_TUNABLES={HUGEPAGES} in its environment (./run.sh does; see mltd_jax/hostmem.py)"
  )
