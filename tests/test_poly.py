"""Tests of privml.approx: fits, stated errors, composite sign, costs, serialization, errors.

Every error claim is re-measured here on grids of the test's own (uniform, random and
geometric points), independent of the grids the module uses.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.polynomial import chebyshev as npcheb
from numpy.polynomial import polynomial as nppoly

from privml.approx.activations import ACTIVATIONS, POSITIVE_DOMAIN, gelu, relu, sigmoid
from privml.approx.basis import Poly, bsgs_mult_count
from privml.approx.fit import (
    chebyshev_interp,
    estimate_error,
    fit_activation,
    fit_activation_to_error,
    max_error,
    remez,
)
from privml.approx.sign import (
    CompositePoly,
    MaxApprox,
    ReluApprox,
    abs_from_sign,
    cheapest,
    composite_sign,
    max_from_sign,
    relu_from_sign,
)
from privml.errors import BudgetError, CalibrationError, InvalidInput, MalformedInput, RangeViolation
from privml.functional import polyval

RNG = np.random.default_rng(1234)


def dense(a: float, b: float, n: int = 200_001) -> np.ndarray:
    """Uniform points plus random points of [a, b], endpoints included."""
    return np.sort(np.concatenate([np.linspace(a, b, n), RNG.uniform(a, b, n // 4)]))


def measured(approx, f, a: float, b: float) -> float:
    x = dense(a, b)
    return float(np.max(np.abs(np.asarray(approx(x)) - f(x))))


def alternation(e: np.ndarray, level: float) -> int:
    """Number of alternating sign runs of e whose extreme reaches `level`."""
    s = np.sign(e)
    count, last = 0, 0
    run_start = 0
    for i in range(1, e.size + 1):
        if i == e.size or s[i] != s[run_start]:
            if np.max(np.abs(e[run_start:i])) >= level and s[run_start] != last:
                count, last = count + 1, s[run_start]
            run_start = i
    return count


# ---------------------------------------------------------------------------------------------------------------
# fitting accuracy

INTERVALS = [(-4.0, 4.0), (-8.0, 2.0), (0.5, 6.0)]
DEGREES = [3, 8, 15, 31]


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_every_activation_meets_its_stated_error_and_remez_beats_cheb(name):
    f = ACTIVATIONS[name]
    intervals = [(0.05, 2.0), (0.5, 6.0)] if name in POSITIVE_DOMAIN else INTERVALS
    for a, b in intervals:
        for d in DEGREES:
            p = fit_activation(name, a, b, d)
            c = fit_activation(name, a, b, d, method="cheb")
            assert p.degree <= d and p.err is not None
            true_err = measured(p, f, a, b)
            # the stated error is honest (a denser, independent grid finds at most 1% more)
            assert true_err <= p.err * 1.01 + 1e-13, (name, a, b, d, true_err, p.err)
            assert measured(c, f, a, b) <= c.err * 1.01 + 1e-13
            # minimax is no worse than interpolation at the same degree
            assert p.err <= c.err * 1.001 + 1e-13, (name, a, b, d, p.err, c.err)
            noise = p.err < 1e-10 * np.max(np.abs(f(np.array([a, b]))) + 1.0)
            assert p.method in ("remez", "exact") or noise, (name, a, b, d, p.method)


def test_remez_recovers_known_minimax_errors():
    # best degree-n approximation of t^(n+1) on [-1, 1] is t^(n+1) - T_{n+1}/2^n: error exactly 2^-n
    for n in (3, 8, 15, 30):
        p = remez(lambda x, n=n: x ** (n + 1), -1.0, 1.0, n)
        assert p.err == pytest.approx(2.0 ** -n, rel=1e-6)
    # Bernstein: d * E_d(|x|) -> 0.2801694990 (best uniform approximation of |x| on [-1, 1])
    p = fit_activation("abs", -1.0, 1.0, 64)
    assert abs(64 * p.err - 0.2801694990) < 5e-4
    # best linear approximation of x^2 on [0, 1] has error 1/8
    assert remez(lambda x: x * x, 0.0, 1.0, 1).err == pytest.approx(0.125, rel=1e-6)


@pytest.mark.parametrize("name,a,b,d", [("gelu", -8.0, 2.0, 9), ("softplus", -4.0, 4.0, 12),
                                         ("silu", -3.0, 7.0, 6), ("relu", -5.0, 3.0, 10)])
def test_remez_error_equioscillates(name, a, b, d):
    f = ACTIVATIONS[name]
    p = fit_activation(name, a, b, d)
    x = dense(a, b)
    e = p(x) - f(x)
    # Chebyshev alternation theorem: d + 2 alternating extrema of (nearly) equal size
    assert alternation(e, 0.99 * np.max(np.abs(e))) >= p.degree + 2


def test_weighted_remez_minimizes_relative_error():
    f, w = sigmoid, (lambda x: 1.0 / sigmoid(x))
    plain = remez(f, -6.0, 6.0, 7)
    rel = remez(f, -6.0, 6.0, 7, weight=w)
    x = dense(-6.0, 6.0)
    rel_err = lambda p: np.max(np.abs(p(x) - f(x)) * w(x))
    assert rel_err(rel) < 0.8 * rel_err(plain)
    assert rel.err >= plain.err * 0.999  # and pays for it in absolute error


def test_parity_fits():
    p = fit_activation("tanh", -3.0, 3.0, 12)  # odd: the even request drops to degree 11
    assert p.parity == "odd" and p.degree == 11 and all(c == 0.0 for c in p.coeffs[0::2])
    q = fit_activation("abs", -2.0, 2.0, 9)
    assert q.parity == "even" and q.degree == 8
    x = dense(-3.0, 3.0)
    np.testing.assert_allclose(p(x), -p(-x), atol=1e-15)
    with pytest.raises(InvalidInput, match="not odd"):
        remez(sigmoid, -2.0, 2.0, 5, parity="odd")
    ci = chebyshev_interp(np.sin, -1.0, 1.0, 9, parity="odd")
    assert ci.parity == "odd" and ci.err < 1e-9


def test_square_is_exact():
    for a, b in [(-3.0, 5.0), (-2.0, 2.0), (1.0, 4.0)]:
        p = fit_activation("square", a, b, 2)
        assert p.degree == 2 and p.method == "exact"
        x = dense(a, b, 1001)
        np.testing.assert_allclose(p(x), x * x, rtol=1e-13, atol=1e-13)
    assert fit_activation("square", -1.0, 1.0, 1).err == pytest.approx(0.5, rel=1e-6)  # best line: 1/2


def test_leaky_relu_slope_parameter():
    p = fit_activation("leaky_relu", -4.0, 4.0, 15, slope=0.2)
    f = lambda x: np.where(x >= 0, x, 0.2 * x)
    assert measured(p, f, -4.0, 4.0) <= p.err * 1.01
    assert fit_activation("leaky_relu", -4.0, 4.0, 15, slope=0.2) is p  # cached
    with pytest.raises(InvalidInput):
        fit_activation("relu", -1.0, 1.0, 3, slope=0.2)


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(["gelu", "silu", "sigmoid", "tanh", "softplus", "relu", "abs"]),
       a=st.floats(-20.0, 5.0), width=st.floats(0.1, 30.0), degree=st.integers(1, 40))
def test_random_intervals_remez_vs_cheb(name, a, width, degree):
    b = a + width
    f = ACTIVATIONS[name]
    p = fit_activation(name, a, b, degree)
    c = fit_activation(name, a, b, degree, method="cheb")
    assert p.err <= c.err * 1.001 + 1e-12
    x = np.concatenate([RNG.uniform(a, b, 30_000), [a, b]])
    assert np.max(np.abs(p(x) - f(x))) <= p.err * 1.01 + 1e-12


# ---------------------------------------------------------------------------------------------------------------
# choosing a degree for an error budget


def test_fit_to_error_is_smallest_and_monotone():
    targets = [1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4, 1e-5, 1e-6]
    for name, a, b in [("gelu", -4.0, 4.0), ("sigmoid", -8.0, 8.0), ("tanh", -3.0, 3.0)]:
        f = ACTIVATIONS[name]
        degrees, depths = [], []
        for t in targets:
            p = fit_activation_to_error(name, a, b, t)
            assert measured(p, f, a, b) <= t * 1.01
            step = 2 if p.parity else 1
            if p.degree - step >= 0:  # one degree less does not meet the target
                assert fit_activation(name, a, b, p.degree - step).err > t
            degrees.append(p.degree)
            depths.append(p.depth)
        assert degrees == sorted(degrees) and depths == sorted(depths), (name, degrees)


def test_fit_to_error_impossible_budget_raises_with_best_error():
    with pytest.raises(BudgetError, match=r"best error reached 0\.0\d+") as exc:
        fit_activation_to_error("relu", -4.0, 4.0, 1e-4)
    assert "sign-composite" in str(exc.value)
    with pytest.raises(BudgetError):
        fit_activation_to_error("gelu", -4.0, 4.0, 1e-9, max_degree=10)
    with pytest.raises(InvalidInput):
        fit_activation_to_error("gelu", -4.0, 4.0, 0.0)


# ---------------------------------------------------------------------------------------------------------------
# composite sign, ReLU, max


def sign_bits(comp, eps: float) -> float:
    x = np.concatenate([np.geomspace(eps, 1.0, 100_000), RNG.uniform(eps, 1.0, 100_000), [eps, 1.0]])
    e = max(np.max(np.abs(comp(x) - 1.0)), np.max(np.abs(comp(-x) + 1.0)))
    return -math.log2(e)


def test_sign_7_7_13_measures_11_04_bits_at_eps_2m6_and_1_bit_at_2m10():
    s6 = composite_sign(degrees=(7, 7, 13), eps=2.0 ** -6)
    assert s6.degrees == (7, 7, 13) and s6.depth == 3 + 3 + 4
    assert sign_bits(s6, 2.0 ** -6) >= 11.0
    assert sign_bits(s6, 2.0 ** -6) == pytest.approx(s6.precision_bits, abs=0.02)
    s10 = composite_sign(degrees=(7, 7, 13), eps=2.0 ** -10)
    bits10 = sign_bits(s10, 2.0 ** -10)
    # Bernstein: each stage widens the gap by <= its degree; 7*7*13 = 637 < 1024 caps precision at ~2.1 bits
    cap = -math.log2((1 - 637 / 1024) / (1 + 637 / 1024))
    assert 0.9 <= bits10 <= cap
    assert composite_sign() == composite_sign(degrees=(7, 7, 13))


def test_sign_15_15_27_measures_13_29_bits_at_eps_2m9_and_7_34_bits_at_2m10():
    s9 = composite_sign(degrees=(15, 15, 27), eps=2.0 ** -9)
    assert sign_bits(s9, 2.0 ** -9) >= 13.2
    assert s9.depth == 4 + 4 + 5 and s9.degree == 15 * 15 * 27
    s10 = composite_sign(degrees=(15, 15, 27), eps=2.0 ** -10)
    assert 7.2 <= sign_bits(s10, 2.0 ** -10) <= 7.5


@pytest.mark.parametrize("bits", [10, 13])
def test_composite_sign_reaches_requested_precision_at_eps_2m10(bits):
    s = composite_sign(precision_bits=bits, eps=2.0 ** -10)
    assert sign_bits(s, 2.0 ** -10) >= bits
    assert s.depth <= 14  # measured: {7,7,7,31} and {15,31,27}, both depth 14
    assert all(p.parity == "odd" and (p.a, p.b) == (-1.0, 1.0) for p in s.stages)


def test_composite_sign_bad_inputs():
    for eps in (0.0, 1.0, -0.1, float("nan")):
        with pytest.raises(CalibrationError):
            composite_sign(eps=eps)
    with pytest.raises(InvalidInput):
        composite_sign(degrees=(7, 8))
    with pytest.raises(BudgetError):
        composite_sign(precision_bits=45)


@pytest.mark.parametrize("a,b", [(-4.0, 4.0), (-8.0, 2.0), (-1.0, 1.0)])
def test_relu_abs_max_from_sign_meet_their_bounds(a, b):
    s = composite_sign(degrees=(15, 15, 27), eps=2.0 ** -9)
    r = relu_from_sign(s, a, b)
    true_err = measured(r, relu, a, b)
    assert true_err <= r.err * 1.001 + 1e-12 and r.err <= r.bound * 1.001
    B = max(abs(a), abs(b))
    assert r.bound <= B * 2.0 ** -9 * 1.01  # eps-limited: |x| < eps B is where it is worst
    assert r.depth == s.depth + (1 if B != 1.0 else 0) + 1 and r.mult_count == s.mult_count + 1
    ab = abs_from_sign(s, a, b)
    assert measured(ab, np.abs, a, b) <= ab.err * 1.001 + 1e-12 <= ab.bound * 1.001 + 1e-12
    m = max_from_sign(s, a, b)
    u, v = RNG.uniform(a, b, 200_000), RNG.uniform(a, b, 200_000)
    close = u + RNG.uniform(-1e-3, 1e-3, u.size) * (b - a)
    keep = (close >= a) & (close <= b)
    uu, vv = np.concatenate([u, close[keep]]), np.concatenate([v, u[keep]])
    assert np.max(np.abs(m(uu, vv) - np.maximum(uu, vv))) <= m.err * 1.001
    assert m.err <= (b - a) * 2.0 ** -9 * 1.01


def test_relu_from_sign_works_on_torch_with_autograd():
    s = composite_sign(degrees=(7, 7, 13), eps=2.0 ** -6)
    r = relu_from_sign(s, -3.0, 3.0)
    x = torch.linspace(-3, 3, 1001, dtype=torch.float64, requires_grad=True)
    y = r(x)
    assert torch.max(torch.abs(y - torch.relu(x))).item() <= r.err * 1.001
    y.sum().backward()
    assert x.grad is not None and torch.all(torch.isfinite(x.grad))


# ---------------------------------------------------------------------------------------------------------------
# cost numbers


def test_depth_is_ceil_log2_degree_plus_one():
    known = {0: 0, 1: 1, 2: 2, 3: 2, 4: 3, 7: 3, 8: 4, 15: 4, 16: 5, 27: 5, 31: 5, 32: 6, 63: 6, 64: 7}
    for d, depth in known.items():
        p = Poly(-1.0, 1.0, tuple([0.0] * d + [1.0]))
        assert p.degree == d and p.depth == depth
        assert p.depth_with_affine == depth  # [-1, 1]: no affine level
        assert Poly(0.0, 2.0, p.coeffs).depth_with_affine == depth  # width 2: t = x - 1, an addition
        assert Poly(-4.0, 4.0, p.coeffs).depth_with_affine == depth + (1 if d else 0)


def test_mult_count_estimate():
    # hand-counted: t^2 | t^2, t^3 | t^2, t^4 and (c2 + c3 t) * t^2 ... ; even d=4: t^2, t^4
    assert [bsgs_mult_count(d) for d in (0, 1, 2, 3, 4, 7)] == [0, 0, 1, 2, 3, 4]
    assert bsgs_mult_count(4, "even") == 2 and bsgs_mult_count(7, "odd") == 4
    for d in range(2, 129):
        m = bsgs_mult_count(d)
        assert math.ceil(math.log2(d)) <= m <= d - 1  # at least the squarings that reach degree d
        assert m <= 2 * math.sqrt(2 * d) + math.log2(d)  # Paterson-Stockmeyer order, not Horner's d - 1
        assert bsgs_mult_count(d, "odd") <= m and bsgs_mult_count(d, "even") <= m
    s = composite_sign(degrees=(7, 7, 13), eps=2.0 ** -6)
    assert s.mult_count == sum(p.mult_count for p in s.stages)


# ---------------------------------------------------------------------------------------------------------------
# representation


def test_evaluation_numpy_torch_and_bases_agree():
    p = fit_activation("gelu", -3.0, 5.0, 9)
    x = np.linspace(-3.0, 5.0, 501)
    y = p(x)
    t = (2 * x - 2.0) / 8.0
    np.testing.assert_allclose(y, npcheb.chebval(t, p.cheb_coeffs), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(nppoly.polyval(t, p.power_coeffs()), y, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(nppoly.polyval(x, p.power_coeffs_x()), y, rtol=1e-7, atol=1e-9)
    xt = torch.tensor(x, dtype=torch.float64)
    np.testing.assert_allclose(p(xt).numpy(), y, rtol=1e-13, atol=1e-13)
    out = polyval(xt, p.power_coeffs_x().tolist())  # the power basis privml.functional evaluates
    np.testing.assert_allclose(out.numpy(), y, rtol=1e-7, atol=1e-9)
    assert isinstance(p(1.5), float) and p(1.5) == pytest.approx(float(gelu(np.array(1.5))), abs=p.err)
    # autograd through Clenshaw equals the Chebyshev derivative
    xg = xt.clone().requires_grad_(True)
    p(xg).sum().backward()
    dp = npcheb.chebval(t, npcheb.chebder(p.cheb_coeffs)) * 2.0 / 8.0
    np.testing.assert_allclose(xg.grad.numpy(), dp, rtol=1e-10, atol=1e-10)
    p32 = p(torch.tensor(x, dtype=torch.float32))
    assert p32.dtype == torch.float32


def test_power_basis_conditioning_is_reported():
    low = fit_activation("gelu", -1.0, 1.0, 3)
    high = fit_activation("relu", -4.0, 4.0, 63)
    assert low.power_amplification() < 10
    assert high.power_amplification() > 1e10  # degree 63: evaluate in the Chebyshev basis
    far = fit_activation("tanh", 2.0, 12.0, 12)  # interval away from 0: x-basis coefficients cancel
    assert far.power_amplification() < 2 and far.power_amplification(in_x=True) > 1e5


def test_from_power_coeffs_and_parity_validation():
    p = Poly.from_power_coeffs([0.0, 1.5, 0.0, -0.5], parity="odd")
    assert p.parity == "odd" and p.degree == 3
    np.testing.assert_allclose(p.power_coeffs(), [0.0, 1.5, 0.0, -0.5], atol=1e-15)
    with pytest.raises(InvalidInput):
        Poly(-1.0, 1.0, (1.0, 1.0), parity="odd")
    with pytest.raises(InvalidInput):
        Poly(-1.0, 1.0, (1.0, float("nan")))
    assert Poly(-1.0, 1.0, (1.0, 2.0, 0.0, 0.0)).degree == 1  # trailing zeros trimmed


def test_check_range():
    p = fit_activation("tanh", -2.0, 2.0, 7)
    p.check_range(np.array([-2.0, 0.3, 2.0]))
    with pytest.raises(RangeViolation, match="recalibrate"):
        p.check_range(torch.tensor([0.0, 2.5]))


def test_round_trips_through_json():
    p = fit_activation("silu", -5.0, 3.0, 17)
    assert Poly.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    s = composite_sign(degrees=(7, 7, 13), eps=2.0 ** -6)
    s2 = CompositePoly.from_dict(json.loads(json.dumps(s.to_dict())))
    assert s2 == s and s2.precision_bits == s.precision_bits
    r = relu_from_sign(s, -2.0, 3.0)
    r2 = ReluApprox.from_dict(json.loads(json.dumps(r.to_dict())))
    assert r2 == r
    x = np.linspace(-2.0, 3.0, 101)
    assert np.array_equal(r2(x), r(x))
    m = max_from_sign(s, -1.0, 2.0)
    assert MaxApprox.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    for bad in ({"type": "Poly"}, {"type": "Poly", "a": 1.0, "b": 0.0, "coeffs": [1.0]}, [1, 2], {"type": "X"},
                {"type": "Poly", "a": 0, "b": 1, "coeffs": ["x"]}):
        with pytest.raises(MalformedInput):
            Poly.from_dict(bad)
    with pytest.raises(MalformedInput):
        CompositePoly.from_dict({"type": "CompositePoly", "stages": "nope"})
    with pytest.raises(MalformedInput):
        CompositePoly.from_dict({"type": "CompositePoly", "stages": [p.to_dict()], "err": "big"})


@settings(max_examples=30, deadline=None)
@given(coeffs=st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=65),
       a=st.floats(-1e4, 1e4), width=st.floats(1e-3, 1e4))
def test_random_poly_round_trip_and_clenshaw(coeffs, a, width):
    p = Poly(a, a + width, tuple(coeffs))
    assert Poly.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    x = np.linspace(p.a, p.b, 33)
    ref = npcheb.chebval(p.to_t(x), p.cheb_coeffs)
    np.testing.assert_allclose(p(x), ref, rtol=1e-9, atol=1e-9 * (1 + np.abs(p.cheb_coeffs).sum()))


# ---------------------------------------------------------------------------------------------------------------
# bad intervals and names


@pytest.mark.parametrize("a,b", [(1.0, 1.0), (2.0, 1.0), (float("nan"), 1.0), (0.0, float("inf")),
                                 (-float("inf"), 0.0), ("x", 1.0), (1.0, 1.0 + 1e-15)])
def test_degenerate_intervals_raise_calibration_error(a, b):
    calls = [lambda: chebyshev_interp(np.tanh, a, b, 5), lambda: remez(np.tanh, a, b, 5),
             lambda: fit_activation("gelu", a, b, 5), lambda: fit_activation_to_error("gelu", a, b, 1e-3),
             lambda: max_error(np.tanh, np.tanh, a, b), lambda: Poly(a, b, (1.0,)),
             lambda: cheapest("relu", a, b, 0.1)]
    for call in calls:
        with pytest.raises(CalibrationError, match="interval"):
            call()


def test_bad_names_degrees_and_functions():
    with pytest.raises(InvalidInput, match="unknown activation"):
        fit_activation("swish2", -1.0, 1.0, 3)
    with pytest.raises(InvalidInput):
        fit_activation("gelu", -1.0, 1.0, -1)
    with pytest.raises(InvalidInput):
        fit_activation("gelu", -1.0, 1.0, 2.5)
    with pytest.raises(InvalidInput):
        fit_activation("gelu", -1.0, 1.0, 3, method="lsq")
    with pytest.raises(InvalidInput, match="non-finite"), np.errstate(invalid="ignore", divide="ignore"):
        remez(np.log, -1.0, 1.0, 3)


# ---------------------------------------------------------------------------------------------------------------
# choice


def test_cheapest_picks_direct_when_loose_and_sign_composite_when_tight():
    loose = cheapest("relu", -4.0, 4.0, 0.05)
    assert isinstance(loose, Poly) and measured(loose, relu, -4.0, 4.0) <= 0.05 * 1.01
    tight = cheapest("relu", -4.0, 4.0, 1e-3)  # no direct polynomial of degree <= 63 gets there
    assert isinstance(tight, ReluApprox)
    assert measured(tight, relu, -4.0, 4.0) <= 1e-3
    leaky = cheapest("leaky_relu", -2.0, 2.0, 1e-3, slope=0.1)
    assert measured(leaky, lambda x: np.where(x >= 0, x, 0.1 * x), -2.0, 2.0) <= 1e-3
    smooth = cheapest("gelu", -4.0, 4.0, 1e-3)
    assert isinstance(smooth, Poly) and smooth.err <= 1e-3
    with pytest.raises(BudgetError, match="best error reached"):
        cheapest("gelu", -30.0, 30.0, 1e-6)
    est = estimate_error(tight, relu, -4.0, 4.0)
    assert est == pytest.approx(measured(tight, relu, -4.0, 4.0), rel=0.01)
