"""Tensors on the wire: cutting them into self-describing chunks and putting them back together.

A tensor travels as raw little-endian bytes in C order, cut into `TensorChunk` messages that each
carry the name, dtype, shape, byte offset, total size and a CRC32 of their slice. The assembler
trusts nothing: every chunk is checked against the limits, against the chunks before it and
(optionally) against the tensors the receiver expects, before a byte is kept.

This module knows numpy and protobuf only; torch conversions live with the model code.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from fedmoe.common.crc import crc32
from fedmoe.common.logsafe import clip
from fedmoe.common.proto import pb


class WireError(ValueError):
    """A tensor stream broke a rule of the protocol; the message says which and where."""


@dataclass(frozen=True)
class DTypeInfo:
    name: str
    itemsize: int
    numpy: str | None  # None: numpy has no such type (bfloat16)


DTYPES: dict[int, DTypeInfo] = {
    pb.FLOAT32: DTypeInfo("float32", 4, "<f4"),
    pb.FLOAT16: DTypeInfo("float16", 2, "<f2"),
    pb.BFLOAT16: DTypeInfo("bfloat16", 2, None),
    pb.FLOAT64: DTypeInfo("float64", 8, "<f8"),
    pb.INT64: DTypeInfo("int64", 8, "<i8"),
    pb.INT32: DTypeInfo("int32", 4, "<i4"),
    pb.UINT8: DTypeInfo("uint8", 1, "u1"),
}
DTYPE_BY_NAME: dict[str, int] = {info.name: code for code, info in DTYPES.items()}

DEFAULT_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class WireLimits:
    """Upper bounds on what one stream may carry; everything above is refused."""

    max_chunk_bytes: int = 4 << 20
    max_tensor_bytes: int = 1 << 30
    max_total_bytes: int = 2 << 30
    max_tensors: int = 10_000
    max_name_len: int = 256
    max_dims: int = 8


@dataclass(frozen=True)
class TensorSpec:
    """What the receiver expects of one tensor: its shape and the dtypes it accepts."""

    shape: tuple[int, ...]
    dtypes: frozenset[int]


@dataclass(frozen=True)
class WireTensor:
    name: str
    dtype: int
    shape: tuple[int, ...]
    data: bytes | bytearray | np.ndarray  # raw little-endian bytes (a uint8 array when received)

    @property
    def dtype_name(self) -> str:
        return DTYPES[self.dtype].name

    def to_numpy(self) -> np.ndarray:
        """Decode to numpy; bfloat16 widens losslessly to float32 (numpy has no bfloat16)."""
        info = DTYPES[self.dtype]
        if info.numpy is None:
            raw = np.frombuffer(self.data, dtype="<u2").astype(np.uint32) << 16
            return raw.view(np.float32).reshape(self.shape)
        return np.frombuffer(self.data, dtype=info.numpy).reshape(self.shape)


def numpy_to_wire(name: str, array: np.ndarray, dtype: int | None = None) -> WireTensor:
    """Encode a numpy array, optionally converting it to another wire dtype first."""
    if dtype is None:
        dtype = DTYPE_BY_NAME.get(np.dtype(array.dtype).name)
        if dtype is None:
            raise WireError(f"tensor {name!r}: numpy dtype {array.dtype} has no wire dtype")
    info = DTYPES[dtype]
    if info.numpy is None:  # bfloat16: round-to-nearest-even on the top 16 bits of float32
        x = np.ascontiguousarray(array, dtype="<f4")
        bits = x.view(np.uint32)
        rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16
        data = np.where(np.isnan(x), np.uint32(0x7FC0), rounded).astype("<u2").tobytes()
    else:
        data = np.ascontiguousarray(array, dtype=info.numpy).tobytes()
    return WireTensor(name, dtype, tuple(int(s) for s in array.shape), data)


def chunk_tensor(
    tensor: WireTensor, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[pb.TensorChunk]:
    """Yield the chunks of one tensor in offset order (an empty tensor is one empty chunk)."""
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    view = memoryview(tensor.data).cast("B")  # type: ignore[arg-type]  # ndarray is a buffer
    total = len(view)
    offset = 0
    while True:
        piece = bytes(view[offset : offset + chunk_bytes])
        yield pb.TensorChunk(
            name=tensor.name,
            dtype=tensor.dtype,  # type: ignore[arg-type]
            shape=tensor.shape,
            offset=offset,
            total_bytes=total,
            data=piece,
            crc32=crc32(piece),
        )
        offset += len(piece)
        if offset >= total:
            return


def chunk_tensors(
    tensors: Iterable[WireTensor], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[pb.TensorChunk]:
    for tensor in tensors:
        yield from chunk_tensor(tensor, chunk_bytes)


class ChunkLike(Protocol):
    """What the assembler reads of a chunk: pb.TensorChunk's fields (ChunkView has them too)."""

    @property
    def name(self) -> str: ...
    @property
    def dtype(self) -> int: ...
    @property
    def shape(self) -> Sequence[int]: ...
    @property
    def offset(self) -> int: ...
    @property
    def total_bytes(self) -> int: ...
    @property
    def data(self) -> Any: ...  # bytes or memoryview: anything with len() and the buffer protocol
    @property
    def crc32(self) -> int: ...


