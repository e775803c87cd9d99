"""Fault injection for the reliability tests: crash this process at a named point.

FEDMOE_FAULTS="point=value,..." arms points; nothing happens when it is unset. Points:
  kill_after_round=R           after round R is written (coordinator) or reported (peer)
  kill_after_served_chunks=N   peer: after streaming N expert chunks to other peers
A point may name the one member it applies to, `point=value@peer-K`: since one process may host
several peers, the kill then fires only when that hosted peer reaches the point (and kills the
whole process, all its peers with it). A targeted point never fires in the coordinator.
The kill is SIGKILL: no cleanup, no flushing, exactly like a machine losing power.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

_lock = threading.Lock()
_counters: dict[str, int] = {}


def _entries() -> list[tuple[str, int, str | None]]:
    """(point, value, target or None) for every armed item."""
    out: list[tuple[str, int, str | None]] = []
    for item in os.environ.get("FEDMOE_FAULTS", "").split(","):
        name, sep, rest = item.partition("=")
        if not sep:
            continue
        value, at, target = rest.partition("@")
        out.append((name.strip(), int(value), target.strip() if at else None))
    return out


def armed(point: str, target: str | None = None) -> int | None:
    """The value armed for `point` in the caller `target` (a hosted peer id, or None).

    An item aimed at `target` wins over an untargeted one; items aimed at someone else, or at
    anyone when the caller names no target, do not apply."""
    untargeted = None
    for name, value, aimed in _entries():
        if name != point:
            continue
        if aimed is None:
            untargeted = value if untargeted is None else untargeted
        elif target is not None and aimed == target:
            return value
    return untargeted


def kill_now(reason: str) -> None:
    print(f"FAULT INJECTED: {reason}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def at_round_end(round_: int, target: str | None = None) -> None:
    if armed("kill_after_round", target) == round_:
        kill_now(f"kill after round {round_}" + (f" ({target})" if target else ""))


def count(point: str, target: str | None = None) -> None:
    limit = armed(point, target)
    if limit is None:
        return
    # A targeted point counts that peer's events only; an untargeted one the whole process's.
    aimed = any(n == point and t == target for n, _, t in _entries() if t is not None)
    key = f"{point}@{target}" if aimed else point
    with _lock:
        _counters[key] = _counters.get(key, 0) + 1
        if _counters[key] >= limit:
            kill_now(f"{point} reached {limit}" + (f" ({target})" if aimed else ""))
