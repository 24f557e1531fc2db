"""The benchmark script runs and prints one JSON line per setting with the promised fields (no timing asserted)."""

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mltd_jax import hostmem

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "meta_step.py"


PEER_STUB = """import json, os, sys
args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
env = os.environ.get("GLIBC_TUNABLES")
print(json.dumps({"impl": "stub", "tokens_per_s": 100.0, "peak_rss_mb": 50, "args": args, "tunables": env}))
"""


def test_meta_step_benchmark_prints_json_lines_with_the_peer_and_the_modes(tmp_path):
  """Every mode in one call (CI time: one setting each); ``--peer`` runs the peer script with the same flags (a stub
  here: the tests must not need ../shared) and puts its line and the ratios into the meta-step's line."""
  stub = tmp_path / "peer.py"
  stub.write_text(PEER_STUB)
  tiny = ["--layers=1", "--d=16", "--heads=2", "--vocab=32", "--seq=8", "--tasks=2", "--shots=2", "--steps=1"]
  tiny += ["--pairs=3"]  # --mode adapt's paired calls
  cmd = [sys.executable, str(SCRIPT), *tiny, "--inner", "2", "--order", "2", "--mode", "fwdbwd", "adapt", "meta"]
  cmd += ["--peer", "--peer_script", str(stub), "--threads", "3"]
  out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
  rows = [json.loads(line) for line in out.stdout.splitlines()]
  assert [r["mode"] for r in rows] == ["fwdbwd", "adapt", "meta"], out.stderr
  fwdbwd, adapt, step = rows
  sys.path.insert(0, str(SCRIPT.parent))
  import meta_step

  for r in rows:
    assert r["cpu"] == meta_step.cpu_name() and (r["cpu"] is None or r["cpu"].strip())  # the machine, in every line
    assert r["tokens_per_s"] > 0 and r["compile_s"] > 0 and r["peak_rss_mb"] > 0 and r["xla_temp_mb"] is not None
    assert r["hugepages"] == hostmem.hugepages(hostmem.with_hugepages(os.environ))  # --hugepages 1, the default
  # tokens per step: tasks * (T_in + 1) * shots * seq (the adaptation step: one task batch); seconds are rounded
  assert 2 * 3 * 2 * 8 / fwdbwd["tokens_per_s"] == pytest.approx(fwdbwd["median_step_s"], abs=6e-5)
  assert 2 * 2 * 8 / adapt["tokens_per_s"] == pytest.approx(adapt["median_step_s"], abs=6e-5)
  assert 2 * 2 * 8 / adapt["full_tokens_per_s"] == pytest.approx(adapt["full_step_s"], abs=6e-5)
  low, high = adapt["tarp_speedup_range"]  # the median over --pairs pairs of full / TARP seconds, timed in turn
  assert 0 < low <= adapt["tarp_speedup"] <= high and adapt["pairs"] == 3  # --pairs, not --steps
  assert (step["order"], step["inner"], step["backward"]) == (2, 2, "auto")
  assert step["of_fwdbwd"] == pytest.approx(step["tokens_per_s"] / fwdbwd["tokens_per_s"], rel=1e-2)
  # FLOPs of every inner step and its HVP (an unrolled twin: XLA counts a loop body once), more than fwd+bwd's
  assert step["flops_per_step"] > 1.5 * fwdbwd["flops_per_step"] > 0
  assert adapt["full_flops_per_step"] > adapt["flops_per_step"] > 0  # full fine-tuning adds the weight gradients
  peer = step["peer"]["args"]
  assert peer == {"order": "2", "layers": "1", "d": "16", "heads": "2", "vocab": "32", "seq": "8", "tasks": "2",
                  "shots": "2", "inner": "2", "rank": "8", "steps": "1", "threads": "3"}  # fmt: skip
  assert "glibc.malloc.hugetlb=1" in step["peer"]["tunables"].split(":")  # the peer starts in our environment
  assert step["vs_peer"]["tokens_per_s"] == pytest.approx(step["tokens_per_s"] / 100.0, rel=1e-2)
  assert step["vs_peer"]["peak_mb"] == pytest.approx(step["peak_rss_mb"] / 50, rel=1e-2)
  for r in (*rows, step["peer"]):  # other programs' load while each ran (`meta_step.Load`; None without /proc/stat)
    assert r["others"] is None or set(r["others"]) == {"cores", "steal_cores", "seconds"}


