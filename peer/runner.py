"""The peer's round loop (DESIGN.md §1.4): train, upload, get the plan, fetch experts, merge, report."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from common.accounting import ByteCounter
from common.config import is_sync_round, upload_prefixes
from common.proto import pb
from common.tensors import TensorSpec
from common.torch_wire import TORCH_DTYPES, torch_to_wire, wire_to_torch
from peer.coordinator_client import CoordinatorClient
from peer.expert_client import ExpertClient
from peer.expert_merge import Term, merge_experts
from peer.expert_store import ExpertStore
from peer.trainer import LocalTrainer

log = logging.getLogger("fedmoe.peer")

Experts = dict[int, dict[str, torch.Tensor]]


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
    ) -> None:
        self.cfg = cfg
        self.peer_id = peer_id
        self.trainer = trainer
        self.coordinator = coordinator
        self.experts = experts
        self.store = store
        self.counter = counter
        self.serve_timeout = serve_timeout
        self.fetch_failures: list[str] = []

    def run(self, start_round: int = 1) -> None:
        for round_ in range(start_round, self.cfg.rounds + 1):
            ack = self.run_round(round_)
            if ack.run_finished:
                return

    def run_round(self, round_: int) -> pb.MetricsAck:
        started = time.perf_counter()
        loss = self.trainer.train_round(round_)
        trained = time.perf_counter()
        fetched = 0
        prefixes = upload_prefixes(self.cfg, round_)
        sync = is_sync_round(self.cfg, round_)
        if prefixes:
            snapshot = self.trainer.expert_snapshot() if sync else None
            if snapshot is not None:
                # Published before uploading: once the round closes, others may ask for it.
                self.store.publish(round_, self._wire_experts(snapshot), self.cfg.chunk_bytes)
            uploads = [
                torch_to_wire(n, t, pb.FLOAT32) for n, t in self.trainer.tensors(prefixes).items()
            ]
            self.coordinator.submit(self.peer_id, round_, self.trainer.num_samples, uploads)
            plan, shared = self.coordinator.round_result(self.peer_id, round_)
            if plan.sync and snapshot is not None:
                self.store.set_orders(round_, {o.peer_id: list(o.experts) for o in plan.serves})
                fetched = self._exchange_experts(round_, plan, snapshot)
            self.trainer.load({n: wire_to_torch(t, torch.float32) for n, t in shared.items()})
        exchanged = time.perf_counter()
        accuracy = self.trainer.evaluate(self.trainer.data.local_test)
        global_accuracy = self.trainer.evaluate(self.trainer.data.global_test)
        if sync and prefixes:
            # Report only after every planned fetch from us is done, so this round's p2p bytes
            # are complete and nobody is left waiting on a peer that moved on.
            never = self.store.wait_all_served(round_, self.serve_timeout)
            if never:
                log.warning("round %d: planned fetches never came from %s", round_, never)
            self.store.drop(round_)
        c = self.counter.round_counts(round_)
        report = pb.MetricsReport(
            peer_id=self.peer_id,
            round=round_,
            accuracy=accuracy,
            loss=loss,
            global_accuracy=global_accuracy,
            bytes=pb.ByteCounts(**c),
            seconds=time.perf_counter() - started,
            train_seconds=trained - started,
            exchange_seconds=exchanged - trained,
            experts_fetched=fetched,
            num_samples=self.trainer.num_samples,
        )
        log.info(
            "round %d: loss %.4f acc %.4f global %.4f fetched %d experts",
            round_,
            loss,
            accuracy,
            global_accuracy,
            fetched,
        )
        return self.coordinator.report(report)

    def _wire_experts(self, snapshot: Experts) -> dict[int, list]:
        dtype = self.cfg.expert_wire_dtype
        return {m: [torch_to_wire(n, t, dtype) for n, t in p.items()] for m, p in snapshot.items()}

    def _exchange_experts(self, round_: int, plan: pb.Plan, snapshot: Experts) -> int:
        addresses = {s.peer_id: s.address for s in plan.sources}
        needed: dict[str, set[int]] = {}
        for row in plan.rows:
            for t in row.terms:
                if t.peer_id != self.peer_id:
                    needed.setdefault(t.peer_id, set()).add(t.expert)
        shapes = {n.split(".", 2)[2]: tuple(v.shape) for n, v in snapshot[0].items()}
        dtypes = frozenset({self.cfg.expert_wire_dtype})

        def fetch(source: str) -> dict[tuple[str, int], dict[str, torch.Tensor]]:
            experts = sorted(needed[source])
            expected = {
                f"experts.{n}.{p}": TensorSpec(shape, dtypes)
                for n in experts
                for p, shape in shapes.items()
            }
            tensors = self.experts.fetch(addresses[source], self.peer_id, round_, experts, expected)
            out: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
            for name, tensor in tensors.items():
                n = int(name.split(".", 2)[1])
                out.setdefault((source, n), {})[name] = wire_to_torch(tensor, torch.float32)
            return out

        fetched: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
        if needed:
            with ThreadPoolExecutor(max_workers=min(8, len(needed))) as pool:
                futures = {s: pool.submit(fetch, s) for s in sorted(needed)}
                for source, future in futures.items():
                    try:
                        fetched.update(future.result())
                    except Exception as e:  # a source that fails is left out (Eq. 10 renormalised)
                        log.warning(
                            "round %d: fetching experts from %s failed: %s", round_, source, e
                        )
                        self.fetch_failures.append(f"round {round_}: {source}: {e}")
        rows = {
            row.expert: [Term(t.peer_id, t.expert, t.weight) for t in row.terms]
            for row in plan.rows
        }
        merged, missing = merge_experts(rows, self.peer_id, snapshot, fetched)
        if missing:
            log.warning(
                "round %d: %d planned experts missing, weights renormalised", round_, len(missing)
            )
        self.trainer.load({n: t for params in merged.values() for n, t in params.items()})
        return len(fetched)


__all__ = ["PeerRunner", "TORCH_DTYPES"]
