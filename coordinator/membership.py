"""Who is in the run: members, their identities and sessions, liveness, and the event log.

Pure logic, no gRPC and no lock of its own: the round book calls it under its lock.
"""

from __future__ import annotations

import hmac
import secrets
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from fedmoe.common.auth import MAX_SECRET_CHARS, secret_digest, session_owner
from fedmoe.common.config import participants, takes_part
from fedmoe.common.netaddr import check_advertise
from fedmoe.common.proto import pb
from fedmoe.common.refusal import Reason, Refused

# The event log is bounded: a member (or a stolen token) that rejoins in a loop cannot grow the
# coordinator's memory or its checkpoint. The oldest events give way; their count is kept.
MAX_EVENTS = 512


@dataclass
class Member:
    peer_id: str
    index: int
    address: str
    session: str
    last_seen: float = 0.0
    alive: bool = True
    reported: set[int] = field(default_factory=set)
    joins: int = 1
    secret_digest: str = ""  # of the member secret issued at its first join
    secret: str = ""  # the secret itself, only until the Join reply carries it (never persisted)
    num_samples: int = 0  # declared by its first upload; later uploads must agree

    def to_dict(self) -> dict[str, Any]:
        return {
            "peer_id": self.peer_id,
            "index": self.index,
            "address": self.address,
            "session": self.session,
            "reported": sorted(self.reported),
            "joins": self.joins,
            "alive": self.alive,
            "secret_digest": self.secret_digest,
            "num_samples": self.num_samples,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], now: float) -> Member:
        # Everyone gets a fresh peer_timeout to reconnect and heartbeat again.
        return cls(
            d["peer_id"],
            d["index"],
            d["address"],
            d["session"],
            last_seen=now,
            alive=True,
            reported=set(d["reported"]),
            joins=d["joins"],
            secret_digest=d.get("secret_digest", ""),
            num_samples=d.get("num_samples", 0),
        )


def _proves(member: Member, member_secret: str) -> bool:
    """True if `member_secret` is the secret issued to `member` at its first join."""
    return (
        0 < len(member_secret) <= MAX_SECRET_CHARS
        and bool(member.secret_digest)
        and hmac.compare_digest(member.secret_digest, secret_digest(member_secret))
    )


class EventLog:
    """The last MAX_EVENTS events of the run (joins, silences, rounds nobody reported...)."""

    def __init__(self) -> None:
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self.dropped = 0

    def add(self, kind: str, peers: Iterable[str], open_round: int, **info: Any) -> None:
        if len(self.events) == self.events.maxlen:
            self.dropped += 1
        self.events.append({"event": kind, "peers": list(peers), "open_round": open_round, **info})

    def snapshot(self) -> dict[str, Any]:
        return {"events": list(self.events), "dropped": self.dropped}

    def restore(self, state: dict[str, Any]) -> None:
        self.events.clear()
        self.events.extend(state.get("events", []))
        self.dropped = state.get("dropped", 0)


