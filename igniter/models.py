"""Built-in models: ``mlp`` and ``lenet``. Both return logits of shape ``[B, num_classes]``."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from igniter.registry import model_registry

__all__ = ["MLP", "LeNet"]


@model_registry("mlp")
class MLP(nn.Module):
    """Fully connected ReLU network on flattened inputs.

    Args:
        in_features: size of one flattened sample (64 for digits, 784 for MNIST).
        hidden: widths of the hidden layers.
        num_classes: output logits.

    Shapes: input ``[B, ...]`` with ``in_features`` elements per sample -> ``[B, num_classes]``.
    """

    def __init__(self, in_features: int = 64, hidden: Sequence[int] = (128,), num_classes: int = 10) -> None:
        super().__init__()
        widths = [in_features, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


@model_registry("lenet")
class LeNet(nn.Module):
    """The two-convolution MNIST network of the original Igniter example (PyTorch's MNIST example).

    conv(1->10, 5x5) -> maxpool 2 -> ReLU -> conv(10->20, 5x5) -> [dropout2d] -> maxpool 2 -> ReLU
    -> fc(320->50) -> ReLU -> [dropout] -> fc(50->num_classes).

    Args:
        num_classes: output logits.
        dropout: dropout probability (0 disables it, making the forward pass deterministic).

    Shapes: input ``[B, 1, 28, 28]`` -> ``[B, num_classes]``.
    """

    def __init__(self, num_classes: int = 10, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d(dropout)
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, num_classes)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = F.relu(self.fc1(x.flatten(1)))
        x = F.dropout(x, p=self.dropout, training=self.training)
        return self.fc2(x)
