"""Polynomial approximations of activations, and their CKKS cost.

Pure maths on numpy/torch, no crypto: the CKKS engine evaluates these polynomials
on ciphertexts and the compiler pass chooses among them, so every object here says
exactly what it is (interval, basis, coefficients), how wrong it is (``err``,
measured on a dense grid) and what it costs (``depth``, ``mult_count``).

Representation
    A :class:`Poly` lives on an interval [a, b] and stores Chebyshev coefficients in
    the normalized variable ``t = (2x - a - b) / (b - a)`` (so t runs over [-1, 1]).
    Chebyshev coefficients stay well conditioned up to degree ~64; power-basis
    coefficients do not (see :meth:`Poly.power_coeffs`).

Cost model (the contract with the CKKS engine)
    ``depth = ceil(log2(degree + 1))`` ciphertext levels for p(t), the depth of a
    baby-step giant-step (Paterson-Stockmeyer style) evaluation in which every
    multiplication by a scalar coefficient is folded into the product that consumes
    it (coefficients encoded at the matching scale, one rescale per product, lazy
    rescaling).  An engine that spends a separate level on each scalar
    multiplication needs one level more.  Mapping x to t is a plaintext affine op;
    ``depth_with_affine`` adds its level (none when b - a == 2, where the map is a
    pure addition).  ``mult_count`` is an estimate of ciphertext-ciphertext
    multiplications of that evaluation (see :func:`bsgs_mult_count`); scalar
    multiplications and additions are not counted.

Sign-based ReLU
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
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from numpy.polynomial import chebyshev as npcheb
from numpy.polynomial import polynomial as nppoly
from scipy.special import erf, expit

from privml.errors import BudgetError, CalibrationError, InvalidInput, MalformedInput, RangeViolation

__all__ = [
    "ACTIVATIONS", "CompositePoly", "MaxApprox", "Poly", "ReluApprox", "abs_from_sign", "bsgs_mult_count",
    "cheapest", "chebyshev_interp", "composite_sign", "estimate_error", "fit_activation",
    "fit_activation_to_error", "max_error", "max_from_sign", "relu_from_sign", "remez", "sign_precision",
]

MAX_DEGREE = 128          # beyond this even the Chebyshev basis and our float64 Remez are not trusted
PUBLISHED_SIGN_DEGREES: dict[int, tuple[int, ...]] = {10: (7, 7, 13), 13: (15, 15, 27)}
_SIGN_SEARCH_DEGREES = (7, 15, 31)
_PARITIES = (None, "odd", "even")

# ---------------------------------------------------------------------------------------------------------------
# validation helpers


def _check_interval(a: Any, b: Any) -> tuple[float, float]:
    """Return (a, b) as floats or raise CalibrationError saying what to change."""
    try:
        fa, fb = float(a), float(b)
    except (TypeError, ValueError):
        raise CalibrationError(f"interval bounds must be real numbers, got a={a!r}, b={b!r}") from None
    if not (math.isfinite(fa) and math.isfinite(fb)):
        raise CalibrationError(f"interval [{fa}, {fb}] is not finite: calibrate on finite data or clip the range")
    if not fa < fb:
        raise CalibrationError(f"interval [{fa}, {fb}] is degenerate (need a < b): widen the calibration range "
                               "or add a margin around a constant input")
    if fb - fa <= 1e-12 * max(1.0, abs(fa), abs(fb)):
        raise CalibrationError(f"interval [{fa}, {fb}] is too narrow for float64 fitting: add a margin")
    return fa, fb


def _check_err(err: Any) -> float:
    try:
        e = float(err)
    except (TypeError, ValueError):
        raise InvalidInput(f"err must be a finite non-negative float or None, got {err!r}") from None
    if not (math.isfinite(e) and e >= 0):
        raise InvalidInput(f"err must be a finite non-negative float or None, got {err!r}")
    return e


def _check_degree(degree: Any) -> int:
    if isinstance(degree, bool) or not isinstance(degree, (int, np.integer)) or not 0 <= degree <= MAX_DEGREE:
        raise InvalidInput(f"degree must be an integer in [0, {MAX_DEGREE}], got {degree!r}")
    return int(degree)


def _check_parity(parity: Any) -> str | None:
    if parity not in _PARITIES:
        raise InvalidInput(f"parity must be 'odd', 'even' or None, got {parity!r}")
    return parity


def _values(f: Callable[[np.ndarray], Any], x: np.ndarray, what: str = "f") -> np.ndarray:
    y = np.asarray(f(x), dtype=float)
    if y.shape != x.shape:
        y = np.broadcast_to(y, x.shape).astype(float)
    if not np.all(np.isfinite(y)):
        raise InvalidInput(f"{what} returned non-finite values on [{x.min()}, {x.max()}]")
    return y


def _parity_indices(degree: int, parity: str | None) -> list[int]:
    """Chebyshev indices 0..degree allowed by the parity."""
    if parity == "odd":
        return list(range(1, degree + 1, 2))
    if parity == "even":
        return list(range(0, degree + 1, 2))
    return list(range(degree + 1))


def _grid(a: float, b: float, n: int) -> np.ndarray:
    """Uniform points and Chebyshev-Lobatto points (clustered at the ends) on [a, b], sorted."""
    n = max(int(n), 2)
    u = np.linspace(a, b, n)
    c = (a + b) / 2 - (b - a) / 2 * np.cos(np.pi * np.arange(n) / (n - 1))
    return np.unique(np.clip(np.concatenate([u, c]), a, b))


# ---------------------------------------------------------------------------------------------------------------
# cost model


def bsgs_mult_count(degree: int, parity: str | None = None) -> int:
    """Estimated ciphertext-ciphertext multiplications to evaluate a degree-``degree`` polynomial.

    The scheme (in the power basis t^j or the Chebyshev basis T_j alike, since
    T_{m+n} = 2 T_m T_n - T_{|m-n|} costs one product too), for block size k = 2^l:

    * baby steps: every basis element of degree 2..k-1 the parity needs (odd parity:
      the odd ones plus the powers of two used to build them; even parity: the even
      ones), plus T_k when there is more than one block; one product each;
    * giant steps: T_2k, T_4k, ... by squaring, as many as the number of blocks needs;
    * combine: p = q_lo + T_{2^j k} * q_hi recursively over the blocks of k
      coefficients; one product per split whose high part is not a constant.

    Every choice of l keeps depth ceil(log2(degree + 1)) (scalars folded); the
    estimate is the minimum over l.  It ignores coefficients that happen to be zero
    beyond the parity, so it is an upper-bound-style estimate, typically exact
    within one or two products.
    """
    d = int(degree)
    if d <= 1:
        return 0
    present = set(_parity_indices(d, parity))
    m = math.ceil(math.log2(d + 1))
    best = None
    for l in range(1, m + 1):  # noqa: E741 - l is the standard name for log2(block size)
        k = 1 << l
        nb = -(-(d + 1) // k)
        top = k if nb > 1 else d
        if parity == "odd":
            baby = len([j for j in range(3, top + 1, 2)]) + int(math.log2(top))
        elif parity == "even":
            baby = top // 2
        else:
            baby = top - 1
        giants = max(0, math.ceil(math.log2(nb)) - 1) if nb > 1 else 0
        kinds = []
        for i in range(nb):
            rel = [j - i * k for j in present if i * k <= j < (i + 1) * k]
            kinds.append("zero" if not rel else ("const" if rel == [0] else "poly"))
        total = baby + giants + _combine_mults(kinds)[0]
        best = total if best is None else min(best, total)
    return int(best)


def _combine_mults(kinds: list[str]) -> tuple[int, str]:
    """(ct-ct products, kind of the result) for combining blocks with giant steps at power-of-two splits."""
    if len(kinds) == 1:
        return 0, kinds[0]
    h = 1 << (math.ceil(math.log2(len(kinds))) - 1)
    m_lo, k_lo = _combine_mults(kinds[:h])
    m_hi, k_hi = _combine_mults(kinds[h:])
    mults = m_lo + m_hi + (1 if k_hi == "poly" else 0)
    return mults, (k_lo if k_hi == "zero" else "poly")


def _depth(degree: int) -> int:
    return math.ceil(math.log2(degree + 1)) if degree > 0 else 0


# ---------------------------------------------------------------------------------------------------------------
# Poly


def _clenshaw(coeffs: tuple[float, ...], t: Any) -> Any:
    """Evaluate sum c_j T_j(t) with Clenshaw's recurrence; works for numpy arrays and torch tensors."""
    b1 = t * 0.0
    b2 = t * 0.0
    for c in coeffs[:0:-1]:
        b1, b2 = 2.0 * t * b1 - b2 + c, b1
    return t * b1 - b2 + coeffs[0]


