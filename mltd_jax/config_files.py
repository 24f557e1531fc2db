"""Config files loaded by path, as absl's ``config_flags`` loads ``--config=FILE``: for a config that starts from
another's defaults (``configs/adaptsum.py`` and ``configs/personachat.py`` start from ``multidomain_lm.py``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType


def load(path: str | Path) -> ModuleType:
  """The config file at ``path`` as a module (call its ``get_config``); an error names a missing file."""
  path = Path(path)
  if path.suffix != ".py" or not path.is_file():
    raise FileNotFoundError(f"config file {path} is not an existing .py file; pass the path of a configs/*.py file.")
  spec = importlib.util.spec_from_file_location(f"_mltd_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
