"""Fitting polynomials to functions: Chebyshev interpolation, Remez minimax, measured errors, named activations.

Every fit states how wrong it is: ``Poly.err`` is max |p - f| measured on a dense grid
(uniform plus Chebyshev-Lobatto points), never assumed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np
from numpy.polynomial import chebyshev as npcheb

from privml.approx.activations import POSITIVE_DOMAIN, detect_parity, lookup
from privml.approx.basis import Poly, _check_degree, _check_interval, _check_parity, _grid, _parity_indices, _values
from privml.errors import BudgetError, InvalidInput


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


def fit_activation(name: str, a: float, b: float, degree: int, method: str = "remez", **params: Any) -> Poly:
    """Fit a named activation on [a, b] ("remez" minimax or "cheb" interpolation).

    Parity is used automatically on symmetric intervals (tanh odd; abs, square even).
    "square" is returned exactly (degree 2) whenever degree >= 2.  ``params``: see
    ``privml.approx.activations.PARAMS``.  Results are cached (Poly is immutable).
    """
    lookup(name, params)  # validates name and params
    a, b = _check_interval(a, b)
    if name in POSITIVE_DOMAIN and a <= 0:
        raise InvalidInput(f"{name} is defined for x > 0 only; got the interval [{a:g}, {b:g}]")
    degree = _check_degree(degree)
    if method not in ("remez", "cheb"):
        raise InvalidInput(f"method must be 'remez' or 'cheb', got {method!r}")
    return _fit_cached(name, a, b, degree, method, tuple(sorted(params.items())))


@lru_cache(maxsize=2048)
def _fit_cached(name: str, a: float, b: float, degree: int, method: str, params: tuple) -> Poly:
    f = lookup(name, dict(params))
    if name == "square" and degree >= 2:  # x = al t + be: x^2 = al^2 (T0 + T2)/2 + 2 al be T1 + be^2
        al, be = (b - a) / 2, (a + b) / 2
        c = (al * al / 2 + be * be, 2 * al * be, al * al / 2)
        parity = "even" if be == 0 else None
        if parity:
            c = (c[0], 0.0, c[2])
        p = Poly(a, b, c, parity)
        return Poly(a, b, p.coeffs, parity, err=max_error(p, f, a, b), method="exact")
    parity = detect_parity(f, a, b)
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
    f = lookup(name, params)
    a, b = _check_interval(a, b)
    max_degree = _check_degree(max_degree)
    try:
        max_err = float(max_err)
    except (TypeError, ValueError):
        raise InvalidInput(f"max_err must be a positive number, got {max_err!r}") from None
    if not (math.isfinite(max_err) and max_err > 0):
        raise InvalidInput(f"max_err must be a positive finite number, got {max_err!r}")
    parity = detect_parity(f, a, b) if name != "square" else None
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
                      "max_degree" + (", or use the sign-composite construction (privml.approx.sign.cheapest)"
                                      if name in ("relu", "leaky_relu", "abs") else ""))
