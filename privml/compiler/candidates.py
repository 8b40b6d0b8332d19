"""Candidate approximations of one activation, with their errors and costs, and the frontier worth paying for.

Per activation the candidates are direct minimax polynomials of degree 2..``max_degree`` fitted
on its calibrated interval (:func:`privml.approx.fit.fit_activation`); for ReLU-like activations
x (1 + s(x / B)) / 2 with s a composite sign polynomial (:func:`privml.approx.sign.composite_sign`
stages, several gaps eps); on MPC, CrypTen's exact comparison-based ReLU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch.nn as nn

from privml.approx.basis import Poly, poly_depth
from privml.approx.fit import fit_activation
from privml.approx.sign import ReluApprox, composite_sign
from privml.compiler.approx import ActivationSite
from privml.compiler.costs import (
    MPC_FRAC_BITS,
    MPC_PRODUCT_BYTES,
    MPC_RELU_BYTES,
    MPC_RELU_ROUNDS,
    ckks_mults,
    mpc_poly_cost,
    numeric_unit,
)
from privml.errors import InvalidInput
from privml.nn import CompositeRelu, PolyActivation

MAX_DIRECT_DEGREE = 31
SIGN_DEGREE_SETS: tuple[tuple[int, ...], ...] = ((3, 3), (3, 3, 3), (7, 7), (7, 7, 7), (7, 7, 13), (15, 15),
                                                 (15, 15, 27))
SIGN_EPS = (2.0**-4, 2.0**-6, 2.0**-8, 2.0**-10)
RELU_LIKE = ("relu", "leaky_relu")
BACKEND_COSTS = ("ckks", "mpc", "hybrid", "plain")


@dataclass(frozen=True)
class Candidate:
    """One way to compute an activation, with its error on the interval and its costs on every backend.

    ``kind``: "poly" (direct polynomial, ``degrees`` = (d,)), "composite" (sign-based ReLU,
    ``degrees`` = the sign stages) or "exact" (MPC comparison, ``degrees`` = ()). ``err`` is the
    measured max |approx - f| on the interval (dense grid); ``numeric_err`` the predicted
    arithmetic error of the backend (coefficients' L1 norm times its precision), so the
    error a plan states is ``total_err``. ``depth``/``mults`` are CKKS levels and ciphertext
    products (the CKKS schedule's count on ckks/hybrid, the BSGS estimate ``Poly.mult_count`` on
    mpc/plain), ``rounds``/``nbytes`` MPC rounds and bytes per element.
    """

    kind: str
    degrees: tuple[int, ...]
    err: float
    numeric_err: float
    depth: int
    mults: int
    rounds: int
    nbytes: int
    eps: float | None = None
    approx: Any = field(default=None, compare=False, repr=False)

    @property
    def total_err(self) -> float:
        return self.err + self.numeric_err

    @property
    def degree(self) -> int:
        """Degree in x: the polynomial's, or the composite's (product of stages, times x)."""
        if self.kind == "poly":
            return self.degrees[0]
        if self.kind == "composite":
            return math.prod(self.degrees) + 1
        return 0

    def cost(self, backend: str) -> tuple[int, int]:
        """(rounds, bytes) on MPC, (depth, products) otherwise: the order frontiers and raises use."""
        if backend == "mpc":
            return self.rounds, self.nbytes
        return self.depth, self.mults

    def label(self) -> str:
        """Short human description for plans and error messages."""
        if self.kind == "poly":
            return f"minimax deg {self.degrees[0]}"
        if self.kind == "composite":
            return f"x(1+s)/2, sign {{{','.join(map(str, self.degrees))}}} eps 2^{math.log2(self.eps):.0f}"
        return "exact (CrypTen comparison)"

    def module(self, site: ActivationSite, trainable: bool = False, clamp: bool = False) -> nn.Module | None:
        """The privml.nn module computing this candidate at ``site`` (None for "exact": keep the original)."""
        if self.kind == "poly":
            return PolyActivation(self.approx.power_coeffs(), (site.lo, site.hi), source=site.kind,
                                  trainable=trainable, clamp=clamp)
        if self.kind == "composite":
            stages = [p.power_coeffs() for p in self.approx.sign.stages]
            return CompositeRelu(stages, (site.lo, site.hi), slope=self.approx.slope, source=site.kind,
                                 trainable=trainable, clamp=clamp)
        return None

    def spec(self) -> dict[str, Any]:
        """JSON-safe description: kind, degrees, errors, costs and the coefficients (power basis in t)."""
        d: dict[str, Any] = {"kind": self.kind, "degrees": list(self.degrees), "err": self.err,
                             "numeric_err": self.numeric_err, "eps": self.eps}
        if self.kind == "poly":
            d["coeffs_t"] = [float(c) for c in self.approx.power_coeffs()]
        elif self.kind == "composite":
            d["sign_stages_t"] = [[float(c) for c in p.power_coeffs()] for p in self.approx.sign.stages]
            d["bound"] = self.approx.B
            d["slope"] = self.approx.slope
        return d


def poly_candidate(p: Poly, backend: str, unit: float) -> Candidate:
    """A direct polynomial fit as a candidate; ``unit`` is the backend's arithmetic precision."""
    c = p.power_coeffs()
    d = p.degree
    rounds, nbytes = mpc_poly_cost(d)
    mults = ckks_mults(c) if backend in ("ckks", "hybrid") else p.mult_count
    return Candidate("poly", (d,), float(p.err), float(np.abs(c).sum()) * unit, poly_depth(d), mults, rounds,
                     nbytes, approx=p)


def _composite_candidate(r: ReluApprox, backend: str, unit: float) -> Candidate:
    """A sign-based ReLU as a candidate: its stages' depths + 1 for the product with x."""
    stages = r.sign.stages
    coeffs = [p.power_coeffs() for p in stages]
    depth = sum(poly_depth(p.degree) for p in stages) + 1
    mults = (sum(ckks_mults(c) for c in coeffs) if backend in ("ckks", "hybrid")
             else sum(p.mult_count for p in stages)) + 1
    mpc = [mpc_poly_cost(p.degree) for p in stages]
    numeric = r.B * (1.0 - r.slope) / 2.0 * sum(float(np.abs(c).sum()) for c in coeffs) * unit
    return Candidate("composite", tuple(p.degree for p in stages), float(r.err), numeric, depth, mults,
                     sum(m[0] for m in mpc) + 1, sum(m[1] for m in mpc) + MPC_PRODUCT_BYTES, eps=r.sign.eps, approx=r)


@lru_cache(maxsize=256)
def _candidates_cached(kind: str, lo: float, hi: float, params: tuple, backend: str, precision_bits: int,
                       max_degree: int, composites: bool) -> tuple[Candidate, ...]:
    """Every candidate, the best of each (kind, degrees, eps); cached since fits and sign stages are costly."""
    unit = numeric_unit(backend, precision_bits)
    pdict = dict(params)
    out: dict[tuple, Candidate] = {}
    for d in range(2, max_degree + 1):
        p = fit_activation(kind, lo, hi, d, "remez", **pdict)
        if p.degree >= 1 and p.err is not None and math.isfinite(p.err):
            cand = poly_candidate(p, backend, unit)
            key = ("poly", cand.degrees)
            if key not in out or cand.total_err < out[key].total_err:
                out[key] = cand
    if composites and kind in RELU_LIKE:
        slope = float(pdict.get("slope", 0.01)) if kind == "leaky_relu" else 0.0
        for degs in SIGN_DEGREE_SETS:
            for eps in SIGN_EPS:
                r = ReluApprox(composite_sign(degrees=degs, eps=eps), lo, hi, slope)
                out[("composite", degs, eps)] = _composite_candidate(r, backend, unit)
    if backend == "mpc" and kind in RELU_LIKE:
        out[("exact",)] = Candidate("exact", (), 0.0, max(abs(lo), abs(hi)) * 2.0 ** -MPC_FRAC_BITS, 0, 0,
                                    MPC_RELU_ROUNDS, MPC_RELU_BYTES)
    return tuple(out.values())


def candidates(kind: str, lo: float, hi: float, params: dict[str, Any] | None = None, backend: str = "ckks",
               precision_bits: int = 20, max_degree: int = MAX_DIRECT_DEGREE, composites: bool = True
               ) -> list[Candidate]:
    """Every candidate for activation ``kind`` on [lo, hi], with errors and costs for ``backend``."""
    if backend not in BACKEND_COSTS:
        raise InvalidInput(f"privml: unknown backend {backend!r} for the cost model; use one of {BACKEND_COSTS}")
    if not 2 <= int(max_degree) <= 63:
        raise InvalidInput(f"privml: max_degree must be in [2, 63], got {max_degree}")
    return list(_candidates_cached(kind, float(lo), float(hi), tuple(sorted((params or {}).items())), backend,
                                   int(precision_bits), int(max_degree), bool(composites)))


def frontier(cands: list[Candidate], backend: str, cost: Any = None) -> list[Candidate]:
    """The candidates worth paying for: by increasing cost (the backend's, or ``cost(candidate)``), each strictly
    more accurate than every cheaper one."""
    price = cost or (lambda c: c.cost(backend))
    ordered = sorted(cands, key=lambda c: (price(c), c.total_err, c.kind, c.degrees, c.eps or 0.0))
    out: list[Candidate] = []
    for c in ordered:
        if not out or c.total_err < out[-1].total_err:
            out.append(c)
    return out


def cheapest_within(ladder: list[Candidate], max_error: float) -> int | None:
    """Index of the cheapest frontier candidate whose total error is <= max_error (None if none is)."""
    for i, c in enumerate(ladder):
        if c.total_err <= max_error:
            return i
    return None


def next_index(ladder: list[Candidate], index: int, backend: str, within: bool) -> int | None:
    """Index in ``ladder`` of the next raise from ``index``: with ``within``, the most accurate candidate at the
    same cost level first (free in depth); then the most accurate one a level up (e.g. the best polynomial one
    level deeper). None at the top of the ladder."""
    here = ladder[index].cost(backend)[0]
    same = [i for i in range(index + 1, len(ladder)) if ladder[i].cost(backend)[0] == here]
    if same and within:
        return same[-1]
    above = [i for i in range(index + 1, len(ladder)) if ladder[i].cost(backend)[0] > here]
    if not above:
        return None
    level = ladder[above[0]].cost(backend)[0]
    return max(i for i in above if ladder[i].cost(backend)[0] == level)
