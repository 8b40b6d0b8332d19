"""Polynomial stand-ins for non-polynomial activations, fixed or trainable.

``PolyActivation`` is one polynomial, stored in the well-conditioned variable t in
[-1, 1] that the calibrated interval maps to. ``CompositeRelu`` is ReLU (or leaky
ReLU, |x|) built from a composite sign approximation: x * ((1 + a) + (1 - a) s(x / B)) / 2.

In clear both evaluate with ordinary torch ops (autograd works, so approximation-aware
fine-tuning can train the network around them, and the coefficients too when
``trainable``); on a private tensor they route through ``privml.functional.polyval``
and one private product, which the backend evaluates with its own schedule (the
x -> t map is fused into the preceding linear layer where there is one).

An approximation only holds on its interval. Both modules count inputs that fall
outside it (clear evaluation only) and, in training mode, keep a *range penalty*
(mean squared excess of |t| over 1) that :func:`range_penalty` sums over a model, so
fine-tuning can be told to keep the activations' inputs inside their intervals.
With ``clamp=True`` inputs are also clamped into the interval in training mode (keeps
a high-degree polynomial from blowing up while the weights move; evaluation never
clamps, since a ciphertext cannot be clamped).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from privml.approx.basis import poly_depth
from privml.functional import polyval
from privml.tensor import PrivateTensor


def _coeff_tensor(coeffs: Sequence[float] | torch.Tensor, what: str = "coeffs") -> torch.Tensor:
    c = torch.as_tensor(coeffs, dtype=torch.float64).detach().clone()
    if c.dim() != 1 or c.numel() < 1 or not torch.isfinite(c).all():
        raise ValueError(f"{what} must be a non-empty 1-D sequence of finite numbers")
    return c


def _degree_of(c: torch.Tensor) -> int:
    nz = torch.nonzero(c.detach()).flatten()
    return int(nz[-1]) if nz.numel() else 0


class _RangeGuard(nn.Module):
    """Shared bookkeeping: interval, out-of-range counter, range penalty, optional training-time clamp."""

    def __init__(self, interval: tuple[float, float], clamp: bool) -> None:
        super().__init__()
        lo, hi = float(interval[0]), float(interval[1])
        if not (hi > lo) or not (torch.isfinite(torch.tensor([lo, hi])).all()):
            raise ValueError(f"interval must be finite with a < b, got {interval}")
        self.interval = (lo, hi)
        self.clamp = bool(clamp)
        self.out_of_range = 0  # inputs seen outside the interval (clear evaluation only)
        self.last_penalty: torch.Tensor | None = None

    def _guard(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.interval
        with torch.no_grad():
            self.out_of_range += int(((x < lo) | (x > hi)).sum())
        if self.training:
            t = (2.0 * x - (lo + hi)) / (hi - lo)
            self.last_penalty = torch.relu(t.abs() - 1.0).square().mean()
            if self.clamp:
                x = x.clamp(lo, hi)
        else:
            self.last_penalty = None
        return x


class PolyActivation(_RangeGuard):
    """p(t) = sum_i coeffs[i] t^i with t = (2x - a - b) / (b - a), valid for x in ``interval`` = (a, b).

    ``source`` names the activation it replaces; ``trainable`` makes the coefficients parameters.
    """

    def __init__(self, coeffs: Sequence[float] | torch.Tensor, interval: tuple[float, float], source: str = "relu",
                 trainable: bool = False, clamp: bool = False) -> None:
        super().__init__(interval, clamp)
        c = _coeff_tensor(coeffs)
        if trainable:
            self.coeffs = nn.Parameter(c)
        else:
            self.register_buffer("coeffs", c)
        self.source = source

    @property
    def degree(self) -> int:
        return _degree_of(self.coeffs)

    @property
    def depth(self) -> int:
        """CKKS levels this activation consumes (besides materializing a pending linear map)."""
        return poly_depth(self.degree)

    def coefficient_list(self) -> list[float]:
        return [float(v) for v in self.coeffs.detach()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, PrivateTensor):
            return polyval(x, self.coefficient_list(), domain=self.interval)
        x = self._guard(x)
        return polyval(x.double(), self.coeffs, domain=self.interval).to(x.dtype)  # float64: see CompositeRelu

    def extra_repr(self) -> str:
        return f"{self.source}, degree={self.degree}, interval=[{self.interval[0]:.3g}, {self.interval[1]:.3g}]"


class CompositeRelu(_RangeGuard):
    """x * ((1 + slope) + (1 - slope) * s(x / B)) / 2 with s = q_k(...q_1(x / B)) a composite sign.

    ``stages`` are the sign stages as power-basis coefficients, the first in t = x / B
    (B = max |interval|), the others in the previous stage's output. The final
    (1 + slope)/2 + (1 - slope)/2 * s is folded into the last stage's coefficients, so
    on CKKS the module costs the stages' depths plus one level for the product with x.
    ``slope`` 0 is ReLU, in (0, 1) leaky ReLU, -1 is |x|.
    """

    def __init__(self, stages: Sequence[Sequence[float]], interval: tuple[float, float], slope: float = 0.0,
                 source: str = "relu", trainable: bool = False, clamp: bool = False) -> None:
        super().__init__(interval, clamp)
        if not stages:
            raise ValueError("CompositeRelu needs at least one sign stage")
        if not -1.0 <= float(slope) < 1.0:
            raise ValueError(f"slope must be in [-1, 1), got {slope}")
        self.slope = float(slope)
        self.source = source
        self.bound = max(abs(self.interval[0]), abs(self.interval[1]))
        cs = [_coeff_tensor(s, "each stage") for s in stages]
        last = cs[-1] * ((1.0 - self.slope) / 2.0)
        last[0] = last[0] + (1.0 + self.slope) / 2.0
        cs[-1] = last
        self.stages = nn.ParameterList([nn.Parameter(c, requires_grad=trainable) for c in cs])

    @property
    def degrees(self) -> tuple[int, ...]:
        return tuple(_degree_of(c) for c in self.stages)

    @property
    def degree(self) -> int:
        out = 1
        for d in self.degrees:
            out *= d
        return out + 1  # times x

    @property
    def depth(self) -> int:
        """CKKS levels: every stage's ceil(log2(d + 1)) plus one for the product with x."""
        return sum(poly_depth(d) for d in self.degrees) + 1

    def stage_lists(self) -> list[list[float]]:
        return [[float(v) for v in c.detach()] for c in self.stages]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        private = isinstance(x, PrivateTensor)
        if private:
            coeffs: list = self.stage_lists()
            z = x
        else:  # float64 in clear: sign stages have large power-basis coefficients
            coeffs, z = list(self.stages), self._guard(x).double()
        s = polyval(z, coeffs[0], domain=(-self.bound, self.bound))
        for c in coeffs[1:]:
            s = polyval(s, c)
        out = z * s
        return out if private else out.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"{self.source}, sign stages {list(self.degrees)}, slope={self.slope:g}, "
                f"interval=[{self.interval[0]:.3g}, {self.interval[1]:.3g}]")


