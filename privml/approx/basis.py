"""Polynomial bases: the :class:`Poly` representation, basis conversions, and the one depth rule.

Representation
    A :class:`Poly` lives on an interval [a, b] and stores Chebyshev coefficients in
    the normalized variable ``t = (2x - a - b) / (b - a)`` (so t runs over [-1, 1]).
    Chebyshev coefficients stay well conditioned up to degree ~64; power-basis
    coefficients do not (see :meth:`Poly.power_coeffs`).

Costs
    ``depth`` is :func:`poly_depth`, ceil(log2(degree + 1)) levels for p(t): the CKKS
    evaluator (``privml.he.kernels.eval_poly``) folds every scalar coefficient into the
    product that consumes it.  Mapping x to t is a plaintext affine op; ``depth_with_affine``
    adds its level (none when b - a == 2, where the map is a pure addition).
    ``mult_count`` (:func:`bsgs_mult_count`) is a baby-step giant-step estimate of
    ciphertext-ciphertext products, used here to rank approximations of equal depth; the
    CKKS backend's exact count for its own schedule is ``privml.he.kernels.poly_mult_count``.

Numpy only: a Poly also evaluates torch tensors (duck-typed, dtype, device and autograd kept)
without this package importing torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.polynomial import chebyshev as npcheb
from numpy.polynomial import polynomial as nppoly

from privml.errors import CalibrationError, InvalidInput, MalformedInput, RangeViolation

MAX_DEGREE = 128          # beyond this even the Chebyshev basis and our float64 Remez are not trusted
_PARITIES = (None, "odd", "even")


def poly_depth(degree: int) -> int:
    """CKKS levels of a degree-``degree`` polynomial in privml's schedule: ceil(log2(degree + 1)).

    The single source of this rule: the CKKS evaluator (``privml.he.kernels.eval_poly``) consumes
    exactly this many levels, and every planner, module and cost model asks this function. One exception,
    decided by :func:`square_form`: a quadratic on a pending linear map costs one level (a square), which
    ``privml.compiler.costs.graph_cost`` and the CKKS backend both apply.
    """
    degree = int(degree)
    if degree < 0:
        raise ValueError(f"polynomial degree must be >= 0, got {degree}")
    return degree.bit_length()


SQUARE_FORM_AMPLIFICATION = 4.0  # most the completed square may amplify rounding over c2 t^2 + c1 t + c0 (2 bits)


def square_form(c: Any) -> tuple[float, float, float, float] | None:
    """(s, shift, sign, const) with p(t) = sign * (s t + shift)^2 + const for a quadratic p on t in [-1, 1].

    Completing the square lets a degree-2 polynomial cost one level (a square) instead of two: s and shift
    join the linear map before it, sign and const the one after. None when p is not quadratic or when the
    cancellation between the square and const would amplify rounding by more than SQUARE_FORM_AMPLIFICATION
    (p nearly linear: |c1| >> |c2|)."""
    coeffs = [float(v) for v in c]
    while coeffs and coeffs[-1] == 0.0:
        coeffs.pop()
    if len(coeffs) != 3:
        return None
    c0, c1, c2 = coeffs
    sign = 1.0 if c2 > 0 else -1.0
    s = math.sqrt(abs(c2))
    shift = sign * c1 / (2.0 * s)
    if abs(c2) + abs(c1) + shift * shift > SQUARE_FORM_AMPLIFICATION * (abs(c2) + abs(c1) + abs(c0)):
        return None
    return s, shift, sign, c0 - sign * shift * shift


# ---------------------------------------------------------------------------------------------------------------
# validation and grids (shared by the fitting and sign modules)


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
    """Return err as a float or raise InvalidInput unless it is finite and non-negative."""
    try:
        e = float(err)
    except (TypeError, ValueError):
        raise InvalidInput(f"err must be a finite non-negative float or None, got {err!r}") from None
    if not (math.isfinite(e) and e >= 0):
        raise InvalidInput(f"err must be a finite non-negative float or None, got {err!r}")
    return e


def _check_degree(degree: Any) -> int:
    """Return degree as an int or raise InvalidInput unless it is an integer in [0, MAX_DEGREE]."""
    if isinstance(degree, bool) or not isinstance(degree, (int, np.integer)) or not 0 <= degree <= MAX_DEGREE:
        raise InvalidInput(f"degree must be an integer in [0, {MAX_DEGREE}], got {degree!r}")
    return int(degree)


def _check_parity(parity: Any) -> str | None:
    """Return parity or raise InvalidInput unless it is 'odd', 'even' or None."""
    if parity not in _PARITIES:
        raise InvalidInput(f"parity must be 'odd', 'even' or None, got {parity!r}")
    return parity


def _values(f: Callable[[np.ndarray], Any], x: np.ndarray, what: str = "f") -> np.ndarray:
    """f(x) as a float array of x's shape; InvalidInput if any value is not finite."""
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
    m = poly_depth(d)
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


# ---------------------------------------------------------------------------------------------------------------
# Poly


def _is_tensor(x: Any) -> bool:
    """A torch tensor (duck-typed, so this numpy-only package need not import torch)."""
    return hasattr(x, "detach") and hasattr(x, "requires_grad")


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
        if _is_tensor(x):
            return _clenshaw(self.coeffs, self.to_t(x))
        xa = np.asarray(x, dtype=float)
        y = _clenshaw(self.coeffs, self.to_t(xa))
        return float(y) if xa.ndim == 0 else y

    def check_range(self, x: Any, tol: float = 0.0) -> None:
        """Raise RangeViolation if any x lies outside [a - tol, b + tol], where the fit does not hold."""
        xs = x.detach().cpu().numpy() if _is_tensor(x) else np.asarray(x, dtype=float)
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
        """Levels to evaluate p(t): :func:`poly_depth` of the degree, scalar multiplications folded."""
        return poly_depth(self.degree)

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
