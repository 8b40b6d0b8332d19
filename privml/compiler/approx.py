"""Find the activations of a captured graph, their calibrated intervals, and swap in approximations.

Works on the captured graph, so both activation modules (``nn.ReLU``) and
functional calls inside ``forward`` (``F.relu``) are found and replaced. Which
approximation each activation gets is decided in :mod:`privml.compiler.choose`;
:func:`approximate_activations` is the fixed-degree special case.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from privml.approx.activations import ACTIVATIONS
from privml.compiler.calibrate import RangeStats
from privml.compiler.capture import node_label, node_spec
from privml.errors import CalibrationError, InvalidInput
from privml.nn import PolyActivation


@dataclass
class ActivationSite:
    """One activation in the graph with its calibrated input interval."""

    node: fx.Node
    label: str
    kind: str
    params: dict
    lo: float
    hi: float


def _arg(node: fx.Node, index: int, name: str, default: float) -> float:
    if name in node.kwargs:
        return float(node.kwargs[name])
    return float(node.args[index]) if len(node.args) > index else default


def _params(kind: str, node: fx.Node, mod: nn.Module | None) -> dict:
    """The activation's parameters, from its module or its call's arguments."""
    if kind == "leaky_relu":
        return {"slope": float(mod.negative_slope) if mod is not None else _arg(node, 1, "negative_slope", 0.01)}
    if kind == "elu":
        return {"alpha": float(mod.alpha) if mod is not None else _arg(node, 1, "alpha", 1.0)}
    if kind == "hardtanh":
        if mod is not None:
            return {"lo": float(mod.min_val), "hi": float(mod.max_val)}
        if node.target is F.relu6:
            return {"lo": 0.0, "hi": 6.0}
        return {"lo": _arg(node, 1, "min_val", -1.0), "hi": _arg(node, 2, "max_val", 1.0)}
    if kind == "softplus":
        beta = float(mod.beta) if mod is not None else _arg(node, 1, "beta", 1.0)
        if beta != 1.0:
            raise InvalidInput(f"privml: softplus with beta={beta} at '{node_label(node)}' cannot be approximated "
                               "yet (only beta=1)")
    return {}


def _kind_of(node: fx.Node, modules: dict[str, nn.Module], backend: str, every: bool = False
             ) -> tuple[str, dict] | None:
    """(activation name, parameters) when the registry leaves this node to the compiler on ``backend``
    (``every``: any activation privml can fit, e.g. to let a budget trade MPC's exact ReLU for a polynomial)."""
    mod = modules[node.target] if node.op == "call_module" else None
    spec = node_spec(node, modules)
    if spec is None or spec.kind != "activation" or spec.name not in ACTIVATIONS:
        return None
    if not every and spec.how(backend) != "approx":
        return None
    return spec.name, _params(spec.name, node, mod)


def needs_approximation(gm: fx.GraphModule, backend: str) -> bool:
    """True if some activation of ``gm`` has no exact protocol on ``backend`` (the registry says "approx")."""
    modules = dict(gm.named_modules())
    return any(_kind_of(node, modules, backend) is not None for node in gm.graph.nodes)


def find_activations(gm: fx.GraphModule, stats: dict[str, RangeStats], margin: float = 0.1,
                     percentile: tuple[float, float] | None = None, backend: str = "ckks",
                     every: bool = False) -> list[ActivationSite]:
    """Every activation the registry leaves to the compiler on ``backend`` (all non-polynomial ones on CKKS;
    those without an exact protocol on MPC), with its input interval widened by ``margin`` of its width.

    The interval is the calibrated [min, max] of the activation's input, or with ``percentile``
    = (low, high) (in percent, e.g. (0.1, 99.9)) those percentiles of it: tighter, so a cheaper
    polynomial fits, at the price of rare inputs outside the interval (counted by the modules).
    """
    if margin < 0 or not math.isfinite(margin):
        raise InvalidInput(f"privml: margin must be a finite number >= 0, got {margin!r}")
    if percentile is not None:
        qs = tuple(float(q) for q in percentile)
        if len(qs) != 2 or not 0.0 <= qs[0] < qs[1] <= 100.0:
            raise InvalidInput(f"privml: percentile must be (low, high) with 0 <= low < high <= 100, got {percentile}")
    modules = dict(gm.named_modules())
    sites = []
    for node in gm.graph.nodes:
        found = _kind_of(node, modules, backend, every)
        if found is None:
            continue
        src = node.args[0]
        st = stats.get(src.name) if isinstance(src, fx.Node) else None
        label = node_label(node)
        if st is None:
            raise CalibrationError(f"privml: no calibrated range for the input of activation '{label}'")
        lo, hi = st.lo, st.hi
        if percentile is not None and math.isfinite(lo) and math.isfinite(hi):
            lo, hi = st.percentiles(qs)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise CalibrationError(f"privml: activation '{label}' has a non-finite calibrated range [{lo}, {hi}]: "
                                   "calibrate with finite data, or fix the layer producing inf/NaN")
        width = hi - lo
        if width <= 1e-9 * max(1.0, abs(hi)):
            raise CalibrationError(f"privml: activation '{label}' saw a constant input ({lo:.4g}) on the "
                                   "calibration data: the interval is degenerate. Calibrate with more varied data"
                                   + (" or a wider percentile range." if percentile is not None else "."))
        sites.append(ActivationSite(node, label, found[0], found[1], lo - margin * width, hi + margin * width))
    return sites


def replace_activation(gm: fx.GraphModule, site: ActivationSite, module: nn.Module) -> str:
    """Put ``module`` in place of ``site``; returns the name of the graph node that now calls it."""
    return replace_node(gm, site.node, module)


def replace_node(gm: fx.GraphModule, node: fx.Node, module: nn.Module, prefix: str = "privml_poly") -> str:
    """Put ``module`` in place of the op ``node`` calls (module swap, or a new submodule for a functional call).

    The input is the node's first argument. Returns the name of the graph node that now calls ``module``.
    """
    if node.op == "call_module":
        parent, _, attr = str(node.target).rpartition(".")
        # a module object can be called at several sites (torchvision's ResNet reuses `relu`): give each its own
        name = f"{attr}_poly_{node.name}" if _call_count(gm, node.target) > 1 else attr
        setattr(gm.get_submodule(parent) if parent else gm, name, module)
        node.target = f"{parent}.{name}" if parent else name
        new = node
    else:
        name = f"{prefix}_{node.name}"
        gm.add_submodule(name, module)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return new.name


def _call_count(gm: fx.GraphModule, target: object) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == target)


def approximate_activations(gm: fx.GraphModule, stats: dict[str, RangeStats], degree: int = 4,
                            margin: float = 0.1, method: str = "remez") -> list[str]:
    """Replace every activation by a degree-``degree`` fit on its calibrated interval; returns what was done.

    The fixed-degree special case; ``privml.compile`` goes through :func:`privml.compiler.choose.choose`.
    """
    from privml.approx.fit import fit_activation

    done = []
    for site in find_activations(gm, stats, margin):
        poly = fit_activation(site.kind, site.lo, site.hi, degree, method=method, **site.params)
        module = PolyActivation(poly.power_coeffs(), (site.lo, site.hi), source=site.kind)
        replace_activation(gm, site, module)
        err = poly.err if poly.err is not None else float("nan")
        done.append(f"{site.label}: {site.kind} -> degree-{module.degree} polynomial on "
                    f"[{site.lo:.3g}, {site.hi:.3g}] (max err {err:.3g})")
    return done


