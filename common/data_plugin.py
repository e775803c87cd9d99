"""A data set plug-in (--dataset MODULE:FUNCTION): call the user's loader, check what it gave.

The loader is `loader(data_dir: str | None, seed: int) -> (train, test)`, each of the two either
a pair of numpy arrays `(x, y)` (x: one row per sample, any numeric dtype; y: integer labels
0..K-1) or a torch Dataset whose items are `(x, y)` pairs. The system then splits and scores it
like a built-in set (common/data.py). Optional attributes `input_shape` (tuple) and
`num_classes` (int) on the loader let the coordinator learn the model's shapes without loading
the data (it loads it once otherwise).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedmoe.common.plugins import load_plugin

Arrays = tuple[np.ndarray, np.ndarray]
FLAG = "--dataset"
MAX_CLASSES = 100_000  # a label far above this is a bug (an id, a hash), not a class


class LoaderError(ValueError):
    """What the loader returned cannot be used; the message names the spec and the part."""


def _from_torch_dataset(ds: Any, what: str) -> Arrays:
    """Stack a map-style torch Dataset of (x, y) items into arrays."""
    import torch

    xs, ys = [], []
    for i in range(len(ds)):
        item = ds[i]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise LoaderError(f"{what}: item {i} is a {type(item).__name__}, expected (x, y)")
        x, y = item
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        elif not isinstance(x, np.ndarray):
            raise LoaderError(
                f"{what}: item {i} has x of type {type(x).__name__}; return tensors or arrays "
                "(e.g. transform=torchvision.transforms.ToTensor() for PIL images)"
            )
        xs.append(x)
        ys.append(int(y.item()) if isinstance(y, (torch.Tensor, np.ndarray)) else y)
    if not xs:
        raise LoaderError(f"{what} is empty")
    if any(x.shape != xs[0].shape for x in xs):
        raise LoaderError(f"{what}: samples differ in shape")
    return np.stack(xs), np.asarray(ys)


def _is_array(value: Any) -> bool:
    return isinstance(value, np.ndarray) or type(value).__name__ == "Tensor"


def _as_arrays(part: Any, what: str) -> Arrays:
    if isinstance(part, (tuple, list)) and len(part) == 2:
        x, y = part
        try:
            import torch

            if isinstance(x, torch.Tensor):
                x = x.detach().cpu().numpy()
            if isinstance(y, torch.Tensor):
                y = y.detach().cpu().numpy()
        except ImportError:  # pragma: no cover - torch is a dependency
            pass
        if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
            raise LoaderError(
                f"{what} must be numpy arrays (x, y), got ({type(x).__name__}, {type(y).__name__})"
            )
        return x, y
    if not _is_array(part) and hasattr(part, "__getitem__") and hasattr(part, "__len__"):
        return _from_torch_dataset(part, what)
    raise LoaderError(
        f"{what} is a {type(part).__name__}: return a pair (x, y) of numpy arrays or a torch "
        "Dataset of (x, y) items"
    )


def _check(x: np.ndarray, y: np.ndarray, what: str) -> Arrays:
    if x.dtype.kind not in "biuf":
        raise LoaderError(f"{what}: x has dtype {x.dtype}, expected numbers")
    if x.ndim < 2:
        raise LoaderError(f"{what}: x has shape {x.shape}; expected one row per sample (N, ...)")
    if y.ndim != 1:
        raise LoaderError(f"{what}: y has shape {y.shape}, expected (N,) labels")
    if y.dtype.kind not in "iu":
        raise LoaderError(f"{what}: y has dtype {y.dtype}, expected integer labels")
    if len(x) != len(y):
        raise LoaderError(f"{what}: x has {len(x)} rows but y has {len(y)} labels")
    if len(y) == 0:
        raise LoaderError(f"{what} is empty")
    if y.min() < 0 or y.max() >= MAX_CLASSES:
        raise LoaderError(f"{what}: labels must lie in 0..K-1 (got {y.min()}..{y.max()})")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise LoaderError(f"{what}: x holds NaN or infinite values")
    return x, y.astype(np.int64)


def load_plugin_arrays(spec: str, data_dir: str | None, seed: int) -> tuple[Arrays, Arrays, int]:
    """(train, test, number of classes) from the loader `spec`, checked; LoaderError (or
    PluginError from the import) with a message that names the spec."""
    loader = load_plugin(spec, FLAG)
    try:
        result = loader(data_dir, seed)
    except Exception as exc:  # the user's code: report what it raised, with the spec
        raise LoaderError(f"{FLAG} {spec} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise LoaderError(f"{FLAG} {spec} must return (train, test), got {type(result).__name__}")
    if all(_is_array(part) for part in result):
        raise LoaderError(
            f"{FLAG} {spec} must return (train, test), each an (x, y) pair or a Dataset; it "
            "returned two arrays (one (x, y) pair?)"
        )
    train = _check(*_as_arrays(result[0], f"{FLAG} {spec}: train"), f"{FLAG} {spec}: train")
    test = _check(*_as_arrays(result[1], f"{FLAG} {spec}: test"), f"{FLAG} {spec}: test")
    if train[0].shape[1:] != test[0].shape[1:]:
        raise LoaderError(
            f"{FLAG} {spec}: train samples have shape {train[0].shape[1:]} but test samples "
            f"{test[0].shape[1:]}"
        )
    classes = int(max(train[1].max(), test[1].max())) + 1
    if classes < 2:
        raise LoaderError(f"{FLAG} {spec}: the labels name only one class")
    declared = getattr(loader, "num_classes", None)
    if declared is not None:  # may exceed the labels seen (a class absent from both parts)
        if not isinstance(declared, int) or declared < classes:
            raise LoaderError(
                f"{FLAG} {spec}: the loader declares num_classes={declared!r} but its labels "
                f"reach {classes - 1}"
            )
        classes = declared
    shape = getattr(loader, "input_shape", None)
    if shape is not None and tuple(shape) != train[0].shape[1:]:
        raise LoaderError(
            f"{FLAG} {spec}: the loader declares input_shape={tuple(shape)} but its samples "
            f"have shape {train[0].shape[1:]}"
        )
    return train, test, classes


def declared_spec(spec: str) -> tuple[tuple[int, ...], int] | None:
    """(input shape, classes) the loader declares as attributes, or None if it does not."""
    loader = load_plugin(spec, FLAG)
    shape, classes = getattr(loader, "input_shape", None), getattr(loader, "num_classes", None)
    if shape is None or classes is None:
        return None
    try:
        return tuple(int(d) for d in shape), int(classes)
    except (TypeError, ValueError) as exc:
        raise LoaderError(f"{FLAG} {spec}: input_shape/num_classes are not integers") from exc
