"""One or more example calls per registry op, each a function of ONE input tensor (private or clear).

The conformance test (tests/test_registry.py) runs every (op, backend) pair the registry declares from
these; an op without a case fails that test, so a new op cannot be registered untested.
Constants come from a fixed generator, so every call of a case uses the same values.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from privml import functional as PF


class Case(nn.Module):
    """A model whose forward is one example call (or any function of the input)."""

    def __init__(self, fn: object) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


_g = torch.Generator().manual_seed(0)


def _r(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=_g) * scale


W = _r(3, 8, scale=0.4)
B = _r(3)
M = _r(8, 5, scale=0.4)
CW = _r(3, 2, 3, 3, scale=0.3)
CB = _r(3)
BN = (_r(2), torch.rand(2, generator=_g) + 0.5, _r(2), _r(2))
LN_W, LN_B = _r(8) * 0.2 + 1.0, _r(8) * 0.1
V = _r(8)
VEC, IMG = (8,), (2, 4, 4)


def _stochastic_depth(x: torch.Tensor) -> torch.Tensor:
    from torchvision.ops import stochastic_depth

    return stochastic_depth(x, 0.2, "row", training=False)


def _iadd(x: torch.Tensor) -> torch.Tensor:
    y = x * 1.0
    y += V
    return y


# (op name, case name, sample shape, fn)
CASES: list[tuple[str, str, tuple[int, ...], object]] = [
    ("linear", "linear", VEC, lambda x: F.linear(x, W, B)),
    ("conv2d", "conv2d_pad", IMG, lambda x: F.conv2d(x, CW, CB, padding=1)),
    ("conv2d", "conv2d_stride", IMG, lambda x: F.conv2d(x, CW, None, stride=2, padding=1)),
    ("avg_pool2d", "avg_pool2d", IMG, lambda x: F.avg_pool2d(x, 2)),
    ("adaptive_avg_pool2d", "global_pool", IMG, lambda x: F.adaptive_avg_pool2d(x, 1)),
    ("batch_norm", "batch_norm", IMG, lambda x: F.batch_norm(x, *BN)),
    ("matmul", "matmul", VEC, lambda x: x @ M),
    ("sum", "sum", IMG, lambda x: x.sum(dim=(2, 3))),
    ("mean", "mean", IMG, lambda x: torch.mean(x, dim=1)),
    ("add", "add_private", VEC, lambda x: x + x * 0.5),
    ("add", "add_plain_inplace", VEC, _iadd),
    ("sub", "rsub", VEC, lambda x: 1.0 - x),
    ("mul", "mul_private", VEC, lambda x: (x * 0.5) * (x + 1.0)),
    ("div", "div_scalar", VEC, lambda x: x / 4.0),
    ("neg", "neg", VEC, lambda x: -x),
    ("square", "square", VEC, lambda x: torch.square(x)),
    ("pow", "pow3", VEC, lambda x: x ** 3),
    ("polyval", "polyval", VEC, lambda x: PF.polyval(x, [0.1, -0.5, 0.25, 0.05])),
    ("flatten", "flatten", IMG, lambda x: x.flatten(1)),
    ("reshape", "reshape_view", IMG, lambda x: x.reshape(x.shape[0], 2, 16).view(x.shape[0], -1)),
    ("cat", "cat", VEC, lambda x: torch.cat([x, x * 2.0], dim=1)),
    ("identity", "contiguous", VEC, lambda x: x.contiguous()),
    ("transpose", "permute", IMG, lambda x: x.permute(0, 2, 3, 1)),
    ("unsqueeze", "unsqueeze", VEC, lambda x: x.unsqueeze(1)),
    ("getitem", "getitem", IMG, lambda x: x[:, :1]),
    ("metadata", "size", IMG, lambda x: x.reshape(x.size(0), -1)),
    ("dropout", "dropout", VEC, lambda x: F.dropout(x, 0.5, training=False)),
    ("stochastic_depth", "stochastic_depth", IMG, _stochastic_depth),
    ("max_pool2d", "max_pool2d", IMG, lambda x: F.max_pool2d(x, 2)),
    ("max_pool2d", "max_pool2d_ceil", (2, 5, 5), lambda x: F.max_pool2d(x, 3, 2, ceil_mode=True)),
    ("layer_norm", "layer_norm", VEC, lambda x: F.layer_norm(x, (8,), LN_W, LN_B)),
    ("relu", "relu", VEC, lambda x: F.relu(x)),
    ("leaky_relu", "leaky_relu", VEC, lambda x: F.leaky_relu(x, 0.1)),
    ("hardtanh", "relu6", VEC, lambda x: F.relu6(x * 4.0)),
    ("hardtanh", "hardtanh", VEC, lambda x: F.hardtanh(x, -0.5, 0.5)),
    ("hardswish", "hardswish", VEC, lambda x: F.hardswish(x * 3.0)),
    ("hardsigmoid", "hardsigmoid", VEC, lambda x: F.hardsigmoid(x * 3.0)),
    ("silu", "silu", VEC, lambda x: F.silu(x)),
    ("sigmoid", "sigmoid", VEC, lambda x: torch.sigmoid(x)),
    ("tanh", "tanh", VEC, lambda x: torch.tanh(x)),
    ("gelu", "gelu", VEC, lambda x: F.gelu(x)),
    ("softplus", "softplus", VEC, lambda x: F.softplus(x)),
    ("elu", "elu", VEC, lambda x: F.elu(x)),
    ("softmax", "softmax", VEC, lambda x: F.softmax(x, dim=-1)),
]


def cases_for(op: str) -> list[tuple[str, str, tuple[int, ...], object]]:
    return [c for c in CASES if c[0] == op]
