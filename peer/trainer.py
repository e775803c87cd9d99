"""Local training and evaluation on one peer. Knows torch and the data, nothing of the network."""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from fedmoe.common.data import ArrayDataset, PeerData
from fedmoe.common.proto import pb
from fedmoe.peer.model import MoEModel

# Peers hosted in one process share its torch runtime and device: they train and evaluate one
# after another (each with all of the process's threads) rather than all at once, which would only
# oversubscribe the cores or the GPU. Network waits are outside this lock.
COMPUTE_LOCK = threading.Lock()


def build_model(cfg: pb.RunConfig, data: PeerData) -> MoEModel:
    # Same seed on every peer: all start from the same embedding, as FedAvg assumes.
    torch.manual_seed(cfg.seed)
    return MoEModel(
        data.train.input_shape,
        data.train.num_classes,
        embed_dim=cfg.embed_dim,
        num_experts=cfg.num_experts,
        top_k=cfg.top_k,
        expert_hidden=cfg.expert_hidden,
    )


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
        self.model.train()
        opt = torch.optim.SGD(self.model.parameters(), lr=self.cfg.lr, momentum=self.cfg.momentum)
        gen = torch.Generator().manual_seed(
            self.cfg.seed * 1_000_003 + self.index * 10_007 + round_
        )
        total, batches = 0.0, 0
        for _ in range(self.cfg.local_epochs):
            order = torch.randperm(self.num_samples, generator=gen).to(self.device)
            for start in range(0, self.num_samples, self.cfg.batch_size):
                idx = order[start : start + self.cfg.batch_size]
                logits, balance = self.model(self.train_x[idx])
                loss = F.cross_entropy(logits, self.train_y[idx]) + self.cfg.balance_coef * balance
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach())
                batches += 1
        return total / max(batches, 1)

    def evaluate(self, ds: ArrayDataset, batch: int = 512) -> float:
        with COMPUTE_LOCK:
            return self._evaluate(ds, batch)

    @torch.no_grad()
    def _evaluate(self, ds: ArrayDataset, batch: int = 512) -> float:
        self.model.eval()
        correct = 0
        for start in range(0, len(ds), batch):
            x = torch.from_numpy(ds.x[start : start + batch]).to(self.device)
            y = torch.from_numpy(ds.y[start : start + batch]).to(self.device)
            logits, _ = self.model(x)
            correct += int((logits.argmax(dim=-1) == y).sum())
        return correct / max(len(ds), 1)

    def tensors(self, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
        return {n: t for n, t in self.model.state_dict().items() if n.startswith(prefixes)}

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
