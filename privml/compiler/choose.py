"""Choose an approximation for every activation under one budget, by a per-backend cost model.

The user states one target and the pass picks, per activation, among

* direct minimax polynomials of degree 2..31 fitted on the activation's calibrated
  interval (:func:`privml.approx.fit.fit_activation`);
* for ReLU-like activations, x (1 + s(x / B)) / 2 with s a composite sign polynomial
  (:func:`privml.approx.sign.composite_sign` stages, several gaps eps);
* on MPC, CrypTen's exact comparison-based ReLU.

Targets (``choose`` arguments): ``max_error`` (max |approx - f| on each activation's
interval, arithmetic error of the backend included), ``accuracy_tolerance`` (drop of
accuracy against the original model on ``validation`` data, evaluated in clear) and
``depth_budget`` (total CKKS multiplicative depth). They combine: ``max_error`` sets the
starting point, ``depth_budget`` caps every step, ``accuracy_tolerance`` decides when to
stop raising. Alone, ``depth_budget`` spends the depth where it reduces the error most.

Cost model (lexicographic, cheapest first)
    ckks:   (total depth, sum of the activations' depths, ciphertext products). Depth decides
            the ring dimension and the chain, so it comes first; the sum makes the order
            monotone in every activation's depth even off the critical path.
    mpc:    (rounds on the critical path, sum of activation rounds, bytes per element).
    hybrid: (enclave refreshes, sum of activation depths, ciphertext products): a refresh
            (one round trip to the key holder) resets the level, so it buys depth.
An activation's depth is what the CKKS backend spends on it (``privml.he.kernels``
schedule: ceil(log2(d + 1)) per polynomial, + 1 for the product with x of a sign-based
ReLU); linear layers cost one level each, fused when consecutive. ``graph_cost`` walks
the captured graph with those rules; a test checks it against the backend's dry run.

Greedy steps, when a target needs them, raise the activation whose approximation moves
the model's logits most (measured in clear, that activation alone approximated) to its
next candidate on the cost/error frontier. Everything is deterministic given the inputs.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from privml.approx.basis import poly_depth
from privml.compiler.approx import ActivationSite, find_activations, replace_activation
from privml.compiler.calibrate import RangeStats
from privml.errors import BudgetError, InvalidInput

# ---------------------------------------------------------------------------------------------------------------
# MPC costs (2 parties, CrypTen 0.4.1, TFP triples, 64-bit ring, 16 fractional bits). Measured on this machine with
# privml.parties.costs.CostMeter on shared tensors (rounds per party; bytes whole-system per element):
#   x.relu(): 9 rounds, 464 bytes/element (a secure comparison: A2B conversion + carry-lookahead adder + B2A);
#   x * y: 1 round, 32 bytes/element (one Beaver product, opening epsilon and delta); x.square(): 1 round, 16 bytes.
# The MPC backend evaluates polyval with every power t^2..t^d in ceil(log2 d) batched rounds
# (privml.backends.mpc.power_schedule). Public scalars and, for 2 parties, truncation are local.
# Kept here as constants so they can be checked against measured rounds (tests/test_compile_choose.py).
MPC_RELU_ROUNDS = 9
MPC_RELU_BYTES = 464
MPC_PRODUCT_BYTES = 32
MPC_SQUARE_BYTES = 16
MPC_FRAC_BITS = 16

MAX_DIRECT_DEGREE = 31
SIGN_DEGREE_SETS: tuple[tuple[int, ...], ...] = ((3, 3), (3, 3, 3), (7, 7), (7, 7, 7), (7, 7, 13), (15, 15),
                                                 (15, 15, 27))
SIGN_EPS = (2.0**-4, 2.0**-6, 2.0**-8, 2.0**-10)
RELU_LIKE = ("relu", "leaky_relu")
BACKEND_COSTS = ("ckks", "mpc", "hybrid", "plain")


def mpc_poly_cost(degree: int) -> tuple[int, int]:
    """(rounds, bytes per element) of ``polyval`` of degree d on the MPC backend (all powers, batched by round)."""
    rounds, nbytes, top = 0, 0, 1
    while top < degree:
        new = min(2 * top, degree)
        nbytes += MPC_SQUARE_BYTES if new - top == 1 and top == new - top else MPC_PRODUCT_BYTES * (new - top)
        rounds += 1
        top = new
    return rounds, nbytes


def _ckks_mults(coeffs: np.ndarray) -> int:
    """Ciphertext products of the CKKS backend's polynomial schedule (privml.he.kernels.poly_mult_count)."""
    from privml.he.kernels import poly_mult_count

    return int(poly_mult_count([float(c) for c in coeffs]))


# ---------------------------------------------------------------------------------------------------------------
# candidates


