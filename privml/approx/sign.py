"""Sign-based approximations: composite sign polynomials, and ReLU, |x|, leaky ReLU and max built from them.

:func:`composite_sign` builds sign(x) on [-1, -eps] U [eps, 1] as a composition
of odd minimax polynomials (Lee et al., "Minimax approximation of sign function
by composite polynomial"), each stage fitted by Remez on the image interval of
the previous one; :func:`relu_from_sign` / :func:`abs_from_sign` /
:func:`max_from_sign` turn it into ReLU, |x|, leaky ReLU and pairwise max.

Measured here (float64, checked in tests/test_poly.py), sign precision = -log2 max |p(x) - sign(x)|
over eps <= |x| <= 1:
    {7,7,13}   depth 10: 11.04 bits at eps = 2^-6 (>= 10 bits for eps >= 2^-6.17), only 1.00 bit at eps = 2^-10;
    {15,15,27} depth 13: 13.29 bits at eps = 2^-9 (>= 13 bits for eps >= 2^-9.04), 7.34 bits at eps = 2^-10.
So the published sets do not give 10 / 13 bits on |x| >= 2^-10: by Bernstein's inequality a stage of
degree d widens the gap around 0 by at most a factor d, and 7*7*13 = 637 < 2^10 caps {7,7,13} at
2.1 bits there.  ``composite_sign(precision_bits=..., eps=2**-10)`` searches deeper chains instead:
10 bits -> {7,7,7,31} (10.38 bits, depth 14, 22 products), 13 bits -> {15,31,27} (13.69 bits,
depth 14, 27 products).

:func:`cheapest` picks, for a named activation and an error target, the cheaper of a direct
minimax fit and (for ReLU-like activations) a sign composite.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from numpy.polynomial import chebyshev as npcheb

from privml.approx.activations import lookup
from privml.approx.basis import MAX_DEGREE, Poly, _check_err, _check_interval, _grid, _parity_indices, poly_depth
from privml.approx.fit import _remez_t, estimate_error, fit_activation_to_error
from privml.errors import BudgetError, CalibrationError, InvalidInput, MalformedInput

PUBLISHED_SIGN_DEGREES: dict[int, tuple[int, ...]] = {10: (7, 7, 13), 13: (15, 15, 27)}
_SIGN_SEARCH_DEGREES = (7, 15, 31)


@dataclass(frozen=True)
class CompositePoly:
    """p_k(...p_2(p_1(x))): ``stages`` applied first to last.

    For a sign approximation ``eps`` is the gap (-eps, eps) left out and ``err`` the
    measured max |p(x) - sign(x)| for eps <= |x| <= 1.
    """

    stages: tuple[Poly, ...]
    err: float | None = None
    eps: float | None = None

    def __post_init__(self) -> None:
        st = tuple(self.stages)
        if not st or not all(isinstance(p, Poly) for p in st):
            raise InvalidInput("CompositePoly needs a non-empty sequence of Poly stages")
        object.__setattr__(self, "stages", st)
        if self.err is not None:
            object.__setattr__(self, "err", _check_err(self.err))
        if self.eps is not None:
            object.__setattr__(self, "eps", _check_err(self.eps))

    def __call__(self, x: Any) -> Any:
        for p in self.stages:
            x = p(x)
        return x

    @property
    def degree(self) -> int:
        return math.prod(p.degree for p in self.stages)

    @property
    def depth(self) -> int:
        """Sum of stage depths, affine maps included (zero for stages on [-1, 1], as composite_sign builds)."""
        return sum(p.depth_with_affine for p in self.stages)

    @property
    def mult_count(self) -> int:
        return sum(p.mult_count for p in self.stages)

    @property
    def degrees(self) -> tuple[int, ...]:
        return tuple(p.degree for p in self.stages)

    @property
    def precision_bits(self) -> float | None:
        """-log2(err) for a sign approximation (None if err unknown)."""
        if self.err is None:
            return None
        return math.inf if self.err == 0 else -math.log2(self.err)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "CompositePoly", "stages": [p.to_dict() for p in self.stages], "err": self.err,
                "eps": self.eps}

    @classmethod
    def from_dict(cls, d: Any) -> CompositePoly:
        if not isinstance(d, dict) or d.get("type") != "CompositePoly" or not isinstance(d.get("stages"), list):
            raise MalformedInput(f"not a serialized CompositePoly: {str(d)[:80]}")
        try:
            return cls(tuple(Poly.from_dict(s) for s in d["stages"]), d.get("err"), d.get("eps"))
        except InvalidInput as exc:
            raise MalformedInput(f"malformed CompositePoly dict: {exc}") from exc


def _sign_grid(eps: float, n: int = 20001) -> np.ndarray:
    """Points of [eps, 1]: geometric (dense near eps) and uniform."""
    return np.unique(np.concatenate([np.geomspace(eps, 1.0, n), np.linspace(eps, 1.0, n)]))


def sign_precision(sign: Callable[[np.ndarray], Any], eps: float) -> float:
    """Measured bits, -log2 max |sign(x) - sign_poly(x)| over eps <= |x| <= 1 (dense grid, both sides)."""
    x = _sign_grid(eps)
    e = max(np.max(np.abs(np.asarray(sign(x)) - 1.0)), np.max(np.abs(np.asarray(sign(-x)) + 1.0)))
    return math.inf if e == 0 else -math.log2(float(e))


@lru_cache(maxsize=512)
def _sign_stage(r: float, degree: int) -> tuple[tuple[float, ...], float, float, float]:
    """Odd minimax q ~ 1 on [r, 1]: (Chebyshev coeffs, min q, max q on [r, 1], max |q - 1| on [r, 1])."""
    idx = _parity_indices(degree, "odd")
    c, _, _ = _remez_t(lambda t: np.ones_like(t), r, 1.0, idx, None, 80, 1e-6)
    x = _sign_grid(r, 4001)
    q = npcheb.chebval(x, c)
    return tuple(c), float(q.min()), float(q.max()), float(np.max(np.abs(q - 1.0)))


@lru_cache(maxsize=4096)
def _sign_chain(degrees: tuple[int, ...], eps: float) -> tuple[float, float]:
    """(ratio r seen by a next stage, max |q - 1| of the last stage) for stages ``degrees`` from [eps, 1]."""
    r = eps if len(degrees) == 1 else _sign_chain(degrees[:-1], eps)[0]
    _, lo, hi, err = _sign_stage(r, degrees[-1])
    return min(lo / hi, 1.0 - 1e-6), err  # clamping r down is safe; r ~ 1 is ill-conditioned


@lru_cache(maxsize=256)
def _build_sign(degrees: tuple[int, ...], eps: float) -> CompositePoly:
    """Stages on [-1, 1]; each intermediate stage is divided by the max of its image so the next sees [r, 1]."""
    stages = []
    for i, d in enumerate(degrees):
        r = eps if i == 0 else _sign_chain(degrees[:i], eps)[0]
        c, _, hi, _ = _sign_stage(r, d)
        c = np.array(c) if i == len(degrees) - 1 else np.array(c) / hi
        stages.append(Poly(-1.0, 1.0, tuple(c), "odd", method="remez-sign"))
    comp = CompositePoly(tuple(stages), eps=eps)
    measured = 2.0 ** -sign_precision(comp, eps)
    return CompositePoly(comp.stages, err=max(measured, _sign_chain(degrees, eps)[1]), eps=eps)


def composite_sign(precision_bits: int | None = None, degrees: tuple[int, ...] | None = None,
                   eps: float = 2 ** -10) -> CompositePoly:
    """Odd composite polynomial approximating sign(x) on [-1, -eps] U [eps, 1].

    ``degrees`` builds exactly those stages (odd degrees >= 3), each the odd minimax
    approximation of 1 on the previous stage's image (Lee et al.'s construction).
    ``precision_bits`` instead picks the cheapest (depth, then products) among the
    published sets (10 -> {7,7,13}, 13 -> {15,15,27}) and stage sequences of degrees
    7, 15, 31 found by a best-first search on depth (last stage then shrunk to the
    smallest odd degree that still works); the measured error decides.  BudgetError
    if nothing within 10 stages reaches it.  With neither argument: {7,7,13}.
    ``err`` / ``precision_bits`` of the result are measured, never assumed (see the
    module docstring: the published sets need eps well above 2^-10).
    """
    try:
        eps = float(eps)
    except (TypeError, ValueError):
        raise CalibrationError(f"eps must be a number in (0, 1), got {eps!r}") from None
    if not (0.0 < eps < 1.0):
        raise CalibrationError(f"eps must be in (0, 1) (the gap around 0 left out), got {eps!r}")
    if degrees is not None:
        degs = tuple(degrees)
        if not degs or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 3 or d % 2 == 0
                           or d > MAX_DEGREE for d in degs):
            raise InvalidInput(f"sign stage degrees must be odd integers in [3, {MAX_DEGREE}], got {degrees!r}")
        return _build_sign(tuple(int(d) for d in degs), eps)
    if precision_bits is None:
        return _build_sign(PUBLISHED_SIGN_DEGREES[10], eps)
    if isinstance(precision_bits, bool) or not isinstance(precision_bits, (int, np.integer)) or precision_bits < 1:
        raise InvalidInput(f"precision_bits must be a positive integer, got {precision_bits!r}")
    if precision_bits > 40:
        raise BudgetError(f"precision_bits={precision_bits} is beyond what float64 fits can certify (max 40)")
    target = 2.0 ** -int(precision_bits)
    cands = [_build_sign(s, eps) for s in PUBLISHED_SIGN_DEGREES.values()]
    cands = [c for c in cands if c.err <= target]
    # best-first search by depth over stage sequences of degrees 7, 15, 31 (the most degree per level);
    # a prefix whose ratio r is no better than one already expanded at no more depth is dropped
    heap: list[tuple[int, tuple[int, ...]]] = [(poly_depth(d), (d,)) for d in _SIGN_SEARCH_DEGREES]
    heapq.heapify(heap)
    found, limit, best_seen, best_r, pops = [], math.inf, math.inf, 0.0, 0
    while heap and pops < 300:
        dep, seq = heapq.heappop(heap)
        if dep > limit:
            break
        pops += 1
        r, err = _sign_chain(seq, eps)
        best_seen = min(best_seen, err)
        if err <= target:
            found.append(seq)
            limit = min(limit, dep + 2)  # a deeper one may still shrink below
        elif r > best_r and len(seq) < 10:
            best_r = r
            for d in _SIGN_SEARCH_DEGREES:
                heapq.heappush(heap, (dep + poly_depth(d), seq + (d,)))
    for seq in found:  # shrink the last stage: precision is monotone in its degree, so bisect
        lo, hi = 1, seq[-1]  # odd degrees; hi works, lo (degree 1) is not a sign stage
        while hi - lo > 2:
            mid = (lo + hi) // 2 | 1
            mid = mid if mid < hi else hi - 2
            if _sign_chain(seq[:-1] + (mid,), eps)[1] <= target:
                hi = mid
            else:
                lo = mid
        cands.append(_build_sign(seq[:-1] + (hi,), eps))
    cands = [c for c in cands if c.err <= target]  # the measured error decides
    if not cands:
        raise BudgetError(f"no composite sign within 10 stages reaches {precision_bits} bits at eps={eps:g} "
                          f"(best {-math.log2(best_seen):.1f} bits); lower precision_bits or raise eps")
    return min(cands, key=lambda c: (c.depth, c.mult_count, c.degrees))


def _as_sign(sign_poly: Any) -> CompositePoly:
    if isinstance(sign_poly, Poly):
        if sign_poly.a != -1.0 or sign_poly.b != 1.0:
            raise InvalidInput("a Poly used as sign must live on [-1, 1]")
        return CompositePoly((sign_poly,))
    if not isinstance(sign_poly, CompositePoly):
        raise InvalidInput(f"sign_poly must be a CompositePoly or Poly, got {type(sign_poly).__name__}")
    return sign_poly


@dataclass(frozen=True)
class ReluApprox:
    """x * ((1 + slope) + (1 - slope) * s(x / B)) / 2, s ~ sign, B = max(|a|, |b|).

    slope 0 is ReLU, slope -1 is |x| (= x s(x/B)), 0 < slope < 1 leaky ReLU.
    ``err`` is measured on [a, b] at construction; ``bound`` is the a-priori bound
    B (1 - slope) / 2 * max(sign err, eps (1 + max|s| on [-eps, eps]))."""

    sign: CompositePoly
    a: float
    b: float
    slope: float = 0.0
    err: float | None = None

    def __post_init__(self) -> None:
        a, b = _check_interval(self.a, self.b)
        object.__setattr__(self, "a", a)
        object.__setattr__(self, "b", b)
        object.__setattr__(self, "sign", _as_sign(self.sign))
        if not (math.isfinite(float(self.slope)) and -1.0 <= float(self.slope) < 1.0):
            raise InvalidInput(f"slope must be in [-1, 1), got {self.slope!r}")
        object.__setattr__(self, "slope", float(self.slope))
        if self.err is None:
            object.__setattr__(self, "err", estimate_error(self, self.target, a, b))
        else:
            object.__setattr__(self, "err", _check_err(self.err))

    @property
    def B(self) -> float:
        return max(abs(self.a), abs(self.b))

    def target(self, x: np.ndarray) -> np.ndarray:
        return np.where(x >= 0, x, self.slope * np.asarray(x, dtype=float))

    def __call__(self, x: Any) -> Any:
        s = self.sign(x / self.B)
        return x * ((1.0 + self.slope) + (1.0 - self.slope) * s) / 2.0

    @property
    def depth(self) -> int:
        """Sign depth, + 1 for x/B unless B == 1, + 1 for the final x * (...) (the 1/2 and slope fold into it)."""
        return self.sign.depth + (0 if self.B == 1.0 else 1) + 1

    @property
    def mult_count(self) -> int:
        return self.sign.mult_count + 1

    @property
    def bound(self) -> float:
        eps = self.sign.eps if self.sign.eps is not None else 0.0
        serr = self.sign.err if self.sign.err is not None else 2.0 ** -sign_precision(self.sign, eps or 1e-3)
        inner = np.linspace(0.0, eps, 2001) if eps else np.zeros(1)
        smax = float(np.max(np.abs(np.asarray(self.sign(inner))))) if eps else 0.0
        return self.B * (1.0 - self.slope) / 2.0 * max(serr, eps * (1.0 + smax))

    def to_dict(self) -> dict[str, Any]:
        return {"type": "ReluApprox", "sign": self.sign.to_dict(), "a": self.a, "b": self.b, "slope": self.slope,
                "err": self.err}

    @classmethod
    def from_dict(cls, d: Any) -> ReluApprox:
        if not isinstance(d, dict) or d.get("type") != "ReluApprox":
            raise MalformedInput(f"not a serialized ReluApprox: {str(d)[:80]}")
        try:
            return cls(CompositePoly.from_dict(d["sign"]), float(d["a"]), float(d["b"]), float(d["slope"]),
                       d.get("err"))
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedInput(f"malformed ReluApprox dict: {exc}") from exc


def relu_from_sign(sign_poly: CompositePoly | Poly, a: float, b: float) -> ReluApprox:
    """ReLU on [a, b] as x (1 + s(x/B)) / 2."""
    return ReluApprox(_as_sign(sign_poly), a, b, 0.0)


def abs_from_sign(sign_poly: CompositePoly | Poly, a: float, b: float) -> ReluApprox:
    """|x| on [a, b] as x s(x/B)."""
    return ReluApprox(_as_sign(sign_poly), a, b, -1.0)


@dataclass(frozen=True)
class MaxApprox:
    """max(u, v) = ((u + v) + (u - v) s((u - v)/D)) / 2 for u, v in [a, b], D = b - a.

    ``err`` is exact up to the grid: the error is |w D (s(w) - sign(w))| / 2 over w in [-1, 1]."""

    sign: CompositePoly
    a: float
    b: float
    err: float | None = None

    def __post_init__(self) -> None:
        a, b = _check_interval(self.a, self.b)
        object.__setattr__(self, "a", a)
        object.__setattr__(self, "b", b)
        object.__setattr__(self, "sign", _as_sign(self.sign))
        if self.err is None:
            w = _grid(-1.0, 1.0, 40001)
            e = np.abs(w * (np.asarray(self.sign(w)) - np.sign(w))) * (b - a) / 2.0
            object.__setattr__(self, "err", float(e.max()))
        else:
            object.__setattr__(self, "err", _check_err(self.err))

    @property
    def D(self) -> float:
        return self.b - self.a

    def __call__(self, u: Any, v: Any) -> Any:
        diff = u - v
        return ((u + v) + diff * self.sign(diff / self.D)) / 2.0

    @property
    def depth(self) -> int:
        return self.sign.depth + (0 if self.D == 1.0 else 1) + 1

    @property
    def mult_count(self) -> int:
        return self.sign.mult_count + 1

    def to_dict(self) -> dict[str, Any]:
        return {"type": "MaxApprox", "sign": self.sign.to_dict(), "a": self.a, "b": self.b, "err": self.err}

    @classmethod
    def from_dict(cls, d: Any) -> MaxApprox:
        if not isinstance(d, dict) or d.get("type") != "MaxApprox":
            raise MalformedInput(f"not a serialized MaxApprox: {str(d)[:80]}")
        try:
            return cls(CompositePoly.from_dict(d["sign"]), float(d["a"]), float(d["b"]), d.get("err"))
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedInput(f"malformed MaxApprox dict: {exc}") from exc


def max_from_sign(sign_poly: CompositePoly | Poly, a: float, b: float) -> MaxApprox:
    """Pairwise max of u, v in [a, b] from a sign approximation."""
    return MaxApprox(_as_sign(sign_poly), a, b)


# ---------------------------------------------------------------------------------------------------------------
# choice between a direct fit and a sign composite

_RELU_LIKE = {"relu": 0.0, "abs": -1.0}  # slope for negative inputs; leaky_relu reads its own


def cheapest(name: str, a: float, b: float, max_err: float, **params: Any) -> Poly | ReluApprox | CompositePoly:
    """Cheapest approximation of activation ``name`` on [a, b] with max error <= max_err.

    Cost order: depth on a ciphertext holding x (affine map included), then
    ciphertext products.  For relu / leaky_relu / abs both a direct minimax
    polynomial and the sign-composite construction are considered; other
    activations get the direct polynomial.  BudgetError if neither reaches max_err.
    """
    f = lookup(name, params)
    a, b = _check_interval(a, b)
    cands: list[tuple[int, int, Any]] = []
    direct_msg = ""
    try:
        p = fit_activation_to_error(name, a, b, max_err, **params)
        cands.append((p.depth_with_affine, p.mult_count, p))
    except BudgetError as exc:
        direct_msg = str(exc)
    if name in ("relu", "leaky_relu", "abs"):
        slope = float(params.get("slope", 0.01)) if name == "leaky_relu" else _RELU_LIKE[name]
        B = max(abs(a), abs(b))
        scale = B * (1.0 - slope) / 2.0  # error = scale * |s - sign| away from 0
        eps = min(0.5, max_err / (scale * 2.2))
        bits = max(1, math.ceil(-math.log2(max_err / scale)))
        for _ in range(4):  # tighten if the measured error misses (near-0 overshoot)
            try:
                s = composite_sign(precision_bits=bits, eps=eps)
            except BudgetError:
                break
            r = ReluApprox(s, a, b, slope)
            if r.err <= max_err and estimate_error(r, f, a, b) <= max_err:
                cands.append((r.depth, r.mult_count, r))
                break
            eps, bits = eps / 2, bits + 1
    if not cands:
        if name not in ("relu", "leaky_relu", "abs"):
            raise BudgetError(direct_msg)
        raise BudgetError(f"{direct_msg}; the sign-composite construction did not reach it either "
                          "(within 10 stages and 40 bits)")
    return min(cands, key=lambda c: (c[0], c[1]))[2]
