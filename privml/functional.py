"""privml's own differentiable functions that private tensors can intercept.

``polyval`` is how compiled models express a polynomial activation: on a plain
tensor it evaluates in clear (and supports autograd for fine-tuning); on a
private tensor the call is routed to the backend, which evaluates it with its
own minimal-depth schedule.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.overrides import handle_torch_function, has_torch_function_unary


def to_unit_interval(domain: tuple[float, float]) -> tuple[float, float]:
    """(alpha, beta) with t = alpha * x + beta mapping [a, b] onto [-1, 1]."""
    a, b = float(domain[0]), float(domain[1])
    return 2.0 / (b - a), -(a + b) / (b - a)


def coeffs_in_x(coeffs: Sequence[float], domain: tuple[float, float] | None) -> np.ndarray:
    """Power coefficients of p(alpha x + beta) in x (well-conditioned only for small degree / narrow domains)."""
    c = np.asarray(coeffs, dtype=np.float64)
    if domain is None:
        return c
    alpha, beta = to_unit_interval(domain)
    out = np.zeros(1)
    for v in c[::-1]:  # Horner on polynomials
        out = np.polynomial.polynomial.polyadd(np.polynomial.polynomial.polymul(out, [beta, alpha]), [v])
    return out


def polyval(x: torch.Tensor, coeffs: Sequence[float] | torch.Tensor,
            domain: tuple[float, float] | None = None) -> torch.Tensor:
    """Elementwise ``sum_i coeffs[i] * t**i`` with t = x, or t = x mapped from ``domain`` onto [-1, 1]."""
    if has_torch_function_unary(x):
        return handle_torch_function(polyval, (x,), x, coeffs, domain=domain)
    c = coeffs if isinstance(coeffs, torch.Tensor) else torch.as_tensor(list(coeffs), dtype=x.dtype)
    c = c.to(x.dtype)
    if domain is not None:
        alpha, beta = to_unit_interval(domain)
        x = x * alpha + beta
    out = torch.zeros_like(x) + c[-1]
    for k in range(c.shape[0] - 2, -1, -1):  # Horner in clear
        out = out * x + c[k]
    return out