@dataclass(frozen=True)
class Poly:
    """A polynomial on [a, b] stored as Chebyshev coefficients in t = (2x - a - b)/(b - a).

    ``parity`` ('odd' / 'even' / None) is in t, i.e. about the interval midpoint;
    coefficients of the other parity are exactly zero.  ``err`` is the max |p - f|
    measured on a dense grid when the polynomial was fitted (None if unknown) and
    ``method`` says how it was obtained.  Trailing zero coefficients are dropped.
    """

    a: float
    b: float
    coeffs: tuple[float, ...]
    parity: str | None = None
    err: float | None = None
    method: str | None = None

    def __post_init__(self) -> None:
        a, b = _check_interval(self.a, self.b)
        _check_parity(self.parity)
        c = np.asarray(self.coeffs, dtype=float).ravel()
        if c.size == 0 or not np.all(np.isfinite(c)):
            raise InvalidInput("Poly needs at least one finite Chebyshev coefficient")
        nz = np.flatnonzero(c)
        c = c[: (nz[-1] + 1 if nz.size else 1)]
        if self.parity is not None:
            wrong = c[0::2] if self.parity == "odd" else c[1::2]
            if np.any(wrong != 0.0):
                raise InvalidInput(f"Poly declared {self.parity} has non-zero coefficients of the other parity")
        if self.err is not None:
            _check_err(self.err)
        object.__setattr__(self, "a", a)
        object.__setattr__(self, "b", b)
        object.__setattr__(self, "coeffs", tuple(float(v) for v in c))
        if self.err is not None:
            object.__setattr__(self, "err", float(self.err))

    # --- construction -----------------------------------------------------------------------------------------
    @classmethod
    def from_power_coeffs(cls, coeffs_t: Any, a: float = -1.0, b: float = 1.0, parity: str | None = None) -> Poly:
        """Build from power-basis coefficients in t (low degree first)."""
        c = np.atleast_1d(np.asarray(coeffs_t, dtype=float))
        cheb = npcheb.poly2cheb(c)
        if parity is not None:  # remove rounding noise of the other parity
            cheb[(0 if parity == "odd" else 1)::2] = 0.0
        return cls(a, b, tuple(cheb), parity)

    # --- evaluation -------------------------------------------------------------------------------------------
    def to_t(self, x: Any) -> Any:
        """Map x in [a, b] to t in [-1, 1]."""
        return (2.0 * x - (self.a + self.b)) / (self.b - self.a)

    def __call__(self, x: Any) -> Any:
        """Evaluate at x (numpy array, float or torch tensor; torch keeps dtype, device and autograd)."""
        if isinstance(x, torch.Tensor):
            return _clenshaw(self.coeffs, self.to_t(x))
        xa = np.asarray(x, dtype=float)
        y = _clenshaw(self.coeffs, self.to_t(xa))
        return float(y) if xa.ndim == 0 else y

    def check_range(self, x: Any, tol: float = 0.0) -> None:
        """Raise RangeViolation if any x lies outside [a - tol, b + tol], where the fit does not hold."""
        xs = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=float)
        if xs.size and (xs.min() < self.a - tol or xs.max() > self.b + tol):
            raise RangeViolation(f"inputs span [{xs.min():.6g}, {xs.max():.6g}] but the polynomial was fitted on "
                                 f"[{self.a:.6g}, {self.b:.6g}]: recalibrate with representative data or a margin")

    # --- structure and cost -----------------------------------------------------------------------------------
    @property
    def cheb_coeffs(self) -> np.ndarray:
        """Chebyshev coefficients in t, low degree first."""
        return np.array(self.coeffs)

    @property
    def degree(self) -> int:
        return len(self.coeffs) - 1

    @property
    def affine(self) -> tuple[float, float]:
        """(alpha, beta) with t = alpha * x + beta."""
        return 2.0 / (self.b - self.a), -(self.a + self.b) / (self.b - self.a)

    @property
    def depth(self) -> int:
        """Levels to evaluate p(t): ceil(log2(degree + 1)), scalar multiplications folded (module docstring)."""
        return _depth(self.degree)

    @property
    def affine_depth(self) -> int:
        """Level spent mapping x -> t: 0 when b - a == 2 (t = x - mid is an addition) or degree 0, else 1."""
        return 0 if (self.b - self.a == 2.0 or self.degree == 0) else 1

    @property
    def depth_with_affine(self) -> int:
        """Levels to evaluate p on a ciphertext holding x (affine map included)."""
        return self.depth + self.affine_depth

    @property
    def mult_count(self) -> int:
        """Estimated ciphertext-ciphertext products of the BSGS evaluation (see :func:`bsgs_mult_count`)."""
        return bsgs_mult_count(self.degree, self.parity)

    def power_coeffs(self) -> np.ndarray:
        """Power-basis coefficients in t, low degree first (for an engine that maps x -> t first).

        Converting from Chebyshev amplifies rounding: coefficients grow like
        (1 + sqrt 2)^degree while p stays O(1) on [-1, 1], so beyond degree ~20 the
        power basis loses digits (see :meth:`power_amplification`) and the engine
        should evaluate in the Chebyshev basis (T_j baby steps) instead.
        """
        c = npcheb.cheb2poly(self.cheb_coeffs)
        if self.parity is not None:
            c[(0 if self.parity == "odd" else 1)::2] = 0.0
        return c

    def power_coeffs_x(self) -> np.ndarray:
        """Power-basis coefficients in x directly, low degree first (what ``privml.functional.polyval`` takes).

        Ill-conditioned when the interval is far from the origin or wide: the
        coefficient of x^j scales like alpha^j = (2/(b-a))^j and the terms cancel
        over [a, b].  Fine for small degrees on intervals around 0 of width ~2;
        check :meth:`power_amplification` with ``in_x=True`` before relying on it.
        """
        alpha, beta = self.affine
        out = np.zeros(1)
        for c in self.power_coeffs()[::-1]:  # Horner on polynomials: out = out * (alpha x + beta) + c
            out = nppoly.polyadd(nppoly.polymul(out, [beta, alpha]), [c])
        return np.asarray(out, dtype=float)

    def power_amplification(self, in_x: bool = False) -> float:
        """sum |coeff_j * s^j| / max |p|, s = max |t| (or |x|): how much float rounding of the terms is amplified."""
        if in_x:
            c, s = self.power_coeffs_x(), max(abs(self.a), abs(self.b))
        else:
            c, s = self.power_coeffs(), 1.0
        scale = float(np.max(np.abs(self(_grid(self.a, self.b, 2001)))))
        total = float(np.sum(np.abs(c) * s ** np.arange(c.size)))
        return total / scale if scale > 0 else (math.inf if total > 0 else 1.0)

    # --- serialization ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict; ``from_dict(to_dict())`` gives an equal Poly (floats round-trip exactly in JSON)."""
        return {"type": "Poly", "a": self.a, "b": self.b, "coeffs": list(self.coeffs), "parity": self.parity,
                "err": self.err, "method": self.method}

    @classmethod
    def from_dict(cls, d: Any) -> Poly:
        if not isinstance(d, dict) or d.get("type") != "Poly":
            raise MalformedInput(f"not a serialized Poly: {str(d)[:80]}")
        try:
            coeffs = [float(v) for v in d["coeffs"]]
            return cls(float(d["a"]), float(d["b"]), tuple(coeffs), d.get("parity"), d.get("err"), d.get("method"))
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedInput(f"malformed Poly dict: {exc}") from exc


