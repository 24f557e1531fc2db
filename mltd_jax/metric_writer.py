"""Metrics to ``metrics.jsonl`` (one JSON object per logged step) and TensorBoard events (tensorboardX)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

log = logging.getLogger("mltd_jax")


class MetricWriter:
  """Appends ``{"step": s, name: value, ...}`` lines to ``workdir/metrics.jsonl`` and scalars to TensorBoard."""

  def __init__(self, workdir: str | Path):
    from tensorboardX import SummaryWriter  # imported here: tensorboardX imports torch when it is installed (~250 MB)

    self.path = Path(workdir) / "metrics.jsonl"
    self.tb = SummaryWriter(str(Path(workdir) / "tensorboard"))
    self._drop_unfinished_line()

  def _drop_unfinished_line(self) -> None:
    """A run killed while writing leaves a last line without its newline: cut it, so the next row starts a line."""
    if not self.path.exists():
      return
    text = self.path.read_bytes()
    if text and not text.endswith(b"\n"):
      keep = text.rfind(b"\n") + 1
      log.warning("%s: dropping an unfinished last line (a killed run's): %r", self.path, text[keep:][:80])
      with self.path.open("r+b") as f:
        f.truncate(keep)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    with self.path.open("a") as f:
      f.write(
        json.dumps({k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in row.items()}) + "\n"
      )
    for k, v in scalars.items():
      self.tb.add_scalar(k, float(v), int(step))

  def rewind(self, phase: str, step: int, only: bool = False) -> None:
    """Drop ``phase``'s metrics (names ``phase/...``) logged after ``step`` from ``metrics.jsonl``: a run resumed
    from the checkpoint at ``step`` (0: none) logs those steps again. ``only``: those logged at ``step`` itself, no
    other (a rerun's meta-test results replace its step's). (TensorBoard's event files keep both writes of a
    replayed step.)"""
    if not self.path.exists():
      return
    kept = []
    for n, line in enumerate(self.path.read_text().splitlines(), 1):
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:  # dropped, not raised: only process 0 writes (sharding's docstring)
        log.warning("%s:%d: dropping a line that is not JSON (%s): %r", self.path, n, e, line[:80])
        continue
      if row["step"] == step if only else row["step"] > step:
        row = {k: v for k, v in row.items() if not k.startswith(f"{phase}/")}
        if set(row) == {"step"}:
          continue
      kept.append(json.dumps(row) + "\n")
    tmp = self.path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(kept))
    tmp.replace(self.path)

  def close(self) -> None:
    self.tb.close()
