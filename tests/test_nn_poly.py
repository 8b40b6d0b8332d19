"""privml.nn: polynomial and sign-composite activations in clear (autograd, range penalty) and on real CKKS."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import privml
from privml.approx.fit import fit_activation
from privml.approx.sign import composite_sign, relu_from_sign
from privml.nn import (
    CompositeRelu,
    PolyActivation,
    out_of_range_counts,
    range_penalty,
    reset_range_counters,
    set_trainable,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def composite_module(lo: float, hi: float, degrees=(7, 7), eps=2.0**-6, slope: float = 0.0) -> tuple:
    sign = composite_sign(degrees=degrees, eps=eps)
    ref = relu_from_sign(sign, lo, hi) if slope == 0.0 else type(relu_from_sign(sign, lo, hi))(sign, lo, hi, slope)
    mod = CompositeRelu([p.power_coeffs() for p in sign.stages], (lo, hi), slope=slope)
    return mod, ref


def test_poly_activation_matches_its_fit_on_a_dense_grid() -> None:
    p = fit_activation("gelu", -3.0, 5.0, 7)
    mod = PolyActivation(p.power_coeffs(), (-3.0, 5.0), source="gelu")
    x = torch.linspace(-3.0, 5.0, 100_001, dtype=torch.float64)
    assert mod.degree == 7 and mod.depth == 3
    np.testing.assert_allclose(mod(x).numpy(), p(x.numpy()), atol=1e-10)
    exact = torch.nn.functional.gelu(x)
    assert float((mod(x) - exact).abs().max()) <= p.err * (1 + 1e-6) + 1e-12


def test_trainable_coefficients_get_gradients_and_frozen_ones_do_not() -> None:
    frozen = PolyActivation([0.1, 0.5, 0.25], (-2.0, 2.0))
    assert list(frozen.parameters()) == []
    trainable = PolyActivation([0.1, 0.5, 0.25], (-2.0, 2.0), trainable=True)
    x = torch.randn(32, requires_grad=True)
    trainable(x).sum().backward()
    assert trainable.coeffs.grad is not None and trainable.coeffs.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0
    # set_trainable switches both module kinds and keeps the values
    model = nn.Sequential(frozen, composite_module(-2.0, 2.0)[0])
    before = model(torch.linspace(-2, 2, 11))
    set_trainable(model, coefficients=True)
    assert len(list(model.parameters())) == 1 + 2 and all(p.requires_grad for p in model.parameters())
    set_trainable(model, coefficients=False)
    assert not any(p.requires_grad for p in model.parameters())
    assert torch.equal(model(torch.linspace(-2, 2, 11)), before)


def test_range_penalty_counts_and_training_time_clamp() -> None:
    mod = PolyActivation([0.0, 0.0, 1.0], (-1.0, 1.0), clamp=True)  # t^2
    inside = torch.tensor([-0.5, 0.0, 0.9])
    mod.train()
    mod(inside)
    assert float(mod.last_penalty) == 0.0
    outside = torch.tensor([3.0, 0.0])  # t = 3: excess 2, squared 4, mean over 2 values = 2
    y = mod(outside)
    assert float(mod.last_penalty) == pytest.approx(2.0)
    assert float(y[0]) == pytest.approx(1.0)  # clamped to the interval's end in training
    assert float(range_penalty(nn.Sequential(mod))) == pytest.approx(2.0)
    mod.eval()
    assert float(mod(outside)[0]) == pytest.approx(9.0)  # evaluation never clamps (a ciphertext cannot be)
    assert mod.last_penalty is None and float(range_penalty(mod)) == 0.0
    assert out_of_range_counts(nn.Sequential(mod)) == {"0": 2}
    reset_range_counters(mod)
    assert mod.out_of_range == 0
    # the penalty is differentiable: it pushes inputs back inside
    mod.train()
    z = torch.tensor([3.0], requires_grad=True)
    mod(z)
    mod.last_penalty.backward()
    assert float(z.grad) > 0


@pytest.mark.parametrize("slope", [0.0, 0.1, -1.0])
def test_composite_relu_matches_the_sign_construction_and_its_claimed_error(slope: float) -> None:
    mod, ref = composite_module(-3.0, 5.0, slope=slope)
    x = torch.linspace(-3.0, 5.0, 200_001, dtype=torch.float64)
    got = mod(x).numpy()
    np.testing.assert_allclose(got, ref(x.numpy()), atol=1e-9)
    target = np.where(x.numpy() >= 0, x.numpy(), slope * x.numpy())
    assert np.max(np.abs(got - target)) <= ref.err * (1 + 1e-6) + 1e-12
    assert mod.degrees == (7, 7) and mod.depth == 3 + 3 + 1


def test_modules_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="finite"):
        PolyActivation([1.0, float("nan")], (-1.0, 1.0))
    with pytest.raises(ValueError, match="a < b"):
        PolyActivation([1.0], (1.0, 1.0))
    with pytest.raises(ValueError, match="slope"):
        CompositeRelu([[0.0, 1.0]], (-1.0, 1.0), slope=1.5)
    with pytest.raises(ValueError, match="at least one"):
        CompositeRelu([], (-1.0, 1.0))


def test_poly_and_composite_on_ckks_match_clear_and_consume_their_depth() -> None:
    torch.manual_seed(0)
    p = fit_activation("tanh", -3.0, 3.0, 5)
    comp, _ = composite_module(-4.0, 4.0, degrees=(3, 3), eps=2.0**-4)
    model = nn.Sequential(nn.Linear(6, 6), PolyActivation(p.power_coeffs(), (-3.0, 3.0), source="tanh"),
                          nn.Linear(6, 6), comp, nn.Linear(6, 3)).eval()
    with torch.no_grad():
        for lin in (model[0], model[2], model[4]):
            lin.weight.mul_(0.5)
    compiled = privml.compile(model, torch.rand(64, 6) * 2 - 1, backend="ckks", layout="latency")
    expected = 1 + 3 + 1 + (2 + 2 + 1) + 1  # linear, deg-5 poly, linear, composite {3,3} + product, linear
    assert compiled.plan.params["depth"] == expected
    session = privml.Session(compiled.plan)
    x = torch.rand(2, 6) * 2 - 1
    out = compiled(session.encrypt(x))
    assert session.backend.levels_used(out) == expected
    assert float((session.decrypt(out) - compiled(x)).abs().max()) < 1e-3