# ---------------------------------------------------------------------------------------------------------------
# fitting


def _check_fn_parity(f: Callable, a: float, b: float, parity: str | None) -> None:
    """Raise InvalidInput unless f is odd/even about the interval midpoint (what a parity-restricted fit assumes)."""
    if parity is None:
        return
    mid, half = (a + b) / 2, (b - a) / 2
    h = np.linspace(0.0, half, 1001)
    fp, fm = _values(f, mid + h), _values(f, mid - h)
    dev = np.max(np.abs(fp + fm)) if parity == "odd" else np.max(np.abs(fp - fm))
    if dev > 1e-9 * (1.0 + np.max(np.abs(fp))):
        raise InvalidInput(f"f is not {parity} about the midpoint {mid:g} of [{a:g}, {b:g}] (deviation {dev:.3g}); "
                           "use parity=None or a symmetric interval")


def chebyshev_interp(f: Callable[[np.ndarray], Any], a: float, b: float, degree: int,
                     parity: str | None = None) -> Poly:
    """Interpolate f at the degree+1 Chebyshev (first-kind) nodes of [a, b].

    Near-minimax (within a factor 1 + Lebesgue constant ~ 2 + (2/pi) log(d+1)) and
    cheap.  With ``parity`` the other-parity coefficients are dropped, which is exact
    for an f with that parity.
    """
    a, b = _check_interval(a, b)
    degree, parity = _check_degree(degree), _check_parity(parity)
    _check_fn_parity(f, a, b, parity)
    n = degree + 1
    t = np.cos(np.pi * (np.arange(n) + 0.5) / n)
    y = _values(f, (b - a) / 2 * t + (a + b) / 2)
    c = 2.0 / n * (npcheb.chebvander(t, degree).T @ y)
    c[0] /= 2
    if parity is not None:
        c[(0 if parity == "odd" else 1)::2] = 0.0
    p = Poly(a, b, tuple(c), parity, method="cheb")
    return Poly(a, b, p.coeffs, parity, err=max_error(p, f, a, b), method="cheb")


