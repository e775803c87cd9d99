"""A pre-trained embedding from a file the user brings (--embedding-init), and its freezing.

The file is a torch state_dict saved with `torch.save`, read with `weights_only=True`: tensors
and plain containers only, never arbitrary pickled objects. Its keys are those of the embedding
network ("0.weight", ...) or of a whole model's state_dict ("embedding.0.weight", ...; the rest
of that model is ignored). Names, shapes and values must fit the run's embedding exactly: a
silently partial load would train a different model than the one the user asked for.

Learning logic only: no gRPC here.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

# An error names at most this many mismatches, each clipped: a wrong file can hold thousands.
MAX_LISTED = 5
MAX_NAME_CHARS = 80
PREFIX = "embedding."


class EmbeddingInitError(ValueError):
    """The --embedding-init file cannot be used; the message says which process and why."""


def _where() -> str:
    return f"process {os.getpid()} on host {socket.gethostname()}"


def _clip(name: object) -> str:
    text = repr(name)
    return text if len(text) <= MAX_NAME_CHARS else text[: MAX_NAME_CHARS - 3] + "..."


def _listed(items: list[str]) -> str:
    more = f" (and {len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
    return ", ".join(items[:MAX_LISTED]) + more


def read_state(path: str) -> dict[str, torch.Tensor]:
    """The file's tensors by embedding parameter name ("0.weight"), as float32 on the CPU."""
    where = f"--embedding-init {path}"
    if path.endswith(".safetensors"):
        raise EmbeddingInitError(
            f"{where}: .safetensors is not supported here (the package is not installed); "
            "save the state_dict with torch.save instead"
        )
    file = Path(path)
    if not file.is_file() or not os.access(file, os.R_OK):
        raise EmbeddingInitError(
            f"{where}: {_where()} cannot read it ({'not a readable file' if file.exists() else 'no such file'}); "
            "every peer process loads it itself, so in docker or across machines each peer "
            "needs the file at this path (mount or copy it there)"
        )
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses any pickled object that is not plain data
        raise EmbeddingInitError(
            f"{where}: {_where()} cannot load it as a torch state_dict (torch.save of tensors "
            f"only): {str(e)[:300]}"
        ) from e
    if not isinstance(state, Mapping):
        raise EmbeddingInitError(
            f"{where}: holds a {type(state).__name__}, not a state_dict (a mapping of names "
            "to tensors)"
        )
    if any(isinstance(k, str) and k.startswith(PREFIX) for k in state):  # a whole model's
        state = {
            k[len(PREFIX) :]: v
            for k, v in state.items()
            if isinstance(k, str) and k.startswith(PREFIX)
        }
    bad = [_clip(k) for k, v in state.items() if not isinstance(k, str)]
    bad += [_clip(k) for k, v in state.items() if isinstance(k, str) and not torch.is_tensor(v)]
    if bad:
        raise EmbeddingInitError(f"{where}: entries that are not named tensors: {_listed(bad)}")
    return {k: v.detach().to(torch.float32) for k, v in state.items()}


def check_state(
    state: Mapping[str, torch.Tensor], embedding: nn.Module, path: str = ""
) -> dict[str, torch.Tensor]:
    """`state` checked against `embedding`'s own state_dict: the same names, shapes, finite."""
    where = f"--embedding-init {path}" if path else "the embedding weights"
    own = embedding.state_dict()
    problems = [f"missing {_clip(n)}" for n in own if n not in state]
    problems += [f"unexpected {_clip(n)}" for n in state if n not in own]
    problems += [
        f"{_clip(n)} has shape {list(state[n].shape)}, the model {list(own[n].shape)}"
        for n in own
        if n in state and tuple(state[n].shape) != tuple(own[n].shape)
    ]
    if problems:
        raise EmbeddingInitError(
            f"{where} does not fit this run's embedding network ({len(own)} tensors): "
            + _listed(problems)
        )
    for name in own:
        if not torch.isfinite(state[name]).all():
            raise EmbeddingInitError(f"{where}: tensor {_clip(name)} has NaN or infinite values")
    return {n: state[n] for n in own}


def load_embedding(embedding: nn.Module, path: str) -> None:
    """Overwrite `embedding`'s weights (and buffers, e.g. BatchNorm statistics) from `path`."""
    state = check_state(read_state(path), embedding, path)
    own = embedding.state_dict()
    with torch.no_grad():
        for name, value in state.items():
            own[name].copy_(value.to(own[name].dtype))


def freeze(embedding: nn.Module) -> None:
    """No gradient for any of its parameters (the optimizer gets only trainable ones); its
    BatchNorm statistics stay too as long as it is in eval mode (see LocalTrainer._train)."""
    for p in embedding.parameters():
        p.requires_grad_(False)