def test_other_programs_load_is_measured_and_flagged(monkeypatch, capsys):
  """`meta_step.Load`: the CPUs' busy time less this process's own, per second of wall time (exact arithmetic on
  stubbed readings), and a real busy loop in another process while this one sleeps shows and is warned about; a
  summary keeps the busiest round's figure."""
  import resource
  import types

  sys.path.insert(0, str(SCRIPT.parent))
  import meta_step

  readings = {"clock": iter([10.0, 12.0]), "cpus": iter([(100.0, 5.0), (103.0, 5.1)])}
  rusage = iter([(0.5, 0.3), (1.4, 0.6)])  # (user, system) of this process: 1.2 s of its own in the span
  with monkeypatch.context() as m:
    m.setattr(meta_step, "cpu_seconds", lambda: next(readings["cpus"]))
    m.setattr(meta_step, "time", types.SimpleNamespace(perf_counter=lambda: next(readings["clock"])))
    m.setattr(resource, "getrusage", lambda who: next(rusage))
    load = meta_step.Load()
    assert load.others() == {"cores": 0.9, "steal_cores": 0.05, "seconds": 2.0}  # (3 - 1.2) / 2 and 0.1 / 2

  hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
  try:
    time.sleep(0.3)  # the hog is spinning
    load = meta_step.Load()
    time.sleep(1.2)  # this process does nothing (a warning needs a span of a second or more)
    row = meta_step.warn_if_busy({"others": load.others()}, "the test's sleeper")
  finally:
    hog.kill()
    hog.wait()
  assert row["others"]["cores"] > 0.5, row
  assert "while the test's sleeper ran, other programs kept" in capsys.readouterr().err
  rows = [{"others": {"cores": 0.05}, "peer": {"others": {"cores": 0.7}}}, {"others": {"cores": 0.2}}]
  assert meta_step.summarize(("meta", 2, 1, 1, "auto"), 4, rows)["others_cores_max"] == 0.7


def test_profile_meta_step_prints_time_by_kind_of_op(tmp_path):
  """`benchmarks/profile_meta_step.py`: one JSON line with the step's seconds, FLOPs and thunk time by kind; with
  ``--floor`` the kernel's products, in the step and each timed alone."""
  script = SCRIPT.parent / "profile_meta_step.py"
  tiny = ["--layers=1", "--d=16", "--heads=2", "--vocab=32", "--seq=8", "--tasks=2", "--shots=2", "--inner=1"]
  cmd = [sys.executable, str(script), *tiny, "--order=1", "--steps=1", "--top=3", "--trace", str(tmp_path / "t")]
  out = subprocess.run(
    [*cmd, "--floor", "--floor_calls=2", "--bytes"], cwd=tmp_path, capture_output=True, text=True, timeout=300
  )
  (row,) = [json.loads(line) for line in out.stdout.splitlines()] or [out.stderr]
  assert row["seconds"] > 0 and row["flops_loops_once"] > 0 and row["thunk_ms"] > 0
  traffic = row["rest_traffic"]  # --bytes: the non-product thunks' bytes and rate, numpy's copy rates beside them
  assert traffic["gb"] > 0 and 0 < traffic["ms"] <= row["thunk_ms"] and traffic["gb_per_s"] > 0
  assert set(traffic["copy_gb_per_s"]) == {"0.5MiB", "2MiB", "8MiB", "64MiB"}
  on_kernel = row["ms_by_kind"].get("custom calls (oneDNN)", 0)
  assert row["ms_by_kind"].get("matmuls", 0) + on_kernel > 0 and len(row["top"]) == 3
  from mltd_jax import onednn

  assert (on_kernel > 0) == onednn.available()  # float32 products on the oneDNN kernel where it is available
  if not onednn.available():
    assert row["products"] is None
    return
  products, top = row["products"], row["products_top"]
  assert products["in_step_ms"] == pytest.approx(on_kernel, abs=0.2)  # every custom call read from the HLO
  assert products["shapes"] >= len(top) == 3 and products["runs"] >= sum(r["runs"] for r in top) > 0
  assert all(r["alone_cold_ms"] > 0 and r["alone_hot_ms"] > 0 for r in top)
  assert top[0]["alone_cold_ms"] >= top[-1]["alone_cold_ms"]  # the costliest alone first
  a, c = top[0]["a"], top[0]["c"]  # one shape's FLOPs: 2 B M K N per run
  m, k = a[-2:][::-1] if top[0]["transpose_a"] else a[-2:]
  n = c[-2] if top[0]["transpose_b"] else c[-1]
  assert top[0]["gflop"] == pytest.approx(2 * math.prod(a[:-2]) * m * k * n * top[0]["runs"] / 1e9, rel=1e-3)
  assert products["rest_ms"] == pytest.approx(row["thunk_ms"] - products["in_step_ms"], abs=0.2)


