"""Costs of approximations on each backend: CKKS levels and products, MPC rounds and bytes, whole-graph depth.

Cost model (lexicographic, cheapest first; :meth:`privml.compiler.search.ChoiceResult.cost`)
    ckks:   (total depth, sum of the activations' depths, ciphertext products). Depth decides
            the ring dimension and the chain, so it comes first; the sum makes the order
            monotone in every activation's depth even off the critical path.
    mpc:    (rounds on the critical path, sum of activation rounds, bytes per element).
    hybrid: (enclave refreshes, sum of activation depths, ciphertext products): a refresh
            (one round trip to the key holder) resets the level, so it buys depth.
An activation's depth is what the CKKS backend spends on it (``privml.approx.basis.poly_depth``
per polynomial, + 1 for the product with x of a sign-based ReLU); linear layers cost one level
each, fused when consecutive. :func:`graph_cost` walks the captured graph with those rules; a
test checks it against the backend's dry run.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from privml.approx.basis import poly_depth, square_form
from privml.compiler.calibrate import RangeStats
from privml.compiler.plan import _node_cost
from privml.errors import BudgetError
from privml.parties.fixed_point import FRAC_BITS

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
MPC_FRAC_BITS = FRAC_BITS  # CrypTen's fixed point, declared once in privml.parties.fixed_point


def mpc_poly_cost(degree: int) -> tuple[int, int]:
    """(rounds, bytes per element) of ``polyval`` of degree d on the MPC backend (all powers, batched by round)."""
    rounds, nbytes, top = 0, 0, 1
    while top < degree:
        new = min(2 * top, degree)
        nbytes += MPC_SQUARE_BYTES if new - top == 1 and top == new - top else MPC_PRODUCT_BYTES * (new - top)
        rounds += 1
        top = new
    return rounds, nbytes


# CKKS time per ciphertext op, measured on this machine (2 cores, SEAL via TenSEAL, one thread): a rotation (key
# switch) at N=8192 with 8 data primes 11.6 ms (N=16384: 31.6 ms with 9 primes, 12.3 ms with 5; N=8192 with 3:
# 2.5 ms), so ~ N x primes^1.6; a ciphertext x plaintext product 0.59 ms at N=8192 with 8 primes, ~ N x primes.
FUSION_MARGIN = 0.9  # apply two linear maps apart only when that is predicted at least 10% faster than fused
CKKS_HEADROOM = 2.0  # CKKS plans multiply the largest calibrated |value| by this before sizing the first prime
ROTATION_S = 11.6e-3 / (8192 * 8**1.6)
PT_MULT_S = 0.59e-3 / (8192 * 8)


def ckks_seconds(poly_modulus_degree: int, work: dict[int, tuple[float, float]]) -> float:
    """Predicted seconds of a forward pass's linear work: ``work`` maps the data primes a ciphertext has when
    the work is done (its level + 1) to (key switches, ciphertext x plaintext products) done there."""
    n = poly_modulus_degree
    return sum((ks * ROTATION_S * p**1.6 + prod * PT_MULT_S * p) * n for p, (ks, prod) in work.items() if p > 0)


def level_work(rotations_at: dict[int, int], products_at: dict[int, int], key_switches: int,
               primes: Any) -> dict[int, tuple[float, float]]:
    """``ckks_seconds``'s work from a dry run's rotations and products per level key (``primes(key)``: the data
    primes there); ``key_switches`` (compositions counted) is spread over the levels like the rotations."""
    per_rotation = key_switches / max(1, sum(rotations_at.values()))
    work: dict[int, tuple[float, float]] = {}
    for key in set(rotations_at) | set(products_at):
        p = primes(key)
        ks, prod = work.get(p, (0.0, 0.0))
        work[p] = (ks + rotations_at.get(key, 0) * per_rotation, prod + products_at.get(key, 0))
    return work


def ckks_mults(coeffs: np.ndarray) -> int:
    """Ciphertext products of the CKKS backend's polynomial schedule (privml.he.kernels.poly_mult_count)."""
    from privml.he.kernels import poly_mult_count

    return int(poly_mult_count([float(c) for c in coeffs]))


