"""How `fedmoe local` shows the coordinator's per-round lines: a progress bar on a terminal.

On a terminal: a tqdm bar (rounds done of total, ETA, the last round's mean accuracy), with the
coordinator's lines printed above it. Anywhere else (CI, logs, pipes): the plain lines, as they
come, with no control characters.
"""

from __future__ import annotations

import io
import os
import re
from typing import Any, Protocol, TextIO

# The line coordinator/results.py prints per round: "[fedmoe-da] round 3/20  acc 0.8123  ..."
ROUND_LINE = re.compile(
    r"^\[[\w-]+\] round (?P<round>\d+)/(?P<total>\d+)\s+acc (?P<acc>\d+(?:\.\d+)?)"
    r"\s+global (?P<gacc>\d+(?:\.\d+)?)"
)


class Progress(Protocol):
    def line(self, text: str) -> None: ...
    def close(self) -> None: ...


class PlainProgress:
    """Today's output: every line as it comes."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def line(self, text: str) -> None:
        print(text, end="" if text.endswith("\n") else "\n", file=self.stream, flush=True)

    def close(self) -> None:
        pass


class BarProgress:
    """A bar of `total` rounds; the lines scroll above it."""

    def __init__(self, total: int, stream: TextIO) -> None:
        from tqdm import tqdm

        self.stream = stream
        # Follow the terminal's size; one that reports none (0 x 0, e.g. a bare pty) gets
        # 80 x 24: with 0 rows tqdm would draw nothing at all.
        sized = min(_size(stream)) > 0
        self.bar: Any = tqdm(
            total=total,
            desc="rounds",
            unit="round",
            file=stream,
            dynamic_ncols=sized,
            ncols=None if sized else 80,
            nrows=None if sized else 24,
        )

    def line(self, text: str) -> None:
        self.bar.write(text.rstrip("\n"), file=self.stream)
        match = ROUND_LINE.match(text)
        if match is None:
            return
        done = int(match["round"])
        self.bar.set_postfix(acc=match["acc"], global_acc=match["gacc"], refresh=False)
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)
        else:
            self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _size(stream: TextIO) -> tuple[int, int]:
    """(columns, lines) of the terminal `stream` writes to; (0, 0) when it tells none."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return 0, 0
    return size.columns, size.lines


def choose_progress(total: int, stream: TextIO) -> Progress:
    """The bar when `stream` is a terminal, the plain lines otherwise."""
    isatty = getattr(stream, "isatty", None)
    if callable(isatty) and isatty():
        return BarProgress(total, stream)
    return PlainProgress(stream)