def test_hlo_bytes_counts_each_thunks_output_and_operands_and_a_slice_as_read_in_part():
  """`profile_meta_step.hlo_bytes` on compiled programs: an elementwise fusion moves its operand and its output; a
  fusion that slices its operand is counted as reading a slice its output's size; a tuple's parts add up."""
  import jax
  import jax.numpy as jnp

  sys.path.insert(0, str(SCRIPT.parent))
  from profile_meta_step import hlo_bytes

  x = jnp.ones((64, 32), jnp.float32)  # 8 KiB

  def fusions(f):
    sizes = hlo_bytes(jax.jit(f).lower(x).compile().as_text())
    return {n: b for n, b in sizes.items() if "fusion" in n or n.startswith("wrapped")}

  assert list(fusions(lambda x: jnp.tanh(x) * 2.0).values()) == [8192 + 8192]
  assert list(fusions(lambda x: x[:, :16] * 2.0).values()) == [4096 + 4096]  # reads half of x: its output's size
  text = jax.jit(lambda x: (x * 2.0, x.sum(0))).lower(x).compile().as_text()
  pair = hlo_bytes(text)
  (root,) = [b for n, b in pair.items() if n.startswith("tuple")]
  assert root >= 8192 + 32 * 4  # the tuple's output: both parts
  import meta_parts

  assert hlo_bytes(list(meta_parts.hlo_instructions(text))) == pair  # the text parsed once by the caller: the same


def test_meta_parts_hvp_from_saved_products_is_the_same_product_with_fewer_flops(tmp_path):
  """`benchmarks/meta_parts.py`: a line per part; ``hvp_saved`` (the HVP from the linearization's saved products)
  equals ``hvp`` and counts fewer FLOPs; one task at a time is counted as every task (not one loop body)."""
  script = SCRIPT.parent / "meta_parts.py"
  tiny = ["--layers=1", "--d=16", "--heads=2", "--vocab=32", "--seq=8", "--tasks=2", "--shots=1", "--rank=2"]
  parts = ["grad_fast", "hvp", "linearize", "hvp_saved"]
  rows = {}
  for tasks_as in ("map", "vmap"):
    cmd = [sys.executable, str(script), *tiny, "--steps=1", f"--tasks_as={tasks_as}", "--parts", *parts]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    rows[tasks_as] = {r["part"]: r for r in map(json.loads, out.stdout.splitlines())} or out.stderr
  assert list(rows["map"]) == parts, rows["map"]
  assert rows["map"]["hvp_saved"]["max_abs_diff_vs_hvp"] < 1e-6
  assert rows["map"]["hvp_saved"]["gflop"] < rows["map"]["hvp"]["gflop"]
  assert all(rows["map"][p]["gflop"] == rows["vmap"][p]["gflop"] for p in parts)


def test_rounds_summary_gives_the_median_and_range_of_each_ratio():
  """``--rounds R``: one line per setting with the median, min and max over the rounds (no subprocess here)."""
  sys.path.insert(0, str(SCRIPT.parent))
  import meta_step

  rows = [
    {"tokens_per_s": t, "peak_rss_mb": 10.0, "of_fwdbwd": t / 10, "peer": {"tokens_per_s": p},
     "vs_peer": {"tokens_per_s": t / p, "peak_mb": 0.5}}
    for t, p in [(4.0, 2.0), (1.0, 2.0), (3.0, 1.0)]
  ]  # fmt: skip
  out = meta_step.summarize(("meta", 2, 1, 1, "auto"), 4, rows)
  assert (out["summary_of_rounds"], out["order"], out["backward"], out["inner"]) == (3, 2, "auto", 4)
  assert out["tokens_per_s"] == {"median": 3.0, "min": 1.0, "max": 4.0}
  assert out["vs_peer_tokens_per_s"] == {"median": 2.0, "min": 0.5, "max": 3.0}
  assert out["peer_tokens_per_s"]["median"] == 2.0 and out["vs_peer_peak_mb"]["max"] == 0.5
  adapt = meta_step.summarize(("adapt",), 4, [{"tarp_speedup": 1.2}, {"tarp_speedup": 1.5}, {"error": ["x"]}])
  assert adapt["tarp_speedup"] == {"median": pytest.approx(1.35), "min": 1.2, "max": 1.5}
  assert adapt["tokens_per_s"] is None
  assert out["hugepages"] is None and adapt["hugepages"] is None  # no round recorded it
  rounds = [{"hugepages": True}, {"error": ["x"]}, {"hugepages": True}]
  assert meta_step.summarize(("adapt",), 4, rounds)["hugepages"] is True  # the value the rounds agree on
  assert meta_step.summarize(("adapt",), 4, [{"hugepages": True}, {"hugepages": False}])["hugepages"] is None
  dtypes = [{"dtype": "bfloat16", "peer": {"dtype": "float32"}}] * 2
  summary = meta_step.summarize(("meta", 2, 1, 1, "auto"), 4, dtypes)
  assert (summary["dtype"], summary["peer_dtype"]) == ("bfloat16", "float32")
  cpus = [{"cpu": "AuthenticAMD AMD EPYC"}, {"error": ["x"]}, {"cpu": "AuthenticAMD AMD EPYC"}]
  assert meta_step.summarize(("adapt",), 4, cpus)["cpu"] == "AuthenticAMD AMD EPYC"  # the machine every round ran on
  assert meta_step.summarize(("adapt",), 4, [*cpus, {"cpu": "GenuineIntel Xeon"}])["cpu"] is None  # runs disagree