def numeric_unit(backend: str, precision_bits: int) -> float:
    """Arithmetic precision of ``backend`` (CKKS: 2^-precision_bits, MPC: its fixed point, plain: exact)."""
    if backend in ("ckks", "hybrid"):
        return 2.0 ** -precision_bits
    if backend == "mpc":
        return 2.0 ** -MPC_FRAC_BITS
    return 0.0


def depth_cap(stats: dict[str, RangeStats], precision_bits: int, poly_modulus_degree: int | None) -> int:
    """Deepest CKKS chain at 128-bit security for these values (what plan_ckks can still give)."""
    from privml.he.params import HE_STANDARD_128, max_depth

    max_abs = max((st.abs_max for st in stats.values()), default=1.0) * CKKS_HEADROOM
    n = poly_modulus_degree or max(HE_STANDARD_128)
    return max(0, max_depth(precision_bits, max(max_abs, 1e-6), n))


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


def is_square_form(mod: nn.Module) -> bool:
    """A privml.nn polynomial activation of degree 2 that the CKKS backend evaluates as one square."""
    coeffs = getattr(mod, "coefficient_list", None)
    return getattr(mod, "degree", None) == 2 and coeffs is not None and square_form(coeffs()) is not None


def graph_cost(gm: fx.GraphModule, site_cost: dict[str, int], metric: str = "depth",
               refresh: frozenset[str] | set[str] = frozenset(),
               quadratic: frozenset[str] | set[str] = frozenset()) -> tuple[int, dict[str, int]]:
    """(total, per-node level) of ``gm`` when activation node ``n`` costs ``site_cost[n]``.

    ``metric="depth"``: CKKS levels with the backend's rules: a linear op (conv, linear, pooling,
    flatten, add/mul by a constant) stays pending and is fused with the next ones; it costs one
    level when a non-linear op (activation, product of two private values, addition of two
    different ciphertexts, the output) needs its value. A degree-2 activation on a pending map (sites in
    ``quadratic``, and privml.nn modules that :func:`is_square_form`) is one square, its output pending
    (:func:`privml.approx.basis.square_form`). ``metric="rounds"``: MPC rounds (linear
    ops free, a private product one round). Nodes in ``refresh`` restart at level 0 (an enclave
    refresh of their output).
    """
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
        square = node.name in quadratic
        if node.name in site_cost:
            cost = site_cost[node.name]
        elif node.op == "call_module" and hasattr(modules[node.target], "source"):
            cost = _module_cost(modules[node.target], metric)
            square = is_square_form(modules[node.target])
        if cost is not None and square and metric == "depth" and first.pending:
            out = _Val(mat(first) + 1, True, node.name)
        elif cost is not None:
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
                coeffs = node.args[1] if len(node.args) > 1 and isinstance(node.args[1], (list, tuple)) else None
                if coeffs is not None:
                    deg = max((i for i, c in enumerate(coeffs) if c), default=0)
                domain = node.kwargs.get("domain", node.args[2] if len(node.args) > 2 else None)
                if (metric == "depth" and first.pending and domain is not None and coeffs is not None
                        and all(isinstance(c, (int, float)) for c in coeffs) and square_form(coeffs) is not None):
                    out = _Val(mat(first) + 1, True, node.name)
                else:
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
# MPC: a whole request's rounds and bytes, and its predicted seconds on a link (network-aware planning).
# Measured per request on this machine (privml.backends.mpc costs(), 2 parties, TFP): a linear layer with shared
# weights is one Beaver product, opening epsilon (the input) and delta (the weights): 16 bytes per input value and
# per weight; opening the output: one round, 8 bytes per value; sharing the input: local (0 rounds).
MPC_LINEAR_BYTES = 16
MPC_OPEN_BYTES = 8
# Seconds of a 2-party request, least-squares fitted on this machine to 16 runs of experiments/bench/mpc_links.py
# (the digits CNN with exact ReLU and with polynomials, the breast-cancer MLP; each party in its own namespace on
# an unshaped, 1000, 100 and 20 Mbit/s veth link): 3.8 ms per round (CrypTen's Python, gloo's synchronisation),
# 58 ns per byte counted (the arithmetic and serialisation of those values), and 0.71 of each party's counted bytes
# waiting on its shaped egress (both parties send at once, and part of the sending overlaps local work).
# The bench prints the plan's prediction next to each measurement.
MPC_ROUND_SECONDS = 3.8e-3
MPC_BYTE_SECONDS = 5.8e-8
MPC_WIRE_FACTOR = 0.71
LINEAR_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _mpc_node_cost(node: fx.Node, modules: dict[str, nn.Module], stats: dict[str, RangeStats],
                   batch: int) -> tuple[int, int]:
    """(rounds, bytes) one node costs a 2-party request of ``batch`` samples (0, 0 for local ops)."""
    from privml.nn.poly import CompositeRelu, PolyActivation

    out = stats.get(node.name)
    elems = int(np.prod(out.shape)) * batch if out is not None and out.shape else 0
    if node.op == "call_module":
        mod = modules[str(node.target)]
        if isinstance(mod, LINEAR_MODULES):
            src = stats.get(node.all_input_nodes[0].name) if node.all_input_nodes else None
            inputs = int(np.prod(src.shape)) * batch if src is not None and src.shape else 0
            return 1, MPC_LINEAR_BYTES * (inputs + mod.weight.numel())
        if isinstance(mod, (nn.ReLU, nn.LeakyReLU)):
            return MPC_RELU_ROUNDS, MPC_RELU_BYTES * elems
        if isinstance(mod, PolyActivation):
            rounds, per = mpc_poly_cost(mod.degree)
            return rounds, per * elems
        if isinstance(mod, CompositeRelu):
            costs = [mpc_poly_cost(d) for d in mod.degrees]
            return sum(c[0] for c in costs) + 1, (sum(c[1] for c in costs) + MPC_PRODUCT_BYTES) * elems
        return 0, 0
    if node.op == "call_function" and getattr(node.target, "__name__", "") in ("relu", "relu_"):
        return MPC_RELU_ROUNDS, MPC_RELU_BYTES * elems
    return 0, 0


