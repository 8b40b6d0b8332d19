"""CKKS parameter choice: HE-standard budget, smallest ring, headroom, overrides, clear depth errors."""

from __future__ import annotations

import pytest

from privml.errors import BudgetError, DepthExhausted, InvalidInput
from privml.he.context import build_seal_context
from privml.he.params import (
    HE_STANDARD_128,
    MARGIN_BITS,
    CKKSParams,
    choose_params,
    max_depth,
    noise_bits,
)


@pytest.mark.parametrize("depth", list(range(0, 22)))
def test_chosen_params_fit_the_128_bit_standard(depth: int) -> None:
    p = choose_params(depth)
    n = p.poly_modulus_degree
    assert p.total_bits <= HE_STANDARD_128[n]
    assert p.security_bits == 128
    assert p.depth == depth
    assert p.scale_bits >= 20 + noise_bits(n)  # default precision_bits=20 survives the noise
    assert p.coeff_mod_bit_sizes[1:-1] == (p.scale_bits,) * depth
    assert p.coeff_mod_bit_sizes[0] == p.scale_bits + 1 + MARGIN_BITS  # |values| <= 1: sign + margin
    assert p.coeff_mod_bit_sizes[-1] >= p.coeff_mod_bit_sizes[0]
    assert max(p.coeff_mod_bit_sizes) <= 60
    # the smallest ring: the next smaller N cannot hold this depth at this precision
    if n > 1024:
        with pytest.raises(DepthExhausted):
            choose_params(depth, poly_modulus_degree=n // 2)


def test_seal_accepts_chosen_params() -> None:
    for depth in (1, 3, 6, 12):
        p = choose_params(depth)
        ctx = build_seal_context(p)
        assert ctx.first_context_data().chain_index() == depth


def test_smallest_ring_then_largest_scale() -> None:
    p = choose_params(3)
    assert p.poly_modulus_degree == 8192  # 4096 cannot hold 3 levels of >= 35-bit scale
    assert p.scale_bits == 40  # at N=8192 the budget allows the 40-bit cap
    q = choose_params(5, precision_bits=12)
    assert q.poly_modulus_degree == 8192
    assert q.scale_bits == (218 - 2 * (1 + MARGIN_BITS)) // 7  # largest scale that fits


def test_min_slots_raises_the_ring() -> None:
    assert choose_params(1, min_slots=3000).poly_modulus_degree == 8192
    assert choose_params(1, min_slots=5000).slots >= 5000
    with pytest.raises(BudgetError):
        choose_params(1, min_slots=20000)


def test_first_prime_headroom_grows_with_max_abs_value() -> None:
    firsts = []
    for m in (1.0, 16.0, 1000.0):
        p = choose_params(2, max_abs_value=m, poly_modulus_degree=16384, scale_bits=40)
        firsts.append(p.coeff_mod_bit_sizes[0])
        assert p.max_value >= 2 * m
    assert firsts == [43, 47, 53]


def test_depth_40_is_exhausted_with_breakdown() -> None:
    breakdown = [("conv1", 1), ("act1", 13), ("fc1", 1), ("act2", 24), ("fc2", 1)]
    with pytest.raises(DepthExhausted) as err:
        choose_params(40, depth_breakdown=breakdown)
    msg = str(err.value)
    assert "depth 40" in msg
    for name, d in breakdown:
        assert f"{name}: {d}" in msg
    assert f"{max_depth()} levels" in msg and "N=32768" in msg
    assert "refresh" in msg and "degree" in msg


def test_max_depth_matches_choose_params() -> None:
    d = max_depth()
    assert choose_params(d).poly_modulus_degree == 32768
    with pytest.raises(DepthExhausted):
        choose_params(d + 1)


def test_overrides_are_checked() -> None:
    p = choose_params(2, coeff_mod_bit_sizes=(60, 40, 40, 60), scale_bits=40)
    assert p.poly_modulus_degree == 8192 and p.depth == 2
    with pytest.raises(BudgetError, match="128-bit"):
        choose_params(2, poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40, 40, 60, 60), scale_bits=40)
    with pytest.raises(BudgetError, match="larger than the smallest middle prime"):
        choose_params(2, coeff_mod_bit_sizes=(60, 30, 30, 60), scale_bits=40)
    with pytest.raises(BudgetError, match=r"\[2, 60\]"):
        choose_params(1, coeff_mod_bit_sizes=(61, 40, 61), scale_bits=40)
    with pytest.raises(BudgetError, match="special prime"):
        choose_params(1, coeff_mod_bit_sizes=(50, 40, 45), scale_bits=40)
    with pytest.raises(BudgetError, match="headroom"):
        choose_params(1, max_abs_value=100.0, coeff_mod_bit_sizes=(45, 40, 45), scale_bits=40)
    with pytest.raises(DepthExhausted, match="only 2 middle primes"):
        choose_params(3, coeff_mod_bit_sizes=(60, 40, 40, 60), scale_bits=40)
    with pytest.raises(BudgetError):
        choose_params(1, poly_modulus_degree=3000)
    with pytest.raises(DepthExhausted):
        choose_params(8, poly_modulus_degree=8192)
    forced = choose_params(1, poly_modulus_degree=16384, scale_bits=30)
    assert forced.poly_modulus_degree == 16384 and forced.scale_bits == 30


def test_insecure_only_when_asked() -> None:
    chain = (60, 40, 40, 60, 60)
    with pytest.raises(BudgetError):
        CKKSParams(8192, chain, 40).check()
    p = CKKSParams(8192, chain, 40, allow_insecure=True).check()
    assert p.security_bits == 0
    assert build_seal_context(p).parameters_set()


def test_dict_round_trip_and_bad_dicts() -> None:
    p = choose_params(4, max_abs_value=8.0)
    assert CKKSParams.from_dict(p.to_dict()) == p
    with pytest.raises(InvalidInput):
        CKKSParams.from_dict({"poly_modulus_degree": 8192})
    with pytest.raises(BudgetError):
        CKKSParams.from_dict({**p.to_dict(), "coeff_mod_bit_sizes": [60] * 10})


def test_bad_arguments() -> None:
    with pytest.raises(InvalidInput):
        choose_params(-1)
    with pytest.raises(InvalidInput):
        choose_params(2, max_abs_value=0.0)
    with pytest.raises(InvalidInput):
        choose_params(2, max_abs_value=float("nan"))
