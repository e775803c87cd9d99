"""The tensor wire format: round trips for every dtype, and refusal of every malformed stream."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from fedmoe.common.proto import pb
from fedmoe.common.tensors import (
    DTYPES,
    TensorAssembler,
    TensorSpec,
    WireError,
    WireLimits,
    assemble,
    chunk_tensor,
    numpy_to_wire,
)
from fedmoe.common.torch_wire import TORCH_DTYPES, torch_to_wire, wire_to_torch


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(0, 200, shape, generator=g).to(dtype)


@pytest.mark.parametrize("code", sorted(DTYPES), ids=lambda c: DTYPES[c].name)
@pytest.mark.parametrize("shape", [(), (0,), (7,), (33, 65), (2, 3, 4)])
def test_round_trip_every_dtype(code: int, shape: tuple[int, ...]) -> None:
    t = random_tensor(TORCH_DTYPES[code], shape)
    wire = torch_to_wire("w", t)
    chunks = list(chunk_tensor(wire, chunk_bytes=64))
    assert all(len(c.data) <= 64 for c in chunks)
    assert [c.offset for c in chunks] == [i * 64 for i in range(len(chunks))]
    back = wire_to_torch(assemble(chunks)["w"])
    assert back.dtype == t.dtype and tuple(back.shape) == shape
    assert torch.equal(back, t)


def test_chunks_survive_protobuf_serialization() -> None:
    t = torch.randn(1000)
    chunks = [
        pb.TensorChunk.FromString(c.SerializeToString())
        for c in chunk_tensor(torch_to_wire("x", t), 1000)
    ]
    assert torch.equal(wire_to_torch(assemble(chunks)["x"]), t)


def test_bfloat16_numpy_path_matches_torch() -> None:
    x = np.random.default_rng(0).standard_normal(100).astype(np.float32)
    via_numpy = numpy_to_wire("x", x, pb.BFLOAT16)
    via_torch = torch_to_wire("x", torch.from_numpy(x), pb.BFLOAT16)
    assert via_numpy.data == via_torch.data
    np.testing.assert_allclose(via_numpy.to_numpy(), x, rtol=1e-2)


def test_cast_on_the_wire_halves_the_bytes() -> None:
    t = torch.randn(256)
    assert len(torch_to_wire("x", t, pb.FLOAT16).data) == len(torch_to_wire("x", t).data) // 2


def chunks_of(n: int = 300, chunk: int = 100) -> list[pb.TensorChunk]:
    return list(chunk_tensor(numpy_to_wire("w", np.arange(n, dtype=np.uint8)), chunk))


def refuse(chunks: list[pb.TensorChunk], match: str, **kwargs: object) -> None:
    with pytest.raises(WireError, match=match):
        assemble(chunks, **kwargs)  # type: ignore[arg-type]


def test_corrupted_chunk_is_rejected() -> None:
    chunks = chunks_of()
    chunks[1].data = b"\x00" + chunks[1].data[1:]
    refuse(chunks, "checksum mismatch")


def test_truncated_stream_is_rejected() -> None:
    refuse(chunks_of()[:2], "incomplete")


def test_duplicated_chunk_is_rejected() -> None:
    c = chunks_of()
    refuse([c[0], c[0], c[1], c[2]], "offset")


def test_duplicated_tensor_is_rejected() -> None:
    c = chunks_of(50, 100)
    refuse(c + c, "already received")


def test_chunk_past_declared_size_is_rejected() -> None:
    c = chunks_of(300, 100)
    c[2].data = c[2].data + b"xx"
    c[2].crc32 = zlib.crc32(c[2].data)
    refuse(c, "past the declared size")


def test_gap_and_reorder_are_rejected() -> None:
    c = chunks_of()
    refuse([c[0], c[2]], "expected 100")
    refuse([c[1]], "not 0")


def test_inconsistent_metadata_is_rejected() -> None:
    c = chunks_of()
    c[1].shape[:] = [3, 100]
    refuse(c, "changed between chunks")
    c = chunks_of()
    c[0].total_bytes = 12
    refuse(c, "does not match shape")


def test_unknown_dtype_and_bad_shape_are_rejected() -> None:
    c = chunks_of(10, 100)
    c[0].dtype = 99  # type: ignore[assignment]
    refuse(c, "unknown dtype")
    c = chunks_of(10, 100)
    c[0].shape[:] = [-10]
    refuse(c, "invalid shape")


def test_limits_are_enforced() -> None:
    refuse(chunks_of(300, 100), "exceeds the limit", limits=WireLimits(max_chunk_bytes=50))
    refuse(chunks_of(300, 100), "per-tensor limit", limits=WireLimits(max_tensor_bytes=200))
    c = chunks_of(10, 100)
    c[0].name = "n" * 300
    refuse(c, "over-long name")


def test_expected_specs_are_enforced() -> None:
    ok = {"w": TensorSpec((300,), frozenset({pb.UINT8}))}
    assert len(assemble(chunks_of(), expected=ok)["w"].data) == 300
    refuse(
        chunks_of(),
        "does not match the expected",
        expected={"w": TensorSpec((3, 100), frozenset({pb.UINT8}))},
    )
    refuse(chunks_of(), "not accepted", expected={"w": TensorSpec((300,), frozenset({pb.FLOAT32}))})
    refuse(chunks_of(), "not expected", expected={"v": TensorSpec((300,), frozenset({pb.UINT8}))})
    two = {**ok, "v": TensorSpec((1,), frozenset({pb.UINT8}))}
    refuse(chunks_of(), "without tensors", expected=two)


def test_assembler_returns_tensor_when_complete() -> None:
    asm = TensorAssembler()
    c = chunks_of()
    assert asm.add(c[0]) is None and asm.add(c[1]) is None
    done = asm.add(c[2])
    assert done is not None and bytes(done.data) == bytes(range(256)) + bytes(range(44))