def mpc_request_cost(gm: fx.GraphModule, stats: dict[str, RangeStats], batch: int = 1,
                     parties: int = 2) -> dict[str, int]:
    """Rounds on the critical path and whole-system bytes of one MPC request of ``batch`` samples.

    Every opened value is sent by each party to every other, so bytes grow with parties * (parties - 1)."""
    modules = dict(gm.named_modules())
    depth: dict[str, int] = {}
    total_bytes = 0
    rounds = 0
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            depth[node.name] = 0
            continue
        before = max((depth.get(a.name, 0) for a in node.all_input_nodes), default=0)
        if node.op == "output":
            src = node.args[0] if isinstance(node.args[0], fx.Node) else None
            st = stats.get(src.name) if src is not None else None
            total_bytes += MPC_OPEN_BYTES * (int(np.prod(st.shape)) * batch if st is not None and st.shape else 0)
            rounds = before + 1
            continue
        r, b = _mpc_node_cost(node, modules, stats, batch)
        depth[node.name] = before + r
        total_bytes += b
    scale = parties * (parties - 1) / 2
    return {"rounds": rounds, "bytes": int(total_bytes * scale)}


def mpc_seconds(rounds: int, nbytes: float, delay_ms: float = 0.0, rate_mbit: float | None = None,
                parties: int = 2) -> float:
    """Predicted seconds of an MPC request on a link: local costs (per round, per byte), a round trip
    (2 x one-way delay) per round, and each party's share of the bytes over the bandwidth."""
    wire = MPC_WIRE_FACTOR * nbytes / parties * 8 / (rate_mbit * 1e6) if rate_mbit else 0.0
    return rounds * (MPC_ROUND_SECONDS + 2 * delay_ms / 1e3) + nbytes * MPC_BYTE_SECONDS + wire


# Links the plan predicts a request's latency on (name, one-way delay ms, Mbit/s; None: unshaped loopback)
PLAN_LINKS = (("loopback", 0.0, None), ("LAN 0.2 ms, 1 Gbit/s", 0.2, 1000.0), ("WAN 10 ms, 100 Mbit/s", 10.0, 100.0),
              ("WAN 50 ms, 100 Mbit/s", 50.0, 100.0))
