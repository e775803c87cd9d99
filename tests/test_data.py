"""Tests for common.data: loaders, the Dirichlet split and per-peer data."""

from __future__ import annotations

import pickle
import socket
from pathlib import Path

import numpy as np
import pytest

import fedmoe.common.data as data_module
from fedmoe.common.data import (
    DATASETS,
    ArrayDataset,
    DataError,
    dirichlet_split,
    label_proportions,
    load_dataset,
    load_peer_data,
    local_test_indices,
)


def _labels(n_per_class: int = 100, num_classes: int = 10) -> np.ndarray:
    return np.random.default_rng(123).permutation(np.repeat(np.arange(num_classes), n_per_class))


def _mean_max_class_fraction(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    fractions = [np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]
    return float(np.mean(fractions))


# --------------------------------------------------------------------------- dirichlet_split


@pytest.mark.parametrize("alpha", [0.05, 0.5, 1000.0])
def test_dirichlet_split_uses_every_sample_exactly_once(alpha: float) -> None:
    labels = _labels()
    parts = dirichlet_split(labels, num_peers=5, alpha=alpha, seed=1, min_size=0)
    assert len(parts) == 5
    assert all(np.all(np.diff(p) > 0) for p in parts)  # sorted, no duplicates within a peer
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))


def test_dirichlet_split_is_seed_stable() -> None:
    labels = _labels()
    a = dirichlet_split(labels, 4, 0.5, seed=7)
    b = dirichlet_split(labels, 4, 0.5, seed=7)
    c = dirichlet_split(labels, 4, 0.5, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_dirichlet_split_proportions_follow_alpha() -> None:
    labels = _labels(n_per_class=200)
    iid = dirichlet_split(labels, 5, alpha=1000.0, seed=3, min_size=0)
    skewed = dirichlet_split(labels, 5, alpha=0.05, seed=3, min_size=0)
    # Near-uniform peers: the biggest class is barely above 1/10 of a peer's data.
    assert _mean_max_class_fraction(labels, iid) < 0.15
    for p in iid:
        assert np.abs(label_proportions(labels[p], 10) - 0.1).max() < 0.05
    # Skewed peers: most of a peer's data comes from few classes.
    assert _mean_max_class_fraction(labels, skewed) > 0.4


def test_dirichlet_split_respects_min_size() -> None:
    labels = _labels()
    for seed in range(5):
        parts = dirichlet_split(labels, 10, alpha=0.3, seed=seed, min_size=30)
        assert min(len(p) for p in parts) >= 30


def test_dirichlet_split_default_min_size_is_enforced() -> None:
    labels = _labels()
    parts = dirichlet_split(labels, 8, alpha=0.1, seed=0)
    assert min(len(p) for p in parts) >= 10


def test_dirichlet_split_single_peer_gets_everything() -> None:
    labels = _labels(n_per_class=3)
    (only,) = dirichlet_split(labels, 1, alpha=0.1, seed=0)
    np.testing.assert_array_equal(only, np.arange(len(labels)))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_peers": 0}, "num_peers"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": -1.0}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"num_peers": 2000}, "cannot give"),
        ({"seed": -1}, "seed"),
        # 10 peers of >= 95 out of 1000 needs an almost even split, which alpha=0.5 never draws.
        ({"min_size": 95}, "could not split"),
    ],
)
def test_dirichlet_split_bad_arguments(kwargs: dict, match: str) -> None:
    args = {"num_peers": 10, "alpha": 0.5, "seed": 0, **kwargs}
    with pytest.raises(DataError, match=match):
        dirichlet_split(_labels(), **args)


# --------------------------------------------------------------------------- local test split


def test_label_proportions_sum_to_one() -> None:
    props = label_proportions(np.array([0, 0, 1, 3]), 5)
    assert props.dtype == np.float64
    np.testing.assert_allclose(props, [0.5, 0.25, 0.0, 0.25, 0.0])
    with pytest.raises(DataError):
        label_proportions(np.array([0, 5]), 5)
    with pytest.raises(DataError):
        label_proportions(np.array([], dtype=np.int64), 5)


def test_local_test_indices_follow_proportions_and_seed() -> None:
    test_labels = _labels(n_per_class=50)
    props = np.zeros(10)
    props[1], props[2] = 0.75, 0.25
    idx = local_test_indices(test_labels, props, size=40, seed=5)
    counts = np.bincount(test_labels[idx], minlength=10)
    assert counts[0] == 0
    assert counts[1] == 30 and counts[2] == 10 and counts.sum() == 40
    assert np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(idx, local_test_indices(test_labels, props, 40, seed=5))
    assert not np.array_equal(idx, local_test_indices(test_labels, props, 40, seed=6))


