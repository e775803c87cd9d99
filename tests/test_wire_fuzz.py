"""Property-based tests of the chunk decoder: random and mutated input never crashes or hangs it;
every input is either decoded exactly or refused with a WireError."""

from __future__ import annotations

import numpy as np
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmoe.common.proto import pb
from fedmoe.common.tensors import (
    TensorAssembler,
    TensorSpec,
    WireError,
    WireLimits,
    chunk_tensor,
    numpy_to_wire,
)

LIMITS = WireLimits(
    max_chunk_bytes=4096, max_tensor_bytes=1 << 16, max_total_bytes=1 << 17, max_tensors=8
)
# derandomize: the same examples on every run, so CI is reproducible.
SETTINGS = settings(
    max_examples=300, deadline=2000, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


def feed(chunks: list[pb.TensorChunk], expected: dict | None = None) -> dict | None:
    """Decode; returns the tensors, or None when refused. Any other exception fails the test."""
    asm = TensorAssembler(LIMITS, expected)
    try:
        for c in chunks:
            asm.add(c)
        return asm.finish()
    except WireError:
        return None


@SETTINGS
@given(st.lists(st.binary(max_size=300), max_size=6))
def test_random_bytes(blobs: list[bytes]) -> None:
    chunks = []
    for blob in blobs:
        try:
            chunks.append(pb.TensorChunk.FromString(blob))
        except DecodeError:
            return  # protobuf refuses it before our decoder runs
    feed(chunks)


chunk_fields = st.fixed_dictionaries(
    {
        "name": st.text(max_size=300),
        "dtype": st.integers(0, 12),
        "shape": st.lists(st.integers(-3, 1 << 40), max_size=10),
        "offset": st.integers(0, 1 << 64 - 1),
        "total_bytes": st.integers(0, 1 << 64 - 1),
        "data": st.binary(max_size=600),
        "crc32": st.integers(0, (1 << 32) - 1),
    }
)


@SETTINGS
@given(st.lists(chunk_fields, max_size=6))
def test_random_chunk_fields(fields: list[dict]) -> None:
    feed([pb.TensorChunk(**f) for f in fields])


@SETTINGS
@given(
    n=st.integers(1, 400),
    chunk=st.integers(1, 200),
    mutations=st.lists(
        st.tuples(
            st.integers(0, 50),
            st.sampled_from(
                ["offset", "total_bytes", "data", "crc32", "shape", "dtype", "name", "drop", "dup"]
            ),
            st.integers(0, 1 << 20),
        ),
        max_size=4,
    ),
)
def test_mutated_valid_streams(n: int, chunk: int, mutations: list[tuple[int, str, int]]) -> None:
    array = np.arange(n, dtype=np.float32)
    chunks = list(chunk_tensor(numpy_to_wire("w", array), chunk))
    for index, field, value in mutations:
        i = index % len(chunks)
        c = chunks[i]
        if field == "drop":
            del chunks[i]
            if not chunks:
                return
        elif field == "dup":
            chunks.insert(i, pb.TensorChunk.FromString(c.SerializeToString()))
        elif field == "data":
            c.data = bytes([value & 0xFF]) + c.data[1:] if c.data else b"x"
        elif field == "shape":
            c.shape[:] = [value]
        elif field == "name":
            c.name = "v" if value % 2 else ""
        else:
            setattr(c, field, value % (1 << 32))
    # What a receiver expects (as peers do): anything accepted must be the original, bit for bit.
    result = feed(chunks, {"w": TensorSpec((n,), frozenset({pb.FLOAT32}))})
    if result is not None:
        assert list(result) == ["w"]
        np.testing.assert_array_equal(result["w"].to_numpy(), array)
