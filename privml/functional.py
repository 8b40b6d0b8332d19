"""privml's own differentiable functions that private tensors can intercept.

``polyval`` is how compiled models express a polynomial activation: on a plain
tensor it evaluates in clear (and supports autograd for fine-tuning); on a
private tensor the call is routed to the backend, which evaluates it with its
own minimal-depth schedule.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.overrides import handle_torch_function, has_torch_function_unary


def polyval(x: torch.Tensor, coeffs: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Evaluate ``sum_i coeffs[i] * x**i`` elementwise (power basis, lowest degree first)."""
    if has_torch_function_unary(x):
        return handle_torch_function(polyval, (x,), x, coeffs)
    c = coeffs if isinstance(coeffs, torch.Tensor) else torch.as_tensor(list(coeffs), dtype=x.dtype)
    out = torch.zeros_like(x) + c[-1]
    for k in range(c.shape[0] - 2, -1, -1):  # Horner in clear
        out = out * x + c[k]
    return out
