"""Eq. 11 on the peer: each own expert becomes the planned weighted sum of source experts."""

from __future__ import annotations

import torch

from fedmoe.common.plan import Term  # shared with the coordinator's strategies: see common/plan.py


def merge_experts(
    rows: dict[int, list[Term]],
    self_id: str,
    own: dict[int, dict[str, torch.Tensor]],
    fetched: dict[tuple[str, int], dict[str, torch.Tensor]],
) -> tuple[dict[int, dict[str, torch.Tensor]], list[tuple[str, int]]]:
    """Returns the new experts (keyed by own index, params named like `own`) and missing sources.

    All sources are snapshots taken at the end of local training, so the order of updates does not
    matter. A source that did not arrive is left out and the row's weights are renormalised over
    what did (if nothing but the expert itself remains, it keeps its own weights).
    """
    merged: dict[int, dict[str, torch.Tensor]] = {}
    missing: list[tuple[str, int]] = []
    for m, terms in rows.items():
        available = []
        for t in terms:
            source = (
                own.get(t.expert) if t.peer_id == self_id else fetched.get((t.peer_id, t.expert))
            )
            if source is None:
                missing.append((t.peer_id, t.expert))
            else:
                available.append((t.weight, source))
        total = sum(w for w, _ in available)
        if not available or total <= 0:
            continue
        out = {}
        for name in own[m]:
            suffix = name.split(".", 2)[2]  # "experts.<m>.fc1.weight" -> "fc1.weight"
            acc = torch.zeros_like(own[m][name], dtype=torch.float32)
            for w, src in available:
                # Fetched experts arrive on the CPU; the own ones live on the model's device.
                acc += (w / total) * _param(src, suffix).to(acc.device, torch.float32)
            out[name] = acc.to(own[m][name].dtype)
        merged[m] = out
    return merged, missing


def _param(expert: dict[str, torch.Tensor], suffix: str) -> torch.Tensor:
    for name, value in expert.items():
        if name.split(".", 2)[2] == suffix:
            return value
    raise KeyError(f"expert lacks parameter {suffix!r}")
