"""Decoding one serialized TensorChunk without copying its payload.

`pb.TensorChunk.FromString` copies the payload into the message, and every read of `.data` copies
it again (upb hands out a new bytes object on each access): two 1 MiB copies per chunk before the
CRC has even looked at it. This decoder reads the protobuf wire format of this one message by hand
and returns the payload as a memoryview into the received bytes; the only copy left on the
receiving side is the one into the tensor's buffer (common/tensors.TensorAssembler).

It accepts what protobuf accepts for a TensorChunk, with the same values (last occurrence wins for
singular fields; shape packed or not; unknown fields skipped), and refuses a little more, all of
which no protobuf encoder produces for a real chunk: groups, a known field with the wrong wire
type, varints over 10 bytes, tags above 2^32, more than MAX_FIELDS fields and shape entries. Everything malformed is a WireError, never another exception;
tests/test_chunk_decoder.py checks it against protobuf on random and mutated messages.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedmoe.common.tensors import WireError

_U64 = (1 << 64) - 1
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
# TensorChunk's fields (protos/fedmoe.proto) -> their wire type; shape (3) may also come packed.
_WIRE_TYPES = {1: _LEN, 2: _VARINT, 3: _VARINT, 4: _VARINT, 5: _VARINT, 6: _LEN, 7: _I32}
# A real chunk has 7 fields and a few shape entries. Without a bound, a 5 MB message of 2-byte
# fields would keep this Python loop busy for seconds (protobuf's C parser takes milliseconds).
MAX_FIELDS = 256  # fields plus shape entries, packed or not


@dataclass(frozen=True, slots=True)
class ChunkView:
    """The fields of a TensorChunk; `data` is a view into the received message (no copy)."""

    name: str
    dtype: int
    shape: tuple[int, ...]
    offset: int
    total_bytes: int
    data: memoryview
    crc32: int


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """(value, next position) of the varint at `pos`; protobuf keeps the low 64 bits."""
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise WireError("chunk: truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result & _U64, pos
        shift += 7
        if shift >= 70:
            raise WireError("chunk: varint longer than 10 bytes")


def _length(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """(end of the length-delimited field at `pos`, start of its content)."""
    n, pos = _varint(buf, pos, end)
    if n > end - pos:
        raise WireError(f"chunk: field of {n} bytes runs past the end of the message")
    return pos + n, pos


def _int64(v: int) -> int:
    return v - (1 << 64) if v >> 63 else v


def _int32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >> 31 else v


def decode_chunk(raw: bytes) -> ChunkView:
    """Decode a serialized TensorChunk; the payload stays in `raw` (viewed, not copied)."""
    name_view: memoryview | None = None
    dtype = offset = total = crc = 0
    shape: list[int] = []
    data_at = (0, 0)
    view = memoryview(raw)
    pos, end = 0, len(raw)
    fields = 0
    while pos < end:
        fields += 1
        if fields + len(shape) > MAX_FIELDS:
            raise WireError(f"chunk: more than {MAX_FIELDS} fields and shape entries")
        tag, pos = _varint(raw, pos, end)
        field, wire = tag >> 3, tag & 7
        if field == 0 or tag > 0xFFFFFFFF:
            raise WireError(f"chunk: invalid tag {tag}")
        if field == 3 and wire == _LEN:  # packed shape
            stop, pos = _length(raw, pos, end)
            while pos < stop:
                if fields + len(shape) >= MAX_FIELDS:
                    raise WireError(f"chunk: more than {MAX_FIELDS} fields and shape entries")
                v, pos = _varint(raw, pos, stop)
                shape.append(_int64(v))
            continue
        want = _WIRE_TYPES.get(field)
        if want is not None and wire != want:
            raise WireError(f"chunk: field {field} has wire type {wire}, not {want}")
        if wire == _VARINT:
            v, pos = _varint(raw, pos, end)
            if field == 2:
                dtype = _int32(v)
            elif field == 3:
                shape.append(_int64(v))
            elif field == 4:
                offset = v
            elif field == 5:
                total = v
        elif wire == _LEN:
            stop, start = _length(raw, pos, end)
            if field == 1:
                name_view = view[start:stop]
            elif field == 6:
                data_at = (start, stop)
            pos = stop
        elif wire == _I32:
            if end - pos < 4:
                raise WireError("chunk: truncated fixed32 field")
            if field == 7:
                crc = int.from_bytes(raw[pos : pos + 4], "little")
            pos += 4
        elif wire == _I64:
            if end - pos < 8:
                raise WireError("chunk: truncated fixed64 field")
            pos += 8
        else:
            raise WireError(f"chunk: wire type {wire} (groups or invalid) is not allowed")
    try:
        name = str(name_view, "utf-8") if name_view is not None else ""
    except UnicodeDecodeError:
        raise WireError("chunk: name is not valid UTF-8") from None
    return ChunkView(name, dtype, tuple(shape), offset, total, view[data_at[0] : data_at[1]], crc)
