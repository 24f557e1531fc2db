"""`mltd_jax.hostmem`: the huge-page tunable in an environment, the kernel's mode, the hint, the trim."""

import pytest

from mltd_jax import hostmem


def test_with_hugepages_sets_or_removes_only_the_hugetlb_tunable():
  assert hostmem.with_hugepages({}) == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  env = {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0"}
  on = hostmem.with_hugepages(env)
  assert on == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}
  assert hostmem.with_hugepages(on, on=False) == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
  assert hostmem.with_hugepages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, on=False) == {}
  assert env["GLIBC_TUNABLES"].endswith("hugetlb=0")  # the given mapping is not changed


@pytest.mark.parametrize(
  "text, mode", [("always [madvise] never\n", "madvise"), ("[always] madvise never\n", "always"), ("garbled", None)]
)
def test_transparent_hugepages_reads_the_bracketed_mode(tmp_path, text, mode):
  path = tmp_path / "enabled"
  path.write_text(text)
  assert hostmem.transparent_hugepages(path) == mode
  assert hostmem.transparent_hugepages(tmp_path / "missing") is None


def test_hugepages_needs_the_tunable_only_where_the_kernel_waits_for_advice(tmp_path):
  def mode(text):
    path = tmp_path / "enabled"
    path.write_text(text)
    return path

  on, off = hostmem.with_hugepages({}), {}
  assert hostmem.hugepages(on, mode("always [madvise] never")) and not hostmem.hugepages(off, mode("[madvise]"))
  assert hostmem.hugepages(off, mode("[always] madvise never"))  # the kernel does it unasked
  assert not hostmem.hugepages(on, mode("always madvise [never]")) and not hostmem.hugepages(on, tmp_path / "none")
  assert not hostmem.hugepages(on, mode("[madvise]"), glibc=lambda: (2, 34))  # glibc ignores the tunable before 2.35
  assert not hostmem.hugepages(on, mode("[madvise]"), glibc=lambda: None)  # not glibc
  assert not hostmem.hugepages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1:glibc.malloc.hugetlb=0"}, mode("[madvise]"))


def test_glibc_version_is_the_c_librarys_own():
  """The (major, minor) that glibc's own gnu_get_libc_version() returns (called through ctypes); None where the C
  library has no such function (not glibc: musl, macOS)."""
  import ctypes

  version = hostmem.glibc_version()
  try:
    get = ctypes.CDLL(None).gnu_get_libc_version
  except (AttributeError, OSError):
    assert version is None
    return
  get.restype = ctypes.c_char_p
  assert version == tuple(int(v) for v in get().decode().split(".")[:2])


def test_hint_only_for_a_cpu_process_without_huge_pages(monkeypatch):
  monkeypatch.setattr(hostmem, "transparent_hugepages", lambda path=None: "madvise")
  monkeypatch.setattr(hostmem, "glibc_version", lambda: (2, 36))
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  assert "GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in hostmem.hint("cpu")
  assert hostmem.hint("gpu") is None
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
  assert hostmem.hint("cpu") is None
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")  # the user's choice: no advice
  assert hostmem.hint("cpu") is None
  monkeypatch.delenv("GLIBC_TUNABLES")
  monkeypatch.setattr(hostmem, "glibc_version", lambda: (2, 31))  # a glibc without the tunable
  assert hostmem.hint("cpu") is None
  hostmem.release()  # glibc's malloc_trim, or nothing: must not raise