def _alternant(x: np.ndarray, e: np.ndarray, n_ref: int) -> np.ndarray | None:
    """Indices of n_ref alternating-sign local extrema of e (largest kept), or None if e alternates too little."""
    s = np.where(e >= 0, 1, -1)
    run = np.concatenate([[0], np.cumsum(s[1:] != s[:-1])])
    order = np.lexsort((-np.abs(e), run))
    first = np.concatenate([[True], run[order][1:] != run[order][:-1]])
    ext = list(order[first])  # one index per sign run, in increasing x (runs are ordered)
    if len(ext) < n_ref:
        return None
    while len(ext) > n_ref:
        v = np.abs(e[ext])
        if len(ext) - n_ref == 1:
            ext.pop(0 if v[0] < v[-1] else -1)
            continue
        i = int(np.argmin(v))
        if i in (0, len(ext) - 1):
            ext.pop(i)
        else:  # dropping two neighbours keeps the signs alternating
            j = i - 1 if v[i - 1] < v[i + 1] else i + 1
            for k in sorted((i, j), reverse=True):
                ext.pop(k)
    return np.array(ext)


def _remez_t(g: Callable[[np.ndarray], np.ndarray], lo: float, hi: float, idx: list[int],
             w: Callable[[np.ndarray], np.ndarray] | None, max_iter: int, tol: float,
             ) -> tuple[np.ndarray, float, bool]:
    """Minimax fit of g on [lo, hi] (in t) by sum_j c_j T_{idx_j}(t), weighted error w*(p - g).

    Returns (full Chebyshev coefficient array, max weighted error on the grid, converged).
    Multi-point exchange on a dense grid, each new reference point refined locally.
    Starts from the alternant of the matching Chebyshev polynomial, then from a
    uniform reference if that fails.
    """
    n, deg = len(idx), max(idx)
    odd = all(j % 2 == 1 for j in idx)
    even = all(j % 2 == 0 for j in idx)
    x = _grid(lo, hi, max(3000, 80 * n))
    if odd and lo <= 0.0:  # the odd basis vanishes at 0: keep 0 out of the reference set
        x = x[x > 0]
    wfun = (lambda p: np.ones_like(p)) if w is None else w
    gx, wx = g(x), wfun(x)
    if np.any(~np.isfinite(wx)) or np.any(wx <= 0):
        raise InvalidInput("weight must be finite and positive on the interval")
    scale = max(1.0, float(np.max(np.abs(gx))))

    def err(c: np.ndarray, pts: np.ndarray) -> np.ndarray:
        return wfun(pts) * (npcheb.chebval(pts, c) - g(pts))

    def exchange(rx: np.ndarray) -> tuple[np.ndarray | None, float, bool]:
        best_c, best_err = None, math.inf
        for _ in range(max_iter):
            A = np.empty((n + 1, n + 1))
            A[:, :n] = npcheb.chebvander(rx, deg)[:, idx]
            A[:, n] = (-1.0) ** np.arange(n + 1) / wfun(rx)
            try:
                sol = np.linalg.solve(A, g(rx))
            except np.linalg.LinAlgError:
                break
            c = np.zeros(deg + 1)
            c[idx] = sol[:n]
            e_grid = wx * (npcheb.chebval(x, c) - gx)
            emax = float(np.max(np.abs(e_grid)))
            if not math.isfinite(emax):
                break
            if emax < best_err:
                best_c, best_err = c, emax
            if emax <= 1e-12 * scale:  # exact, or at the float64 noise floor
                return best_c, best_err, True
            # the error alternates on the reference by construction: keep those points in the search set
            order = np.argsort(np.concatenate([x, rx]), kind="stable")
            xs = np.concatenate([x, rx])[order]
            e = np.concatenate([e_grid, err(c, rx)])[order]
            ext = _alternant(xs, e, n + 1)
            if ext is None:
                break
            # refine each extremum between its neighbours: three zooming passes of 33 points
            left, right = xs[np.maximum(ext - 1, 0)], xs[np.minimum(ext + 1, xs.size - 1)]
            sgn, rows = np.sign(e[ext])[:, None], np.arange(ext.size)
            for _ in range(3):
                cand = left[:, None] + (right - left)[:, None] * np.linspace(0.0, 1.0, 33)[None, :]
                ce = err(c, cand.ravel()).reshape(cand.shape)
                pick = np.argmax(ce * sgn, axis=1)
                new_rx, new_e = cand[rows, pick], np.abs(ce[rows, pick])
                step = (right - left) / 32
                left, right = np.maximum(new_rx - step, left), np.minimum(new_rx + step, right)
            if np.all(np.diff(new_rx) > 0):
                rx = new_rx
            else:
                rx, new_e = xs[ext], np.abs(e[ext])
            top = max(emax, float(new_e.max()))
            if top - new_e.min() <= tol * top + 1e-14 * (deg + 1) * scale:  # relative gap, or float noise
                return best_c, best_err, True
        return best_c, best_err, False

    k = np.arange(n, -1, -1)
    if odd:  # positive extrema of T_{2n+1}
        c0 = np.cos(k * np.pi / (2 * n + 1))
    elif even:  # non-negative extrema of T_{2n}
        c0 = np.cos(k * np.pi / (2 * n))
    else:  # extrema of T_n on [-1, 1]
        c0 = (np.cos(k * np.pi / n) + 1) / 2 if n > 0 else np.array([0.5])
    if lo > 0.0 or not (odd or even):  # stretch onto [lo, hi]
        c0 = lo + (hi - lo) * (c0 - c0[0]) / (c0[-1] - c0[0])
    else:
        c0 = c0 * hi
    # asymmetric second start: when the best approximation of degree d is also the best of degree d + 1
    # (relu = x/2 + |x|/2 on [-B, B]), a symmetric reference forces a zero levelled error.
    c1 = np.cos(np.arange(n, -1, -1) * np.pi / (n + 1))
    c1 = lo + (hi - lo) * (c1 - c1[0]) / (c1[-1] - c1[0]) if not (odd and lo <= 0) else c1[1:] * hi
    if c1.size < n + 1:
        c1 = np.linspace(lo, hi, n + 2)[1:]
    best = (None, math.inf, False)
    for start in (c0, c1):
        res = exchange(start)
        if res[0] is not None and (res[2] or res[1] < best[1]):
            best = res if (res[2] or not best[2]) else best
        if best[2]:
            break
    if best[0] is None:
        return np.zeros(deg + 1), math.inf, False
    return best[0], best[1], best[2]


