"""An embedding plug-in (--model MODULE:FUNCTION): build the user's network and check it.

The factory is `factory(input_shape: tuple[int, ...], embed_dim: int, config: dict) -> nn.Module`
(`config`: the run's config.json as a dict, e.g. config["model_weights"]). The module maps a
batch (B, *input_shape) of float32 inputs to (B, embed_dim). Only the embedding is the user's:
the gate and experts stay peer/model.py's, so Eq. 8-11 and the byte accounting hold unchanged.

Both the peers (to train) and the coordinator (for the tensor schema it checks uploads
against) call build_plugin_embedding, so every process must be able to import the module.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedmoe.common.plugins import PluginError, load_plugin
from fedmoe.common.tensors import WireLimits

FLAG = "--model"
_DUMMY_BATCH = 2  # two rows: catches a module that drops or mixes up the batch dimension


def shared_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The embedding state that is averaged: floating tensors only. An integer buffer (e.g.
    BatchNorm's num_batches_tracked, a step counter) has no meaningful average and would grow
    past --max-tensor-norm: it stays on each peer."""
    return {n: t for n, t in module.state_dict().items() if t.is_floating_point()}


def build_plugin_embedding(
    spec: str, input_shape: tuple[int, ...], embed_dim: int, config: dict[str, Any]
) -> nn.Module:
    """Call the factory `spec` and check its module; PluginError naming the spec if unusable."""
    factory = load_plugin(spec, FLAG)
    try:
        module = factory(tuple(input_shape), int(embed_dim), dict(config))
    except Exception as exc:  # the user's code: report what it raised, with the spec
        raise PluginError(f"{FLAG} {spec} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(module, nn.Module):
        raise PluginError(
            f"{FLAG} {spec} returned a {type(module).__name__}, not a torch nn.Module"
        )
    _check_output(spec, module, tuple(input_shape), int(embed_dim))
    _check_state(spec, module)
    return module


def _check_output(spec: str, module: nn.Module, input_shape: tuple[int, ...], d: int) -> None:
    was_training = module.training
    module.eval()  # no BatchNorm statistics move, no dropout draws from the generator
    try:
        with torch.no_grad():
            out = module(torch.zeros((_DUMMY_BATCH, *input_shape), dtype=torch.float32))
    except Exception as exc:
        raise PluginError(
            f"{FLAG} {spec}: the module fails on a dummy batch of shape "
            f"{(_DUMMY_BATCH, *input_shape)} ({type(exc).__name__}: {exc})"
        ) from exc
    finally:
        module.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise PluginError(f"{FLAG} {spec}: the module returns a {type(out).__name__}, not a tensor")
    if tuple(out.shape) != (_DUMMY_BATCH, d):
        raise PluginError(
            f"{FLAG} {spec}: the module maps a batch of shape {(_DUMMY_BATCH, *input_shape)} to "
            f"{tuple(out.shape)}; it must give (B, embed_dim) = ({_DUMMY_BATCH}, {d}) "
            "(--embed-dim sets embed_dim)"
        )
    if not out.is_floating_point():
        raise PluginError(f"{FLAG} {spec}: the module returns {out.dtype}, not floating point")


def _check_state(spec: str, module: nn.Module) -> None:
    """Names and sizes the wire can carry (common/tensors.py WireLimits)."""
    limits = WireLimits()
    state = shared_state(module)
    if len(state) + 1 > limits.max_tensors:
        raise PluginError(f"{FLAG} {spec}: {len(state)} tensors, more than the wire carries")
    for name, tensor in state.items():
        if len(f"embedding.{name}") > limits.max_name_len:
            raise PluginError(f"{FLAG} {spec}: parameter name {name!r} is too long for the wire")
        if tensor.dim() > limits.max_dims:
            raise PluginError(f"{FLAG} {spec}: {name!r} has more than {limits.max_dims} dims")
        if tensor.numel() * 4 > limits.max_tensor_bytes:
            raise PluginError(f"{FLAG} {spec}: {name!r} is larger than one wire tensor may be")


def plugin_embedding_schema(
    spec: str, input_shape: tuple[int, ...], embed_dim: int, config: dict[str, Any]
) -> dict[str, tuple[int, ...]]:
    """The "embedding.*" names and shapes the coordinator expects of this plug-in."""
    module = build_plugin_embedding(spec, input_shape, embed_dim, config)
    return {f"embedding.{n}": tuple(t.shape) for n, t in shared_state(module).items()}