def test_task_chunk_default_is_one_task_at_a_time():
  """``--task_chunk -1``: the measured better layout, one task at a time for both orders and dtypes (since session
  13); an explicit value is kept; an unknown ``--dtype`` is refused."""
  sys.path.insert(0, str(SCRIPT.parent))
  import argparse

  import meta_step

  def pick(order: int, dtype: str, chunk: int = -1) -> int:
    return meta_step._task_chunk(argparse.Namespace(order=order, dtype=dtype, task_chunk=chunk))

  assert [pick(2, "float32"), pick(2, "bfloat16"), pick(1, "float32"), pick(1, "bfloat16")] == [1, 1, 1, 1]
  assert pick(1, "float32", 2) == 2 and pick(2, "bfloat16", 0) == 0
  out = subprocess.run([sys.executable, str(SCRIPT), "--dtype=f4"], capture_output=True, text=True, timeout=120)
  assert out.returncode != 0 and "--dtype: float32 or bfloat16, got 'f4'" in out.stderr


AUTOCAST_STUB = """import json, sys, torch
print(json.dumps({"tokens_per_s": 1.0, "argv": sys.argv[1:], "autocast": torch.is_autocast_enabled("cpu"),
                  "autocast_dtype": str(torch.get_autocast_dtype("cpu")), "cache": torch.is_autocast_cache_enabled()}))
"""


def test_the_peer_computes_in_our_dtype_under_autocast(tmp_path):
  """``--dtype bfloat16``: the peer's script runs under torch.autocast to bfloat16 (its products in bfloat16, like
  ours), with its flags unchanged; ``--peer_dtype float32`` (or ``--dtype float32``) runs it as it is."""
  sys.path.insert(0, str(SCRIPT.parent))
  import argparse

  import meta_step

  stub = tmp_path / "peer.py"
  stub.write_text(AUTOCAST_STUB)
  flags = {**meta_step.FIELDS, "dtype": "bfloat16", "order": [2], "inner": [4]}
  a = argparse.Namespace(**flags, peer_dtype="same", peer_script=stub, threads=1)
  row = meta_step.run_peer(a, dict(os.environ), 3, 1)
  assert (row["autocast"], row["autocast_dtype"], row["dtype"]) == (True, "torch.bfloat16", "bfloat16")
  assert row["cache"] is False  # no stale casts of parameters the optimizer updates in place
  assert "--inner=3" in row["argv"] and "--order=1" in row["argv"] and "--threads=1" in row["argv"]
  for dtype, peer_dtype in [("bfloat16", "float32"), ("float32", "same")]:
    a.dtype, a.peer_dtype = dtype, peer_dtype
    row = meta_step.run_peer(a, dict(os.environ), 3, 1)
    assert (row["autocast"], row["dtype"]) == (False, "float32")


@pytest.mark.parametrize("family, beams", [("gpt2", ["1", "2"]), ("t5", ["2"])])  # T5: one setting (CI time)
def test_decode_benchmark_prints_json_lines(tmp_path, family, beams):
  script = SCRIPT.parent / "decode.py"
  tiny = ["--layers=1", "--d=16", "--heads=2", "--vocab=32", "--batch=2", "--prompt=4", "--new=3", "--repeats=1"]
  cmd = [sys.executable, str(script), f"--family={family}", *tiny, "--beams", *beams, "--tarp", "none", "dynamic"]
  out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
  rows = [json.loads(line) for line in out.stdout.splitlines()]
  expected = [(int(b), t) for b in beams for t in ("none", "dynamic")]
  assert [(r["num_beams"], r["tarp"]) for r in rows] == expected, out.stderr
  for r in rows:
    assert r["family"] == family
    assert r["tokens_per_s"] > 0 and r["first_call_s"] > 0 and r["cost_vs_none"] > 0