def test_local_test_indices_capped_by_available_samples() -> None:
    test_labels = np.array([0] * 3 + [1] * 100)
    idx = local_test_indices(test_labels, np.array([0.5, 0.5]), size=20, seed=0)
    counts = np.bincount(test_labels[idx], minlength=2)
    assert counts.tolist() == [3, 10]


# --------------------------------------------------------------------------- loaders


def test_synthetic_shapes_and_determinism() -> None:
    train, test = load_dataset("synthetic", None, seed=0)
    assert (len(train), len(test)) == (2000, 500)
    assert train.x.shape == (2000, 32) and train.x.dtype == np.float32
    assert train.y.dtype == np.int64 and train.input_shape == (32,)
    assert train.num_classes == 10 and set(np.unique(train.y)) == set(range(10))
    again, _ = load_dataset("synthetic", None, seed=0)
    np.testing.assert_array_equal(train.x, again.x)


def test_synthetic_task_is_learnable_but_not_trivial() -> None:
    # The class means are fixed; a nearest-class-mean classifier fit on one seed must
    # generalise to data drawn with another seed.
    train, _ = load_dataset("synthetic", None, seed=1)
    _, test = load_dataset("synthetic", None, seed=2)
    means = np.stack([train.x[train.y == c].mean(0) for c in range(10)])
    dist = ((test.x[:, None, :] - means[None]) ** 2).sum(-1)
    accuracy = float((dist.argmin(1) == test.y).mean())
    assert 0.6 < accuracy < 0.98


def test_digits_shapes_and_fixed_test_split() -> None:
    train, test = load_dataset("digits", None, seed=0)
    assert (len(train), len(test)) == (1437, 360)
    assert train.x.shape == (1437, 64) and train.x.dtype == np.float32
    assert train.y.dtype == np.int64 and train.input_shape == (64,) and train.num_classes == 10
    assert 0.0 <= train.x.min() and train.x.max() <= 1.0
    # Stratified: every class appears in the test split in about the same share.
    assert np.bincount(test.y, minlength=10).min() >= 30
    _, test_other_seed = load_dataset("digits", None, seed=99)
    np.testing.assert_array_equal(test.x, test_other_seed.x)
    np.testing.assert_array_equal(test.y, test_other_seed.y)


def test_unknown_dataset_is_rejected() -> None:
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("mnist", None, seed=0)
    assert set(DATASETS) == {"digits", "cifar10", "synthetic", "cifar100", "fashion-mnist", "svhn"}


def test_cifar10_subset_loads(cifar_dir: str) -> None:
    train, test = load_dataset("cifar10", cifar_dir, seed=0)
    assert len(train) == 4 * 1017 and len(test) == 1017
    assert train.input_shape == (3, 32, 32) and train.x.shape == (4 * 1017, 3, 32, 32)
    assert train.x.dtype == np.float32 and train.y.dtype == np.int64
    assert set(np.unique(train.y)) == set(range(10)) and test.y.max() <= 9
    # Normalised per channel: means near 0, spreads near 1.
    assert np.all(np.abs(train.x.mean(axis=(0, 2, 3))) < 0.2)
    assert np.all(np.abs(train.x.std(axis=(0, 2, 3)) - 1.0) < 0.2)


def test_cifar10_requires_data_dir() -> None:
    with pytest.raises(DataError, match="--data-dir is required"):
        load_dataset("cifar10", None, seed=0)


def _write_cifar(root: Path, train: dict[str, object], test: object | None = None) -> Path:
    batch_dir = root / "cifar-10-batches-py"
    batch_dir.mkdir(parents=True)
    good = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 9]}
    for name, content in {**train, "test_batch": good if test is None else test}.items():
        path = batch_dir / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_bytes(pickle.dumps(content))
    return batch_dir


def test_cifar10_reads_str_and_bytes_keys(tmp_path: Path) -> None:
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    _write_cifar(tmp_path, {"data_batch_2": {"data": data, "labels": [3, 4]}})
    train, test = load_dataset("cifar10", str(tmp_path), seed=0)
    assert train.y.tolist() == [3, 4] and len(test) == 2
    # Row layout: first 1024 values are the red plane, row-major.
    red_pixel_1 = (data[0, 1] / 255.0 - 0.4914) / 0.2470
    assert train.x[0, 0, 0, 1] == pytest.approx(red_pixel_1, rel=1e-5)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)})[:40], "not a readable pickle"),
        (b"this is not a pickle", "not a readable pickle"),
        ({b"data": np.zeros((2, 3072), np.uint8)}, "labels"),
        ({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}, "shape"),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "uint8"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, "0..9"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "labels"),
        ([1, 2, 3], "expected a dict"),
    ],
)
def test_malformed_cifar_batch_names_the_file(tmp_path: Path, content: object, match: str) -> None:
    _write_cifar(tmp_path, {"data_batch_1": content})
    with pytest.raises(DataError, match=match) as info:
        load_dataset("cifar10", str(tmp_path), seed=0)
    assert "data_batch_1" in str(info.value)


