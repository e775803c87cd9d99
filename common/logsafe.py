"""Strings from the network go into logs and files only clipped: an attacker controls their size."""

from __future__ import annotations

MAX_LOGGED_CHARS = 64


def clip(value: object, limit: int = MAX_LOGGED_CHARS) -> str:
    """`repr` of a caller-controlled value, cut to `limit` characters with its true length noted."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...({len(text)} chars)"


def clip_text(value: str, limit: int = MAX_LOGGED_CHARS) -> str:
    """A caller-controlled name as plain text (no quotes), unprintable characters escaped and
    cut to `limit` characters: for ids that are usually short and well-formed, like "peer-3"."""
    text = value if value.isprintable() else value.encode("unicode_escape").decode("ascii")
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...({len(value)} chars)"
