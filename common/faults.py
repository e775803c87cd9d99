"""Fault injection for the reliability tests: crash this process at a named point.

FEDMOE_FAULTS="point=value,..." arms points; nothing happens when it is unset. Points:
  kill_after_round=R           after round R is written (coordinator) or reported (peer)
  kill_after_served_chunks=N   peer: after streaming N expert chunks to other peers
The kill is SIGKILL: no cleanup, no flushing, exactly like a machine losing power.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

_lock = threading.Lock()
_counters: dict[str, int] = {}


def armed(point: str) -> int | None:
    for item in os.environ.get("FEDMOE_FAULTS", "").split(","):
        name, _, value = item.partition("=")
        if name.strip() == point:
            return int(value)
    return None


def kill_now(reason: str) -> None:
    print(f"FAULT INJECTED: {reason}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def at_round_end(round_: int) -> None:
    if armed("kill_after_round") == round_:
        kill_now(f"kill after round {round_}")


def count(point: str) -> None:
    limit = armed(point)
    if limit is None:
        return
    with _lock:
        _counters[point] = _counters.get(point, 0) + 1
        if _counters[point] >= limit:
            kill_now(f"{point} reached {limit}")
