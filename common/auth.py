"""Run credentials: the join token, and the gRPC metadata keys that carry secrets.

A token is read from a file (`--token-file`) or the FEDMOE_TOKEN environment variable, never from
the command line, where every user of the machine could read it in the process list.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path

from fedmoe.common.atomic import atomic_write_bytes
from fedmoe.common.logsafe import clip_text
from fedmoe.common.refusal import Reason, Refused

TOKEN_METADATA = "x-fedmoe-token"
SESSION_METADATA = "x-fedmoe-session"
TOKEN_ENV = "FEDMOE_TOKEN"
MIN_TOKEN_CHARS = 16


class CredentialError(ValueError):
    pass


def load_token(token_file: str | Path | None) -> str | None:
    """The token from the file if given, else from FEDMOE_TOKEN, else None."""
    if token_file:
        path = Path(token_file)
        try:
            token = path.read_text().strip()
        except OSError as e:
            raise CredentialError(f"cannot read token file {path}: {e.strerror}") from e
        if path.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH):
            # Not fatal (bind-mounted secrets are often 0644), but worth saying.
            print(f"warning: token file {path} is readable by other users", flush=True)
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
        if not token:
            return None
    if len(token) < MIN_TOKEN_CHARS:
        raise CredentialError(f"the join token must have at least {MIN_TOKEN_CHARS} characters")
    return token


def new_token_file(path: Path) -> str:
    """Create a random token, readable by the owner only (also when `path` existed before)."""
    token = secrets.token_urlsafe(32)
    atomic_write_bytes(path, (token + "\n").encode(), mode=0o600)
    return token


MAX_SECRET_CHARS = 128  # a longer session or member secret is none (never hashed)
UNKNOWN_SESSION = "unknown or expired session: join the run first"


def session_owner(sessions: Mapping[str, str], session: str) -> str:
    """The peer_id whose session `session` is, from digest -> peer_id, or Refused: the one
    session check of the coordinator's membership and of its liveness process's mirror."""
    if session and len(session) <= MAX_SECRET_CHARS:
        peer_id = sessions.get(secret_digest(session))
        if peer_id is not None:
            return peer_id
    raise Refused(Reason.UNKNOWN_CALLER, UNKNOWN_SESSION)


def acting_as(peer_id: str, claimed: str) -> None:
    """A session may act only as its own member: `claimed` (a request's peer_id, empty for
    "myself") must be `peer_id`, or Refused (the caller's string clipped in the message)."""
    if claimed and claimed != peer_id:
        raise Refused(Reason.NOT_ALLOWED, f"session of {peer_id} used as {clip_text(claimed)}")


def secret_digest(secret: str) -> str:
    """Sessions and member secrets are looked up and stored by digest, never compared as text
    (the coordinator's membership, and its liveness process's mirror)."""
    return hashlib.sha256(secret.encode()).hexdigest()
