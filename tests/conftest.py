"""Shared test fixtures. Tests never reach beyond this machine: downloads are disabled."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["FEDMOE_NO_DOWNLOAD"] = "1"

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR = REPO.parent / "shared" / "data" / "cifar10-subset"


@pytest.fixture(scope="session")
def cifar_dir() -> str:
    if not (SHARED_CIFAR / "cifar-10-batches-py").is_dir():
        pytest.fail(
            f"the CIFAR-10 subset is expected at {SHARED_CIFAR} (../shared beside the repo)"
        )
    return str(SHARED_CIFAR)
