"""Datasets and the non-IID partitioning used by fedmoe peers.

Every peer runs the same deterministic code with the same seed, so all peers agree on the
partition without exchanging any data; each then keeps only its own rows.
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmoe.common.data_plugin import LoaderError, declared_spec, load_plugin_arrays
from fedmoe.common.plugins import PluginError, is_plugin_spec
from fedmoe.common.safe_pickle import load_restricted
from fedmoe.common.vision_data import (
    VisionDataError,
    load_cifar100,
    load_fashion_mnist,
    load_svhn,
)

DATASETS = ("digits", "cifar10", "synthetic", "cifar100", "fashion-mnist", "svhn")
# Shape of one sample and number of classes, known without loading anything (the coordinator
# derives the model's tensor schema from these). A plug-in (--dataset MODULE:FUNCTION) is not
# here: dataset_spec() asks it.
DATASET_SPECS: dict[str, tuple[tuple[int, ...], int]] = {
    "digits": ((64,), 10),
    "cifar10": ((3, 32, 32), 10),
    "synthetic": ((32,), 10),
    "cifar100": ((3, 32, 32), 100),
    "fashion-mnist": ((1, 28, 28), 10),
    "svhn": ((3, 32, 32), 10),
}
# Read by common/vision_data.py from torchvision's on-disk layouts (never downloaded).
_VISION_LOADERS = {
    "cifar100": load_cifar100,
    "fashion-mnist": load_fashion_mnist,
    "svhn": load_svhn,
}

# The synthetic task (class means) must be identical for every run, so it has its own constant seed.
_SYNTHETIC_TASK_SEED = 20240601
_SYNTHETIC_CLASSES = 10
_SYNTHETIC_FEATURES = 32
_SYNTHETIC_TRAIN = 2000
_SYNTHETIC_TEST = 500
# Chosen so that a small MLP reaches roughly 80-90 % test accuracy: learnable, but not trivial.
_SYNTHETIC_NOISE_STD = 1.75

# The digits train/test split uses a constant seed so the test set is the same for every run seed.
_DIGITS_SPLIT_SEED = 0
_DIGITS_TEST_FRACTION = 0.2

_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST_FILE = "test_batch"
_CIFAR_ROW = 3 * 32 * 32
_CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32).reshape(1, 3, 1, 1)
_CIFAR_STD = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32).reshape(1, 3, 1, 1)
_CIFAR_LAYOUT = (
    f"expected <data-dir>/{_CIFAR_DIR}/ in the standard CIFAR-10 python layout: "
    "data_batch_1 .. data_batch_5 (at least one), test_batch and batches.meta"
)
# torchvision's download sets no timeout; without one an unreachable host can hang for minutes.
_DOWNLOAD_SOCKET_TIMEOUT_S = 20.0
_CIFAR_DOWNLOAD_HOST = "www.cs.toronto.edu"  # where torchvision.datasets.CIFAR10 downloads from

# Redrawing is cheap, but an impossible min_size must end in an error rather than a hang.
_MAX_SPLIT_ATTEMPTS = 1000


class DataError(ValueError):
    """A dataset could not be loaded or split; the message is meant for the user."""


@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """In-memory dataset; eq=False because numpy arrays have no single truth value."""

    x: np.ndarray  # float32; images N x C x H x W, flat inputs N x F
    y: np.ndarray  # int64 labels, shape (N,)
    num_classes: int
    input_shape: tuple[int, ...]  # shape of one sample, e.g. (3, 32, 32) or (64,)

    def __post_init__(self) -> None:
        # Catch shape mix-ups here rather than deep inside a training loop.
        if self.y.ndim != 1 or self.x.shape[0] != self.y.shape[0]:
            raise DataError(f"x has {self.x.shape[0]} rows but y has shape {self.y.shape}")
        if tuple(self.x.shape[1:]) != tuple(self.input_shape):
            raise DataError(f"x rows have shape {self.x.shape[1:]}, expected {self.input_shape}")

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True, eq=False)
class PeerData:
    train: ArrayDataset  # the rows the peer trains on (its partition less `val`)
    local_test: ArrayDataset
    global_test: ArrayDataset
    class_counts: np.ndarray  # label histogram of `train`
    val: ArrayDataset | None = None  # held out of the peer's own partition; None: no split


def _make(x: np.ndarray, y: np.ndarray, num_classes: int) -> ArrayDataset:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return ArrayDataset(
        x=x,
        y=np.asarray(y, dtype=np.int64),
        num_classes=num_classes,
        input_shape=tuple(int(d) for d in x.shape[1:]),
    )


def subset(ds: ArrayDataset, indices: np.ndarray) -> ArrayDataset:
    """Rows `indices` of `ds`; fancy indexing copies, so the full arrays can be freed afterwards."""
    return ArrayDataset(
        x=ds.x[indices], y=ds.y[indices], num_classes=ds.num_classes, input_shape=ds.input_shape
    )


def _check_seed(seed: int) -> None:
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}")


# --------------------------------------------------------------------------- loaders


def _load_synthetic(seed: int) -> tuple[ArrayDataset, ArrayDataset]:
    means = np.random.default_rng(_SYNTHETIC_TASK_SEED).normal(
        0.0, 1.0, size=(_SYNTHETIC_CLASSES, _SYNTHETIC_FEATURES)
    )
    # Samples (not the task) depend on the run seed.
    rng = np.random.default_rng(seed)

    def draw(n: int) -> ArrayDataset:
        y = rng.permutation(np.repeat(np.arange(_SYNTHETIC_CLASSES), n // _SYNTHETIC_CLASSES))
        x = means[y] + rng.normal(0.0, _SYNTHETIC_NOISE_STD, size=(len(y), _SYNTHETIC_FEATURES))
        return _make(x, y, _SYNTHETIC_CLASSES)

    return draw(_SYNTHETIC_TRAIN), draw(_SYNTHETIC_TEST)


def _load_digits() -> tuple[ArrayDataset, ArrayDataset]:
    """sklearn's bundled 8x8 digits, 64 features in [0, 1].

    Split 80/20, stratified by label, with the constant seed 0 (not the run seed), so the test set
    is the same for every run.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = bunch.data / 16.0  # pixel values are 0..16
    y = bunch.target
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=_DIGITS_TEST_FRACTION, stratify=y, random_state=_DIGITS_SPLIT_SEED
    )
    return _make(x_tr, y_tr, 10), _make(x_te, y_te, 10)


