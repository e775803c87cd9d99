"""The one way files are written here: to a temporary name, fsynced, then renamed over the target.

A crash (kill -9) at any instant leaves either the old or the new version, never half a file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any], mode: int = 0o600) -> None:
    """Write `path` through `write(file)`; readers see the old or the new content only."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o600) -> None:
    atomic_write(path, lambda f: f.write(data), mode)


def atomic_write_json(path: Path, data: Any, mode: int = 0o644) -> None:
    """Strict JSON (no NaN/Infinity), indented and key-sorted for people and diffs."""
    text = json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode(), mode)
