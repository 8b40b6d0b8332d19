"""``PolyActivation``: a polynomial standing in for a non-polynomial activation.

The polynomial is stored in the well-conditioned variable t in [-1, 1] that the
calibrated interval maps to. In clear it evaluates (autograd works, so
approximation-aware fine-tuning can train the coefficients); on a private tensor
the call routes to the backend through ``privml.functional.polyval``, which fuses
the x -> t map into the preceding linear layer where it can. It counts inputs
that fall outside the interval (the approximation is only valid inside).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from privml.functional import polyval
from privml.tensor import PrivateTensor


class PolyActivation(nn.Module):
    """p(t) = sum_i coeffs[i] t^i with t = (2x - a - b) / (b - a), valid for x in ``interval`` = (a, b).

    ``source`` names the activation it replaces; ``trainable`` makes the coefficients parameters.
    """

    def __init__(self, coeffs: Sequence[float] | torch.Tensor, interval: tuple[float, float], source: str = "relu",
                 trainable: bool = False) -> None:
        super().__init__()
        c = torch.as_tensor(coeffs, dtype=torch.float64).detach().clone()
        if c.dim() != 1 or c.numel() < 1 or not torch.isfinite(c).all():
            raise ValueError("coeffs must be a non-empty 1-D sequence of finite numbers")
        if not interval[1] > interval[0]:
            raise ValueError(f"interval must have a < b, got {interval}")
        if trainable:
            self.coeffs = nn.Parameter(c)
        else:
            self.register_buffer("coeffs", c)
        self.interval = (float(interval[0]), float(interval[1]))
        self.source = source
        self.out_of_range = 0  # inputs seen outside the interval (clear evaluation only)

    @property
    def degree(self) -> int:
        nz = torch.nonzero(self.coeffs.detach()).flatten()
        return int(nz[-1]) if nz.numel() else 0

    def coefficient_list(self) -> list[float]:
        return [float(v) for v in self.coeffs.detach()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, PrivateTensor):
            return polyval(x, self.coefficient_list(), domain=self.interval)
        lo, hi = self.interval
        with torch.no_grad():
            self.out_of_range += int(((x < lo) | (x > hi)).sum())
        return polyval(x, self.coeffs, domain=self.interval)

    def extra_repr(self) -> str:
        return f"{self.source}, degree={self.degree}, interval=[{self.interval[0]:.3g}, {self.interval[1]:.3g}]"