def test_cifar10_missing_test_batch(tmp_path: Path) -> None:
    batch_dir = _write_cifar(tmp_path, {"data_batch_1": b""})
    (batch_dir / "data_batch_1").write_bytes(
        pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [1]})
    )
    (batch_dir / "test_batch").unlink()
    with pytest.raises(DataError, match="test_batch"):
        load_dataset("cifar10", str(tmp_path), seed=0)


def test_cifar10_without_train_batches(tmp_path: Path) -> None:
    _write_cifar(tmp_path, {})
    with pytest.raises(DataError, match="no training batch"):
        load_dataset("cifar10", str(tmp_path), seed=0)


def test_missing_cifar_dir_reports_layout(tmp_path: Path) -> None:
    # The suite runs with FEDMOE_NO_DOWNLOAD=1 (conftest): no traffic leaves this machine.
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", str(tmp_path / "nothing"), seed=0)
    message = str(info.value)
    assert "missing" in message and "download" in message
    assert "cifar-10-batches-py" in message and "data_batch_1" in message


def test_failed_torchvision_download_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The download branch runs, with torchvision's downloader replaced by one that fails the
    # way an offline machine does (no real network traffic from tests).
    import torchvision

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("Network is unreachable")

    monkeypatch.delenv("FEDMOE_NO_DOWNLOAD", raising=False)
    monkeypatch.setattr(data_module, "_check_download_host", lambda: None)
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    before = socket.getdefaulttimeout()
    with pytest.raises(DataError, match="downloading it failed") as info:
        load_dataset("cifar10", str(tmp_path), seed=0)
    assert "Network is unreachable" in str(info.value)
    assert "test_batch" in str(info.value)
    assert socket.getdefaulttimeout() == before  # the temporary timeout is undone


# --------------------------------------------------------------------------- load_peer_data


@pytest.mark.parametrize("name", ["digits", "synthetic"])
def test_peer_train_sets_partition_the_train_set(name: str) -> None:
    full_train, full_test = load_dataset(name, None, seed=4)
    peers = [load_peer_data(name, None, 4, i, alpha=0.5, seed=4) for i in range(4)]
    assert sum(len(p.train) for p in peers) == len(full_train)
    # Same multiset of labels as the full train set: nothing lost, nothing duplicated.
    all_labels = np.concatenate([p.train.y for p in peers])
    np.testing.assert_array_equal(np.bincount(all_labels), np.bincount(full_train.y))
    for p in peers:
        np.testing.assert_array_equal(p.class_counts, np.bincount(p.train.y, minlength=10))
        assert len(p.global_test) == len(full_test)
        assert 0 < len(p.local_test) <= len(full_test) // 4 + 10
        # Classes the peer never trains on do not show up in its local test split.
        absent = np.flatnonzero(p.class_counts == 0)
        assert not np.isin(p.local_test.y, absent).any()


def test_peer_data_is_deterministic_and_differs_between_peers() -> None:
    a = load_peer_data("synthetic", None, 3, 1, alpha=0.3, seed=9)
    b = load_peer_data("synthetic", None, 3, 1, alpha=0.3, seed=9)
    c = load_peer_data("synthetic", None, 3, 2, alpha=0.3, seed=9)
    np.testing.assert_array_equal(a.train.x, b.train.x)
    np.testing.assert_array_equal(a.local_test.y, b.local_test.y)
    assert not np.array_equal(a.class_counts, c.class_counts)


@pytest.mark.parametrize(("num_peers", "index"), [(3, 3), (3, -1), (0, 0)])
def test_peer_index_out_of_range(num_peers: int, index: int) -> None:
    with pytest.raises(DataError):
        load_peer_data("synthetic", None, num_peers, index, alpha=0.5, seed=0)


def test_array_dataset_rejects_mismatched_shapes() -> None:
    with pytest.raises(DataError):
        ArrayDataset(np.zeros((3, 4), np.float32), np.zeros(2, np.int64), 2, (4,))
    with pytest.raises(DataError):
        ArrayDataset(np.zeros((3, 4), np.float32), np.zeros(3, np.int64), 2, (5,))
