"""The plan: what ``privml.compile`` decided for each layer, serializable and printable.

A plan is the contract between the compiler and the backends: per node, the op,
its calibrated input range, the approximation chosen, the multiplicative depth it
consumes and the running level; globally, backend parameters and security level.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch.fx as fx
import torch.nn as nn

from privml.approx.basis import poly_depth
from privml.compiler.calibrate import RangeStats
from privml.compiler.capture import node_label, node_spec
from privml.config import CompileConfig, config_from_dict
from privml.errors import InvalidInput, MalformedInput

PLAN_VERSION = 1

@dataclass
class LayerPlan:
    """One graph node's entry in the plan."""

    name: str
    node: str
    op: str
    kind: str
    out_shape: tuple[int, ...] = ()
    in_range: tuple[float, float] | None = None
    out_range: tuple[float, float] | None = None
    approx: str = "exact"
    degree: int | None = None
    coeffs: list[float] | None = None
    depth: int | None = 0
    level: int | None = 0
    est_error: float = 0.0
    cost: dict[str, Any] | None = None  # approximation costs (CKKS depth/products, MPC rounds/bytes, ...)
    spec: dict[str, Any] | None = None  # the chosen approximation in full (kind, stages, coefficients, errors)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerPlan:
        d = dict(d)
        for key in ("out_shape", "in_range", "out_range"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)


