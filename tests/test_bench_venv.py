"""bench/venv.py: `python bench/scale.py` typed with a Python that lacks the project's packages
re-runs under the project's venv, or says what to run instead of an ImportError."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from bench.venv import use_project_venv
use_project_venv({needs!r})
print("RAN UNDER", sys.prefix)
"""


def _run(python: str, needs: tuple[str, ...], tmp_path: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "tool.py"
    script.write_text(SCRIPT.format(root=str(ROOT), needs=needs))
    return subprocess.run(
        [python, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )


def test_a_python_without_the_packages_reruns_under_the_venv(tmp_path: Path) -> None:
    base = Path(sys.base_prefix) / "bin" / "python3"
    assert base.exists(), base
    out = _run(str(base), ("grpc",), tmp_path)
    assert out.returncode == 0, out.stderr
    assert "RAN UNDER" in out.stdout
    base_has_grpc = (
        subprocess.run([str(base), "-c", "import grpc"], capture_output=True, timeout=60).returncode
        == 0
    )
    if not base_has_grpc:  # the usual case: it ran again, under the venv (where grpc is)
        assert out.stdout.split("RAN UNDER", 1)[1].strip() == str(Path(sys.prefix))


def test_missing_packages_even_in_the_venv_name_the_fix(tmp_path: Path) -> None:
    assert importlib.util.find_spec("no_such_module_fedmoe") is None
    out = _run(sys.executable, ("no_such_module_fedmoe",), tmp_path)
    assert out.returncode == 1 and "RAN UNDER" not in out.stdout
    assert "no_such_module_fedmoe not found" in out.stderr and "make setup" in out.stderr
    assert "Traceback" not in out.stderr