def test_xla_cpu_dots_prints_a_line_per_product_with_its_kernel(tmp_path):
  """`benchmarks/xla_cpu_dots.py`: per product, the rates of each implementation and the kernels XLA chose; the
  transposed product written with explicit transposes equals the one JAX emits."""
  pytest.importorskip("torch")
  script = SCRIPT.parent / "xla_cpu_dots.py"
  tiny = ["--tokens=32", "--d=16", "--vocab=64", "--rank=8", "--heads=2", "--shots=4", "--seq=8", "--calls=2"]
  tiny += ["--part", "matmul", "transposed", "bfloat16"]
  kernel = (shutil.which("c++") or shutil.which("g++")) and os.environ.get("MLTD_JAX_ONEDNN", "1") != "0"
  from mltd_jax import onednn

  kernel = kernel and onednn.WHEELS_HERE and not onednn.unsupported_cpu()  # no wheels, or no native bf16: no rows
  extra = ["onednn"] if kernel else []
  out = subprocess.run([sys.executable, str(script), *tiny, *extra, "reduce", *(["ceiling"] if kernel else [])],
                       cwd=tmp_path, capture_output=True, text=True, timeout=900)  # fmt: skip
  rows = [json.loads(line) for line in out.stdout.splitlines()]
  parts = ["matmul"] * 6 + ["transposed"] * 3 + ["bfloat16"] * 5 + ["onednn"] * (10 if kernel else 0) + ["reduce"] * 3
  assert [r["part"] for r in rows] == parts + ["ceiling"] * (8 if kernel else 0), out.stderr
  if kernel:  # one core's float32 ceiling: the step's dense shapes at 8 and 32 tokens, then two large products
    ceiling, rows = rows[len(parts) :], rows[: len(parts)]
    shapes = [(m, k, n) for m in (8, 32) for k, n in ((16, 48), (16, 64), (64, 16))] + [(2048,) * 3, (4096, 1024, 1024)]
    assert [(r["m"], r["k"], r["n"]) for r in ceiling] == shapes
    for r in ceiling:
      assert r["onednn_f32_best_gflops"] >= r["onednn_f32_gflops"] > 0 and r["torch_f32_best_gflops"] > 0
      assert r["cpus"] >= 1 and r["max_abs_diff_vs_torch"] < 1e-2 * r["k"] ** 0.5
  for ones, r in enumerate(rows[-3:]):  # the softmax backward's reduction behind 0, 1, 2 axes of size 1
    assert r["shape"] == [1] * ones + [2 * 4, 7, 7] and r["leading_ones"] == ones and r["max_abs_diff"] < 1e-5
    assert r["kernel"] in ("ynnpack", "xla") and r["kernel_without_ynn_reduce"] == "xla"
    assert min(r[f"{k}_ms"] for k in ("ynnpack", "xla", "torch")) > 0
  rows = rows[:-3]
  for r in rows[14:]:  # x^T g through the kernel (both dtypes) and XLA, at 32 and 8 tokens
    assert r["tokens"] in (32, 8) and r["f32_max_abs_diff"] < 1e-4
    assert min(r[f"{k}_gflops"] for k in ("onednn_bf16", "onednn_f32", "xla_f32", "torch_bf16")) > 0
  rows = rows[:14]
  for r in rows[9:]:  # bfloat16 operands: each implementation's rate, and the kernel of the float32-accumulating one
    assert min(r[f"{k}_gflops"] for k in ("f32", "bf16_acc32", "bf16_out", "torch_f32", "torch_bf16")) > 0
    assert r["kernel_bf16_acc32"] and set(r["kernel_bf16_acc32"]) <= {"ynnpack", "eigen"}
  assert [r["contract_leading"] for r in rows[9:]] == [False] * 3 + [True] * 2
  rows = rows[:9]
  assert [r["rhs_transposed"] for r in rows[:6]] == [False] * 4 + [True, False]  # the tied LM head: x @ E^T
  for r in rows[:6]:
    assert r["xla_gflops"] > 0 and r["torch_gflops"] > 0 and r["numpy_gflops"] > 0 and r["calls"] == 2
    assert r["kernel"] and set(r["kernel"]) <= {"ynnpack", "eigen"}
  for r in rows[6:]:
    assert r["as_emitted_ms"] > 0 and r["transposes_kept_ms"] > 0 and r["max_abs_diff"] < 1e-4
    assert r["kernel_as_emitted"] and r["kernel_transposes_kept"]


