"""The model on each peer: shared embedding, personal top-k gate, M identical experts.

Parameter names are part of the protocol: "embedding.*" (averaged by the coordinator),
"gate.proxies" (d x M, column m is expert m's proxy, Eq. 8 input) and "experts.<m>.*".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def make_embedding(input_shape: tuple[int, ...], embed_dim: int) -> nn.Module:
    """A small CNN for images (C x H x W), an MLP for flat inputs."""
    if len(input_shape) == 3:
        channels, height, width = input_shape
        flat = 64 * (height // 8) * (width // 8)
        return nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(flat, embed_dim),
            nn.ReLU(),
        )
    if len(input_shape) == 1:
        return nn.Sequential(
            nn.Linear(input_shape[0], embed_dim),
            nn.ReLU(),
            nn.Linear(embed_dim, embed_dim),
            nn.ReLU(),
        )
    raise ValueError(f"unsupported input shape {input_shape}")


class Expert(nn.Module):
    def __init__(self, embed_dim: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(h)))


class Gate(nn.Module):
    """Linear top-k router g = softmax(Pi^T h) with Pi in R^{d x M}."""

    def __init__(self, embed_dim: int, num_experts: int) -> None:
        super().__init__()
        self.proxies = nn.Parameter(torch.randn(embed_dim, num_experts) / math.sqrt(embed_dim))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        d, m = self.proxies.shape
        self.proxies.copy_(torch.randn(d, m) / math.sqrt(d))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.proxies


class MoEModel(nn.Module):
    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        embed_dim: int = 256,
        num_experts: int = 8,
        top_k: int = 2,
        expert_hidden: int = 256,
        embedding: nn.Module | None = None,  # a --model plug-in's network (default: built in)
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError("top_k must be between 1 and num_experts")
        self.num_experts = num_experts
        self.top_k = top_k
        self.embedding = (
            embedding if embedding is not None else make_embedding(input_shape, embed_dim)
        )
        self.gate = Gate(embed_dim, num_experts)
        self.experts = nn.ModuleList(
            Expert(embed_dim, expert_hidden, num_classes) for _ in range(num_experts)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (logits, load-balancing loss). Only the top-k experts run on each sample."""
        h = self.embedding(x)
        probs = F.softmax(self.gate(h), dim=-1)
        top_w, top_i = probs.topk(self.top_k, dim=-1)
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        out: torch.Tensor | None = None
        for m, expert in enumerate(self.experts):
            rows, slot = (top_i == m).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            y = top_w[rows, slot].unsqueeze(-1) * expert(h[rows])
            if out is None:
                out = h.new_zeros(h.shape[0], y.shape[-1])
            out = out.index_add(0, rows, y)
        assert out is not None  # every sample is routed to top_k >= 1 experts
        # Switch-style balance loss: M * sum_m (fraction routed to m) * (mean gate prob of m).
        routed = F.one_hot(top_i, self.num_experts).sum(dim=1).float().mean(dim=0) / self.top_k
        balance = self.num_experts * (routed * probs.mean(dim=0)).sum()
        return out, balance

    def reset_personal(self, seed: int, experts: bool = True) -> None:
        """Draw the gate (and the experts) again from `seed` (the embedding is left as it is)."""
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            self.gate.reset_parameters()
            for module in self.experts.modules() if experts else ():
                if isinstance(module, nn.Linear):
                    module.reset_parameters()
        finally:
            torch.random.set_rng_state(gen_state)

    def expert_names(self, m: int) -> list[str]:
        return [f"experts.{m}.{n}" for n, _ in self.experts[m].named_parameters()]
