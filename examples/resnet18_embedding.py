"""A torchvision ResNet-18 as fedmoe's embedding network (a --model plug-in; docs/PLUGINS.md).

    PYTHONPATH=examples fedmoe local --model resnet18_embedding:make_embedding \
        --dataset cifar10 --data-dir ../shared/data/cifar10-subset --peers 2 --rounds 2

The backbone is torchvision's ResNet-18 with its classifier `fc` replaced by a linear layer to
embed_dim, so it maps (B, C, H, W) images to (B, embed_dim); fedmoe's gate and experts sit on
top. Pre-trained weights are read from a local file, never downloaded: --model-weights FILE
(config["model_weights"]) or the FEDMOE_RESNET18_WEIGHTS environment variable, holding a
torchvision ResNet-18 state dict (e.g. resnet18-f37072fd.pth; its fc is dropped). Give every
peer the same file: the embedding is averaged, so all must start alike.

The standard stem (7x7 stride-2 conv, max-pool) is kept so that ImageNet weights fit; on 32x32
CIFAR it leaves a 1x1 map after layer4, which keeps it cheap enough for a CPU.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from torchvision.models import resnet18

WEIGHTS_ENV = "FEDMOE_RESNET18_WEIGHTS"


def load_backbone_weights(net: nn.Module, path: str) -> None:
    """Load a ResNet-18 state dict from `path` into `net`, all but the classifier fc."""
    state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no code
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a ResNet-18 state dict")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(
            f"{path} is not a ResNet-18 state dict (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]})"
        )


def make_embedding(
    input_shape: tuple[int, ...], embed_dim: int, config: dict[str, Any]
) -> nn.Module:
    if len(input_shape) != 3:
        raise ValueError(f"ResNet-18 takes images (C, H, W), not inputs of shape {input_shape}")
    net = resnet18(weights=None)  # weights=None: torchvision downloads nothing
    path = config.get("model_weights") or os.environ.get(WEIGHTS_ENV, "")
    if path:
        load_backbone_weights(net, path)
    channels = input_shape[0]
    if channels != 3:  # e.g. Fashion-MNIST: a fresh first convolution for its one channel
        net.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    net.fc = nn.Linear(net.fc.in_features, embed_dim)
    return net