def _get(batch: dict[Any, Any], key: str) -> Any:
    # Batches pickled by Python 2 have bytes keys, re-pickled ones have str keys.
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    raise KeyError(key)


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate one CIFAR-10 python batch; returns (uint8 data n x 3072, int64 labels)."""
    try:
        batch = load_restricted(path)  # numpy arrays, lists and bytes only: no code runs
    except FileNotFoundError:
        raise DataError(f"CIFAR-10 batch {path} does not exist; {_CIFAR_LAYOUT}") from None
    except Exception as exc:  # truncated or non-pickle files raise many different types
        raise DataError(
            f"CIFAR-10 batch {path} is not a readable pickle ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(batch, dict):
        raise DataError(f"CIFAR-10 batch {path} holds a {type(batch).__name__}, expected a dict")
    try:
        data = _get(batch, "data")
        raw_labels = _get(batch, "labels")
    except KeyError as exc:
        raise DataError(f"CIFAR-10 batch {path} has no {exc.args[0]!r} entry") from None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        kind = getattr(data, "dtype", type(data).__name__)
        raise DataError(f"CIFAR-10 batch {path}: 'data' must be a uint8 array, got {kind}")
    if data.ndim != 2 or data.shape[1] != _CIFAR_ROW:
        raise DataError(
            f"CIFAR-10 batch {path}: 'data' has shape {data.shape}, expected (n, {_CIFAR_ROW})"
        )
    labels = np.asarray(raw_labels)
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise DataError(
            f"CIFAR-10 batch {path}: 'labels' has shape {labels.shape}, "
            f"expected ({data.shape[0]},) to match 'data'"
        )
    if labels.size and (labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() > 9):
        raise DataError(f"CIFAR-10 batch {path}: 'labels' must be integers in 0..9")
    return data, labels.astype(np.int64)


def _cifar_images(data: np.ndarray) -> np.ndarray:
    # Each row is 1024 R, then 1024 G, then 1024 B values of a row-major 32x32 image.
    x = data.reshape(-1, 3, 32, 32).astype(np.float32) / np.float32(255.0)
    return (x - _CIFAR_MEAN) / _CIFAR_STD


def _read_cifar_split(paths: list[Path]) -> ArrayDataset:
    parts = [read_cifar_batch(p) for p in paths]
    x = np.concatenate([_cifar_images(d) for d, _ in parts])
    y = np.concatenate([lab for _, lab in parts])
    return _make(x, y, 10)


def _check_download_host() -> None:
    """Fail fast (without importing torchvision) when the download host cannot even be resolved.

    Skipped behind a proxy, where the host need not resolve locally.
    """
    if urllib.request.getproxies():
        return
    socket.getaddrinfo(_CIFAR_DOWNLOAD_HOST, 443)


def _download_cifar(data_dir: Path, batch_dir: Path) -> None:
    if os.environ.get("FEDMOE_NO_DOWNLOAD"):
        # Set by the test suite (and usable by anyone offline): never touch the network.
        raise DataError(
            f"CIFAR-10 directory {batch_dir} is missing and downloading it is disabled "
            f"(FEDMOE_NO_DOWNLOAD is set); {_CIFAR_LAYOUT}"
        )
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_DOWNLOAD_SOCKET_TIMEOUT_S)
    try:
        _check_download_host()
        import torchvision  # lazy: only this branch needs it, and it is slow to import

        torchvision.datasets.CIFAR10(root=str(data_dir), train=True, download=True)
    except Exception as exc:
        raise DataError(
            f"CIFAR-10 directory {batch_dir} is missing and downloading it failed "
            f"({type(exc).__name__}: {exc}); {_CIFAR_LAYOUT}"
        ) from exc
    finally:
        socket.setdefaulttimeout(previous)
    if not batch_dir.is_dir():
        raise DataError(f"CIFAR-10 download finished but {batch_dir} is missing; {_CIFAR_LAYOUT}")


def _load_cifar10(data_dir: str | None) -> tuple[ArrayDataset, ArrayDataset]:
    """Read the batch files directly: torchvision's md5 check would reject partial copies."""
    if data_dir is None:
        raise DataError("--data-dir is required for cifar10")
    root = Path(data_dir)
    batch_dir = root / _CIFAR_DIR
    if not batch_dir.is_dir():
        _download_cifar(root, batch_dir)
    train_files = [batch_dir / n for n in _CIFAR_TRAIN_FILES if (batch_dir / n).is_file()]
    if not train_files:
        raise DataError(f"no training batch found in {batch_dir}; {_CIFAR_LAYOUT}")
    return _read_cifar_split(train_files), _read_cifar_split([batch_dir / _CIFAR_TEST_FILE])