class Membership:
    def __init__(
        self,
        cfg: pb.RunConfig,
        clock: Callable[[], float],
        log: EventLog,
        advertise_allow: tuple = (),
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        self.log = log
        self.advertise_allow = advertise_allow  # networks advertised addresses must lie in
        self.members: dict[str, Member] = {}
        self._sessions: dict[str, str] = {}  # digest of a session -> peer_id

    def admit(
        self, index: int, address: str, member_secret: str, open_round: int
    ) -> tuple[Member, Member | None]:
        """Admit peer `index`; returns the new member and the one it replaces (a restart).

        An index is an identity: once taken, only the holder of the member secret issued at the
        first join may rejoin under it while the member is alive. A member that went silent
        (left out after `peer_timeout`) may be taken over without it, so that a peer restarted
        without its --state-dir can come back; its history stays with the index.
        """
        if index >= self.cfg.peers:
            raise Refused(
                Reason.BAD_REQUEST,
                f"peer index {index} is out of range for {self.cfg.peers} peers",
            )
        try:
            address = check_advertise(address, self.advertise_allow)
        except ValueError as e:
            raise Refused(Reason.BAD_REQUEST, f"advertised address refused: {e}") from e
        if len(member_secret) > MAX_SECRET_CHARS:
            raise Refused(Reason.BAD_REQUEST, "member secret too long")
        peer_id = f"peer-{index}"
        old = self.members.get(peer_id)
        proven = old is not None and _proves(old, member_secret)
        if old is not None and old.alive and not proven:
            raise Refused(
                Reason.NOT_ALLOWED,
                f"index {index} belongs to a live member; a restarted peer proves it is that "
                "member with the secret issued at its first join (kept in its --state-dir)",
            )
        secret = member_secret if proven else secrets.token_urlsafe(24)
        member = Member(peer_id, index, address, secrets.token_urlsafe(24), self.clock())
        member.secret_digest, member.secret = secret_digest(secret), secret
        if old is not None:  # a restarted peer: new session, same identity and history
            member.reported, member.joins = old.reported, old.joins + 1
            member.num_samples = old.num_samples
            self._sessions.pop(secret_digest(old.session), None)
            self.log.add("rejoined", [peer_id], open_round, proven=proven)
        self.members[peer_id] = member
        self._sessions[secret_digest(member.session)] = peer_id
        return member, old

    def assign(self, hint: int, member_secret: str) -> int:
        """The index an auto peer (JoinRequest.any_index) joins as.

        `hint` and `member_secret` are what it held before (a restarted auto peer): if the secret
        proves that member, it rejoins as it. Otherwise the lowest index no member holds, live or
        silent: a silent member's index stays bound to its secret (its peer may come back with
        its --state-dir); only an explicit `--index K` may take it over (see `admit`).
        """
        old = self.members.get(f"peer-{hint}")
        if old is not None and _proves(old, member_secret):
            return hint
        taken = {m.index for m in self.members.values()}
        free = next((k for k in range(self.cfg.peers) if k not in taken), None)
        if free is not None:
            return free
        silent = sorted(m.index for m in self.members.values() if not m.alive)
        hint_text = (
            f"; silent: {', '.join(map(str, silent[:8]))}{' ...' if len(silent) > 8 else ''} "
            "(restart that peer with its --state-dir, or take it over with --index K)"
            if silent
            else ""
        )
        raise Refused(
            Reason.NOT_ALLOWED,
            f"the run is full: all {self.cfg.peers} peer indices are held by members{hint_text}",
        )

    def session_digests(self) -> dict[str, str]:
        """Digest of every live session -> its peer_id (a copy: the liveness process's mirror)."""
        return dict(self._sessions)

    def authenticate(self, session: str) -> Member:
        return self.members[session_owner(self._sessions, session)]

    def seen(self, member: Member, open_round: int) -> bool:
        """A heartbeat; True if the member was silent and is back."""
        member.last_seen = self.clock()
        if member.alive:
            return False
        member.alive = True
        self.log.add("back", [member.peer_id], open_round)
        return True

    def mark_silent(self, done: set[str], open_round: int) -> bool:
        """Members silent for longer than peer_timeout are left out (except those in `done`,
        which stop heartbeating while they wait for the others); True if any changed."""
        now, changed = self.clock(), False
        for m in self.members.values():
            if m.peer_id in done or self.cfg.rounds in m.reported:
                continue
            if m.alive and now - m.last_seen > self.cfg.peer_timeout:
                m.alive = False
                self.log.add("silent", [m.peer_id], open_round, seconds=round(now - m.last_seen, 1))
                changed = True
        return changed

    def alive(self) -> list[str]:
        return sorted(p for p, m in self.members.items() if m.alive)

    def ordered(self, peer_ids: Iterable[str]) -> list[str]:
        return sorted(peer_ids, key=lambda p: self.members[p].index)

    def sampled(self, round_: int) -> set[str]:
        """Members that take part in `round_` (all of them without partial participation)."""
        if not self.cfg.clients_per_round:
            return set(self.members)
        return {f"peer-{k}" for k in participants(self.cfg, round_)} & set(self.members)

    def all_joined(self, round_: int) -> bool:
        """Every member sampled for `round_` has joined (asked on every upload: no O(N) set)."""
        if not self.cfg.clients_per_round:
            return len(self.members) >= self.cfg.peers
        return all(f"peer-{k}" in self.members for k in participants(self.cfg, round_))

    def summary(self, reported_round: int) -> dict[str, Any]:
        def due(m: Member) -> set[int]:  # rounds it was sampled for and that are written
            return {r for r in range(1, reported_round + 1) if takes_part(self.cfg, m.index, r)}

        return {
            m.peer_id: {
                "address": m.address,
                "joins": m.joins,
                "alive": m.alive,
                "rounds_reported": len(m.reported),
                "rounds_missed": sorted(due(m) - m.reported),
            }
            for m in sorted(self.members.values(), key=lambda m: m.index)
        }

    def snapshot(self) -> list[dict[str, Any]]:
        return [m.to_dict() for m in self.members.values()]

    def restore(self, members: list[dict[str, Any]]) -> None:
        """Load members (later entries win: a journal of rejoins replays in order)."""
        now = self.clock()
        for d in members:
            self.members[d["peer_id"]] = Member.from_dict(d, now)
        self._sessions = {secret_digest(m.session): p for p, m in self.members.items()}
