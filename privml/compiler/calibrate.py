"""Calibration: run real inputs through the captured graph in clear and record every node's value range.

Ranges are what the approximations and the backends' encoders are sized for:
an activation's polynomial only holds on its calibrated interval, CKKS needs
headroom for the largest value, fixed-point MPC must not wrap.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from privml.errors import CalibrationError

PERCENTILES = (0.1, 99.9)
_SAMPLE_CAP = 200_000


@dataclass
class RangeStats:
    """Observed statistics of one tensor-valued node over the calibration data."""

    lo: float = math.inf
    hi: float = -math.inf
    count: int = 0
    shape: tuple[int, ...] = ()
    samples: list[torch.Tensor] = field(default_factory=list, repr=False)

    def update(self, t: torch.Tensor) -> None:
        if t.numel() == 0:
            return
        self.lo = min(self.lo, float(t.min()))
        self.hi = max(self.hi, float(t.max()))
        self.count += t.numel()
        self.shape = tuple(t.shape[1:])
        flat = t.detach().reshape(-1).float()
        if flat.numel() > 20_000:
            flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:20_000]]
        if sum(s.numel() for s in self.samples) < _SAMPLE_CAP:
            self.samples.append(flat)

    def percentiles(self, qs: Iterable[float] = PERCENTILES) -> tuple[float, ...]:
        data = torch.cat(self.samples) if self.samples else torch.zeros(1)
        return tuple(float(torch.quantile(data, q / 100.0)) for q in qs)

    @property
    def abs_max(self) -> float:
        return max(abs(self.lo), abs(self.hi))


def as_batches(data: object) -> list[torch.Tensor]:
    """Normalise calibration data (a tensor, a DataLoader, a list of tensors or (x, y) pairs) to input batches."""
    if isinstance(data, torch.Tensor):
        batches = [data]
    else:
        try:
            items = list(data)  # type: ignore[arg-type]
        except TypeError:
            raise CalibrationError(f"privml: calibration data must be a tensor or an iterable of batches, got "
                                   f"{type(data).__name__}") from None
        batches = [b[0] if isinstance(b, (tuple, list)) else b for b in items]
    batches = [b for b in batches if isinstance(b, torch.Tensor)]
    if not batches or sum(b.shape[0] if b.dim() else 0 for b in batches) == 0:
        raise CalibrationError("privml: calibration data is empty: pass a batch of real inputs (e.g. 64-512 "
                               "training samples) so value ranges can be measured.")
    for b in batches:
        if not b.is_floating_point():
            raise CalibrationError(f"privml: calibration data has dtype {b.dtype}; privml computes on real "
                                   "numbers: convert with .float().")
        if not torch.isfinite(b).all():
            raise CalibrationError("privml: calibration data contains NaN or inf values.")
    return batches


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, stats: dict[str, RangeStats]) -> None:
        super().__init__(gm)
        self.stats = stats

    def run_node(self, n: fx.Node) -> object:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            self.stats.setdefault(n.name, RangeStats()).update(out)
        return out


def calibrate(gm: fx.GraphModule, data: object, input_shape: tuple[int, ...] | None = None) -> dict[str, RangeStats]:
    """Per-node output statistics (keyed by fx node name; the placeholder holds the input's)."""
    batches = as_batches(data)
    shape = tuple(batches[0].shape[1:])
    for b in batches:
        if tuple(b.shape[1:]) != shape:
            raise CalibrationError(f"privml: calibration batches disagree on the sample shape: {shape} vs "
                                   f"{tuple(b.shape[1:])}")
    if input_shape is not None and shape != tuple(input_shape):
        raise CalibrationError(f"privml: calibration samples have shape {shape} but the model expects "
                               f"{tuple(input_shape)}")
    stats: dict[str, RangeStats] = {}
    with torch.no_grad():
        for b in batches:
            try:
                _Recorder(gm, stats).run(b)
            except (RuntimeError, ValueError, IndexError) as err:
                first = str(err).splitlines()[0]
                raise CalibrationError(f"privml: the model cannot run on calibration samples of shape {shape}: "
                                       f"{first}. Pass inputs shaped like the model expects (batch first).") from None
    for name, st in stats.items():
        if not (math.isfinite(st.lo) and math.isfinite(st.hi)):
            raise CalibrationError(f"privml: node '{name}' produced non-finite values on the calibration data.")
    return stats
