"""The peer's round loop (DESIGN.md §1.4): train, upload, get the plan, fetch experts, merge, report.

Each round runs as explicit phases (common/accounting.PHASES: train, upload, wait_for_plan, fetch,
merge, evaluate, serve_wait, checkpoint, report), one method or block each, timed by PhaseTimer;
their seconds go into the round's MetricsReport.phase_seconds.

Failure handling: a heartbeat thread keeps the membership alive and learns who left; an upload
refused as late, or a plan without us, makes the peer catch up from the latest aggregate; a
coordinator that lost our upload (restart) gets it again; an expert source that fails twice is
dropped and Eq. 10's weights are renormalised over what arrived.

Partial participation (clients_per_round C > 0): a peer works only in the rounds it is sampled
for (`takes_part`, the same seeded draw as the coordinator's). In between it only heartbeats.
Sampled for round r after sitting r - 1 out, it first loads the aggregate of r - 1 (the
coordinator holds that answer until r - 1 is closed); told it is late, it moves on to its next
sampled round. After its last one it heartbeats until the coordinator says the run is over.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import grpc
import torch

from fedmoe.common import faults
from fedmoe.common.accounting import PHASES, ByteCounter
from fedmoe.common.config import coordinated, is_sync_round, takes_part, upload_prefixes, wire_dtype
from fedmoe.common.proto import pb
from fedmoe.common.retry import FETCH_RETRY, retry_stream
from fedmoe.common.telemetry import PeerEvents
from fedmoe.common.tensors import TensorSpec, WireError, WireTensor, check_values
from fedmoe.common.torch_wire import torch_to_wire, wire_to_torch
from fedmoe.common.wire_counters import WireMeter
from fedmoe.peer.checkpoint import PeerCheckpoint
from fedmoe.peer.coordinator_client import CoordinatorClient, is_status
from fedmoe.peer.expert_client import ExpertClient
from fedmoe.peer.expert_merge import Term, merge_experts
from fedmoe.peer.expert_store import ExpertStore
from fedmoe.peer.trainer import LocalTrainer

log = logging.getLogger("fedmoe.peer")

Experts = dict[int, dict[str, torch.Tensor]]
FetchedExperts = dict[tuple[str, int], dict[str, torch.Tensor]]  # (source peer, expert) -> params
# Protocol, not transport: how often an upload is sent again to a coordinator that lost it.
UPLOAD_RESENDS = 3
# A peer with no round left stops waiting for the run's end once the coordinator has refused
# connections for this many heartbeat periods in a row.
GONE_HEARTBEATS = 5


class Late(Exception):
    """The round went on without us; carry on from the latest aggregate."""


class BadAggregate(Exception):
    """The coordinator sent tensors that fail the value checks (NaN, Inf, norm bound)."""


class UploadLost(Exception):
    """The coordinator has no upload of ours for the round (it restarted from a checkpoint)."""


class PhaseTimer:
    """Wall seconds per phase of one round (common/accounting.PHASES).

    Phases do not nest, so they are disjoint parts of the round and add up to at most
    `elapsed()`; a phase entered twice (an upload sent again) adds up."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self._current: str | None = None

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r}")
        if self._current is not None:
            raise RuntimeError(f"phase {name!r} started inside phase {self._current!r}")
        self._current = name
        begun = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - begun
            self._current = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


