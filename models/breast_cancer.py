"""Models for the 30-feature Wisconsin breast cancer data (the medical-analytics case)."""

from __future__ import annotations

import torch
from torch import nn


class BreastCancerMLP(nn.Module):
    """Linear -> ReLU -> Linear: one hidden layer over the standardized clinical features."""

    def __init__(self, in_features: int = 30, hidden: int = 16, num_classes: int = 2) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class BreastCancerLogReg(nn.Module):
    """Multinomial logistic regression: a single Linear layer (depth 1 under encryption)."""

    def __init__(self, in_features: int = 30, num_classes: int = 2) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)
