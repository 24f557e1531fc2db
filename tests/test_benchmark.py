"""The benchmark script runs and prints one JSON line per setting with the promised fields (no timing asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "meta_step.py"


def test_meta_step_benchmark_prints_json_lines(tmp_path):
  tiny = ["--layers=1", "--d=16", "--heads=2", "--vocab=32", "--seq=8", "--tasks=2", "--shots=2", "--steps=1"]
  cmd = [sys.executable, str(SCRIPT), *tiny, "--inner", "2", "--order", "2", "--remat", "1"]  # one setting: CI time
  out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
  rows = [json.loads(line) for line in out.stdout.splitlines()]
  assert [(r["order"], r["remat"], r["inner"]) for r in rows] == [(2, True, 2)], out.stderr
  for r in rows:
    assert r["tokens_per_s"] > 0 and r["compile_s"] > 0 and r["peak_rss_mb"] > 0 and r["xla_temp_mb"] is not None


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
