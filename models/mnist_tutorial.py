"""The network of TenSEAL's encrypted MNIST tutorial, with squaring as the activation."""

from __future__ import annotations

import torch
from torch import nn


class Square(nn.Module):
    """x * x: the cheapest polynomial activation (one ciphertext multiplication)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


class TutorialCNN(nn.Module):
    """Conv2d(1, 4, 7, stride 3) -> Square -> Flatten -> Linear(256, 64) -> Square -> Linear(64, 10).

    Input (N, 1, 28, 28): the convolution gives 4 channels of 8x8, i.e. 256 features.
    """

    def __init__(self, hidden: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, kernel_size=7, stride=3, padding=0)
        self.act1 = Square()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(256, hidden)
        self.act2 = Square()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(self.act1(self.conv1(x)))
        return self.fc2(self.act2(self.fc1(x)))