APPROX_MODULES = (PolyActivation, CompositeRelu)


def range_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of the range penalties the model's approximations recorded in their last training-mode forward."""
    terms = [m.last_penalty for m in model.modules() if isinstance(m, APPROX_MODULES) and m.last_penalty is not None]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def set_trainable(model: nn.Module, coefficients: bool = True, clamp: bool | None = None) -> nn.Module:
    """Make every approximation's coefficients trainable (or frozen); optionally switch training-time clamping."""
    for m in model.modules():
        if isinstance(m, PolyActivation):
            c = m.coeffs.detach().clone()
            del m.coeffs
            if coefficients:
                m.coeffs = nn.Parameter(c)
            else:
                m.register_buffer("coeffs", c)
        elif isinstance(m, CompositeRelu):
            for p in m.stages:
                p.requires_grad_(coefficients)
        if isinstance(m, APPROX_MODULES) and clamp is not None:
            m.clamp = bool(clamp)
    return model


def reset_range_counters(model: nn.Module) -> None:
    """Zero every approximation's out-of-range counter."""
    for m in model.modules():
        if isinstance(m, APPROX_MODULES):
            m.out_of_range = 0


def out_of_range_counts(model: nn.Module) -> dict[str, int]:
    """Inputs seen outside their interval, per approximation module (clear evaluation since the last reset)."""
    return {name: m.out_of_range for name, m in model.named_modules() if isinstance(m, APPROX_MODULES)}
