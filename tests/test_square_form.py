"""Degree-2 activations in one CKKS level: p(t) = sign (s t + shift)^2 + const, the affine parts fused away."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import privml
from privml.approx.basis import SQUARE_FORM_AMPLIFICATION, square_form
from privml.nn.poly import PolyActivation

coef = st.floats(-4, 4, allow_nan=False).filter(lambda v: abs(v) > 1e-3)


@settings(max_examples=200, deadline=None)
@given(c0=st.floats(-4, 4), c1=st.floats(-4, 4), c2=coef)
def test_square_form_is_the_same_polynomial(c0: float, c1: float, c2: float) -> None:
    form = square_form([c0, c1, c2])
    direct = abs(c0) + abs(c1) + abs(c2)
    if form is None:  # refused only when completing the square would cost more than 2 bits
        assert abs(c2) + abs(c1) + c1 * c1 / (4 * abs(c2)) > SQUARE_FORM_AMPLIFICATION * direct
        return
    s, shift, sign, const = form
    t = np.linspace(-1, 1, 41)
    assert np.allclose(sign * (s * t + shift) ** 2 + const, c0 + c1 * t + c2 * t * t, atol=1e-9 * (1 + direct))


def test_square_form_only_for_quadratics() -> None:
    assert square_form([1.0, 2.0]) is None and square_form([0.0, 1.0, 0.0, 1.0]) is None
    assert square_form([0.1, 0.5, 0.47, 0.0]) is not None  # trailing zeros do not raise the degree
    assert square_form([0.0, 100.0, 1e-3]) is None  # nearly linear: the square would cancel ~14 bits away


def _model(c2: float) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(12, 16), PolyActivation([0.2, 0.5, c2], (-3.0, 3.0)), nn.Linear(16, 16),
                         PolyActivation([0.1, -0.3, c2], (-3.0, 3.0)), nn.Linear(16, 5)).eval()


@pytest.mark.parametrize("c2", [0.45, -0.6])
@pytest.mark.parametrize("layout", ["latency", "throughput"])
def test_two_quadratic_layers_cost_one_level_each_and_match_torch(c2: float, layout: str) -> None:
    model = _model(c2)
    x = torch.rand(6, 12) * 2 - 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = privml.compile(model, x, backend="ckks", layout=layout, poly_modulus_degree=8192,
                                   precision_bits=12)
    assert compiled.plan.params["depth"] == 5  # 3 linear maps + 2 squares (a degree-2 Horner would need 7)
    with privml.Session(compiled.plan) as s:
        y = s.decrypt(compiled(s.encrypt(x)))
    with torch.no_grad():
        ref = model(x)
    assert torch.allclose(y.to(ref.dtype), ref, atol=2e-3 * float(ref.abs().max()) + 1e-3), (y - ref).abs().max()
