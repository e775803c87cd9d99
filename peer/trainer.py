"""Local training and evaluation on one peer. Knows torch and the data, nothing of the network."""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedmoe.common.config import config_to_dict
from fedmoe.common.data import ArrayDataset, PeerData
from fedmoe.common.model_plugin import build_plugin_embedding
from fedmoe.common.proto import pb
from fedmoe.peer.embedding_init import freeze, load_embedding
from fedmoe.peer.model import MoEModel

# Peers hosted in one process share its torch runtime and device: they train and evaluate one
# after another (each with all of the process's threads) rather than all at once, which would only
# oversubscribe the cores or the GPU. Network waits are outside this lock.
COMPUTE_LOCK = threading.Lock()


def personal_seed(seed: int, index: int) -> int:
    """The seed of peer `index`'s gate and experts under --init per-peer."""
    return int(np.random.SeedSequence([int(seed), int(index), 0x1417]).generate_state(1)[0])


def build_model(cfg: pb.RunConfig, data: PeerData, index: int = 0) -> MoEModel:
    # Same seed on every peer: all start from the same embedding, as FedAvg assumes.
    torch.manual_seed(cfg.seed)
    embedding = None
    if cfg.model:  # the user's network, drawn from the same seed on every peer
        embedding = build_plugin_embedding(
            cfg.model, data.train.input_shape, cfg.embed_dim, config_to_dict(cfg)
        )
    model = MoEModel(
        data.train.input_shape,
        data.train.num_classes,
        embed_dim=cfg.embed_dim,
        num_experts=cfg.num_experts,
        top_k=cfg.top_k,
        expert_hidden=cfg.expert_hidden,
        embedding=embedding,
    )
    # Only parts the algorithm never averages may start apart (the embedding is always averaged).
    # A shared start of fedmoe-da's experts makes every first-sync plan average each expert
    # with its namesakes on the other peers, blind to their domains (docs/FIRST_SYNC.md).
    if cfg.init == "per-peer" and cfg.algorithm in (pb.FEDMOE_DA, pb.MOE_FEDAVG):
        model.reset_personal(personal_seed(cfg.seed, index), experts=cfg.algorithm == pb.FEDMOE_DA)
    if cfg.embedding_init:  # after every draw from the seed: the rest starts as without it
        load_embedding(model.embedding, cfg.embedding_init)
    if cfg.freeze_embedding:
        freeze(model.embedding)
    return model


@dataclass(frozen=True)
class Scores:
    """What a round's evaluation measured (val: None when the run has no validation split)."""

    accuracy: float  # own local test split
    global_accuracy: float  # whole test set
    val_accuracy: float | None


class LocalTrainer:
    def __init__(self, model: MoEModel, data: PeerData, cfg: pb.RunConfig, device: str, index: int):
        self.model = model.to(device)
        self.cfg = cfg
        self.device = device
        self.index = index
        self.train_x = torch.from_numpy(data.train.x).to(device)
        self.train_y = torch.from_numpy(data.train.y).to(device)
        self.data = data

    @property
    def num_samples(self) -> int:
        return int(self.train_y.shape[0])

    def train_round(self, round_: int) -> float:
        """E local epochs of SGD; returns the mean training loss (cross-entropy + balance)."""
        with COMPUTE_LOCK:
            return self._train_round(round_)

    def _train_round(self, round_: int) -> float:
        gen = torch.Generator().manual_seed(
            self.cfg.seed * 1_000_003 + self.index * 10_007 + round_
        )
        return self._train(self.model, self.cfg.local_epochs, gen)

    def _train(self, model: MoEModel, epochs: int, gen: torch.Generator) -> float:
        """`epochs` epochs of SGD on `model` with a fresh optimizer; the mean training loss."""
        model.train()
        if self.cfg.freeze_embedding:
            model.embedding.eval()  # BatchNorm statistics (if any) are part of what is frozen
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(trainable, lr=self.cfg.lr, momentum=self.cfg.momentum)
        total, batches = 0.0, 0
        for _ in range(epochs):
            order = torch.randperm(self.num_samples, generator=gen).to(self.device)
            for start in range(0, self.num_samples, self.cfg.batch_size):
                idx = order[start : start + self.cfg.batch_size]
                logits, balance = model(self.train_x[idx])
                loss = F.cross_entropy(logits, self.train_y[idx]) + self.cfg.balance_coef * balance
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach())
                batches += 1
        return total / max(batches, 1)

    def evaluate(self, ds: ArrayDataset, batch: int = 512) -> float:
        with COMPUTE_LOCK:
            return self._evaluate(self.model, ds, batch)

    def evaluate_round(self, round_: int) -> Scores:
        """The round's scores of the personalised model: the model itself or, with
        finetune_epochs E > 0 (FedAvg + fine-tuning), a copy of it fine-tuned E epochs on our
        training split. The copy is then dropped: training goes on from the model itself."""
        with COMPUTE_LOCK:
            model = self.model
            if self.cfg.finetune_epochs:
                model = copy.deepcopy(self.model)
                # Its own shuffling stream: the training rounds' stream stays as without it.
                gen = torch.Generator().manual_seed(
                    self.cfg.seed * 1_000_003 + self.index * 10_007 + round_ + (1 << 40)
                )
                self._train(model, self.cfg.finetune_epochs, gen)
            val = self.data.val
            return Scores(
                accuracy=self._evaluate(model, self.data.local_test),
                global_accuracy=self._evaluate(model, self.data.global_test),
                val_accuracy=self._evaluate(model, val) if val is not None else None,
            )

    @torch.no_grad()
    def _evaluate(self, model: MoEModel, ds: ArrayDataset, batch: int = 512) -> float:
        model.eval()
        correct = 0
        for start in range(0, len(ds), batch):
            x = torch.from_numpy(ds.x[start : start + batch]).to(self.device)
            y = torch.from_numpy(ds.y[start : start + batch]).to(self.device)
            logits, _ = model(x)
            correct += int((logits.argmax(dim=-1) == y).sum())
        return correct / max(len(ds), 1)

    def tensors(self, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
        # Floating tensors only: an integer buffer (BatchNorm's step counter) stays local
        # (common/model_plugin.py shared_state; the schema leaves it out the same way).
        return {
            n: t
            for n, t in self.model.state_dict().items()
            if n.startswith(prefixes) and t.is_floating_point()
        }

    def expert_snapshot(self) -> dict[int, dict[str, torch.Tensor]]:
        """A copy of every expert as it is now (Eq. 11 mixes these, not the live weights)."""
        state = self.model.state_dict()
        return {
            m: {n: state[n].detach().clone() for n in self.model.expert_names(m)}
            for m in range(self.cfg.num_experts)
        }

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Overwrite named parameters; names and shapes must match this model exactly."""
        state = self.model.state_dict()
        for name, value in tensors.items():
            if name not in state:
                raise ValueError(f"unknown parameter {name!r}")
            if tuple(state[name].shape) != tuple(value.shape):
                raise ValueError(f"parameter {name!r}: shape {tuple(value.shape)} does not fit")
            state[name].copy_(value.to(state[name].dtype))