def load_dataset(name: str, data_dir: str | None, seed: int) -> tuple[ArrayDataset, ArrayDataset]:
    """Returns (train, test).

    `seed` only affects the samples of `synthetic`; the digits split and CIFAR-10 are fixed.
    """
    _check_seed(seed)
    if name == "synthetic":
        return _load_synthetic(seed)
    if name == "digits":
        return _load_digits()
    if name == "cifar10":
        return _load_cifar10(data_dir)
    if name in _VISION_LOADERS:
        if data_dir is None:
            raise DataError(f"--data-dir is required for {name}")
        try:
            (x_tr, y_tr), (x_te, y_te) = _VISION_LOADERS[name](Path(data_dir))
        except (VisionDataError, OSError, EOFError) as exc:
            raise DataError(f"{name}: {exc}") from exc
        classes = DATASET_SPECS[name][1]
        return _make(x_tr, y_tr, classes), _make(x_te, y_te, classes)
    if is_plugin_spec(name):
        try:
            (x_tr, y_tr), (x_te, y_te), classes = load_plugin_arrays(name, data_dir, seed)
        except (LoaderError, PluginError) as exc:
            raise DataError(str(exc)) from exc
        return _make(x_tr, y_tr, classes), _make(x_te, y_te, classes)
    raise DataError(
        f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}, or a plug-in "
        "MODULE:FUNCTION"
    )


def dataset_spec(name: str, data_dir: str | None, seed: int) -> tuple[tuple[int, ...], int]:
    """(shape of one sample, number of classes) of a data set: a built-in's from DATASET_SPECS;
    a plug-in's from its declared attributes, else by loading it (cached per process)."""
    if name in DATASET_SPECS:
        return DATASET_SPECS[name]
    try:
        declared = declared_spec(name) if is_plugin_spec(name) else None
    except (LoaderError, PluginError) as exc:
        raise DataError(str(exc)) from exc
    if declared is not None:
        return declared
    train, _ = load_dataset(name, data_dir, seed)  # not kept: only its shapes are needed
    return train.input_shape, train.num_classes


