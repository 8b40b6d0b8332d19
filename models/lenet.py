"""LeNet-5 with average pooling and a configurable activation."""

from __future__ import annotations

import torch
from torch import nn


class LeNet5(nn.Module):
    """Conv(6,5,pad 2) -> act -> AvgPool -> Conv(16,5) -> act -> AvgPool -> 120 -> 84 -> classes.

    ``act`` is the activation class (``nn.ReLU`` by default; e.g. ``models.mnist_tutorial.Square``
    for an HE-friendly variant). ``in_size`` is the square input side (28 for MNIST-shaped input,
    giving the classic 16*5*5 = 400 features before the head).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        in_size: int = 28,
        act: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        side = (in_size // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"LeNet5 needs in_size >= 10, got {in_size}")
        self.conv1 = nn.Conv2d(in_channels, 6, kernel_size=5, padding=2)
        self.act1 = act()
        self.pool1 = nn.AvgPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.act2 = act()
        self.pool2 = nn.AvgPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.act3 = act()
        self.fc2 = nn.Linear(120, 84)
        self.act4 = act()
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.act1(self.conv1(x)))
        x = self.pool2(self.act2(self.conv2(x)))
        x = self.act3(self.fc1(self.flatten(x)))
        x = self.act4(self.fc2(x))
        return self.fc3(x)