@dataclass
class _Partial:
    dtype: int
    shape: tuple[int, ...]
    buffer: np.ndarray  # uint8, uninitialised: every byte is written exactly once, in order
    received: int = 0


class TensorAssembler:
    """Rebuilds tensors from a chunk stream, refusing anything malformed.

    Rules: metadata is sane and within `limits`; chunks of a tensor arrive in order with no gap,
    overlap or overrun; each chunk's CRC32 matches; a tensor is not sent twice; with `expected`,
    only those names with those shapes and dtypes are accepted and `finish()` requires all of them.
    """

    def __init__(
        self,
        limits: WireLimits | None = None,
        expected: Mapping[str, TensorSpec] | None = None,
        require_all: bool = True,
    ) -> None:
        self.limits = limits or WireLimits()
        self.expected = expected
        self.require_all = require_all
        self._partial: dict[str, _Partial] = {}
        self._done: dict[str, WireTensor] = {}
        self._total = 0

    def add(self, chunk: pb.TensorChunk | ChunkLike) -> WireTensor | None:
        """Take one chunk (a message, or a ChunkView from common/chunk_decoder.py); returns the
        tensor when this chunk completes it."""
        lim = self.limits
        name = chunk.name
        # Each field is read once: a protobuf message copies its bytes field on every access.
        data = chunk.data
        size = len(data)
        if not name or len(name) > lim.max_name_len:
            raise WireError(f"chunk has an empty or over-long name ({len(name)} characters)")
        if name in self._done:
            raise WireError(f"tensor {name!r} was already received (duplicate chunk)")
        if size > lim.max_chunk_bytes:
            raise WireError(
                f"tensor {name!r}: chunk of {size} bytes exceeds the limit of {lim.max_chunk_bytes}"
            )
        offset = chunk.offset
        if crc32(data) != chunk.crc32:
            raise WireError(f"tensor {name!r}: checksum mismatch in chunk at offset {offset}")
        partial = self._partial.get(name)
        if partial is None:
            partial = self._start(chunk)
        elif chunk.dtype != partial.dtype or tuple(chunk.shape) != partial.shape:
            raise WireError(f"tensor {name!r}: dtype or shape changed between chunks")
        if chunk.total_bytes != len(partial.buffer):
            raise WireError(f"tensor {name!r}: total_bytes changed between chunks")
        if offset != partial.received:
            raise WireError(
                f"tensor {name!r}: chunk at offset {offset}, expected {partial.received} "
                "(chunks must arrive in order, without gaps or repeats)"
            )
        end = offset + size
        if end > len(partial.buffer):
            raise WireError(
                f"tensor {name!r}: chunk ends at byte {end}, past the declared size "
                f"{len(partial.buffer)}"
            )
        if not size and len(partial.buffer) > 0:
            raise WireError(f"tensor {name!r}: empty chunk inside a non-empty tensor")
        # The one copy on the receiving side: into the tensor's own buffer, at its offset.
        partial.buffer[offset:end] = np.frombuffer(data, dtype=np.uint8)
        partial.received = end
        if end < len(partial.buffer):
            return None
        del self._partial[name]
        tensor = WireTensor(name, partial.dtype, partial.shape, partial.buffer)
        self._done[name] = tensor
        return tensor

    def _start(self, chunk: pb.TensorChunk | ChunkLike) -> _Partial:
        lim = self.limits
        name = chunk.name
        info = DTYPES.get(chunk.dtype)
        if info is None:
            raise WireError(f"tensor {name!r}: unknown dtype code {chunk.dtype}")
        shape = tuple(int(s) for s in chunk.shape)
        if len(shape) > lim.max_dims or any(s < 0 for s in shape):
            raise WireError(f"tensor {name!r}: invalid shape {list(shape)}")
        if self.expected is not None:
            spec = self.expected.get(name)
            if spec is None:
                raise WireError(f"tensor {name!r} is not expected in this stream")
            if shape != spec.shape:
                raise WireError(
                    f"tensor {name!r}: shape {list(shape)} does not match the expected "
                    f"{list(spec.shape)}"
                )
            if chunk.dtype not in spec.dtypes:
                raise WireError(f"tensor {name!r}: dtype {info.name} is not accepted here")
        nbytes = math.prod(shape) * info.itemsize
        if chunk.total_bytes != nbytes:
            raise WireError(
                f"tensor {name!r}: total_bytes {chunk.total_bytes} does not match shape "
                f"{list(shape)} of {info.name} ({nbytes} bytes)"
            )
        if nbytes > lim.max_tensor_bytes:
            raise WireError(
                f"tensor {name!r}: {nbytes} bytes exceeds the per-tensor limit "
                f"{lim.max_tensor_bytes}"
            )
        if self._total + nbytes > lim.max_total_bytes:
            raise WireError(f"stream exceeds the total limit of {lim.max_total_bytes} bytes")
        if len(self._done) + len(self._partial) >= lim.max_tensors:
            raise WireError(f"stream exceeds the limit of {lim.max_tensors} tensors")
        if chunk.offset != 0:
            raise WireError(f"tensor {name!r}: first chunk starts at offset {chunk.offset}, not 0")
        self._total += nbytes
        # np.empty, not bytearray(n): no zero-fill pass over memory that is overwritten anyway.
        partial = _Partial(chunk.dtype, shape, np.empty(nbytes, dtype=np.uint8))
        self._partial[name] = partial
        return partial

    def finish(self) -> dict[str, WireTensor]:
        """End of stream: every started tensor must be complete (and every expected one sent)."""
        if self._partial:
            names = ", ".join(sorted(self._partial)[:5])
            raise WireError(f"stream ended with incomplete tensors: {names}")
        if self.expected is not None and self.require_all:
            missing = sorted(set(self.expected) - set(self._done))
            if missing:
                raise WireError(f"stream ended without tensors: {', '.join(missing[:5])}")
        return dict(self._done)