# --------------------------------------------------------------------------- partitioning


def dirichlet_split(
    labels: np.ndarray, num_peers: int, alpha: float, seed: int, min_size: int | None = None
) -> list[np.ndarray]:
    """Non-IID split of sample indices over peers (one sorted index array per peer).

    For each class, proportions ~ Dirichlet(alpha * ones(num_peers)) cut that class's shuffled
    indices; small alpha gives skewed peers, large alpha near-IID ones. The whole draw is
    repeated until every peer has at least `min_size` samples (default
    min(10, len(labels) // (2 * num_peers))). Same inputs always give the same split.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataError(f"labels must be 1-D, got shape {labels.shape}")
    if not isinstance(num_peers, (int, np.integer)) or num_peers < 1:
        raise DataError(f"num_peers must be an integer >= 1, got {num_peers!r}")
    if not np.isfinite(alpha) or alpha <= 0:
        raise DataError(f"alpha must be a finite number > 0, got {alpha!r}")
    _check_seed(seed)
    n = len(labels)
    if min_size is None:
        min_size = min(10, n // (2 * num_peers))
    if min_size < 0:
        raise DataError(f"min_size must be >= 0, got {min_size}")
    if n < num_peers * max(min_size, 1):
        raise DataError(
            f"{n} samples cannot give {num_peers} peers at least {max(min_size, 1)} samples each"
        )

    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(_MAX_SPLIT_ATTEMPTS):
        shards: list[list[np.ndarray]] = [[] for _ in range(num_peers)]
        for idx in by_class:
            idx = rng.permutation(idx)
            props = rng.dirichlet(np.full(num_peers, float(alpha)))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
            for peer, part in enumerate(np.split(idx, cuts)):
                shards[peer].append(part)
        parts = [np.sort(np.concatenate(s)).astype(np.int64) for s in shards]
        if min(len(p) for p in parts) >= min_size:
            return parts
    raise DataError(
        f"could not split {n} samples over {num_peers} peers with alpha={alpha} so that every "
        f"peer gets at least {min_size} samples ({_MAX_SPLIT_ATTEMPTS} attempts); "
        "use a larger alpha or fewer peers"
    )


def label_proportions(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Fraction of each class among `labels` (float64, sums to 1)."""
    labels = np.asarray(labels)
    if labels.size == 0:
        raise DataError("cannot compute label proportions of an empty label set")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(f"labels must lie in 0..{num_classes - 1}")
    counts = np.bincount(labels.astype(np.int64), minlength=num_classes)
    return counts.astype(np.float64) / counts.sum()


