"""In-place entry points and their out-of-place forms.

Private tensors never mutate: a backend handler for ``x.add_(y)`` or ``out += identity`` computes the
out-of-place result and Python rebinds the name (the validator refuses in-place writes whose input is
still read afterwards, where rebinding would change the result).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F

T = torch.Tensor

_OUT_OF_PLACE: dict[Any, Any] = {
    T.add_: torch.add, T.__iadd__: torch.add, operator.iadd: operator.add,
    T.sub_: torch.sub, T.__isub__: torch.sub, operator.isub: operator.sub,
    T.mul_: torch.mul, T.__imul__: torch.mul, operator.imul: operator.mul,
    T.div_: torch.div, T.__itruediv__: torch.div, operator.itruediv: operator.truediv,
    F.relu_: F.relu, torch.relu_: torch.relu, T.relu_: torch.relu,
    F.leaky_relu_: F.leaky_relu, F.hardtanh_: F.hardtanh, F.elu_: F.elu,
}


def out_of_place(func: Any) -> Any:
    """The out-of-place callable computing what the in-place ``func`` would (``func`` itself otherwise)."""
    return _OUT_OF_PLACE.get(func, func)


def is_inplace(func: Any) -> bool:
    return func in _OUT_OF_PLACE
