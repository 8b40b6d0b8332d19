"""``PolyLayerNorm``: LayerNorm with its 1/sqrt(variance + eps) replaced by a polynomial, for CKKS.

Built only from ops every backend runs: the mean and the variance are linear maps replicated over the
normalised features (``F.linear`` by J/n, fused into neighbouring linear maps on CKKS), the centring a
difference of two maps of the same ciphertexts (free), the square one ciphertext product, the inverse
square root a polynomial on the calibrated range of variance + eps refined by ``newton_steps`` Newton steps
y <- y (3 - v y^2) / 2 (two levels each), and the normalisation one more product.
On CKKS that is poly_depth(degree) + 2 * newton_steps + 3 levels after the incoming linear map. The
polynomial only holds on its interval: inputs whose variance leaves it are counted (clear evaluation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from privml.approx.basis import poly_depth
from privml.functional import polyval
from privml.nn.poly import _coeff_tensor, _degree_of, _RangeGuard
from privml.tensor import PrivateTensor


class PolyLayerNorm(_RangeGuard):
    """LayerNorm over the trailing ``normalized_shape`` with 1/sqrt(v) ~ p(t), t the variance mapped from
    ``interval`` onto [-1, 1]; ``weight``/``bias`` as in ``nn.LayerNorm`` (None: identity)."""

    def __init__(self, normalized_shape: Sequence[int], coeffs: Sequence[float] | torch.Tensor,
                 interval: tuple[float, float], weight: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, eps: float = 1e-5, newton_steps: int = 0) -> None:
        super().__init__(interval, clamp=False)
        if interval[0] <= 0:
            raise ValueError(f"the variance interval must be positive, got {interval}")
        self.normalized_shape = tuple(int(n) for n in normalized_shape)
        self.eps = float(eps)
        self.newton_steps = int(newton_steps)
        self.source = "layer_norm"
        self.est_error = 0.0  # bound on the output error, set by the compiler from the fit
        n = math.prod(self.normalized_shape)
        self.register_buffer("coeffs", _coeff_tensor(coeffs))
        self.register_buffer("average", torch.full((n, n), 1.0 / n, dtype=torch.float64))
        self.register_buffer("weight", None if weight is None else weight.detach().double().reshape(n).clone())
        self.register_buffer("bias", None if bias is None else bias.detach().double().reshape(n).clone())

    @property
    def degree(self) -> int:
        return _degree_of(self.coeffs)

    @property
    def depth(self) -> int:
        """CKKS levels besides materializing the incoming linear map (as for ``PolyActivation``): the square,
        the variance map, the polynomial, its Newton steps, the product."""
        return poly_depth(self.degree) + 2 * self.newton_steps + 3

    def coefficient_list(self) -> list[float]:
        return [float(v) for v in self.coeffs]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        private = isinstance(x, PrivateTensor)
        k = len(self.normalized_shape)
        shape = tuple(x.shape)
        z = x.reshape(*shape[:-k], self.average.shape[0])
        avg = self.average if private else self.average.to(torch.float64)
        if not private:
            z = z.double()
        centred = z - F.linear(z, avg)
        variance = F.linear(centred * centred, avg) + self.eps
        if not private:
            self._guard(variance)
        inv = polyval(variance, self.coefficient_list() if private else self.coeffs, domain=self.interval)
        for _ in range(self.newton_steps):
            inv = inv * 1.5 + ((variance * -0.5) * inv) * (inv * inv)  # scalars on the linear side: 2 levels
        y = centred * inv
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        y = y.reshape(shape)
        return y if private else y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, inv_sqrt degree={self.degree} + {self.newton_steps} Newton steps, "
                f"variance interval=[{self.interval[0]:.3g}, {self.interval[1]:.3g}]")