def remez(f: Callable[[np.ndarray], Any], a: float, b: float, degree: int, parity: str | None = None,
          weight: Callable[[np.ndarray], Any] | None = None, max_iter: int = 60, tol: float = 1e-4) -> Poly:
    """Minimax polynomial of degree <= ``degree`` for f on [a, b] (Remez exchange).

    ``weight(x) > 0`` minimizes max |weight * (p - f)| (e.g. 1/|f| for relative error).
    With ``parity`` the fit uses only odd/even Chebyshev polynomials in t, on the
    half interval t in [0, 1] (f must have that parity about the midpoint).
    Converged means the reference errors agree within ``tol`` (relative), so the
    result is within a factor 1 + tol of the best possible.  If Remez does not
    converge (or at the float64 noise floor), the better on the grid of its best
    iterate and the Chebyshev interpolant is returned, ``method`` saying which.
    """
    a, b = _check_interval(a, b)
    degree, parity = _check_degree(degree), _check_parity(parity)
    _check_fn_parity(f, a, b, parity)
    idx = _parity_indices(degree, parity)
    if not idx:  # odd parity, degree 0: the zero polynomial
        p = Poly(a, b, (0.0,), parity, method="remez")
        return Poly(a, b, p.coeffs, parity, err=max_error(p, f, a, b), method="remez")
    to_x = lambda t: (b - a) / 2 * t + (a + b) / 2
    g = lambda t: _values(f, to_x(t))
    w = None if weight is None else (lambda t: _values(weight, to_x(t), "weight"))
    lo = -1.0 if parity is None else 0.0
    c, _, converged = _remez_t(g, lo, 1.0, idx, w, max_iter, tol)
    if not np.all(np.isfinite(c)):
        converged, c = False, np.zeros(degree + 1)
    if parity is not None:
        c[(0 if parity == "odd" else 1)::2] = 0.0
    p = Poly(a, b, tuple(c), parity, method="remez")
    p = Poly(a, b, p.coeffs, parity, err=max_error(p, f, a, b), method="remez")
    # the interpolant is cheap: keep whichever is better on the grid (it only wins when Remez did not
    # converge, or at the float64 noise floor where both are ~1e-12 relative)
    ci = chebyshev_interp(f, a, b, degree, parity)
    if weight is not None:
        xs = _grid(a, b, 20001)
        wv = _values(weight, xs, "weight")
        fx = _values(f, xs)
        better = np.max(wv * np.abs(ci(xs) - fx)) < np.max(wv * np.abs(p(xs) - fx))
    else:
        better = ci.err < p.err
    if better:
        why = "float noise floor" if converged else "remez did not converge"
        return Poly(a, b, ci.coeffs, parity, err=ci.err, method=f"cheb({why})")
    return p if converged else Poly(a, b, p.coeffs, parity, err=p.err, method="remez(not converged)")