@dataclass(frozen=True)
class Candidate:
    """One way to compute an activation, with its error on the interval and its costs on every backend.

    ``kind``: "poly" (direct polynomial, ``degrees`` = (d,)), "composite" (sign-based ReLU,
    ``degrees`` = the sign stages) or "exact" (MPC comparison, ``degrees`` = ()). ``err`` is the
    measured max |approx - f| on the interval (dense grid); ``numeric_err`` the predicted
    arithmetic error of the backend (coefficients' L1 norm times its precision), so the
    error a plan states is ``total_err``. ``depth``/``mults`` are CKKS levels and ciphertext
    products, ``rounds``/``nbytes`` MPC rounds and bytes per element.
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
        if backend == "mpc":
            return self.rounds, self.nbytes
        return self.depth, self.mults

    def label(self) -> str:
        if self.kind == "poly":
            return f"minimax deg {self.degrees[0]}"
        if self.kind == "composite":
            return f"x(1+s)/2, sign {{{','.join(map(str, self.degrees))}}} eps 2^{math.log2(self.eps):.0f}"
        return "exact (CrypTen comparison)"

    def module(self, site: ActivationSite, trainable: bool = False, clamp: bool = False) -> nn.Module | None:
        """The privml.nn module computing this candidate at ``site`` (None for "exact": keep the original)."""
        from privml.nn import CompositeRelu, PolyActivation

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


def _numeric_unit(backend: str, precision_bits: int) -> float:
    if backend in ("ckks", "hybrid"):
        return 2.0 ** -precision_bits
    if backend == "mpc":
        return 2.0 ** -MPC_FRAC_BITS
    return 0.0


def _poly_candidate(p: Any, backend: str, unit: float) -> Candidate:
    c = p.power_coeffs()
    d = p.degree
    rounds, nbytes = mpc_poly_cost(d)
    mults = _ckks_mults(c) if backend in ("ckks", "hybrid") else p.mult_count
    return Candidate("poly", (d,), float(p.err), float(np.abs(c).sum()) * unit, poly_depth(d), mults, rounds,
                     nbytes, approx=p)


def _composite_candidate(r: Any, backend: str, unit: float) -> Candidate:
    stages = r.sign.stages
    coeffs = [p.power_coeffs() for p in stages]
    depth = sum(poly_depth(p.degree) for p in stages) + 1
    mults = (sum(_ckks_mults(c) for c in coeffs) if backend in ("ckks", "hybrid")
             else sum(p.mult_count for p in stages)) + 1
    mpc = [mpc_poly_cost(p.degree) for p in stages]
    numeric = r.B * (1.0 - r.slope) / 2.0 * sum(float(np.abs(c).sum()) for c in coeffs) * unit
    return Candidate("composite", tuple(p.degree for p in stages), float(r.err), numeric, depth, mults,
                     sum(m[0] for m in mpc) + 1, sum(m[1] for m in mpc) + MPC_PRODUCT_BYTES, eps=r.sign.eps, approx=r)


@lru_cache(maxsize=256)
def _candidates_cached(kind: str, lo: float, hi: float, params: tuple, backend: str, precision_bits: int,
                       max_degree: int, composites: bool) -> tuple[Candidate, ...]:
    from privml.approx.fit import fit_activation
    from privml.approx.sign import ReluApprox, composite_sign

    unit = _numeric_unit(backend, precision_bits)
    pdict = dict(params)
    out: dict[tuple, Candidate] = {}
    for d in range(2, max_degree + 1):
        p = fit_activation(kind, lo, hi, d, "remez", **pdict)
        if p.degree >= 1 and p.err is not None and math.isfinite(p.err):
            cand = _poly_candidate(p, backend, unit)
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


def frontier(cands: list[Candidate], backend: str) -> list[Candidate]:
    """The candidates worth paying for: by increasing cost, each strictly more accurate than every cheaper one."""
    ordered = sorted(cands, key=lambda c: (c.cost(backend), c.total_err, c.kind, c.degrees, c.eps or 0.0))
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


# ---------------------------------------------------------------------------------------------------------------
# whole-graph cost: the CKKS backend's level rules (or MPC rounds) on the captured graph

_ADDS = {operator.add, operator.sub, torch.add, torch.sub}
_MULS = {operator.mul, torch.mul}


def _node_pow(node: fx.Node) -> int | None:
    name = getattr(node.target, "__name__", str(node.target))
    if name in ("pow", "__pow__") and len(node.args) > 1 and isinstance(node.args[1], int):
        return int(node.args[1])
    if name == "square":
        return 2
    return None


def _operands(node: fx.Node) -> list[fx.Node]:
    """Node arguments in order, duplicates kept (``x * x`` has two)."""
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), out.append)
    return out


@dataclass
class _Val:
    level: int
    pending: bool
    base: str


def _module_cost(mod: nn.Module, metric: str) -> int | None:
    """Cost of an existing privml.nn module (an activation approximated earlier)."""
    if metric == "rounds":
        degs = getattr(mod, "degrees", None)
        if degs is not None:  # CompositeRelu
            return sum(mpc_poly_cost(d)[0] for d in degs) + 1
        deg = getattr(mod, "degree", None)
        return mpc_poly_cost(deg)[0] if deg is not None else None
    depth = getattr(mod, "depth", None)
    return int(depth) if isinstance(depth, int) else None


def graph_cost(gm: fx.GraphModule, site_cost: dict[str, int], metric: str = "depth",
               refresh: frozenset[str] | set[str] = frozenset()) -> tuple[int, dict[str, int]]:
    """(total, per-node level) of ``gm`` when activation node ``n`` costs ``site_cost[n]``.

    ``metric="depth"``: CKKS levels with the backend's rules: a linear op (conv, linear, pooling,
    flatten, add/mul by a constant) stays pending and is fused with the next ones; it costs one
    level when a non-linear op (activation, product of two private values, addition of two
    different ciphertexts, the output) needs its value. ``metric="rounds"``: MPC rounds (linear
    ops free, a private product one round). Nodes in ``refresh`` restart at level 0 (an enclave
    refresh of their output).
    """
    from privml.compiler.plan import _node_cost

    lin = 1 if metric == "depth" else 0
    modules = dict(gm.named_modules())
    vals: dict[str, _Val | None] = {}
    levels: dict[str, int] = {}
    total = 0

    def mat(v: _Val) -> int:
        return v.level + (lin if v.pending else 0)

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            vals[node.name] = _Val(0, False, node.name)
            continue
        if node.op == "get_attr":
            vals[node.name] = None
            continue
        privs = [v for v in (vals.get(a.name) for a in _operands(node)) if v is not None]  # duplicates kept: x * x
        if node.op == "output":
            total = max([total] + [mat(v) for v in privs])
            continue
        if not privs:
            vals[node.name] = None
            continue
        first = privs[0]
        cost: int | None = None
        if node.name in site_cost:
            cost = site_cost[node.name]
        elif node.op == "call_module" and hasattr(modules[node.target], "source"):
            cost = _module_cost(modules[node.target], metric)
        if cost is not None:
            out = _Val(mat(first) + cost, False, node.name)
        else:
            _, kind, _ = _node_cost(node, modules)
            fn = node.target
            pw = _node_pow(node)
            if kind in ("reshape", "output"):
                out = _Val(first.level, first.pending, first.base)
            elif pw is not None:
                if pw > 1:
                    extra = (1 if pw == 2 else poly_depth(pw)) if metric == "depth" else mpc_poly_cost(pw)[0]
                    out = _Val(mat(first) + extra, False, node.name)
                else:
                    out = first
            elif getattr(fn, "__name__", "") == "polyval" or kind == "activation":
                deg = 0
                if len(node.args) > 1 and isinstance(node.args[1], (list, tuple)):
                    deg = max((i for i, c in enumerate(node.args[1]) if c), default=0)
                extra = poly_depth(deg) if metric == "depth" else mpc_poly_cost(deg)[0]
                out = _Val(mat(first) + extra, False, node.name)
            elif len(privs) >= 2 and (kind == "mul" or fn in _MULS or node.target in ("mul", "__mul__")):
                out = _Val(max(mat(v) for v in privs) + 1, False, node.name)
            elif len(privs) >= 2 and (kind == "add" or fn in _ADDS):
                if all(v.base == first.base and v.level == first.level for v in privs):
                    out = _Val(first.level, True, first.base)
                else:
                    out = _Val(max(mat(v) for v in privs), False, node.name)
            else:  # linear, or add/mul with a constant: fused into the pending map
                out = _Val(first.level, True, first.base)
        if node.name in refresh:
            out = _Val(0, False, node.name)
        vals[node.name] = out
        levels[node.name] = mat(out)  # a pending linear map is materialized sooner or later, at this level
        total = max(total, out.level)
    return total, levels


def place_refreshes(gm: fx.GraphModule, site_cost: dict[str, int], segment_depth: int) -> list[str]:
    """Fewest-first greedy enclave refresh points (activation outputs) keeping every level <= segment_depth.

    On a chain this is the classic greedy (refresh as late as possible), which is optimal.
    BudgetError when one segment cannot fit even with every earlier activation refreshed.
    """
    order = [n.name for n in gm.graph.nodes]
    pos = {name: i for i, name in enumerate(order)}
    nodes = {n.name: n for n in gm.graph.nodes}
    ancestors: dict[str, set[str]] = {}
    for n in gm.graph.nodes:
        acc: set[str] = set()
        for a in n.all_input_nodes:
            acc |= {a.name} | ancestors[a.name]
        ancestors[n.name] = acc
    refresh: set[str] = set()
    for _ in range(len(site_cost) + 1):
        total, levels = graph_cost(gm, site_cost, "depth", refresh)
        bad = [name for name in order if levels.get(name, 0) > segment_depth]
        if not bad and total <= segment_depth:
            return sorted(refresh, key=pos.__getitem__)
        where = bad[0] if bad else [n for n in order if nodes[n].op == "output"][0]
        options = [s for s in site_cost if s in ancestors[where] and s not in refresh]
        if not options:
            raise BudgetError(f"privml: '{where}' needs more than {segment_depth} levels even with an enclave refresh "
                              "after every earlier activation: raise the segment depth (refresh_depth=) or choose "
                              "cheaper approximations (looser max_error / accuracy_tolerance)")
        refresh.add(max(options, key=pos.__getitem__))
    raise BudgetError("privml: refresh placement did not converge")  # unreachable: each pass adds one refresh


# ---------------------------------------------------------------------------------------------------------------
# evaluating choices in clear

_EXACT: dict[str, Callable[..., torch.Tensor]] = {
    "relu": F.relu, "gelu": F.gelu, "silu": F.silu, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
    "softplus": F.softplus,
}


def exact_function(kind: str, params: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation ``kind`` in torch (what the approximations are measured against)."""
    if kind == "leaky_relu":
        slope = float(params.get("slope", 0.01))
        return lambda x: F.leaky_relu(x, slope)
    if kind not in _EXACT:
        raise InvalidInput(f"privml: no approximation for activation {kind!r}")
    return _EXACT[kind]


