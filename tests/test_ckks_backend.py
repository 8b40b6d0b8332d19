"""CKKS backend: every op, both layouts, real SEAL ciphertexts, compared with torch in clear."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import privml
from privml.errors import DepthExhausted, InvalidInput, UnsupportedOperation

TOL = 2e-3  # absolute, for values of order 1 at the planner's default precision (>= 20 bits)
LAYOUTS = ["latency", "throughput"]


class Lambda(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def run_private(model: nn.Module, x: torch.Tensor, layout: str, **opts):
    torch.manual_seed(0)
    calib = torch.randn(32, *x.shape[1:])
    compiled = privml.compile(model, calib, backend="ckks", layout=layout, **opts)
    session = privml.Session(compiled.plan)
    out = compiled(session.encrypt(x))
    return session.decrypt(out), compiled, session, out


W8 = torch.randn(3, 8)
B3 = torch.randn(3)
CONV_W = torch.randn(3, 2, 3, 3) * 0.3
BN = (torch.randn(2), torch.rand(2) + 0.5, torch.randn(2), torch.randn(2))
PLAIN_VEC = torch.randn(8)
OPS = {
    "linear_bias": ((4, 8), lambda x: F.linear(x, W8, B3)),
    "linear_nobias": ((4, 8), lambda x: F.linear(x, W8)),
    "conv2d_stride_pad": ((2, 2, 6, 6), lambda x: F.conv2d(x, CONV_W, None, stride=2, padding=1)),
    "conv2d_after_square": ((2, 2, 5, 5), lambda x: F.conv2d(torch.square(x), CONV_W, torch.ones(3), padding=1)),
    "avg_pool2d": ((2, 2, 4, 4), lambda x: F.avg_pool2d(x, 2)),
    "global_avg_pool": ((2, 2, 4, 4), lambda x: F.adaptive_avg_pool2d(x, 1).flatten(1)),
    "batch_norm_unfolded": ((2, 2, 3, 3), lambda x: F.batch_norm(x, *BN)),
    "flatten_reshape_view": ((2, 2, 3, 3), lambda x: x.flatten(1).reshape(x.shape[0], 2, 9).view(x.size(0), -1)),
    "add_sub_plain": ((3, 8), lambda x: (x + PLAIN_VEC) - 0.5),
    "mul_div_plain": ((3, 8), lambda x: (x * PLAIN_VEC) * 2.0 / 4.0),
    "neg_rsub": ((3, 8), lambda x: 1.0 - (-x)),
    "matmul_plain": ((3, 8), lambda x: x @ W8.t()),
    "sum_mean": ((2, 2, 3, 3), lambda x: x.sum(dim=(2, 3)) + x.mean(dim=1).flatten(1).sum(1, keepdim=True)),
    "square": ((3, 8), lambda x: torch.square(x)),
    "pow3": ((3, 8), lambda x: x ** 3),
    "mul_private": ((3, 8), lambda x: (x * 0.5) * (x + 1.0)),
    "residual_add_aligns_levels": ((3, 8), lambda x: F.linear(torch.square(F.linear(x, W8.t() @ W8 * 0.1)), W8)
                                   + F.linear(x, W8)),
    "polyval": ((3, 8), lambda x: privml.functional.polyval(x, [0.1, -0.5, 0.25, 0.05])),
    "polyval_domain": ((3, 8), lambda x: privml.functional.polyval(F.linear(x, W8.t() @ W8 * 0.1),
                                                                    [0.0, 1.0, 0.0, -0.3], domain=(-5.0, 5.0))),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", sorted(OPS))
def test_op_matches_torch(name: str, layout: str) -> None:
    shape, fn = OPS[name]
    torch.manual_seed(1)
    x = torch.randn(*shape)
    got, compiled, session, out = run_private(Lambda(fn), x, layout)
    _check_op(fn, x, got, compiled, session, out)


@pytest.mark.parametrize("name", sorted(OPS))
def test_op_matches_torch_with_several_features_per_ciphertext(name: str) -> None:
    """Throughput layout packed for the batch: features share ciphertexts, linear maps rotate between them."""
    shape, fn = OPS[name]
    torch.manual_seed(1)
    x = torch.randn(*shape)
    got, compiled, session, out = run_private(Lambda(fn), x, "throughput", batch_size=shape[0])
    lanes = compiled.plan.params["lanes"]
    assert lanes == 1 << (shape[0] - 1).bit_length()
    assert out.packing.width == lanes and out.packing.per_ct == session.backend.ctx.slots // lanes
    _check_op(fn, x, got, compiled, session, out)


def _check_op(fn, x, got, compiled, session, out) -> None:
    expected = fn(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < TOL * max(1.0, expected.abs().max().item())
    # the plan's depth is exactly the levels the ciphertexts lost
    assert session.backend.levels_used(out) == compiled.plan.params["depth"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fusion_saves_levels(layout: str) -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8, 4))
    x = torch.randn(2, 1, 4, 4)
    got, compiled, session, out = run_private(model, x, layout)
    assert compiled.plan.params["depth"] == 1  # conv, pool, flatten, linear fused into one diagonal product
    assert (got - model(x)).abs().max() < TOL


def test_latency_uses_few_rotations() -> None:
    model = nn.Sequential(nn.Linear(64, 32))
    x = torch.randn(1, 64)
    got, compiled, session, out = run_private(model, x, "latency")
    rotations = session.backend.ctx.stats["rotations"]
    assert 0 < rotations <= 24  # BSGS over 95 extended diagonals: ~2*sqrt(95), not 95
    assert (got - model(x)).abs().max() < TOL


def test_unsupported_ops_are_clear() -> None:
    model = Lambda(lambda x: torch.exp(x))
    with pytest.raises(privml.errors.PrivmlError):
        run_private(model, torch.randn(2, 4), "latency")
    session_model = nn.Sequential(nn.Linear(4, 4))
    _, compiled, session, _ = run_private(session_model, torch.randn(1, 4), "latency")
    enc = session.encrypt(torch.randn(1, 4).clamp(-1, 1))
    with pytest.raises(UnsupportedOperation, match="polynomial"):
        F.relu(enc)
    with pytest.raises(UnsupportedOperation, match="divide"):
        enc / enc
    with pytest.raises(UnsupportedOperation, match="softmax"):
        torch.softmax(enc, -1)


def test_depth_exhausted_before_key_generation() -> None:
    layers = []
    for _ in range(30):
        layers += [nn.Linear(4, 4), Lambda(lambda x: x * x)]
    model = nn.Sequential(*layers)
    with pytest.raises(DepthExhausted, match="depth"):
        privml.compile(model, torch.randn(8, 4) * 0.1, backend="ckks")


def test_user_override_is_checked() -> None:
    model = nn.Sequential(nn.Linear(4, 4), Lambda(lambda x: x * x), nn.Linear(4, 2))
    with pytest.raises(DepthExhausted):
        privml.compile(model, torch.randn(8, 4), backend="ckks", coeff_mod_bit_sizes=(60, 40, 60))
    with pytest.raises(privml.errors.BudgetError):
        privml.compile(model, torch.randn(8, 4), backend="ckks", poly_modulus_degree=8192,
                       coeff_mod_bit_sizes=(60, 40, 40, 40, 40, 60))


def test_throughput_batch_over_slots_is_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 2))
    _, compiled, session, _ = run_private(model, torch.randn(2, 4), "throughput")
    with pytest.raises(InvalidInput, match="slots"):
        session.encrypt(torch.randn(session.backend.ctx.slots + 1, 4).clamp(-1, 1))  # inside the calibrated range


def test_out_of_range_input_is_reported() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    compiled = privml.compile(model, torch.rand(64, 4), backend="ckks", layout="latency")
    session = privml.Session(compiled.plan)
    x = torch.rand(2, 4)
    ok = session.decrypt(compiled(session.encrypt(x)))
    assert (ok - compiled(x)).abs().max() < TOL
    with pytest.raises(privml.errors.RangeViolation, match="calibrated"):
        session.decrypt(compiled(session.encrypt(torch.rand(2, 4) * 40.0)))


def test_second_call_reuses_encoded_diagonals() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(32, 4))
    x = torch.randn(1, 1, 4, 4)
    _, compiled, session, _ = run_private(model, x, "latency")
    stats = session.backend.ctx.stats
    before = stats["encodes"]
    out = session.decrypt(compiled(session.encrypt(torch.randn(1, 1, 4, 4).clamp(-1, 1))))
    assert out.shape == (1, 4)
    assert stats["encodes"] - before <= 2  # only the new input's encoding, no diagonal re-encoded


def test_input_expansion_makes_strided_conv_cheap() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 4, 7, stride=3), Lambda(lambda x: x * x), nn.Flatten(), nn.Linear(256, 10))
    x = torch.randn(1, 1, 28, 28) * 0.3
    got, compiled, session, _ = run_private(model, x, "latency")
    assert compiled.plan.params["input_expansion"] is not None
    assert (got - model(x)).abs().max() < TOL * max(1.0, model(x).abs().max().item())
    session.backend.ctx.reset_stats()
    compiled(session.encrypt(x))
    assert session.backend.ctx.stats["ct_pt_mults"] < 400  # ~1000 diagonals without the expansion
    plain_compiled = privml.compile(model, torch.randn(32, 1, 28, 28) * 0.3, backend="ckks", layout="latency",
                                    input_expansion=False)
    assert plain_compiled.plan.params["input_expansion"] is None
    with pytest.raises(privml.errors.PrivmlError, match="expansion"):
        session.decrypt(session.encrypt(x))  # expanded inputs only feed the first layer


def test_no_expansion_when_the_input_is_used_twice() -> None:
    model = Lambda(lambda x: F.conv2d(x, CONV_W[:1, :1], padding=1) + torch.square(x))
    x = torch.randn(2, 1, 5, 5)
    got, compiled, _, _ = run_private(model, x, "latency")
    assert compiled.plan.params["input_expansion"] is None
    assert (got - model(x)).abs().max() < TOL * max(1.0, model(x).abs().max().item())