def max_error(poly: Callable[[np.ndarray], Any], f: Callable[[np.ndarray], Any], a: float, b: float,
              n: int = 20001) -> float:
    """max |poly(x) - f(x)| on n uniform plus n Chebyshev-Lobatto points of [a, b]."""
    a, b = _check_interval(a, b)
    x = _grid(a, b, n)
    return float(np.max(np.abs(np.asarray(poly(x), dtype=float) - _values(f, x))))


def estimate_error(approx: Callable[[np.ndarray], Any], f: Callable[[np.ndarray], Any], a: float, b: float,
                   n: int = 20001) -> float:
    """max |approx - f| on [a, b]: the dense grid of :func:`max_error`, then a finer search near the worst points.

    Works for Poly, CompositePoly, ReluApprox or any vectorized callable.
    """
    a, b = _check_interval(a, b)
    x = _grid(a, b, n)
    e = np.abs(np.asarray(approx(x), dtype=float) - _values(f, x))
    worst = np.argsort(e)[-8:]
    lo, hi = x[np.maximum(worst - 1, 0)], x[np.minimum(worst + 1, x.size - 1)]
    fine = (lo[:, None] + (hi - lo)[:, None] * np.linspace(0, 1, 129)[None, :]).ravel()
    ef = np.abs(np.asarray(approx(fine), dtype=float) - _values(f, fine))
    return float(max(e.max(), ef.max()))


