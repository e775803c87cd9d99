"""The one way files are written here: to a temporary name, fsynced, then renamed over the target.

A crash (kill -9) at any instant leaves either the old or the new version, never half a file.
The temporary file is created fresh (O_EXCL, a random name), so `mode` always applies to it from
the first byte: a secret is never briefly readable by others, not even through a leftover
temporary file of an earlier crash. As with open(), the umask still narrows `mode`.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (best effort: not every file system lets a directory be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any], mode: int = 0o600) -> None:
    """Write `path` through `write(file)`; readers see the old or the new content only."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o600) -> None:
    atomic_write(path, lambda f: f.write(data), mode)


def atomic_write_json(path: Path, data: Any, mode: int = 0o644) -> None:
    """Strict JSON (no NaN/Infinity), indented and key-sorted for people and diffs."""
    text = json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode(), mode)
