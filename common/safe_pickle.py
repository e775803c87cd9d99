"""Reading the CIFAR python batches without running arbitrary code.

The CIFAR-10 and CIFAR-100 "python version" files are pickles. A pickle may name any importable
callable, so a file planted in --data-dir could run code in every peer; this unpickler resolves
only what numpy arrays, lists, dicts and bytes need.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

# What numpy arrays need across numpy 1.x/2.x and pickle protocols 2..5 (numpy 2 renamed
# numpy.core to numpy._core), and protocol 2's way of writing bytes from Python 3.
_ALLOWED = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
)


class _Restricted(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return super().find_class(module, name)


def load_restricted(path: Path) -> Any:
    """The object pickled in `path`; Python 2 strings come back as bytes (CIFAR's own files)."""
    with open(path, "rb") as f:
        return _Restricted(f, encoding="bytes").load()