# ---------------------------------------------------------------------------------------------------------------
# activations


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def leaky_relu(x: np.ndarray, slope: float = 0.01) -> np.ndarray:
    return np.where(x >= 0, x, slope * np.asarray(x, dtype=float))


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact GELU, 0.5 x (1 + erf(x / sqrt 2)) (torch's default, approximate='none')."""
    return 0.5 * x * (1.0 + erf(np.asarray(x, dtype=float) / math.sqrt(2.0)))


def silu(x: np.ndarray) -> np.ndarray:
    return x * expit(x)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return expit(x)


def tanh(x: np.ndarray) -> np.ndarray:
    return np.tanh(x)


def softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


def square(x: np.ndarray) -> np.ndarray:
    return np.square(x)


def abs_(x: np.ndarray) -> np.ndarray:
    return np.abs(x)


ACTIVATIONS: dict[str, Callable[..., np.ndarray]] = {
    "relu": relu, "leaky_relu": leaky_relu, "gelu": gelu, "silu": silu, "sigmoid": sigmoid, "tanh": tanh,
    "softplus": softplus, "square": square, "abs": abs_,
}
_RELU_LIKE = {"relu": 0.0, "abs": -1.0}  # slope for negative inputs; leaky_relu reads its own


def _activation(name: str, params: dict[str, Any]) -> Callable[[np.ndarray], np.ndarray]:
    if name not in ACTIVATIONS:
        raise InvalidInput(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
    if params and name != "leaky_relu":
        raise InvalidInput(f"activation {name!r} takes no parameters, got {sorted(params)}")
    if set(params) - {"slope"}:
        raise InvalidInput(f"leaky_relu takes only 'slope', got {sorted(params)}")
    fn = ACTIVATIONS[name]
    return (lambda x: fn(x, **params)) if params else fn


def _detect_parity(f: Callable, a: float, b: float) -> str | None:
    """'odd'/'even' if f has that parity on the symmetric interval [a, b] = [-B, B], else None."""
    if a != -b:
        return None
    h = np.linspace(0.0, b, 1001)
    fp, fm = _values(f, h), _values(f, -h)
    scale = 1e-12 * (1.0 + np.max(np.abs(fp)))
    if np.max(np.abs(fp + fm)) <= scale:
        return "odd"
    if np.max(np.abs(fp - fm)) <= scale:
        return "even"
    return None


def fit_activation(name: str, a: float, b: float, degree: int, method: str = "remez", **params: Any) -> Poly:
    """Fit a named activation on [a, b] ("remez" minimax or "cheb" interpolation).

    Parity is used automatically on symmetric intervals (tanh odd; abs, square even).
    "square" is returned exactly (degree 2) whenever degree >= 2.  ``params``:
    ``slope`` for leaky_relu.  Results are cached (Poly is immutable).
    """
    _activation(name, params)  # validates name and params
    a, b = _check_interval(a, b)
    degree = _check_degree(degree)
    if method not in ("remez", "cheb"):
        raise InvalidInput(f"method must be 'remez' or 'cheb', got {method!r}")
    return _fit_cached(name, a, b, degree, method, tuple(sorted(params.items())))


@lru_cache(maxsize=2048)
def _fit_cached(name: str, a: float, b: float, degree: int, method: str, params: tuple) -> Poly:
    f = _activation(name, dict(params))
    if name == "square" and degree >= 2:  # x = al t + be: x^2 = al^2 (T0 + T2)/2 + 2 al be T1 + be^2
        al, be = (b - a) / 2, (a + b) / 2
        c = (al * al / 2 + be * be, 2 * al * be, al * al / 2)
        parity = "even" if be == 0 else None
        if parity:
            c = (c[0], 0.0, c[2])
        p = Poly(a, b, c, parity)
        return Poly(a, b, p.coeffs, parity, err=max_error(p, f, a, b), method="exact")
    parity = _detect_parity(f, a, b)
    fit = remez if method == "remez" else chebyshev_interp
    return fit(f, a, b, degree, parity)


def _lebesgue_bound(d: int) -> float:
    """Upper bound on the Lebesgue constant of Chebyshev-node interpolation, degree d."""
    return 1.0 + 2.0 / math.pi * math.log(d + 1)


def fit_activation_to_error(name: str, a: float, b: float, max_err: float, max_degree: int = 63,
                            **params: Any) -> Poly:
    """Smallest-degree minimax fit whose grid error is <= max_err (BudgetError if none up to max_degree).

    Degrees are tried in increasing order (the answer is therefore monotone in
    max_err); a degree is skipped without running Remez when the Chebyshev
    interpolant proves the minimax error is too large (E* >= err_interp / (1 + Lebesgue)).
    """
    f = _activation(name, params)
    a, b = _check_interval(a, b)
    max_degree = _check_degree(max_degree)
    try:
        max_err = float(max_err)
    except (TypeError, ValueError):
        raise InvalidInput(f"max_err must be a positive number, got {max_err!r}") from None
    if not (math.isfinite(max_err) and max_err > 0):
        raise InvalidInput(f"max_err must be a positive finite number, got {max_err!r}")
    parity = _detect_parity(f, a, b) if name != "square" else None
    best = math.inf
    for d in range(max_degree + 1):
        if (parity == "odd" and d % 2 == 0) or (parity == "even" and d % 2 == 1):
            continue
        ci = fit_activation(name, a, b, d, "cheb", **params)
        if ci.err / (1.0 + _lebesgue_bound(d)) > max_err / 0.98:
            best = min(best, ci.err)
            continue
        p = fit_activation(name, a, b, d, "remez", **params)
        best = min(best, p.err, ci.err)
        ok = [q for q in (p, ci) if q.err <= max_err]
        if ok:
            return min(ok, key=lambda q: q.err)
    raise BudgetError(f"{name} on [{a:g}, {b:g}]: no polynomial of degree <= {max_degree} reaches max_err={max_err:g} "
                      f"(best error reached {best:.4g}); loosen max_err, narrow the interval (recalibrate), raise "
                      "max_degree" + (", or use the sign-composite construction (cheapest())"
                                      if name in ("relu", "leaky_relu", "abs") else ""))


# ---------------------------------------------------------------------------------------------------------------
# composite polynomials, sign, ReLU, max


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
    heap: list[tuple[int, tuple[int, ...]]] = [(_depth(d), (d,)) for d in _SIGN_SEARCH_DEGREES]
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
                heapq.heappush(heap, (dep + _depth(d), seq + (d,)))
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
    def max_error(self) -> float:
        return float(self.err)

    @property
    def bound(self) -> float:
        eps = self.sign.eps if self.sign.eps is not None else 0.0
        serr = self.sign.err if self.sign.err is not None else sign_precision_err(self.sign, eps or 1e-3)
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


def sign_precision_err(sign: Callable[[np.ndarray], Any], eps: float) -> float:
    return 2.0 ** -sign_precision(sign, eps)


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

    @property
    def max_error(self) -> float:
        return float(self.err)

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
# choice


def cheapest(name: str, a: float, b: float, max_err: float, **params: Any) -> Poly | ReluApprox | CompositePoly:
    """Cheapest approximation of activation ``name`` on [a, b] with max error <= max_err.

    Cost order: depth on a ciphertext holding x (affine map included), then
    ciphertext products.  For relu / leaky_relu / abs both a direct minimax
    polynomial and the sign-composite construction are considered; other
    activations get the direct polynomial.  BudgetError if neither reaches max_err.
    """
    f = _activation(name, params)
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
