"""CIFAR-100, Fashion-MNIST and SVHN read from --data-dir in torchvision's on-disk layouts.

Nothing is downloaded: a missing file is a DataError that says where the files go. Every file
is validated (shapes, dtypes, label ranges) before use, since --data-dir is outside our control.
Each loader returns (x float32 normalised per channel, y int64) for train and test.
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path
from typing import Any

import numpy as np

from fedmoe.common.safe_pickle import load_restricted

Arrays = tuple[np.ndarray, np.ndarray]


class VisionDataError(ValueError):
    """A file is missing or malformed (common/data.py turns it into a DataError)."""


def _normalise(x: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """uint8 N x C x H x W -> float32 in standard units per channel."""
    shape = (1, len(mean), 1, 1)
    m = np.array(mean, dtype=np.float32).reshape(shape)
    s = np.array(std, dtype=np.float32).reshape(shape)
    return (x.astype(np.float32) / np.float32(255.0) - m) / s


# --------------------------------------------------------------------------- CIFAR-100

CIFAR100_DIR = "cifar-100-python"
CIFAR100_LAYOUT = (
    f"expected <data-dir>/{CIFAR100_DIR}/ in the standard CIFAR-100 python layout "
    "(train, test and meta; get cifar-100-python.tar.gz from "
    "https://www.cs.toronto.edu/~kriz/cifar.html and unpack it into <data-dir>)"
)
_CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
_CIFAR100_STD = (0.2673, 0.2564, 0.2762)
_CIFAR_ROW = 3 * 32 * 32


def _entry(d: dict[Any, Any], key: str) -> Any:
    for k in (key.encode(), key):  # Python 2 pickles have bytes keys, re-pickled ones str
        if k in d:
            return d[k]
    raise KeyError(key)


def _read_cifar100_file(path: Path) -> Arrays:
    if not path.is_file():
        raise VisionDataError(f"CIFAR-100 file {path} does not exist; {CIFAR100_LAYOUT}")
    try:
        batch = load_restricted(path)
    except Exception as exc:  # truncated, not a pickle, or a refused global
        raise VisionDataError(
            f"CIFAR-100 file {path} is not a readable CIFAR pickle ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(batch, dict):
        raise VisionDataError(f"CIFAR-100 file {path} holds a {type(batch).__name__}, not a dict")
    try:
        data, labels = _entry(batch, "data"), np.asarray(_entry(batch, "fine_labels"))
    except KeyError as exc:
        raise VisionDataError(f"CIFAR-100 file {path} has no {exc.args[0]!r} entry") from None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise VisionDataError(f"CIFAR-100 file {path}: 'data' must be a 2-D uint8 array")
    if data.shape[1] != _CIFAR_ROW:
        raise VisionDataError(
            f"CIFAR-100 file {path}: 'data' has shape {data.shape}, expected (n, {_CIFAR_ROW})"
        )
    if labels.shape != (data.shape[0],) or (labels.size and labels.dtype.kind not in "iu"):
        raise VisionDataError(
            f"CIFAR-100 file {path}: 'fine_labels' must be {data.shape[0]} integers"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 99):
        raise VisionDataError(f"CIFAR-100 file {path}: 'fine_labels' must lie in 0..99")
    x = _normalise(data.reshape(-1, 3, 32, 32), _CIFAR100_MEAN, _CIFAR100_STD)
    return x, labels.astype(np.int64)


def load_cifar100(root: Path) -> tuple[Arrays, Arrays]:
    folder = root / CIFAR100_DIR
    if not folder.is_dir():
        raise VisionDataError(f"{folder} is missing (nothing is downloaded); {CIFAR100_LAYOUT}")
    return _read_cifar100_file(folder / "train"), _read_cifar100_file(folder / "test")


# --------------------------------------------------------------------------- Fashion-MNIST

FASHION_DIR = Path("FashionMNIST") / "raw"
FASHION_LAYOUT = (
    f"expected <data-dir>/{FASHION_DIR}/ holding train-images-idx3-ubyte, "
    "train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (each may be "
    ".gz), as torchvision.datasets.FashionMNIST lays them out"
)
_FASHION_MEAN = (0.2860,)
_FASHION_STD = (0.3530,)
_IDX_UBYTE = 0x08  # IDX type code of unsigned bytes
# Fashion-MNIST's largest file is 47 MB unpacked; a bound keeps a planted gzip bomb harmless.
_IDX_MAX_BYTES = 256 << 20


def _read_idx(path: Path, dims: int) -> np.ndarray:
    """An IDX file of unsigned bytes with `dims` dimensions (gzip or not), validated."""
    with gzip.open(path) if path.suffix == ".gz" else open(path, "rb") as f:
        raw = f.read(_IDX_MAX_BYTES + 1)
    if len(raw) > _IDX_MAX_BYTES:
        raise VisionDataError(f"IDX file {path} is larger than {_IDX_MAX_BYTES >> 20} MiB")
    if len(raw) < 4 + 4 * dims:
        raise VisionDataError(f"IDX file {path} is too short for its header")
    zero, kind, ndim = int.from_bytes(raw[:2], "big"), raw[2], raw[3]
    if zero != 0 or kind != _IDX_UBYTE or ndim != dims:
        raise VisionDataError(
            f"IDX file {path}: header says type 0x{kind:02x} with {ndim} dimensions, "
            f"expected unsigned bytes (0x08) with {dims}"
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    count = math.prod(shape)  # Python ints: a forged header cannot overflow
    if len(raw) != 4 + 4 * dims + count:
        raise VisionDataError(
            f"IDX file {path}: {len(raw) - 4 - 4 * dims} data bytes for shape {shape}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _fashion_file(folder: Path, stem: str) -> Path:
    for name in (stem, f"{stem}.gz"):
        if (folder / name).is_file():
            return folder / name
    raise VisionDataError(f"Fashion-MNIST file {folder / stem}[.gz] is missing; {FASHION_LAYOUT}")


def _read_fashion_split(folder: Path, prefix: str) -> Arrays:
    images = _read_idx(_fashion_file(folder, f"{prefix}-images-idx3-ubyte"), 3)
    labels = _read_idx(_fashion_file(folder, f"{prefix}-labels-idx1-ubyte"), 1)
    if images.shape[1:] != (28, 28):
        raise VisionDataError(f"Fashion-MNIST {prefix} images are {images.shape[1:]}, not 28x28")
    if labels.shape[0] != images.shape[0]:
        raise VisionDataError(
            f"Fashion-MNIST {prefix}: {images.shape[0]} images but {labels.shape[0]} labels"
        )
    if labels.size and labels.max() > 9:
        raise VisionDataError(f"Fashion-MNIST {prefix} labels must lie in 0..9")
    x = _normalise(images.reshape(-1, 1, 28, 28), _FASHION_MEAN, _FASHION_STD)
    return x, labels.astype(np.int64)


def load_fashion_mnist(root: Path) -> tuple[Arrays, Arrays]:
    folder = root / FASHION_DIR
    if not folder.is_dir():
        raise VisionDataError(f"{folder} is missing (nothing is downloaded); {FASHION_LAYOUT}")
    return _read_fashion_split(folder, "train"), _read_fashion_split(folder, "t10k")


# --------------------------------------------------------------------------- SVHN

SVHN_LAYOUT = (
    "expected <data-dir>/train_32x32.mat and <data-dir>/test_32x32.mat (the cropped-digit "
    "format 2 files of http://ufldl.stanford.edu/housenumbers/, as torchvision.datasets.SVHN "
    "keeps them)"
)
_SVHN_MEAN = (0.4377, 0.4438, 0.4728)
_SVHN_STD = (0.1980, 0.2010, 0.1970)


def _read_svhn_file(path: Path) -> Arrays:
    if not path.is_file():
        raise VisionDataError(f"SVHN file {path} is missing (nothing is downloaded); {SVHN_LAYOUT}")
    # scipy comes with scikit-learn (a dependency already); loadmat runs no code from the file.
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path), variable_names=("X", "y"))
    except Exception as exc:  # not a MAT file, truncated, or an unsupported version
        raise VisionDataError(
            f"SVHN file {path} is not a readable MAT file ({type(exc).__name__}: {exc})"
        ) from exc
    if "X" not in mat or "y" not in mat:
        raise VisionDataError(f"SVHN file {path} must hold the variables X and y")
    images, labels = np.asarray(mat["X"]), np.asarray(mat["y"])
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[:3] != (32, 32, 3):
        raise VisionDataError(
            f"SVHN file {path}: X is {images.dtype} {images.shape}, expected uint8 (32, 32, 3, n)"
        )
    n = images.shape[3]
    labels = labels.reshape(-1)
    if labels.shape != (n,) or (n and labels.dtype.kind not in "iuf"):
        raise VisionDataError(f"SVHN file {path}: y must hold {n} labels, got {labels.shape}")
    if n and (not np.all(labels == np.round(labels)) or labels.min() < 1 or labels.max() > 10):
        raise VisionDataError(f"SVHN file {path}: y must hold the digits' labels 1..10")
    # SVHN writes the digit 0 as label 10 (torchvision maps it back to 0 the same way).
    y = labels.astype(np.int64) % 10
    x = _normalise(np.ascontiguousarray(images.transpose(3, 2, 0, 1)), _SVHN_MEAN, _SVHN_STD)
    return x, y


def load_svhn(root: Path) -> tuple[Arrays, Arrays]:
    return _read_svhn_file(root / "train_32x32.mat"), _read_svhn_file(root / "test_32x32.mat")
