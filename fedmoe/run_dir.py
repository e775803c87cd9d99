"""The run directory `fedmoe local` writes when no --out is given: runs/<algorithm>-<time>."""

from __future__ import annotations

import time
from pathlib import Path

MAX_TRIES = 1000


def fresh_run_dir(algorithm: str, root: Path = Path("runs"), now: float | None = None) -> Path:
    """Create and return root/<algorithm>-<YYYYmmdd-HHMMSS>, or ...-2, -3, ... when that one
    exists: mkdir is atomic, so two runs started in the same second get different folders."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    root.mkdir(parents=True, exist_ok=True)
    base = f"{algorithm}-{stamp}"
    for n in range(1, MAX_TRIES + 1):
        path = root / (base if n == 1 else f"{base}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"{root / base}: {MAX_TRIES} run directories of this second exist")