@dataclass
class Plan:
    """Everything compile decided; ``print(plan)`` shows the per-layer table."""

    backend: str
    input_shape: tuple[int, ...]
    layers: list[LayerPlan] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    fixes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)  # the compile config, serialized (CompileConfig.to_dict)
    predicted: dict[str, float] = field(default_factory=dict)
    version: int = PLAN_VERSION

    @property
    def total_depth(self) -> int | None:
        """Multiplicative depth of the whole model (None while a non-polynomial op remains exact)."""
        levels = [lp.level for lp in self.layers]
        if any(lv is None for lv in levels):
            return None
        return max(levels, default=0)

    @property
    def config(self) -> CompileConfig:
        """The typed compile config this plan was made with (validation data is not stored: None)."""
        return config_from_dict(self.options, backend=self.backend)

    @property
    def security_bits(self) -> int | None:
        return self.params.get("security_bits")

    def layer(self, name: str) -> LayerPlan:
        for lp in self.layers:
            if lp.name == name or lp.node == name:
                return lp
        raise KeyError(f"no layer named {name!r} in the plan")

    # ---- serialization ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["total_depth"] = self.total_depth
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        if not isinstance(d, dict) or d.get("version") != PLAN_VERSION:
            got = d.get("version") if isinstance(d, dict) else type(d).__name__
            raise MalformedInput(f"privml: not a plan of version {PLAN_VERSION} (got {got})")
        d = dict(d)
        d.pop("total_depth", None)
        d["input_shape"] = tuple(d["input_shape"])
        d["layers"] = [LayerPlan.from_dict(x) for x in d["layers"]]
        plan = cls(**d)
        try:
            plan.config  # noqa: B018 - a plan whose options no config accepts is malformed
        except InvalidInput as err:
            raise MalformedInput(f"privml: the plan's options are not a valid config: {err}") from None
        return plan

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            return cls.from_dict(json.loads(text))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise MalformedInput(f"privml: cannot read plan JSON: {err}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        return cls.from_json(Path(path).read_text())

    # ---- display ------------------------------------------------------------------------------------
    def __str__(self) -> str:
        def rng(r: tuple[float, float] | None) -> str:
            return "-" if r is None else f"[{r[0]:.3g}, {r[1]:.3g}]"

        def opt(v: object) -> str:
            return "-" if v is None else str(v)

        header = ("layer", "op", "out shape", "input range", "approximation", "deg", "depth", "level", "est.err")
        rows = [header]
        for lp in self.layers:
            rows.append((lp.name, lp.op, "x".join(map(str, lp.out_shape)) or "-", rng(lp.in_range), lp.approx,
                         opt(lp.degree), opt(lp.depth), opt(lp.level), f"{lp.est_error:.1e}" if lp.est_error else "-"))
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
        lines = [f"privml plan: backend={self.backend}, input={list(self.input_shape)}, "
                 f"total depth={opt(self.total_depth)}"]
        for i, r in enumerate(rows):
            lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        if self.params:
            lines.append("params: " + ", ".join(f"{k}={_short(v)}" for k, v in self.params.items()))
        if self.fixes:
            lines.append("fixes: " + "; ".join(self.fixes))
        if self.predicted:
            lines.append("predicted: " + ", ".join(f"{k}={v:.4g}" for k, v in self.predicted.items()))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    __repr__ = __str__


def _short(v: Any) -> str:
    """Parameter values for the table: long lists and nested dicts summarised, not dumped."""
    if isinstance(v, (list, tuple)) and len(v) > 16:
        return f"[{len(v)} items]"
    if isinstance(v, dict) and len(str(v)) > 160:
        return "{" + ", ".join(f"{k}: {_short(x)}" for k, x in v.items() if not isinstance(x, (list, dict))) + ", ...}"
    return str(v)


def describe_module(mod: nn.Module) -> str:
    """Short op description for the plan table."""
    if isinstance(mod, nn.Conv2d):
        return (f"Conv2d({mod.in_channels}->{mod.out_channels}, k={mod.kernel_size[0]}, s={mod.stride[0]}, "
                f"p={mod.padding[0] if isinstance(mod.padding, tuple) else mod.padding})")
    if isinstance(mod, nn.Linear):
        return f"Linear({mod.in_features}->{mod.out_features})"
    return type(mod).__name__


_PLAN_KIND = {"linear": "linear", "reduction": "linear", "shape": "reshape", "identity": "reshape",
              "metadata": "reshape", "output": "output"}


def _node_cost(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[str, str, int | None]:
    """(op description, kind, CKKS depth consumed or None while not a polynomial yet), from the registry.

    Kinds: linear (fused, one level), add (free), mul (one level), reshape (free), output, activation.
    This is the table's estimate; for CKKS the dry run through the backend's op table overwrites it.
    """
    mod = modules.get(str(node.target)) if node.op == "call_module" else None
    if mod is not None and hasattr(mod, "source") and isinstance(getattr(mod, "depth", None), int):
        return describe_module(mod), "activation", mod.depth  # a privml.nn approximation, with its own depth
    spec = node_spec(node, modules)
    desc = describe_module(mod) if mod is not None else str(getattr(node.target, "__name__", node.target))
    if spec is None:
        return desc, "activation", None
    if spec.name == "polyval" and len(node.args) > 1 and isinstance(node.args[1], (list, tuple)):
        degree = max((i for i, c in enumerate(node.args[1]) if c), default=0)
        return f"polyval(deg {degree})", "activation", poly_depth(degree)
    if spec.name == "pow":
        power = node.kwargs.get("exponent", node.args[1] if len(node.args) > 1 else None)
        if isinstance(power, (int, float)) and float(power).is_integer() and power >= 1:
            return f"pow {int(power)}", "mul", poly_depth(int(power)) if power > 1 else 0
        return desc, "mul", None
    if spec.kind == "elementwise":  # the registry's depth: additions free, products one level
        return desc, "add" if spec.depth == 0 else "mul", spec.depth
    if spec.kind in _PLAN_KIND:
        return desc, _PLAN_KIND[spec.kind], spec.depth
    return desc, "activation", None


def build_plan(gm: fx.GraphModule, stats: dict[str, RangeStats], backend: str, input_shape: tuple[int, ...],
               fixes: list[str] | None = None, options: dict[str, Any] | None = None) -> Plan:
    """A plan with one row per computing node: ranges from calibration, depth per CKKS counting."""
    modules = dict(gm.named_modules())
    plan = Plan(backend=backend, input_shape=tuple(input_shape), fixes=list(fixes or []), options=dict(options or {}))
    level: dict[str, int | None] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            level[node.name] = 0
            continue
        if node.op in ("output", "get_attr"):
            continue
        inputs = [a for a in node.all_input_nodes]
        in_levels = [level.get(a.name, 0) for a in inputs]
        desc, kind, cost = _node_cost(node, modules)
        if any(lv is None for lv in in_levels) or cost is None:
            lv = None
        else:
            lv = max(in_levels, default=0) + cost
        level[node.name] = lv
        if kind == "reshape" and node.op != "call_module":
            continue  # shape bookkeeping, not worth a row
        src = stats.get(inputs[0].name) if inputs else None
        out = stats.get(node.name)
        row = LayerPlan(
            name=node_label(node), node=node.name, op=desc, kind=kind,
            out_shape=out.shape if out else (),
            in_range=(src.lo, src.hi) if src else None,
            out_range=(out.lo, out.hi) if out else None,
            depth=cost, level=lv,
        )
        mod = modules.get(node.target) if node.op == "call_module" else None
        if hasattr(mod, "coefficient_list"):  # a privml.nn.PolyActivation
            row.approx = f"{mod.source} ~ poly on [{mod.interval[0]:.3g}, {mod.interval[1]:.3g}]"
            row.degree = mod.degree
            row.coeffs = mod.coefficient_list()
            row.est_error = float(getattr(mod, "est_error", 0.0))
        plan.layers.append(row)
    outputs = [n for n in gm.graph.nodes if n.op == "output"]
    if outputs and isinstance(outputs[0].args[0], fx.Node) and outputs[0].args[0].name in stats:
        st = stats[outputs[0].args[0].name]
        plan.params["output_range"] = [st.lo, st.hi]
    return plan