class PeerRunner:
    def __init__(
        self,
        cfg: pb.RunConfig,
        peer_id: str,
        trainer: LocalTrainer,
        coordinator: CoordinatorClient,
        experts: ExpertClient,
        store: ExpertStore,
        counter: ByteCounter,
        serve_timeout: float,
        checkpoint: PeerCheckpoint | None = None,
        heartbeat_seconds: float = 2.0,
        wire: WireMeter | None = None,
        index: int | None = None,
        logger: logging.Logger | None = None,
        events: PeerEvents | None = None,
    ) -> None:
        self.cfg = cfg
        self.events = events or PeerEvents()  # --metrics-port: fetch and round timings
        self.peer_id = peer_id
        # Our index decides which rounds we are sampled for; "peer-K" ids carry it too.
        self.index = index if index is not None else int(peer_id.rsplit("-", 1)[-1])
        self.log = logger or log  # a peer host names each peer's logger after it
        self.trainer = trainer
        self.coordinator = coordinator
        self.experts = experts
        self.store = store
        self.counter = counter
        self.serve_timeout = serve_timeout
        self.checkpoint = checkpoint
        self.heartbeat_seconds = heartbeat_seconds
        self.wire = wire or WireMeter(None)
        self.fetch_failures: list[str] = []
        self.round = 1
        self._stop = threading.Event()
        self._finished = threading.Event()  # a heartbeat reply said the run is over
        self._last_reply = time.monotonic()  # when the coordinator last answered a heartbeat
        self._unreachable_since: float | None = None  # heartbeats UNAVAILABLE since then
        # Traffic is counted under the round whose report is not yet sent; the lock keeps a
        # heartbeat from landing between a report's snapshot of the counts and its sending.
        self._accounting = threading.Lock()

    # ------------------------------------------------------------------ lifecycle

    def run(self, start_round: int = 1) -> None:
        self.round = start_round
        resumed = self._resume_from_checkpoint()
        if start_round > 1 or resumed:
            next_round = self._catch_up()
            self.counter.carry(start_round, next_round)  # its bytes belong to a reported round
            self.round = next_round
        beat = threading.Thread(
            target=self._heartbeats, name=f"heartbeat-{self.peer_id}", daemon=True
        )
        beat.start()
        try:
            if self.cfg.clients_per_round:
                self._run_sampled()
                return
            while self.round <= self.cfg.rounds:
                try:
                    ack = self.run_round(self.round)
                except Late as late:
                    self.log.warning("round %d: %s; catching up", self.round, late)
                    skipped = self.round
                    next_round = self._catch_up()
                    with self._accounting:
                        self.round = next_round
                        self.counter.carry(skipped, next_round)
                    continue
                faults.at_round_end(self.round - 1, self.peer_id)  # run_round moved it on
                if ack.run_finished:
                    return
        finally:
            self._stop.set()

    def _run_sampled(self) -> None:
        """The round loop under partial participation (see the module docstring)."""
        shares = coordinated(self.cfg)
        synced = self.round - 1  # the round whose aggregate our model holds
        start = self.round
        while (round_ := self._next_sampled(start)) is not None:
            with self._accounting:  # heartbeats from here on belong to the round we work on
                if self.round != round_:
                    self.counter.carry(self.round, round_)
                    self.round = round_
            try:
                if shares and synced != round_ - 1:
                    synced = self._load_latest(round_, after_round=round_ - 1)
                    if synced >= round_:
                        raise Late(f"round {round_} closed while we caught up")
                ack = self.run_round(round_)
            except Late as late:
                self.log.warning("round %d: %s; moving on to our next sampled round", round_, late)
                start = max(round_, synced) + 1
                continue
            synced = round_
            faults.at_round_end(round_, self.peer_id)
            if ack.run_finished:
                return
            start = round_ + 1
        self._wait_run_finished()

    def _next_sampled(self, start: int) -> int | None:
        """The first round from `start` on that we take part in (None: no more)."""
        for round_ in range(start, self.cfg.rounds + 1):
            if takes_part(self.cfg, self.index, round_):
                return round_
        return None

    def _wait_run_finished(self) -> None:
        """Sampled for no more rounds: heartbeats go on until the coordinator says it is over."""
        self.log.info("not sampled for any later round; waiting for the run to finish")
        while not self._finished.wait(self.heartbeat_seconds):
            now = time.monotonic()
            gone = self._unreachable_since
            if gone is not None and now - gone > GONE_HEARTBEATS * self.heartbeat_seconds:
                # Refused connections, not slow answers: the coordinator has exited (it ends as
                # soon as the last sampled peers report, often between two of our heartbeats).
                # With no round left to us there is nothing to wait for; a restarted
                # coordinator would not need us either.
                self.log.info("the coordinator is gone and no round is left to us: done")
                return
            if now - self._last_reply > self.serve_timeout:
                raise RuntimeError(
                    f"the coordinator has not answered a heartbeat for {now - self._last_reply:.0f} s"
                )

    def _resume_from_checkpoint(self) -> bool:
        if self.checkpoint is None:
            return False
        saved = self.checkpoint.load(self.cfg.run_id)
        if saved is None:
            return False
        round_, state = saved
        self.trainer.load(state)
        self.log.info("resumed the model of round %d from %s", round_, self.checkpoint.path)
        return True

    def _catch_up(self) -> int:
        """Load the latest aggregate; returns the round to work on next."""
        if not coordinated(self.cfg):  # local: nothing shared, just continue where the run is
            return self.round
        return self._load_latest(self.round) + 1

    def _load_latest(self, count_round: int, after_round: int = 0) -> int:
        """Load the coordinator's latest aggregate (once `after_round` is closed, if given);
        returns the round it is the aggregate of. Its traffic counts under `count_round`."""
        try:
            plan, shared = self.coordinator.latest(
                count_round, self._expected(("embedding.", "gate.", "experts.")), after_round
            )
        except grpc.RpcError as e:
            if is_status(e, grpc.StatusCode.FAILED_PRECONDITION):
                raise Late(e.details()) from e  # type: ignore[attr-defined]
            raise
        self._check_shared(shared)
        self.trainer.load({n: wire_to_torch(t, torch.float32) for n, t in shared.items()})
        self.log.info("caught up to the aggregate of round %d", plan.round)
        return int(plan.round)

    def _check_shared(self, shared: Mapping[str, WireTensor]) -> None:
        """Tensors from the coordinator must be finite and within the run's norm bound."""
        try:
            check_values(shared, self.cfg.max_tensor_norm)
        except WireError as e:
            raise BadAggregate(f"the coordinator sent a bad tensor: {e}") from e

    def _heartbeats(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            with self._accounting:
                if self._stop.is_set():
                    return
                round_ = self.round
                try:
                    reply = self.coordinator.heartbeat(round_, timeout=self.heartbeat_seconds * 2)
                except grpc.RpcError as e:
                    self.log.debug("heartbeat failed: %s", e.code())
                    if is_status(e, grpc.StatusCode.UNAVAILABLE):
                        self._unreachable_since = self._unreachable_since or time.monotonic()
                    continue
            self._last_reply, self._unreachable_since = time.monotonic(), None
            if reply.run_finished:
                self._finished.set()
            self.store.void(set(reply.left))
            self.store.release(round_, set(reply.reported))

    # ------------------------------------------------------------------ one round

    def run_round(self, round_: int) -> pb.MetricsAck:
        """One round as explicit phases (common/accounting.PHASES), each timed by `timer`."""
        self.store.begin(round_)
        timer = PhaseTimer()
        with timer.phase("train"):
            loss = self.trainer.train_round(round_)
        trained = time.perf_counter()
        prefixes = upload_prefixes(self.cfg, round_)
        sync = is_sync_round(self.cfg, round_)
        # An empty upload still takes part (a frozen embedding's fedmoe-da round between syncs).
        fetched = self._share(round_, prefixes, sync, timer) if coordinated(self.cfg) else 0
        exchanged = time.perf_counter()
        with timer.phase("evaluate"):  # with --finetune-epochs, the fine-tuning too
            scores = self.trainer.evaluate_round(round_)
        accuracy, global_accuracy = scores.accuracy, scores.global_accuracy
        if sync:
            with timer.phase("serve_wait"):
                self._wait_served(round_)
        if self.checkpoint is not None:
            with timer.phase("checkpoint"):
                self.checkpoint.save(self.cfg.run_id, round_, self.trainer.model)
        with timer.phase("report"):
            report = self._build_report(round_, timer, loss, accuracy, global_accuracy, fetched)
            report.exchange_seconds = exchanged - trained
            if scores.val_accuracy is not None:
                report.val_accuracy = scores.val_accuracy
        report.phase_seconds.update(timer.seconds)
        report.seconds = timer.elapsed()  # after the last phase: the phases add up to at most it
        self.log.info(
            "round %d: loss %.4f acc %.4f global %.4f fetched %d experts",
            round_,
            loss,
            accuracy,
            global_accuracy,
            fetched,
        )
        ack = self.coordinator.report(report)
        self.events.round_reported(self.peer_id, round_, accuracy, global_accuracy, timer.elapsed())
        return ack

    def _share(self, round_: int, prefixes: tuple[str, ...], sync: bool, timer: PhaseTimer) -> int:
        """Phases upload, wait_for_plan, fetch and merge; returns how many experts arrived."""
        with timer.phase("upload"):
            snapshot = self.trainer.expert_snapshot() if sync else None
            if snapshot is not None:
                # Published before uploading: once the round closes, others may ask for it.
                self.store.publish(round_, self._wire_experts(snapshot), self.cfg.chunk_bytes)
            uploads = [
                torch_to_wire(n, t, wire_dtype(self.cfg, n))
                for n, t in self.trainer.tensors(prefixes).items()
            ]
        try:
            plan, shared = self._exchange_with_coordinator(round_, uploads, timer)
            self._check_shared(shared)  # before any of it (or the plan) is acted on
        except (Late, BadAggregate):
            self.store.drop(round_)
            raise
        fetched: FetchedExperts = {}
        own = snapshot if plan.sync else None  # experts move this round
        if own is not None:
            with timer.phase("fetch"):
                orders = {o.peer_id: (list(o.experts), o.ticket) for o in plan.serves}
                self.store.set_orders(round_, orders)
                fetched = self._fetch_experts(round_, plan, own)
        with timer.phase("merge"):
            if own is not None:
                self._merge_experts(round_, plan, own, fetched)
            self.trainer.load({n: wire_to_torch(t, torch.float32) for n, t in shared.items()})
        return len(fetched)

    def _wait_served(self, round_: int) -> None:
        """Phase serve_wait: report only after every planned fetch from us is done, so this
        round's p2p bytes are complete and nobody is left waiting on a peer that moved on."""
        never = self.store.wait_all_served(round_, self.serve_timeout)
        if never:
            self.log.warning("round %d: planned fetches never came from %s", round_, never)
        served = self.store.served(round_)
        if round_ == self.cfg.rounds and served and self.wire.measured:
            # Last round only: the final wire reading must not miss bytes still in our
            # socket buffers; once the requesters reported, they had received everything.
            self.store.wait_reported(round_, served, timeout=3 * self.heartbeat_seconds)
        self.store.drop(round_)

    def _build_report(
        self,
        round_: int,
        timer: PhaseTimer,
        loss: float,
        accuracy: float,
        global_accuracy: float,
        fetched: int,
    ) -> pb.MetricsReport:
        """Phase report: take the round's counts and move on to the next round's accounting."""
        with self._accounting:
            counts = self.counter.round_counts(round_)
            wire = self.wire.lap()
            self.round = round_ + 1  # from here on, traffic belongs to the next round
            if round_ == self.cfg.rounds:
                self._stop.set()  # no heartbeats after the last report: nothing would count them
        return pb.MetricsReport(
            peer_id=self.peer_id,
            round=round_,
            accuracy=accuracy,
            loss=loss,
            global_accuracy=global_accuracy,
            bytes=pb.ByteCounts(**counts),
            train_seconds=timer.seconds["train"],
            experts_fetched=fetched,
            num_samples=self.trainer.num_samples,
            wire_measured=wire is not None,
            wire_received=wire[0] if wire else 0,
            wire_sent=wire[1] if wire else 0,
            wire_interfaces=",".join(self.wire.counters.interfaces) if self.wire.counters else "",
        )

    def _exchange_with_coordinator(
        self, round_: int, uploads: list[WireTensor], timer: PhaseTimer
    ) -> tuple[pb.Plan, dict[str, WireTensor]]:
        """Phases upload and wait_for_plan.

        Transport failures (the coordinator unreachable for a while) are retried inside each
        call (common/retry.py). The loop here is protocol, not transport: a coordinator that
        restarted from a checkpoint taken before our upload answers NOT_FOUND for the plan, and
        the only remedy is to send the upload again."""
        expected = self._expected(upload_prefixes(self.cfg, round_))
        for _ in range(UPLOAD_RESENDS):
            with timer.phase("upload"):
                self._upload(round_, uploads)
            try:
                with timer.phase("wait_for_plan"):
                    return self._wait_for_plan(round_, expected)
            except UploadLost:
                self.log.warning("round %d: coordinator lost our upload; sending it again", round_)
        raise RuntimeError(f"round {round_}: the coordinator kept losing our upload")

    def _upload(self, round_: int, uploads: list[WireTensor]) -> None:
        try:
            self.coordinator.submit(round_, self.trainer.num_samples, uploads)
        except grpc.RpcError as e:
            if is_status(e, grpc.StatusCode.FAILED_PRECONDITION):
                raise Late(e.details()) from e  # type: ignore[attr-defined]
            raise

    def _wait_for_plan(
        self, round_: int, expected: dict[str, TensorSpec]
    ) -> tuple[pb.Plan, dict[str, WireTensor]]:
        try:
            return self.coordinator.round_result(round_, expected)
        except grpc.RpcError as e:
            if is_status(e, grpc.StatusCode.NOT_FOUND):  # coordinator restarted without it
                raise UploadLost() from e
            if is_status(e, grpc.StatusCode.FAILED_PRECONDITION):
                raise Late(e.details()) from e  # type: ignore[attr-defined]
            raise

    def _expected(self, prefixes: tuple[str, ...]) -> dict[str, TensorSpec]:
        """What the coordinator may send us: these parameters of our model, each in its wire
        dtype (float32, or the embedding's --embedding-wire-dtype)."""
        return {
            n: TensorSpec(tuple(t.shape), frozenset({wire_dtype(self.cfg, n)}))
            for n, t in self.trainer.tensors(prefixes).items()
        }

    def _wire_experts(self, snapshot: Experts) -> dict[int, list[WireTensor]]:
        dtype = self.cfg.expert_wire_dtype
        return {m: [torch_to_wire(n, t, dtype) for n, t in p.items()] for m, p in snapshot.items()}

    def _fetch_experts(self, round_: int, plan: pb.Plan, snapshot: Experts) -> FetchedExperts:
        """Phase fetch: the planned experts of other peers, one stream per source in parallel;
        a source that still fails after its retries is left out (Eq. 10 renormalised)."""
        sources = {s.peer_id: s for s in plan.sources}
        needed: dict[str, set[int]] = {}
        for row in plan.rows:
            for t in row.terms:
                if t.peer_id != self.peer_id:
                    needed.setdefault(t.peer_id, set()).add(t.expert)
        shapes = {n.split(".", 2)[2]: tuple(v.shape) for n, v in snapshot[0].items()}
        dtypes = frozenset({self.cfg.expert_wire_dtype})

        def fetch(source: str) -> FetchedExperts:
            experts = sorted(needed[source])
            expected = {
                f"experts.{n}.{p}": TensorSpec(shape, dtypes)
                for n in experts
                for p, shape in shapes.items()
            }

            def call() -> dict[str, WireTensor]:
                return self.experts.fetch(
                    sources[source].address,
                    self.peer_id,
                    round_,
                    experts,
                    expected,
                    ticket=sources[source].ticket,
                    source_id=source,  # the endpoint may host several peers
                    max_norm=self.cfg.max_tensor_norm,
                )

            what = f"{self.peer_id} round {round_}: fetch from {source}"
            begun = time.perf_counter()
            tensors = retry_stream(call, what, FETCH_RETRY)
            self.events.fetched(self.peer_id, time.perf_counter() - begun)
            out: FetchedExperts = {}
            for name, tensor in tensors.items():
                n = int(name.split(".", 2)[1])
                out.setdefault((source, n), {})[name] = wire_to_torch(tensor, torch.float32)
            return out

        fetched: FetchedExperts = {}
        if needed:
            with ThreadPoolExecutor(max_workers=min(8, len(needed))) as pool:
                futures = {s: pool.submit(fetch, s) for s in sorted(needed)}
                for source, future in futures.items():
                    try:
                        fetched.update(future.result())
                    except Exception as e:  # a failed source is left out (Eq. 10 renormalised)
                        self.log.warning("round %d: dropped source %s: %s", round_, source, e)
                        self.fetch_failures.append(f"round {round_}: {source}: {e}")
        return fetched

    def _merge_experts(
        self, round_: int, plan: pb.Plan, snapshot: Experts, fetched: FetchedExperts
    ) -> None:
        """Phase merge (experts): Eq. 11 over our snapshot and what arrived."""
        rows = {
            row.expert: [Term(t.peer_id, t.expert, t.weight) for t in row.terms]
            for row in plan.rows
        }
        merged, missing = merge_experts(rows, self.peer_id, snapshot, fetched)
        if missing:
            self.log.warning(
                "round %d: %d planned experts missing, weights renormalised", round_, len(missing)
            )
        self.trainer.load({n: t for params in merged.values() for n, t in params.items()})
