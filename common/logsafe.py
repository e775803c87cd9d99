"""Strings from the network go into logs and files only clipped: an attacker controls their size."""

from __future__ import annotations

MAX_LOGGED_CHARS = 64


def clip(value: object, limit: int = MAX_LOGGED_CHARS) -> str:
    """`repr` of a caller-controlled value, cut to `limit` characters with its true length noted."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...({len(text)} chars)"
