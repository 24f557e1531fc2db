"""The quickstart notebook's code cells run top to bottom (outputs are kept cleared in git)."""

import json
from pathlib import Path

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs(monkeypatch):
  nb = json.loads(NOTEBOOK.read_text())
  assert all(not c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code"), "clear notebook outputs"
  monkeypatch.chdir(NOTEBOOK.parent)  # where Jupyter starts its kernel
  scope: dict = {}
  for cell in nb["cells"]:
    if cell["cell_type"] == "code":
      exec(compile("".join(cell["source"]), str(NOTEBOOK), "exec"), scope)
  assert scope["g"]["params"] and scope["after"] < scope["before"]
  if (scope["workdir"] / "checkpoints" / "meta").exists():  # a local `./run.sh` left runs/tiny (never in CI)
    assert scope["run"].step > 0 and scope["loss"](scope["adapted"]) < scope["loss"](scope["run"].variables)
