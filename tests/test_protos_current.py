"""The committed generated code must be what protos/*.proto generates today."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from gen_protos import generate  # noqa: E402


def test_generated_code_is_current(tmp_path: Path) -> None:
    fresh = generate(tmp_path)
    assert fresh, "protoc generated nothing"
    for path in fresh:
        committed = REPO / "common" / "proto" / path.name
        assert committed.read_text() == path.read_text(), (
            f"{committed} is stale: run `make protos` after editing protos/*.proto"
        )
