"""CRC-32 of chunk payloads (the `crc32` field of TensorChunk): one function, two backends.

ISA-L's crc32 (the `isal` package, carry-less multiply instructions) computes the very same
CRC-32 as zlib.crc32 (same polynomial, same start value), some 25x faster on this project's
x86_64 machines: zlib 1.2.x took longer to check a chunk than gRPC took to move it. Where no isal
wheel exists, zlib's is used; the values on the wire are the same either way.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

crc32: Callable[[Any], int]  # bytes, bytearray, memoryview or any contiguous buffer
try:
    from isal.isal_zlib import crc32

    BACKEND = "isal"
except ImportError:  # pragma: no cover - platforms without an isal wheel
    crc32 = zlib.crc32
    BACKEND = "zlib"
