"""The zero-copy chunk decoder (common/chunk_decoder.py) against protobuf itself: whatever it
accepts, protobuf accepts with the same field values; whatever is malformed is a WireError. And the
assembler's checks hold on the decoded form (corrupt payload, wrong offset, overlap, short stream,
oversize shape)."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmoe.common.chunk_decoder import MAX_FIELDS, ChunkView, decode_chunk
from fedmoe.common.crc import crc32
from fedmoe.common.proto import pb
from fedmoe.common.tensors import (
    TensorAssembler,
    TensorSpec,
    WireError,
    WireLimits,
    chunk_tensor,
    numpy_to_wire,
)

SETTINGS = settings(
    max_examples=400, deadline=2000, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


def pb_fields(m: pb.TensorChunk) -> tuple:
    return (m.name, int(m.dtype), tuple(m.shape), m.offset, m.total_bytes, bytes(m.data), m.crc32)


def view_fields(v: ChunkView) -> tuple:
    return (v.name, v.dtype, v.shape, v.offset, v.total_bytes, bytes(v.data), v.crc32)


def check_against_protobuf(raw: bytes) -> None:
    """decode_chunk either refuses with WireError or agrees with protobuf exactly."""
    try:
        view = decode_chunk(raw)
    except WireError:
        return
    try:
        message = pb.TensorChunk.FromString(raw)
    except DecodeError:
        pytest.fail(f"decoder accepted what protobuf refuses: {raw[:80]!r}")
    assert view_fields(view) == pb_fields(message)


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def key(field: int, wire: int) -> bytes:
    return varint(field << 3 | wire)


def sample_chunk(payload: bytes = b"\x01\x02\x03\x04" * 4) -> pb.TensorChunk:
    return pb.TensorChunk(
        name="experts.0.w",
        dtype=pb.FLOAT32,
        shape=[2, 2, 1],
        offset=0,
        total_bytes=len(payload),
        data=payload,
        crc32=crc32(payload),
    )


def test_crc_is_zlibs_crc32() -> None:
    """Whichever backend is installed, the wire's crc32 field keeps zlib's values."""
    import zlib

    data = np.random.default_rng(1).integers(0, 255, 100_003, dtype=np.uint8).tobytes()
    assert crc32(data) == zlib.crc32(data)
    assert crc32(memoryview(data)[7:]) == zlib.crc32(data[7:])
    assert crc32(b"") == 0


def test_real_chunks_decode_as_protobuf_does_without_copying() -> None:
    array = np.arange(3000, dtype=np.float32).reshape(30, 100)
    for chunk in chunk_tensor(numpy_to_wire("experts.3.fc1.weight", array), 4096):
        raw = chunk.SerializeToString()
        view = decode_chunk(raw)
        assert view_fields(view) == pb_fields(chunk)
        assert view.data.obj is raw  # a view into the received message, not a copy


def test_empty_message_is_all_defaults() -> None:
    assert view_fields(decode_chunk(b"")) == pb_fields(pb.TensorChunk())


def test_non_canonical_encodings_protobuf_accepts() -> None:
    base = sample_chunk().SerializeToString()
    # Unpacked shape, a repeated singular field (the last wins), unknown fields of every kind.
    extra = (
        key(3, 0) + varint(7)
        + key(2, 0) + varint(pb.FLOAT16)
        + key(1, 2) + varint(3) + b"abc"
        + key(99, 0) + varint(300)
        + key(100, 1) + b"\x00" * 8
        + key(101, 2) + varint(2) + b"zz"
        + key(102, 5) + b"\x00" * 4
        + key(3, 0) + varint((1 << 64) - 1)  # int64 -1
        + key(2, 0) + varint((1 << 64) - 2)  # enum -2 (open enum: kept as is)
    )  # fmt: skip
    raw = base + extra
    view = decode_chunk(raw)
    assert view_fields(view) == pb_fields(pb.TensorChunk.FromString(raw))
    assert view.name == "abc" and view.shape == (2, 2, 1, 7, -1) and view.dtype == -2


@pytest.mark.parametrize(
    "raw, why",
    [
        (key(1, 2) + varint(10) + b"short", "runs past the end"),
        (key(6, 2) + varint(1 << 40), "runs past the end"),
        (key(1, 2) + varint(2) + b"\xff\xfe", "UTF-8"),
        (key(4, 0) + b"\xff" * 10 + b"\x01", "longer than 10 bytes"),
        (key(4, 0) + b"\x80", "truncated varint"),
        (key(7, 5) + b"\x01\x02", "truncated fixed32"),
        (key(100, 1) + b"\x01", "truncated fixed64"),
        (key(6, 0) + varint(5), "wire type 0, not 2"),
        (key(7, 0) + varint(5), "wire type 0, not 5"),
        (key(100, 3), "groups"),
        (key(100, 6), "wire type 6"),
        (b"\x00", "invalid tag"),
        (key(3, 2) + varint(2) + b"\x01\x80", "truncated varint"),  # packed shape cut short
    ],
)
def test_malformed_messages_are_wire_errors(raw: bytes, why: str) -> None:
    with pytest.raises(WireError, match=why):
        decode_chunk(raw)


def test_field_floods_are_refused_early() -> None:
    """Many tiny fields (a CPU sink for a Python loop) are refused past MAX_FIELDS."""
    base = sample_chunk().SerializeToString()
    unknown = (key(99, 0) + varint(1)) * (MAX_FIELDS + 1)
    packed_entries = b"\x01" * (MAX_FIELDS + 1)
    packed = key(3, 2) + varint(len(packed_entries)) + packed_entries
    unpacked = (key(3, 0) + varint(1)) * (MAX_FIELDS + 1)
    for flood in (unknown, packed, unpacked):
        with pytest.raises(WireError, match="more than 256 fields"):
            decode_chunk(base + flood)
    # Just below the bound is still a chunk (protobuf agrees on every value).
    fine = base + (key(99, 0) + varint(1)) * (MAX_FIELDS - 20)
    assert view_fields(decode_chunk(fine)) == pb_fields(pb.TensorChunk.FromString(fine))


@SETTINGS
@given(
    name=st.text(max_size=40),
    dtype=st.integers(-(1 << 31), (1 << 31) - 1),
    shape=st.lists(st.integers(-(1 << 63), (1 << 63) - 1), max_size=6),
    offset=st.integers(0, (1 << 64) - 1),
    total=st.integers(0, (1 << 64) - 1),
    data=st.binary(max_size=300),
    crc=st.integers(0, (1 << 32) - 1),
)
def test_any_valid_message_decodes_to_protobufs_values(
    name: str, dtype: int, shape: list[int], offset: int, total: int, data: bytes, crc: int
) -> None:
    message = pb.TensorChunk(
        name=name, dtype=dtype, shape=shape, offset=offset, total_bytes=total, data=data, crc32=crc
    )  # type: ignore[arg-type]
    raw = message.SerializeToString()
    assert view_fields(decode_chunk(raw)) == pb_fields(pb.TensorChunk.FromString(raw))


@SETTINGS
@given(
    data=st.data(),
    payload=st.binary(max_size=64),
)
def test_mutated_messages_agree_with_protobuf_or_are_refused(
    data: st.DataObject, payload: bytes
) -> None:
    raw = bytearray(sample_chunk(payload).SerializeToString())
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["flip", "cut", "insert", "append"]))
        at = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if action == "flip" and raw:
            raw[at] = data.draw(st.integers(0, 255))
        elif action == "cut":
            del raw[at:]
        elif action == "insert":
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=12))
        else:
            raw += data.draw(st.binary(min_size=1, max_size=12))
    check_against_protobuf(bytes(raw))


@SETTINGS
@given(raw=st.binary(max_size=200))
def test_random_bytes_agree_with_protobuf_or_are_refused(raw: bytes) -> None:
    check_against_protobuf(raw)


# ---------------------------------------------------------------- assembler on decoded chunks

LIMITS = WireLimits(max_chunk_bytes=4096, max_tensor_bytes=1 << 16, max_total_bytes=1 << 17)
ARRAY = np.arange(4000, dtype=np.float32)  # 16000 bytes: 3 chunks of 4096 and one of 3712
SPEC = {"w": TensorSpec((4000,), frozenset({pb.FLOAT32}))}


def raw_chunks() -> list[bytes]:
    return [c.SerializeToString() for c in chunk_tensor(numpy_to_wire("w", ARRAY), 4096)]


def assemble_raw(raws: list[bytes]) -> dict:
    asm = TensorAssembler(LIMITS, SPEC)
    for raw in raws:
        asm.add(decode_chunk(raw))
    return asm.finish()


def reencoded(raw: bytes, **fields: object) -> bytes:
    message = pb.TensorChunk.FromString(raw)
    for name, value in fields.items():
        if name == "shape":
            del message.shape[:]
            message.shape.extend(value)  # type: ignore[arg-type]
        else:
            setattr(message, name, value)
    return message.SerializeToString()


def test_decoded_stream_rebuilds_the_tensor() -> None:
    out = assemble_raw(raw_chunks())
    assert np.array_equal(out["w"].to_numpy(), ARRAY)


def test_corrupted_payload_is_refused() -> None:
    raws = raw_chunks()
    bad = bytearray(raws[2])
    bad[-10] ^= 0x01  # a payload byte (the crc32 field is the last 5 bytes)
    with pytest.raises(WireError, match="checksum mismatch"):
        assemble_raw([raws[0], raws[1], bytes(bad), *raws[3:]])


def test_wrong_offset_is_refused() -> None:
    raws = raw_chunks()
    with pytest.raises(WireError, match="expected 4096"):
        assemble_raw([raws[0], reencoded(raws[1], offset=4100), *raws[2:]])


def test_overlapping_chunks_are_refused() -> None:
    raws = raw_chunks()
    with pytest.raises(WireError, match="expected 8192"):
        assemble_raw([raws[0], raws[1], reencoded(raws[2], offset=6000), *raws[3:]])


def test_repeated_chunk_is_refused() -> None:
    raws = raw_chunks()
    with pytest.raises(WireError, match="expected 8192"):
        assemble_raw([raws[0], raws[1], raws[1], *raws[2:]])


def test_short_stream_is_refused() -> None:
    with pytest.raises(WireError, match="incomplete tensors: w"):
        assemble_raw(raw_chunks()[:-1])


def test_chunk_past_the_declared_size_is_refused() -> None:
    raws = raw_chunks()
    last = pb.TensorChunk.FromString(raws[-1])
    longer = bytes(last.data) + b"\x00" * 100  # ends past the 16000 bytes the shape declares
    with pytest.raises(WireError, match="past the declared size"):
        assemble_raw([*raws[:-1], reencoded(raws[-1], data=longer, crc32=crc32(longer))])


def test_oversize_declared_shape_is_refused_before_allocating() -> None:
    raw = reencoded(raw_chunks()[0], shape=[1 << 40], total_bytes=4 << 40)
    asm = TensorAssembler(LIMITS)  # no expected shapes: the size limit alone must refuse it
    with pytest.raises(WireError, match="exceeds the per-tensor limit"):
        asm.add(decode_chunk(raw))


def test_oversize_chunk_is_refused() -> None:
    big = b"\x00" * 5000
    raw = reencoded(raw_chunks()[0], data=big, crc32=crc32(big))
    with pytest.raises(WireError, match="exceeds the limit of 4096"):
        assemble_raw([raw])


def test_malformed_bytes_in_a_stream_are_a_wire_error() -> None:
    raws = raw_chunks()
    with pytest.raises(WireError):
        assemble_raw([raws[0], raws[1][: len(raws[1]) // 2], *raws[2:]])