def test_ab_meta_step_compares_compile_option_variants_in_one_process(tmp_path, monkeypatch):
  """`benchmarks/ab_meta_step.py`: one line per variant (compile options parsed), ratios against the first."""
  script = SCRIPT.parent / "ab_meta_step.py"
  tiny = ["--layers=1", "--d=16", "--heads=2", "--vocab=32", "--seq=8", "--tasks=2", "--shots=2", "--inner=1"]
  # bfloat16, where the second variant also turns the oneDNN kernel off (it checks its step has no oneDNN calls) and
  # runs the tasks one at a time (the first: all at once, --task_chunk's default 0)
  other = "xla_cpu_enable_fast_min_max=false;onednn=false;task_chunk=1"
  variants = ["--variant", "base", "--variant", other, "--calls", "2", "--dtype", "bfloat16"]
  out = subprocess.run([sys.executable, str(script), *tiny, *variants], cwd=tmp_path, capture_output=True, text=True,
                       timeout=900)  # fmt: skip
  rows = [json.loads(line) for line in out.stdout.splitlines()]
  assert [r["variant"] for r in rows] == ["base", other], out.stderr
  assert rows[0]["compiler_options"] == {} and rows[0]["dtype"] == "bfloat16"
  assert rows[1]["compiler_options"] == {"xla_cpu_enable_fast_min_max": False, "onednn": False, "task_chunk": "1"}
  assert [r["task_chunk"] for r in rows] == [0, 1]
  assert rows[0]["speedup_vs_first"] == 1.0 and rows[0]["max_abs_diff_vs_first"] == 0.0 and rows[0]["remat"]
  for r in rows:
    assert r["median_step_s"] > 0 and r["speedup_of_medians"] > 0
    assert r["speedup_range"][0] <= r["speedup_vs_first"] <= r["speedup_range"][1]
  monkeypatch.syspath_prepend(str(SCRIPT.parent))
  import ab_meta_step

  assert ab_meta_step.options("a=1;b=true") == {"a": "1", "b": True}
  with pytest.raises(SystemExit, match="got item 'oops'"):
    ab_meta_step.options("a=1;oops")
  assert ab_meta_step.options("onednn=false") == {"onednn": False}


def test_standins_keep_the_products_and_drop_the_nonlinearities(monkeypatch):
  """`benchmarks/standins.py`: GPT-2's gradient traced with linear stand-ins has the same product FLOPs and none of
  the replaced transcendentals; the swapped attributes come back on exit, after an error too; a stand-in that did
  not take, or one that changed the products, stops with the reason; part names are checked."""
  import jax
  import jax.numpy as jnp

  from mltd_jax import losses
  from mltd_jax.models import gpt2, layers
  from tests import helpers

  monkeypatch.syspath_prepend(str(SCRIPT.parent))
  import standins

  model, params = helpers.tiny_gpt2()
  loss = gpt2.make_loss(model)
  batch = helpers.lm_batch(13, (2, 6))

  def traced():  # a fresh function each time: JAX reuses the trace of a function object it traced before
    return jax.make_jaxpr(jax.grad(lambda p: loss({"params": p}, batch, None)[0]))(params)

  plain = traced()
  saved = (gpt2.LayerNorm, dict(layers.ACTIVATIONS), jax.nn.softmax, losses.token_nll)
  with standins.linear(standins.PARTS) as calls:
    linear = traced()
  out = standins.check(plain, linear, standins.PARTS, calls)
  assert out["product_flops"] > 0 and set(out["transcendental"]) == {"exp", "log", "rsqrt", "tanh"}
  assert out["calls"] == {"layer_norm": 5, "gelu": 2, "attention_softmax": 2, "token_loss": 1}  # 2 blocks, ln_f
  assert all(before > 0 and after == 0 for before, after in out["transcendental"].values())
  with pytest.raises(RuntimeError, match="inside"), standins.linear(standins.PARTS):
    raise RuntimeError("inside")
  assert (gpt2.LayerNorm, dict(layers.ACTIVATIONS), jax.nn.softmax, losses.token_nll) == saved
  with standins.linear(("layer_norm",)) as calls:
    only_norm = traced()
  counts = standins.check(plain, only_norm, ("layer_norm",), calls)["transcendental"]
  assert counts["rsqrt"][1] == 0 and counts["exp"][0] == counts["exp"][1] > 0
  with pytest.raises(SystemExit, match="did not take"):
    standins.check(plain, plain, ("layer_norm",), calls)
  with standins.linear(("attention_softmax", "token_loss")) as calls:
    both = traced()
  with pytest.raises(SystemExit, match=r"never called \['attention_softmax'\]"):  # fewer exp, yet one not taken
    standins.check(plain, both, ("attention_softmax", "token_loss"), {**calls, "attention_softmax": 0})
  with pytest.raises(SystemExit, match="products changed"):
    standins.check(plain, jax.make_jaxpr(lambda x: x @ x)(jnp.ones((3, 3))), ("gelu",), calls)
  assert standins.parse("gelu, layer_norm") == ("layer_norm", "gelu") and standins.parse("all") == standins.PARTS
  with pytest.raises(SystemExit, match="unknown"):
    standins.parse("gelu,oops")