def local_test_indices(
    test_labels: np.ndarray, proportions: np.ndarray, size: int, seed: int
) -> np.ndarray:
    """A peer's personal test split: test indices drawn with the peer's label proportions.

    Class c gets round(proportions[c] * size) indices without replacement, capped at what the test
    set has, so the total may differ slightly from `size`. If rounding leaves nothing, one sample
    of the most likely class is taken so the split is never empty. Returns sorted indices.
    """
    test_labels = np.asarray(test_labels)
    proportions = np.asarray(proportions, dtype=np.float64)
    if proportions.ndim != 1 or np.any(proportions < 0) or not np.isfinite(proportions).all():
        raise DataError("proportions must be a 1-D vector of non-negative numbers")
    if size < 0:
        raise DataError(f"size must be >= 0, got {size}")
    _check_seed(seed)
    rng = np.random.default_rng(seed)
    counts = np.rint(proportions * size).astype(np.int64)
    if size > 0 and counts.sum() == 0 and proportions.sum() > 0:
        counts[int(np.argmax(proportions))] = 1
    chosen = []
    for c, k in enumerate(counts):
        pool = np.flatnonzero(test_labels == c)
        k = min(int(k), len(pool))
        if k:
            chosen.append(rng.choice(pool, size=k, replace=False))
    if not chosen:
        return np.empty(0, dtype=np.int64)
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def val_split_indices(
    n: int, fraction: float, seed: int, index: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) positions in a peer's own partition of `n` rows: `fraction` of them, at
    least one, held out for validation. Drawn from (seed, index), so every process and every
    rerun agree. Both sorted, disjoint, together 0..n-1; fraction 0 holds nothing out."""
    if not 0.0 <= fraction <= 0.5:
        raise DataError(f"val_fraction must be in [0, 0.5], got {fraction!r}")
    _check_seed(seed)
    everything = np.arange(n, dtype=np.int64)
    if fraction == 0.0:
        return everything, np.empty(0, dtype=np.int64)
    if n < 2:
        raise DataError(
            f"peer {index} has {n} training sample(s): too few to hold out a validation split "
            "(use --val-fraction 0, a larger --alpha or fewer peers)"
        )
    size = min(max(1, int(round(fraction * n))), n - 1)  # never all: the peer must train
    # A stream of its own (tag 0x7A1), apart from the local test draw of the same (seed, index).
    rng = np.random.default_rng([int(seed), int(index), 0x7A1])
    val = np.sort(rng.choice(n, size=size, replace=False)).astype(np.int64)
    return np.setdiff1d(everything, val, assume_unique=True), val


# --------------------------------------------------------------------------- per-process cache
#
# One process may host many peers (`fedmoe peer --index 0-24`): they read the dataset and draw
# the split once, not once each. Each peer still copies out only its own rows (`subset`); the
# host clears the cache once its peers have their data, so the full training set does not stay.

_CacheKey = tuple[str, str | None, int]
_cache_lock = threading.Lock()
_datasets: dict[_CacheKey, tuple[ArrayDataset, ArrayDataset]] = {}
_splits: dict[tuple[_CacheKey, int, float], list[np.ndarray]] = {}


def _load_split(
    name: str, data_dir: str | None, seed: int, num_peers: int, alpha: float, cache: bool
) -> tuple[ArrayDataset, ArrayDataset, list[np.ndarray]]:
    """(train, test, split); with `cache`, loaded and drawn at most once per process."""
    if not cache:
        train_all, test = load_dataset(name, data_dir, seed)
        return train_all, test, dirichlet_split(train_all.y, num_peers, alpha, seed)
    key: _CacheKey = (name, data_dir, int(seed))
    # One lock for loading: peers of one process asking at once wait for the first load instead
    # of all reading the files in parallel.
    with _cache_lock:
        if key not in _datasets:
            _datasets[key] = load_dataset(name, data_dir, seed)
        train_all, test = _datasets[key]
        split_key = (key, int(num_peers), float(alpha))
        if split_key not in _splits:
            _splits[split_key] = dirichlet_split(train_all.y, num_peers, alpha, seed)
        return train_all, test, _splits[split_key]


def clear_dataset_cache() -> None:
    """Drop the cached datasets and splits (the hosted peers keep their own rows)."""
    with _cache_lock:
        _datasets.clear()
        _splits.clear()


def load_peer_data(
    name: str,
    data_dir: str | None,
    num_peers: int,
    index: int,
    alpha: float,
    seed: int,
    cache: bool = False,
    val_fraction: float = 0.0,
) -> PeerData:
    """Data for peer `index` of `num_peers`.

    Every peer computes the same Dirichlet split from `seed` and keeps only its own rows; the
    raw training data of the other peers is dropped right away and never leaves this function
    (with `cache`, for a process hosting several peers: once `clear_dataset_cache()` is called).
    `val_fraction` of the peer's own rows become its validation split, never trained on.
    """
    if not isinstance(num_peers, (int, np.integer)) or num_peers < 1:
        raise DataError(f"num_peers must be an integer >= 1, got {num_peers!r}")
    if not isinstance(index, (int, np.integer)) or not 0 <= index < num_peers:
        raise DataError(f"peer index must be in 0..{num_peers - 1}, got {index!r}")
    train_all, test, split = _load_split(name, data_dir, seed, num_peers, alpha, cache)
    own = subset(train_all, split[index])
    del train_all  # drop the other peers' rows now (the cache, if asked for, until cleared)
    keep, held = val_split_indices(len(own), val_fraction, seed, index)
    train = subset(own, keep) if len(held) else own
    val = subset(own, held) if len(held) else None

    # The personal test split follows the whole partition's labels, so it does not depend on
    # val_fraction: runs with and without a validation split are scored on the same rows.
    proportions = label_proportions(own.y, own.num_classes)
    # Distinct per peer, yet reproducible from (seed, index).
    local_seed = int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])
    size = max(1, len(test) // num_peers)
    local = subset(test, local_test_indices(test.y, proportions, size, local_seed))
    return PeerData(
        train=train,
        local_test=local,
        global_test=test,
        class_counts=np.bincount(train.y, minlength=train.num_classes).astype(np.int64),
        val=val,
    )
