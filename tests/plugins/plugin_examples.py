"""Plug-ins for tests/test_plugins.py, imported by name (`plugin_examples:tiny_embedding`) by
the launcher, the coordinator and every peer: the tests put this folder on PYTHONPATH, as a user
does with the folder of their own module. Not a test module itself (no test_ prefix)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

CLASSES, FEATURES = 3, 6


def tiny_embedding(
    input_shape: tuple[int, ...], embed_dim: int, config: dict[str, Any]
) -> nn.Module:
    """Flatten, linear, BatchNorm (whose integer step counter must stay local), tanh."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), embed_dim),
        nn.BatchNorm1d(embed_dim),
        nn.Tanh(),
    )


def wrong_width(input_shape: tuple[int, ...], embed_dim: int, config: dict[str, Any]) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), embed_dim + 1))


def not_a_module(input_shape: tuple[int, ...], embed_dim: int, config: dict[str, Any]) -> Any:
    return "a string"


def _blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    means = np.random.default_rng(1234).normal(0.0, 3.0, size=(CLASSES, FEATURES))
    y = np.arange(n) % CLASSES
    x = means[y] + np.random.default_rng(seed).normal(size=(n, FEATURES))
    return x, y  # float64 x: the system converts it


def blobs(data_dir: str | None, seed: int) -> tuple[Any, Any]:
    """Three Gaussian blobs in 6 features: numpy (x, y) pairs."""
    return _blobs(240, 1), _blobs(60, 2)


def blobs_torch(data_dir: str | None, seed: int) -> tuple[Any, Any]:
    """The same blobs as torch Datasets of (tensor, int) items."""
    (x, y), (xt, yt) = blobs(data_dir, seed)

    def ds(a: np.ndarray, b: np.ndarray) -> torch.utils.data.Dataset:
        return torch.utils.data.TensorDataset(
            torch.from_numpy(a.astype(np.float32)), torch.from_numpy(b)
        )

    return ds(x, y), ds(xt, yt)


DECLARED_CALLS: list[int] = []  # how often blobs_declared ran in this process


def blobs_declared(data_dir: str | None, seed: int) -> tuple[Any, Any]:
    DECLARED_CALLS.append(seed)
    return blobs(data_dir, seed)


# The coordinator reads these instead of loading the data.
blobs_declared.input_shape = (FEATURES,)  # type: ignore[attr-defined]
blobs_declared.num_classes = CLASSES  # type: ignore[attr-defined]


def float_labels(data_dir: str | None, seed: int) -> tuple[Any, Any]:
    (x, y), test = blobs(data_dir, seed)
    return (x, y.astype(np.float32)), test


def with_nan(data_dir: str | None, seed: int) -> tuple[Any, Any]:
    (x, y), test = blobs(data_dir, seed)
    x[3, 2] = np.nan
    return (x, y), test


def negative_label(data_dir: str | None, seed: int) -> tuple[Any, Any]:
    (x, y), test = blobs(data_dir, seed)
    y = y.copy()
    y[0] = -1
    return (x, y), test


def short_labels(data_dir: str | None, seed: int) -> tuple[Any, Any]:
    (x, y), test = blobs(data_dir, seed)
    return (x, y[:-1]), test


def mismatched_shapes(data_dir: str | None, seed: int) -> tuple[Any, Any]:
    (x, y), (xt, yt) = blobs(data_dir, seed)
    return (x, y), (xt[:, :5], yt)


def one_part(data_dir: str | None, seed: int) -> Any:
    return blobs(data_dir, seed)[0]


def raises(data_dir: str | None, seed: int) -> Any:
    raise FileNotFoundError("no such file: /nowhere/data.npz")
