"""Run a bench script under the project's environment whatever `python` a user typed.

`python bench/scale.py` from a fresh clone, with a system Python that lacks the project's
packages, re-runs itself under `.venv/bin/python` when `make setup` has made it, and otherwise
says what to do instead of failing on an import.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"


def use_project_venv(needs: tuple[str, ...] = ("grpc", "numpy")) -> None:
    """Returns when this interpreter has `needs`; else re-executes the script under the
    project's venv, or exits with the command that makes it."""
    if all(importlib.util.find_spec(m) is not None for m in needs):
        return
    script = Path(sys.argv[0]).resolve()
    # The venv's python is often a link to the very interpreter running now: tell them apart
    # by sys.prefix, not by the executable.
    in_venv = Path(sys.prefix).resolve() == VENV_PYTHON.parents[1].resolve()
    if VENV_PYTHON.exists() and not in_venv:
        os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), str(script), *sys.argv[1:]])
    missing = ", ".join(m for m in needs if importlib.util.find_spec(m) is None)
    raise SystemExit(
        f"{script.name} needs the project's packages ({missing} not found for {sys.executable}):"
        f" run `make setup` in {ROOT} first, then `.venv/bin/python bench/{script.name} ...`"
    )
