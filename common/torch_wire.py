"""Conversions between torch tensors and wire tensors (kept apart so the coordinator needs no torch)."""

from __future__ import annotations

import numpy as np
import torch

from fedmoe.common.proto import pb
from fedmoe.common.tensors import WireError, WireTensor

TORCH_DTYPES: dict[int, torch.dtype] = {
    pb.FLOAT32: torch.float32,
    pb.FLOAT16: torch.float16,
    pb.BFLOAT16: torch.bfloat16,
    pb.FLOAT64: torch.float64,
    pb.INT64: torch.int64,
    pb.INT32: torch.int32,
    pb.UINT8: torch.uint8,
}
WIRE_DTYPES: dict[torch.dtype, int] = {v: k for k, v in TORCH_DTYPES.items()}


def torch_to_wire(name: str, tensor: torch.Tensor, dtype: int | None = None) -> WireTensor:
    """Encode a tensor (on any device) as raw bytes, cast to `dtype` if given."""
    target = TORCH_DTYPES[dtype] if dtype is not None else tensor.dtype
    if target not in WIRE_DTYPES:
        raise WireError(f"tensor {name!r}: torch dtype {target} has no wire dtype")
    flat = tensor.detach().to(device="cpu", dtype=target).contiguous().reshape(-1)
    # A byte view of the tensor's storage: no per-element conversion in Python.
    data = flat.view(torch.uint8).numpy().tobytes()
    return WireTensor(name, WIRE_DTYPES[target], tuple(tensor.shape), data)


def wire_to_torch(tensor: WireTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decode to a CPU tensor, optionally cast (e.g. bf16 on the wire, float32 in the model)."""
    target = TORCH_DTYPES[tensor.dtype]
    if len(tensor.data) == 0:
        out = torch.empty(tensor.shape, dtype=target)
    elif isinstance(tensor.data, np.ndarray):  # received: reinterpret the bytes, no copy
        out = torch.from_numpy(tensor.data).view(target).reshape(tensor.shape)
    else:
        buf = tensor.data if isinstance(tensor.data, bytearray) else bytearray(tensor.data)
        out = torch.frombuffer(buf, dtype=target).reshape(tensor.shape)
    return out if dtype is None else out.to(dtype)