def check_value(tensor: WireTensor, max_norm: float) -> None:
    """Refuse a tensor with NaN or Inf values, or with an L2 norm above `max_norm`.

    Shape and dtype checks say nothing about values: a source that sends NaN (or huge) experts
    would poison every weighted sum it is part of. One pass for the max |x| (NaN and Inf show up
    there), then the norm of x / max|x|, so that no square overflows whatever the scale.
    """
    array = tensor.to_numpy()
    if array.size == 0:
        return
    if array.dtype not in (np.float32, np.float64):
        array = array.astype(np.float32)  # float16 and integers: no overflow or underflow below
    peak = float(np.max(np.abs(array)))
    if not math.isfinite(peak):
        what = "NaN" if bool(np.isnan(array).any()) else "Inf"
        raise WireError(f"tensor {clip(tensor.name)}: contains {what} values")
    if peak > max_norm:  # the norm is at least the largest |x|
        raise WireError(
            f"tensor {clip(tensor.name)}: a value of magnitude {peak:.3g} exceeds the norm "
            f"limit {max_norm:.3g}"
        )
    if peak == 0.0:
        return
    flat = (array / peak).ravel()
    norm = peak * math.sqrt(float(np.dot(flat, flat)))
    if not norm <= max_norm:
        raise WireError(
            f"tensor {clip(tensor.name)}: L2 norm {norm:.3g} exceeds the limit {max_norm:.3g}"
        )


def check_values(tensors: Mapping[str, WireTensor], max_norm: float) -> None:
    """`check_value` for every tensor: the first bad one raises WireError naming it."""
    for tensor in tensors.values():
        check_value(tensor, max_norm)


def assemble(
    chunks: Iterable[pb.TensorChunk | ChunkLike],
    limits: WireLimits | None = None,
    expected: Mapping[str, TensorSpec] | None = None,
) -> dict[str, WireTensor]:
    assembler = TensorAssembler(limits, expected)
    for chunk in chunks:
        assembler.add(chunk)
    return assembler.finish()
