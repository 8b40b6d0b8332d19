"""Every op registered on the plain backend equals torch's result on random shapes; unregistered ops fail clearly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from privml import functional as PF
from privml.backends.plain import PlainBackend, PlainTensor, Simulation
from privml.errors import RangeViolation, UnsupportedOperation

T = torch.Tensor
B = PlainBackend()


def enc(x: torch.Tensor) -> PlainTensor:
    return B.encrypt(x)


def r(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64)


# Each case: (registry op name, callable taking (private_or_clear wrapper) -> result, input shapes factory)
# The callable receives `w`, a function applied to the tensors that should be private.
def _cases(n: int, c: int, h: int) -> dict[str, tuple[list, object]]:
    x2, y2 = r(n, c * 2), r(n, c * 2)
    x4 = r(n, c, h, h)
    wl, bl = r(3, c * 2), r(3)
    wc, bc = r(2, c, 3, 3), r(2)
    sq = r(c * 2, c * 2)
    bn = (r(c), r(c).abs() + 0.5, r(c), r(c))
    return {
        "linear": ('linear', lambda w: F.linear(w(x2), wl, bl)),
        "conv2d": ('conv2d', lambda w: F.conv2d(w(x4), wc, bc, stride=1, padding=1)),
        "conv2d_stride": ('conv2d', lambda w: F.conv2d(w(x4), wc, None, stride=2, padding=1)),
        "avg_pool2d": ('avg_pool2d', lambda w: F.avg_pool2d(w(x4), 2)),
        "adaptive_avg_pool2d": ('adaptive_avg_pool2d', lambda w: F.adaptive_avg_pool2d(w(x4), 1)),
        "max_pool2d": ('max_pool2d', lambda w: F.max_pool2d(w(x4), 2)),
        "batch_norm": ('batch_norm', lambda w: F.batch_norm(w(x4), *bn)),
        "dropout": ('dropout', lambda w: F.dropout(w(x2), 0.5, training=False)),
        "add_private": ('add', lambda w: w(x2) + w(y2)),
        "add_plain": ('add', lambda w: torch.add(w(x2), y2)),
        "radd_scalar": ('add', lambda w: 2.5 + w(x2)),
        "iadd": ('add', lambda w: _iadd(w(x2.clone()), y2)),
        "sub": ('sub', lambda w: w(x2) - w(y2)),
        "rsub": ('sub', lambda w: 1.0 - w(x2)),
        "mul_private": ('mul', lambda w: w(x2) * w(y2)),
        "mul_scalar": ('mul', lambda w: 3.0 * w(x2)),
        "div_scalar": ('div', lambda w: w(x2) / 4.0),
        "neg": ('neg', lambda w: -w(x2)),
        "matmul": ('matmul', lambda w: w(x2) @ sq),
        "rmatmul": ('matmul', lambda w: torch.matmul(sq, w(x2).t())),
        "square": ('square', lambda w: torch.square(w(x2))),
        "pow2": ('pow', lambda w: w(x2) ** 2),
        "sum": ('sum', lambda w: w(x4).sum(dim=(2, 3))),
        "mean": ('mean', lambda w: torch.mean(w(x4), dim=1)),
        "cat": ('cat', lambda w: torch.cat([w(x2), w(y2)], dim=1)),
        "flatten": ('flatten', lambda w: w(x4).flatten(1)),
        "reshape": ('reshape', lambda w: w(x4).reshape(n, -1)),
        "view": ('reshape', lambda w: w(x4).view(n, c, h * h)),
        "identity": ('identity', lambda w: w(x2).contiguous()),
        "relu": ('relu', lambda w: F.relu(w(x2))),
        "relu_inplace": ('relu', lambda w: F.relu(w(x2.clone()), inplace=True)),
        "leaky_relu": ('leaky_relu', lambda w: F.leaky_relu(w(x2), 0.1)),
        "gelu": ('gelu', lambda w: F.gelu(w(x2))),
        "silu": ('silu', lambda w: F.silu(w(x2))),
        "sigmoid": ('sigmoid', lambda w: torch.sigmoid(w(x2))),
        "tanh": ('tanh', lambda w: torch.tanh(w(x2))),
        "softplus": ('softplus', lambda w: F.softplus(w(x2))),
        "softmax": ('softmax', lambda w: F.softmax(w(x2), dim=-1)),
        "polyval": ('polyval', lambda w: PF.polyval(w(x2), [0.5, 1.0, 0.25])),
        "transpose": ('transpose', lambda w: w(x2).t()),
        "permute": ('transpose', lambda w: w(x4).permute(0, 2, 3, 1)),
        "unsqueeze": ('unsqueeze', lambda w: w(x2).unsqueeze(1)),
        "getitem": ('getitem', lambda w: w(x4)[:, :1]),
        "layer_norm": ('layer_norm', lambda w: F.layer_norm(w(x4), (h, h))),
        "hardtanh": ('hardtanh', lambda w: F.hardtanh(w(x2), -0.5, 0.5)),
        "relu6": ('hardtanh', lambda w: F.relu6(w(x2) * 4)),
        "hardswish": ('hardswish', lambda w: F.hardswish(w(x2) * 4)),
        "hardsigmoid": ('hardsigmoid', lambda w: F.hardsigmoid(w(x2) * 4)),
        "elu": ('elu', lambda w: F.elu(w(x2))),
        "stochastic_depth": ('stochastic_depth', lambda w: _stochastic_depth(w(x4))),
    }


def _stochastic_depth(x: torch.Tensor) -> torch.Tensor:
    from torchvision.ops import stochastic_depth

    return stochastic_depth(x, 0.2, "row", training=False)


def _iadd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a += b
    return a


CASE_NAMES = sorted(_cases(1, 1, 4))


@pytest.mark.parametrize("case", CASE_NAMES)
@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 3), h=st.sampled_from([4, 6]))
def test_plain_op_matches_torch(case: str, n: int, c: int, h: int) -> None:
    torch.manual_seed(n * 100 + c * 10 + h)
    _, fn = _cases(n, c, h)[case]
    expected = fn(lambda t: t)
    got = fn(enc)
    assert isinstance(got, PlainTensor), f"{case} lost the private type"
    assert got.shape == expected.shape
    torch.testing.assert_close(B.decrypt(got), expected, rtol=1e-12, atol=1e-12)


def test_every_plain_op_has_a_case() -> None:
    covered = {op for op, _ in _cases(1, 1, 4).values()}
    registered = set(PlainTensor.supported_ops())
    assert registered, "plain backend registered nothing"
    missing = sorted(registered - covered - {"metadata"})
    assert not missing, f"ops without a test case: {missing}"


@pytest.mark.parametrize("call,name", [
    (lambda x: torch.sort(x), "sort"),
    (lambda x: torch.exp(x), "exp"),
    (lambda x: x.max(), "max"),
    (lambda x: torch.where(x > 0, x, x), "gt"),
    (lambda x: x / x, "div"),
    (lambda x: x ** 0.5, "pow"),
])
def test_unregistered_op_raises_with_name(call: object, name: str) -> None:
    x = enc(r(2, 3))
    with pytest.raises(UnsupportedOperation, match=name):
        call(x)


def test_control_flow_on_private_value_is_refused() -> None:
    x = enc(r(2, 3))
    with pytest.raises(UnsupportedOperation, match="control flow|comparisons"):
        if x.sum() > 0:  # noqa: SIM108 - the point is the Python `if`
            pass


def test_item_is_refused_with_hint() -> None:
    with pytest.raises(UnsupportedOperation, match="decrypt"):
        enc(r(1)).sum().item()


def test_ckks_simulation_is_noisy_but_close() -> None:
    sim_backend = PlainBackend(Simulation("ckks", ckks_noise_std=1e-6, seed=1))
    x = r(4, 8)
    w = r(3, 8)
    got = sim_backend.decrypt(F.linear(sim_backend.encrypt(x), w))
    exact = F.linear(x, w)
    err = (got - exact).abs().max().item()
    assert 0 < err < 1e-4


def test_fixed_point_simulation_rounds_and_detects_overflow() -> None:
    fp = PlainBackend(Simulation("fixed_point", frac_bits=16))
    x = torch.tensor([[0.1234567, -2.5]], dtype=torch.float64)
    got = fp.decrypt(fp.encrypt(x) * 1.0)
    assert torch.all((got * 2**16 - torch.round(got * 2**16)).abs() < 1e-9)
    assert (got - x).abs().max() <= 2**-16
    with pytest.raises(RangeViolation, match="wrap"):
        fp.encrypt(x) * 1e9