class _Slot(nn.Module):
    """Stand-in used while choosing: the exact activation, or the candidate under trial."""

    def __init__(self, exact: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.exact = exact
        self.approx: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.exact(x) if self.approx is None else self.approx(x)


class _Evaluator:
    """A copy of the graph with switchable activations, run in clear on fixed data (results cached)."""

    def __init__(self, gm: fx.GraphModule, sites: list[ActivationSite], x: torch.Tensor,
                 y: torch.Tensor | None) -> None:
        self.work = copy.deepcopy(gm).eval()
        nodes = {n.name: n for n in self.work.graph.nodes}  # deepcopy keeps node names
        self.slots: dict[str, _Slot] = {}
        for s in sites:
            slot = _Slot(exact_function(s.kind, s.params))
            replace_activation(self.work, dataclasses.replace(s, node=nodes[s.node.name]), slot)
            self.slots[s.node.name] = slot
        self.x, self.y = x, y
        self._modules: dict[tuple, nn.Module] = {}
        self._contrib: dict[tuple, float] = {}
        self._metric: dict[tuple, float] = {}
        self.sites = {s.node.name: s for s in sites}
        self.exact_logits = self.run({})

    def module(self, name: str, cand: Candidate) -> nn.Module:
        key = (name, cand.kind, cand.degrees, cand.eps)
        if key not in self._modules:
            self._modules[key] = cand.module(self.sites[name]) or _Slot(self.slots[name].exact)
        return self._modules[key]

    def run(self, assignment: dict[str, Candidate]) -> torch.Tensor:
        for name, slot in self.slots.items():
            cand = assignment.get(name)
            slot.approx = None if cand is None else self.module(name, cand)
        with torch.no_grad():
            out = self.work(self.x)
        for slot in self.slots.values():
            slot.approx = None
        return out

    def contribution(self, name: str, cand: Candidate) -> float:
        """Mean over samples of max |logit change| when only activation ``name`` is approximated by ``cand``."""
        key = (name, cand.kind, cand.degrees, cand.eps)
        if key not in self._contrib:
            diff = (self.run({name: cand}) - self.exact_logits).abs()
            self._contrib[key] = float(diff.reshape(diff.shape[0], -1).max(dim=1).values.mean())
        return self._contrib[key]

    def metric(self, assignment: dict[str, Candidate]) -> float:
        """How far the approximated model is from the goal: validation cross-entropy with labels, else the
        mean over samples of max |logit change| against the exact model."""
        key = tuple(sorted((n, c.kind, c.degrees, c.eps) for n, c in assignment.items()))
        if key not in self._metric:
            logits = self.run(assignment)
            if self.y is not None:
                self._metric[key] = float(F.cross_entropy(logits, self.y))
            else:
                diff = (logits - self.exact_logits).abs()
                self._metric[key] = float(diff.reshape(diff.shape[0], -1).max(dim=1).values.mean())
        return self._metric[key]

    def accuracy(self, assignment: dict[str, Candidate]) -> float:
        if self.y is None:
            raise InvalidInput("privml: accuracy needs labels: pass validation=(x, y)")
        logits = self.run(assignment)
        return float((logits.argmax(dim=1) == self.y).float().mean())


# ---------------------------------------------------------------------------------------------------------------
# the choice


@dataclass
class SiteChoice:
    """One activation: its frontier of candidates (``ladder``) and the index chosen."""

    site: ActivationSite
    ladder: list[Candidate]
    index: int = 0
    contribution: float | None = None

    @property
    def candidate(self) -> Candidate:
        return self.ladder[self.index]


@dataclass
class ChoiceResult:
    """What :func:`choose` decided, with the model-level costs and (if validation data was given) accuracy."""

    backend: str
    mode: str
    sites: list[SiteChoice]
    total_depth: int | None = None
    mpc_rounds: int | None = None
    refresh_points: list[str] = field(default_factory=list)
    levels: dict[str, int] = field(default_factory=dict)  # hybrid: running level per node, refreshes included
    accuracy: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    targets: dict[str, Any] = field(default_factory=dict)

    @property
    def assignment(self) -> dict[str, Candidate]:
        return {s.site.node.name: s.candidate for s in self.sites}

    @property
    def total_mults(self) -> int:
        return sum(s.candidate.mults for s in self.sites)

    @property
    def total_bytes(self) -> int:
        return sum(s.candidate.nbytes for s in self.sites)

    def cost(self) -> tuple[int, ...]:
        """The plan's cost key for its backend (see the module docstring); smaller is cheaper."""
        c = [s.candidate for s in self.sites]
        if self.backend == "mpc":
            return (self.mpc_rounds or 0, sum(x.rounds for x in c), self.total_bytes)
        if self.backend == "hybrid":
            return (len(self.refresh_points), sum(x.depth for x in c), self.total_mults)
        return (self.total_depth or 0, sum(x.depth for x in c), self.total_mults)

    def summary(self) -> dict[str, Any]:
        """JSON-safe plan-level record of the choice."""
        out: dict[str, Any] = {"mode": self.mode, "targets": self.targets, "cost_key": list(self.cost()),
                               "activation_ct_mults": self.total_mults, "steps": self.steps}
        if self.total_depth is not None:
            out["estimated_depth"] = self.total_depth
        if self.mpc_rounds is not None:
            out["mpc_activation_rounds"] = self.mpc_rounds
            out["mpc_activation_bytes_per_element"] = self.total_bytes
        if self.backend == "hybrid":
            out["refresh_points"] = list(self.refresh_points)
        return out


def _check_validation(validation: Any, input_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(validation, (tuple, list)) or len(validation) != 2:
        raise InvalidInput("privml: validation must be a pair (x, y) of tensors: inputs and integer class labels")
    x, y = validation
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise InvalidInput("privml: validation must be a pair (x, y) of tensors: inputs and integer class labels")
    if x.dim() != len(input_shape) + 1 or tuple(x.shape[1:]) != tuple(input_shape) or x.shape[0] == 0:
        raise InvalidInput(f"privml: validation inputs have shape {tuple(x.shape)}; the model expects (batch, "
                           f"{', '.join(map(str, input_shape))}) with batch >= 1")
    if not x.is_floating_point() or not torch.isfinite(x).all():
        raise InvalidInput("privml: validation inputs must be finite floating-point values")
    if y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point():
        raise InvalidInput(f"privml: validation labels must be a 1-D integer tensor of {x.shape[0]} class indices, "
                           f"got shape {tuple(y.shape)} dtype {y.dtype}")
    return x, y


def _positive(name: str, value: Any, integer: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"privml: {name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (integer and v != int(v)):
        raise InvalidInput(f"privml: {name} must be a finite non-negative {'integer' if integer else 'number'}, "
                           f"got {value!r}")
    return v


def _depth_cap(stats: dict[str, RangeStats], precision_bits: int, poly_modulus_degree: int | None) -> int:
    """Deepest CKKS chain at 128-bit security for these values (what plan_ckks can still give)."""
    from privml.compiler.he_plan import HEADROOM
    from privml.he.params import HE_STANDARD_128, max_depth

    max_abs = max((st.abs_max for st in stats.values()), default=1.0) * HEADROOM
    n = poly_modulus_degree or max(HE_STANDARD_128)
    return max(0, max_depth(precision_bits, max(max_abs, 1e-6), n))


def _next_index(c: SiteChoice, backend: str, within: bool) -> int | None:
    """Index of ``c``'s next raise: with ``within``, the most accurate candidate at the same cost level first (free
    in depth); then the most accurate one a level up (e.g. the best polynomial one level deeper)."""
    here = c.candidate.cost(backend)[0]
    same = [i for i in range(c.index + 1, len(c.ladder)) if c.ladder[i].cost(backend)[0] == here]
    if same and within:
        return same[-1]
    above = [i for i in range(c.index + 1, len(c.ladder)) if c.ladder[i].cost(backend)[0] > here]
    if not above:
        return None
    level = c.ladder[above[0]].cost(backend)[0]
    return max(i for i in above if c.ladder[i].cost(backend)[0] == level)


def choose(gm: fx.GraphModule, stats: dict[str, RangeStats], backend: str, calibration: torch.Tensor, *,
           max_error: float | None = None, accuracy_tolerance: float | None = None,
           validation: tuple[torch.Tensor, torch.Tensor] | None = None, depth_budget: int | None = None,
           degree: int | None = None, margin: float = 0.1, percentile: Any = None, precision_bits: int = 20,
           poly_modulus_degree: int | None = None, refresh_depth: int | None = None,
           max_degree: int = MAX_DIRECT_DEGREE, composites: bool = True) -> ChoiceResult:
    """Pick an approximation for every activation of ``gm`` (see the module docstring); ``gm`` is not modified.

    ``calibration`` (a batch of inputs) measures each activation's effect when no validation
    data is given. ``percentile``: True for (0.1, 99.9), or (low, high) in percent.
    ``refresh_depth`` (hybrid): most levels between two enclave refreshes.
    BudgetError when a target cannot be met, saying the best reached and what to change.
    """
    if backend not in BACKEND_COSTS:
        raise InvalidInput(f"privml: unknown backend {backend!r}; choose one of {BACKEND_COSTS}")
    if degree is not None and any(v is not None for v in (max_error, accuracy_tolerance, depth_budget)):
        raise InvalidInput("privml: degree= fixes every polynomial's degree; it cannot be combined with max_error, "
                           "accuracy_tolerance or depth_budget (drop degree= to let the pass choose)")
    if max_error is not None and _positive("max_error", max_error) == 0:
        raise InvalidInput("privml: max_error must be > 0 (no polynomial is exact on an interval)")
    if accuracy_tolerance is not None:
        _positive("accuracy_tolerance", accuracy_tolerance)
        if validation is None:
            raise InvalidInput("privml: accuracy_tolerance needs validation=(x, y): labelled inputs on which the "
                               "approximated model's accuracy is compared with the original's")
    if depth_budget is not None:
        _positive("depth_budget", depth_budget, integer=True)
        if backend == "mpc":
            raise InvalidInput("privml: depth_budget is a CKKS budget; for mpc use max_error or accuracy_tolerance")
    input_shape = tuple(calibration.shape[1:])
    val = _check_validation(validation, input_shape) if validation is not None else None
    if percentile is True:
        from privml.compiler.calibrate import PERCENTILES

        percentile = PERCENTILES
    sites = find_activations(gm, stats, margin, percentile=percentile)
    mode = ("fixed_degree" if degree is not None else "accuracy_tolerance" if accuracy_tolerance is not None
            else "max_error" if max_error is not None else "depth_budget" if depth_budget is not None else "default")
    targets = {k: v for k, v in (("max_error", max_error), ("accuracy_tolerance", accuracy_tolerance),
                                 ("depth_budget", depth_budget), ("degree", degree)) if v is not None}
    result = ChoiceResult(backend, mode, [], targets=targets)
    if not sites:
        return result

    choices = []
    for s in sites:
        if degree is not None:
            from privml.approx.fit import fit_activation

            d = int(_positive("degree", degree, integer=True))
            if not 1 <= d <= 63:
                raise InvalidInput(f"privml: degree must be in [1, 63], got {degree}")
            p = fit_activation(s.kind, s.lo, s.hi, d, "remez", **s.params)
            ladder = [_poly_candidate(p, backend, _numeric_unit(backend, precision_bits))]
        else:
            ladder = frontier(candidates(s.kind, s.lo, s.hi, s.params, backend, precision_bits, max_degree,
                                         composites), backend)
        choices.append(SiteChoice(s, ladder))
    result.sites = choices

    if max_error is not None:
        for c in choices:
            i = cheapest_within(c.ladder, float(max_error))
            if i is None:
                best = min(c.ladder, key=lambda k: k.total_err)
                raise BudgetError(f"privml: no approximation of {c.site.kind} at '{c.site.label}' on "
                                  f"[{c.site.lo:.4g}, {c.site.hi:.4g}] reaches max_error={max_error:g} (best "
                                  f"{best.total_err:.3g}, {best.label()}); loosen max_error, narrow the interval "
                                  "(percentile=, smaller margin=) or raise precision_bits")
            c.index = i

    # the cost of an assignment on the graph
    segment = None
    if backend == "hybrid":
        segment = int(refresh_depth if refresh_depth is not None else depth_budget if depth_budget is not None
                      else _depth_cap(stats, precision_bits, 16384))

    def depths(chs: list[SiteChoice]) -> dict[str, int]:
        return {c.site.node.name: c.candidate.depth for c in chs}

    def measure(chs: list[SiteChoice]) -> None:
        if backend == "mpc":
            result.mpc_rounds = graph_cost(gm, {c.site.node.name: c.candidate.rounds for c in chs}, "rounds")[0]
            return
        result.total_depth = graph_cost(gm, depths(chs), "depth")[0]
        if segment is not None:
            result.refresh_points = place_refreshes(gm, depths(chs), segment)
            result.levels = graph_cost(gm, depths(chs), "depth", set(result.refresh_points))[1]

    cap: int | None = None
    cap_why = ""
    if backend == "ckks":
        cap = int(depth_budget) if depth_budget is not None else _depth_cap(stats, precision_bits,
                                                                            poly_modulus_degree)
        cap_why = ("depth_budget" if depth_budget is not None else
                   "the deepest CKKS chain at 128-bit security" + (f" for N={poly_modulus_degree}"
                                                                   if poly_modulus_degree else ""))
    elif backend == "hybrid":
        cap, cap_why = segment, "the depth between two enclave refreshes (refresh_depth)"

    def fits(chs: list[SiteChoice]) -> bool:
        if backend == "hybrid":
            try:
                place_refreshes(gm, depths(chs), int(segment or 0))
            except BudgetError:
                return False
            return True
        return cap is None or graph_cost(gm, depths(chs), "depth")[0] <= cap

    if not fits(choices):
        what = ("the approximations meeting max_error" if max_error is not None else
                f"degree-{degree} polynomials" if degree is not None else "even the cheapest approximations")
        hint = ("loosen max_error, " if max_error is not None else "lower degree=, " if degree is not None else "")
        need = graph_cost(gm, depths(choices), "depth")[0]
        raise BudgetError(f"privml: {what} need depth {need} but {cap_why} is {cap}: {hint}raise "
                          "depth_budget, use fewer activations, or use backend='hybrid' (enclave refreshes)")

    data_x = val[0] if val is not None else calibration[:512]
    needs_eval = degree is None and (accuracy_tolerance is not None or (depth_budget is not None and max_error is None))
    ev = _Evaluator(gm, sites, data_x, val[1] if val is not None else None) if (needs_eval or val is not None) else None

    def raise_once(within: bool) -> bool:
        """Raise the activation whose next level lowers the model's error most per level of depth it adds.

        Measured on the reference models, raising straight to the best candidate one level up and trimming
        afterwards ends at less depth than taking the free same-level raises first (``within``), which
        the depth-budget mode does since it keeps whatever fits."""
        assert ev is not None
        now = ev.metric(result.assignment)
        depth_now = graph_cost(gm, depths(choices), "depth")[0] if backend != "mpc" else 0
        best: tuple[float, int, int] | None = None
        for i, c in enumerate(choices):
            old, nxt = c.index, _next_index(c, backend, within)
            if nxt is None:
                continue
            c.index = nxt
            if fits(choices):
                if backend == "mpc":
                    added = c.ladder[nxt].rounds - c.ladder[old].rounds
                else:
                    added = graph_cost(gm, depths(choices), "depth")[0] - depth_now
                score = (now - ev.metric(result.assignment)) / max(added, 1)
                if best is None or score > best[0]:
                    best = (score, i, nxt)
            c.index = old
        if best is None:
            return False
        choices[best[1]].index = best[2]
        result.steps += 1
        return True

    def trim(ok: Callable[[], bool]) -> None:
        """Step every activation down its ladder (cheaper) while the target still holds, least effect first."""
        assert ev is not None
        for c in choices:
            c.contribution = ev.contribution(c.site.node.name, c.candidate)
        order = sorted(range(len(choices)), key=lambda i: (choices[i].contribution or 0.0, i))
        for i in order:
            c = choices[i]
            while c.index > 0:
                c.index -= 1
                if not ok():
                    c.index += 1
                    break
                result.steps += 1

    if accuracy_tolerance is not None:
        assert ev is not None
        base = ev.accuracy({})

        def met() -> bool:
            return base - ev.accuracy(result.assignment) <= float(accuracy_tolerance)

        floor = [c.index for c in choices]  # max_error's choice, if given, is the floor
        while not met():
            if not raise_once(within=False):
                acc = ev.accuracy(result.assignment)
                limit = f" within {cap_why} {cap}" if cap is not None else ""
                raise BudgetError(f"privml: the approximated model reaches accuracy {acc:.4f} against {base:.4f} for "
                                  f"the original (drop {base - acc:.4f} > accuracy_tolerance {accuracy_tolerance})"
                                  f" with the most accurate approximations available{limit}: raise "
                                  "accuracy_tolerance or depth_budget, recalibrate on tighter ranges (percentile=), "
                                  "fine-tune the compiled model (privml.train.finetune), or use backend='hybrid'")
        trim(lambda: met() and all(c.index >= f for c, f in zip(choices, floor, strict=True)))
    elif depth_budget is not None and max_error is None and degree is None:
        while raise_once(within=True):
            pass
    measure(choices)
    if ev is not None:
        for c in choices:
            c.contribution = ev.contribution(c.site.node.name, c.candidate)
        if ev.y is not None:
            base = ev.accuracy({})
            acc = ev.accuracy(result.assignment)
            result.accuracy = {"original": base, "approximated": acc, "drop": base - acc,
                               "samples": float(ev.x.shape[0])}
    return result


# ---------------------------------------------------------------------------------------------------------------
# applying the choice and recording it in the plan


def apply_choice(gm: fx.GraphModule, result: ChoiceResult, trainable: bool = False) -> tuple[list[str], dict[str, str]]:
    """Swap the chosen modules into ``gm``. Returns (descriptions for the plan's fixes, site node -> new node)."""
    done, names = [], {}
    for c in result.sites:
        cand, site = c.candidate, c.site
        mod = cand.module(site, trainable=trainable)
        if mod is None:
            names[site.node.name] = site.node.name
            done.append(f"{site.label}: {site.kind} kept exact on MPC ({MPC_RELU_ROUNDS} rounds)")
            continue
        names[site.node.name] = replace_activation(gm, site, mod)
        done.append(f"{site.label}: {site.kind} -> {cand.label()} on [{site.lo:.3g}, {site.hi:.3g}] "
                    f"(max err {cand.total_err:.3g}, depth {cand.depth})")
    return done, names


def annotate_plan(plan: Any, result: ChoiceResult, names: dict[str, str]) -> None:
    """Record every choice in its plan row (approx, degree, coefficients, error, cost) and the plan-level summary."""
    by_node = {lp.node: lp for lp in plan.layers}
    for c in result.sites:
        row = by_node.get(names.get(c.site.node.name, c.site.node.name))
        if row is None:
            continue
        cand, site = c.candidate, c.site
        row.approx = f"{site.kind} ~ {cand.label()} on [{site.lo:.3g}, {site.hi:.3g}]"
        row.degree = cand.degree
        row.coeffs = [float(v) for v in cand.approx.power_coeffs()] if cand.kind == "poly" else None
        row.est_error = cand.total_err
        if result.backend != "mpc":
            row.depth = cand.depth
        row.cost = {"ckks_depth": cand.depth, "ct_mults": cand.mults, "mpc_rounds": cand.rounds,
                    "mpc_bytes_per_element": cand.nbytes, "logit_effect": c.contribution,
                    "refresh_after": site.node.name in result.refresh_points}
        row.spec = {**cand.spec(), "interval": [site.lo, site.hi], "source": site.kind}
    if not result.sites:
        return  # nothing was approximated (e.g. a model compiled again after fine-tuning)
    plan.params["approximation"] = result.summary()
    if result.backend == "hybrid":
        old_name = {new: old for old, new in names.items()}
        for row in plan.layers:
            level = result.levels.get(old_name.get(row.node, row.node))
            if level is not None:
                row.level = level
        refreshed = {names.get(n, n) for n in result.refresh_points}
        plan.params["refresh_points"] = [row.name for row in plan.layers if row.node in refreshed]
        plan.params["segment_depth"] = max((row.level or 0 for row in plan.layers), default=0)
        plan.params["approximation"]["refresh_points"] = plan.params["refresh_points"]
    if result.accuracy:
        plan.predicted.update({"accuracy_original": result.accuracy["original"],
                               "accuracy_approx": result.accuracy["approximated"],
                               "accuracy_drop": result.accuracy["drop"]})


def interval_notes(gm: fx.GraphModule, plan: Any) -> None:
    """Add a plan note for every polynomial activation whose calibrated input leaves its fitted interval.

    Happens with models fine-tuned after approximation, or with percentile intervals: outside
    the interval the polynomial is not an approximation any more.
    """
    from privml.nn import APPROX_MODULES

    modules = dict(gm.named_modules())
    for row in plan.layers:
        node = next((n for n in gm.graph.nodes if n.name == row.node), None)
        mod = modules.get(node.target) if node is not None and node.op == "call_module" else None
        if not isinstance(mod, APPROX_MODULES) or row.in_range is None:
            continue
        (lo, hi), (a, b) = row.in_range, mod.interval
        if lo < a or hi > b:
            plan.notes.append(f"{row.name}: calibrated inputs span [{lo:.4g}, {hi:.4g}] but its polynomial holds on "
                              f"[{a:.4g}, {b:.4g}]; recompile from the original model or fine-tune with a range "
                              "penalty (privml.train.finetune)")


def simulated_accuracy(gm: fx.GraphModule, x: torch.Tensor, y: torch.Tensor, noise_std: float,
                       seed: int = 0) -> float:
    """Accuracy of the approximated model on the plain backend with its CKKS-noise simulation (Gaussian noise
    of ``noise_std`` after every arithmetic op); a cheap check that the planned precision leaves the argmax alone."""
    from privml.backends.plain import PlainBackend, Simulation
    from privml.tensor import PrivateTensor, module_scope

    backend = PlainBackend(Simulation("ckks", ckks_noise_std=float(noise_std), seed=seed))
    with module_scope(gm), torch.no_grad():
        out = gm(backend.encrypt(x))
    logits = backend.decrypt(out.finalize() if isinstance(out, PrivateTensor) else out)
    return float((logits.argmax(dim=1) == y).float().mean())