def test_meta_step_measures_free_nonlinearities_with_its_check(tmp_path):
  """`meta_step.py --standins`: the meta line says which nonlinearities were replaced and carries the check (same
  products, the stand-in called, the layer norm's rsqrt gone); an unknown name, a mode other than meta, or --tams
  stops before any child runs."""
  tiny = ["--layers=1", "--d=16", "--heads=2", "--vocab=32", "--seq=8", "--tasks=2", "--shots=2", "--steps=2"]
  cmd = [sys.executable, str(SCRIPT), *tiny, "--mode", "meta", "--inner", "1", "--order", "2"]
  out = subprocess.run([*cmd, "--standins", "layer_norm"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
  (row,) = [json.loads(line) for line in out.stdout.splitlines()]
  assert "error" not in row, row
  assert row["standins"]["parts"] == ["layer_norm"] and row["tokens_per_s"] > 0
  check = row["standins"]["check"]
  assert check["product_flops"] > 0 and check["transcendental"]["rsqrt"][1] == 0 and check["calls"]["layer_norm"] > 0
  assert check["transcendental"]["tanh"][0] == check["transcendental"]["tanh"][1] > 0  # GELU kept
  bad = subprocess.run([*cmd, "--standins", "layer_norm,oops"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)  # fmt: skip
  assert bad.returncode != 0 and "unknown ['oops']" in bad.stderr and not bad.stdout
  fwdbwd = subprocess.run([*cmd, "--mode", "fwdbwd", "--standins", "gelu"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
  assert fwdbwd.returncode != 0 and "with --mode meta only" in fwdbwd.stderr and not fwdbwd.stdout
  cells = subprocess.run([*cmd, "--tams", "--standins", "gelu"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
  assert cells.returncode != 0 and "drop --tams" in cells.stderr and not cells.stdout


def test_op_kinds_counts_a_library_fusion_as_a_matmul_only_if_it_holds_a_dot():
  """`meta_parts.dot_fusions` reads which fusions of a compiled program hold a product; `op_kinds` then counts
  YNNPACK's reductions as other fusions (every library fusion counted as a matmul without it)."""
  import collections
  import re

  import jax
  import jax.numpy as jnp

  sys.path.insert(0, str(SCRIPT.parent))
  import meta_parts

  x, w = jnp.ones((512, 1024)), jnp.ones((1024, 64))
  text = jax.jit(lambda x, w: (jnp.tanh(x).sum(-1), x @ w)).lower(x, w).compile().as_text()
  dots = meta_parts.dot_fusions(text)
  assert meta_parts.dot_fusions(list(meta_parts.hlo_instructions(text))) == dots  # text or instructions parsed once
  fusions = dict(re.findall(r"%([\w.\-]+) = (f32\[[\d,]*\])\S* fusion\(", text))  # name -> output shape
  reductions = [name for name, shape in fusions.items() if shape == "f32[512]"]
  assert reductions and not dots & set(reductions)  # tanh + sum: fused, no product in it
  assert all(name in dots for name, shape in fusions.items() if shape == "f32[512,64]")
  per_op = collections.Counter({"ynn_fusion.1": 2.0, "ynn_fusion.2": 3.0, "ffi_call.7": 1.0, "copy.3": 0.5})
  assert meta_parts.op_kinds(per_op, {"ynn_fusion.2"}) == {
    "matmuls": 3.0, "other fusions": 2.0, "custom calls (oneDNN)": 1.0, "transposing copies": 0.5
  }
  assert meta_parts.op_kinds(per_op)["matmuls"] == 5.0


def test_jaxpr_product_flops_counts_every_product_where_xla_gives_none(monkeypatch):
  """`meta_step.jaxpr_product_flops` (the FLOP count where XLA's cost analysis is empty, as on jax 0.11.2 with a GPU):
  2 M N K for XLA's dots and `mltd_jax.matmul`'s primitives, a scan body times its length, a cond's costliest branch;
  on a tiny meta-step's unrolled twin it is XLA's count less the elementwise work."""
  sys.path.insert(0, str(SCRIPT.parent))
  import jax
  import jax.numpy as jnp
  import meta_step

  from mltd_jax import matmul

  x, w, u = jnp.ones((6, 4)), jnp.ones((4, 5)), jnp.ones((5, 3))

  def f(x, w, u):
    h = x @ w  # 2*6*5*4
    h, _ = jax.lax.scan(lambda h, _: (h @ jnp.eye(5), None), h, length=3)  # 3 * 2*6*5*5
    h = jax.lax.cond(h.sum() > 0, lambda h: h @ jnp.ones((5, 7)), lambda h: jnp.zeros((6, 7)), h)  # 2*6*7*5
    narrow = matmul.matmul(h.astype(jnp.bfloat16), jnp.ones((7, 2)))  # 2*6*2*7, `lowp_matmul` on XLA:CPU
    pair = matmul.sum_of_products(h[:, :3], u, h[:, 3:4], u[:, :1])  # 2*6*5*(3+1)
    return narrow.sum() + pair.sum()

  want = 2 * (6 * 5 * 4 + 3 * 6 * 5 * 5 + 6 * 7 * 5 + 6 * 2 * 7 + 6 * 5 * 4)
  assert meta_step.jaxpr_product_flops(jax.make_jaxpr(f)(x, w, u)) == want
  # the tiny meta-step: the fallback against XLA's own count of the same traced program
  import argparse

  import numpy as np
  import optax

  from mltd_jax import meta, onednn
  from mltd_jax.models import gpt2
  from mltd_jax.state import TrainState

  a = argparse.Namespace(vocab=32, seq=8, d=16, layers=1, heads=2, dtype="float32", tarp="bilinear", rank=2,
                         tams=False, tasks=2, inner=2, shots=2)
  model, variables, _ = meta_step._model(a)
  tx = optax.adam(1e-3)
  inner = meta.InnerLoop(steps=2, lr=0.05, per_step_support=True, unroll=True)
  twin = meta.make_meta_step(gpt2.make_loss(model), tx, inner, 0)
  args = (TrainState.create(variables, tx), meta_step.meta_batch(np.random.default_rng(0), a), jax.random.key(0))
  xla, source = meta_step._count(twin, *args)
  assert source == "xla"
  with onednn.disabled():  # as `_count` traces it: the kernel's products as XLA's dots
    products = meta_step.jaxpr_product_flops(jax.make_jaxpr(twin)(*args))
  assert 0.7 * xla < products < xla  # dead code (the inner gradients' unused weight gradients) not counted
  monkeypatch.setattr(meta_step, "_flops", lambda program: None)  # XLA without a count, as jax 0.11.2 on a GPU
  assert meta_step._count(twin, *args) == (products, "jaxpr products")


def test_adapt_mode_steps_return_only_the_variables_they_adapt():
  """`meta_step._adapt_step` (``--mode adapt``) hands back the adapted variables alone, equal to `meta.adapt`'s: the
  frozen ones would be copied into fresh output buffers (a TARP step's whole model), which no adaptation needs."""
  sys.path.insert(0, str(SCRIPT.parent))
  import argparse

  import jax
  import meta_step
  import numpy as np

  from mltd_jax import meta
  from mltd_jax.models import gpt2

  a = argparse.Namespace(vocab=32, seq=8, d=16, layers=1, heads=2, dtype="float32", tarp="bilinear", rank=2,
                         tams=False)  # fmt: skip
  model, variables, _ = meta_step._model(a)
  loss_fn = gpt2.make_loss(model)
  batch, key = meta_step.lm_batch(np.random.default_rng(0), a.vocab, 2, a.seq), jax.random.key(0)
  flat = meta.split(variables, "^", "all")[0]
  for regex in ("^tarp/", "^params/"):
    got, _ = jax.jit(meta_step._adapt_step(loss_fn, regex, 0.1))(variables, batch, key)
    adapted = meta.adapt(loss_fn, variables, batch, meta.InnerLoop(steps=1, lr=0.1, fast_regex=regex), key)[0]
    want = meta.split(adapted, regex)[0]
    assert sorted(got) == sorted(want) == sorted(k for k in flat if k.startswith(regex[1:]))
    for k in want:
      np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)
    assert any(not np.allclose(got[k], flat[k]) for k in got)  # a step was taken


def test_cpu_name_reads_the_first_processor_of_proc_cpuinfo(tmp_path):
  sys.path.insert(0, str(SCRIPT.parent))
  import meta_step

  info = tmp_path / "cpuinfo"
  first = "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 143\nmodel name\t: Intel Xeon\n"
  info.write_text(first + "\nprocessor\t: 1\nvendor_id\t: Other\n")
  assert meta_step.cpu_name(str(info)) == "GenuineIntel Intel Xeon family 6 model 143"
  info.write_text("Processor\t: ARMv8\n")  # no field we read
  assert meta_step.cpu_name(str(info)) is None
  assert meta_step.cpu_name(str(tmp_path / "missing")) is None
