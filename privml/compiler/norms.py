"""LayerNorm on backends that approximate it (CKKS): calibrate the variance, fit 1/sqrt, swap in PolyLayerNorm.

The inverse square root is a minimax polynomial on the calibrated range of variance + eps (widened by
``margin``), refined by Newton steps when the range is wide; the pair (degree, steps) of least CKKS depth
whose relative error max |y(v) sqrt(v) - 1|, measured on a dense grid of the interval, is at most
``LAYER_NORM_TOLERANCE`` wins. The output error is that relative error times |x - mean| / std <= sqrt(n).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from privml.approx.basis import poly_depth
from privml.approx.fit import fit_activation
from privml.compiler.approx import replace_node
from privml.compiler.capture import node_label, node_spec
from privml.errors import BudgetError, CalibrationError
from privml.nn import PolyLayerNorm
from privml.registry import REGISTRY

LAYER_NORM_TOLERANCE = 1e-2  # target error of the normalised output (before weight and bias)
LAYER_NORM_MAX_DEGREE = 15  # the power-basis evaluator keeps full precision up to about here
LAYER_NORM_MAX_NEWTON = 3


def _relative_error(poly: Any, lo: float, hi: float, steps: int) -> float:
    """max over [lo, hi] of |y sqrt(v) - 1| for the polynomial start y0 = poly(v) and ``steps`` Newton steps."""
    v = np.geomspace(lo, hi, 4001)
    y = np.asarray(poly(v), dtype=float)
    for _ in range(steps):
        y = y * (1.5 - 0.5 * v * y * y)
    return float(np.max(np.abs(y * np.sqrt(v) - 1.0)))


def fit_inverse_sqrt(lo: float, hi: float, tol: float = LAYER_NORM_TOLERANCE) -> tuple[Any, int, float]:
    """(polynomial, Newton steps, relative error) of least depth approximating 1/sqrt on [lo, hi]."""
    best = None
    for steps in range(LAYER_NORM_MAX_NEWTON + 1):
        for degree in range(1, LAYER_NORM_MAX_DEGREE + 1):
            poly = fit_activation("inv_sqrt", lo, hi, degree)
            err = _relative_error(poly, lo, hi, steps)
            if err <= tol:
                depth = poly_depth(degree) + 2 * steps
                if best is None or depth < best[0]:
                    best = (depth, poly, steps, err)
                break
    if best is None:
        raise BudgetError(f"1/sqrt on [{lo:.3g}, {hi:.3g}]")
    return best[1], best[2], best[3]


def _layer_norm_nodes(gm: fx.GraphModule, backend: str) -> list[fx.Node]:
    spec = REGISTRY["layer_norm"]
    if spec.how(backend) != "approx":
        return []
    modules = dict(gm.named_modules())
    return [n for n in gm.graph.nodes if n.op in ("call_module", "call_function") and node_spec(n, modules) is spec]


def _arguments(node: fx.Node, gm: fx.GraphModule) -> dict[str, Any]:
    """normalized_shape, weight, bias, eps of a LayerNorm module or an F.layer_norm call."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        return {"normalized_shape": tuple(mod.normalized_shape), "weight": mod.weight, "bias": mod.bias,
                "eps": float(mod.eps)}
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    got = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)

    def value(a: Any) -> Any:
        if isinstance(a, fx.Node) and a.op == "get_attr":
            return gm.get_parameter(str(a.target)) if str(a.target) in dict(gm.named_parameters()) else \
                gm.get_buffer(str(a.target))
        if isinstance(a, fx.Node):
            raise CalibrationError(f"privml: the LayerNorm at '{node_label(node)}' takes a computed weight/bias; "
                                   "only parameters are supported")
        return a

    shape = got["normalized_shape"]
    return {"normalized_shape": (shape,) if isinstance(shape, int) else tuple(shape),
            "weight": value(got.get("weight")), "bias": value(got.get("bias")), "eps": float(got.get("eps", 1e-5))}


class _VarianceObserver(fx.Interpreter):
    """Runs the graph and records, for each watched node, the min/max variance of its input."""

    def __init__(self, gm: fx.GraphModule, watched: dict[fx.Node, int]) -> None:
        super().__init__(gm)
        self.watched = watched
        self.ranges: dict[fx.Node, list[float]] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n in self.watched:
            x = self.env[n.args[0]].detach().double()
            k = self.watched[n]
            var = x.reshape(*x.shape[: x.dim() - k], -1).var(dim=-1, unbiased=False)
            lo, hi = self.ranges.get(n, [math.inf, -math.inf])
            self.ranges[n] = [min(lo, float(var.min())), max(hi, float(var.max()))]
        return super().run_node(n)


def approximate_layer_norms(gm: fx.GraphModule, batches: list[torch.Tensor], backend: str,
                            margin: float = 0.1) -> list[str]:
    """Replace each LayerNorm of ``gm`` by a :class:`PolyLayerNorm` fitted on its calibrated variance range."""
    nodes = _layer_norm_nodes(gm, backend)
    if not nodes:
        return []
    args = {n: _arguments(n, gm) for n in nodes}
    observer = _VarianceObserver(gm, {n: len(a["normalized_shape"]) for n, a in args.items()})
    with torch.no_grad():
        for batch in batches:
            observer.run(batch)
    done = []
    for node in nodes:
        a, (vlo, vhi) = args[node], observer.ranges[node]
        lo, hi = (vlo + a["eps"]) / (1.0 + margin), (vhi + a["eps"]) * (1.0 + margin)
        label = node_label(node)
        try:
            poly, steps, rel = fit_inverse_sqrt(lo, hi)
        except BudgetError:
            raise BudgetError(f"privml: the LayerNorm at '{label}' sees variances over [{lo:.3g}, {hi:.3g}] "
                              f"(ratio {hi / lo:.3g}); no polynomial of degree <= {LAYER_NORM_MAX_DEGREE} with up to "
                              f"{LAYER_NORM_MAX_NEWTON} Newton steps approximates 1/sqrt there to the needed "
                              "precision. Calibrate with data closer to what the model will see, or use the mpc "
                              "backend (exact LayerNorm).") from None
        module = PolyLayerNorm(a["normalized_shape"], poly.power_coeffs(), (lo, hi), a["weight"], a["bias"],
                               a["eps"], newton_steps=steps)
        gain = float(a["weight"].detach().abs().max()) if a["weight"] is not None else 1.0
        n = math.prod(a["normalized_shape"])
        module.est_error = rel * math.sqrt(n) * gain  # |x - mean| / std <= sqrt(n)
        replace_node(gm, node, module, prefix="privml_layer_norm")
        done.append(f"{label}: layer_norm -> inverse square root of degree {module.degree} + {steps} Newton steps on "
                    f"variance [{lo:.3g}, {hi:.3g}] (relative error {rel:.2g})")
    gm.delete_all_unused_submodules()
    gm.recompile()
    return done
