"""The plan: what ``privml.compile`` decided for each layer, serializable and printable.

A plan is the contract between the compiler and the backends: per node, the op,
its calibrated input range, the approximation chosen, the multiplicative depth it
consumes and the running level; globally, backend parameters and security level.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch.fx as fx
import torch.nn as nn

from privml.approx.basis import poly_depth
from privml.compiler.calibrate import RangeStats
from privml.compiler.capture import node_label, node_spec
from privml.config import BACKENDS, CompileConfig, config_from_dict
from privml.errors import InvalidInput, MalformedInput
from privml.he.params import HE_STANDARD_128, MAX_PRIME_BITS

PLAN_VERSION = 1

# Bounds a received plan must keep (Plan.check): a crafted plan must not make the client spend unbounded time or memory.
MAX_NESTING = 24  # JSON nesting depth
MAX_ITEMS = 2_000_000  # numbers, strings and containers in the whole plan
MAX_INPUT_ELEMENTS = 1 << 20  # product of input_shape
MAX_INPUT_DIMS = 8
MAX_LAYERS = 10_000
MAX_CHAIN_PRIMES = 64  # coefficient modulus primes
ROTATION_STEPS_PER_LOG_N = 4  # at most 4 * log2(N) Galois keys (real plans: DigitsCNN 11, LeNet-5 10)
ENCRYPTED_BACKENDS = ("ckks", "mpc", "hybrid")


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
        names = {f.name for f in fields(cls)}
        if not isinstance(d, dict) or not set(d) <= names or not {"name", "node", "op", "kind"} <= set(d):
            raise MalformedInput(f"privml: a plan layer must be an object with name, node, op, kind (and only "
                                 f"{sorted(names)}), got {_head(d)}")
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

    def sha256(self) -> str:
        """SHA-256 of the plan's canonical JSON: client and server compare it to know they hold the same plan."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        """A plan from its ``to_dict`` form, schema-checked (``check``); anything else is ``MalformedInput``."""
        if not isinstance(d, dict) or d.get("version") != PLAN_VERSION:
            got = d.get("version") if isinstance(d, dict) else type(d).__name__
            raise MalformedInput(f"privml: not a plan of version {PLAN_VERSION} (got {_head(got)})")
        try:
            _check_size(d)
            d = dict(d)
            d.pop("total_depth", None)
            names = {f.name for f in fields(cls)}
            if not set(d) <= names or not {"backend", "input_shape"} <= set(d):
                raise MalformedInput(f"privml: a plan has the fields {sorted(names)} (backend and input_shape "
                                     f"required), got {sorted(map(str, d))[:20]}")
            if not isinstance(d.get("input_shape"), (list, tuple)) or not isinstance(d.get("layers", []), list):
                raise MalformedInput("privml: a plan's input_shape and layers must be lists")
            d["input_shape"] = tuple(d["input_shape"])
            d["layers"] = [LayerPlan.from_dict(x) for x in d.get("layers", [])]
            plan = cls(**d)
            plan.check()
            plan.config  # noqa: B018 - a plan whose options no config accepts is malformed
        except MalformedInput:
            raise
        except InvalidInput as err:
            raise MalformedInput(f"privml: the plan's options are not a valid config: {err}") from None
        except (KeyError, TypeError, ValueError, AttributeError, RecursionError, OverflowError) as err:
            raise MalformedInput(f"privml: not a valid plan: {type(err).__name__}: {_head(err)}") from None
        return plan

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError, TypeError, ValueError) as err:
            raise MalformedInput(f"privml: cannot read plan JSON: {type(err).__name__}: {_head(err)}") from None
        return cls.from_dict(data)

    def check(self) -> Plan:
        """Schema and bounds of every field a client acts on; ``MalformedInput`` naming the first bad one.

        Types, finite numbers, lengths; CKKS ring dimension from the HE standard table, prime sizes, at most
        ``ROTATION_STEPS_PER_LOG_N * log2(N)`` rotation steps each below N/2; ranges finite with lo < hi; an
        encrypted backend needs an output range (``Session.decrypt`` checks every result against it).
        """
        _expect(self.backend in BACKENDS, "backend", self.backend, f"one of {BACKENDS}")
        shape = self.input_shape
        _expect(isinstance(shape, tuple) and 1 <= len(shape) <= MAX_INPUT_DIMS and all(_is_int(v) and v > 0
                for v in shape) and math.prod(shape) <= MAX_INPUT_ELEMENTS, "input_shape", shape,
                f"1 to {MAX_INPUT_DIMS} positive integers with a product <= {MAX_INPUT_ELEMENTS}")
        _expect(isinstance(self.layers, list) and len(self.layers) <= MAX_LAYERS, "layers", len(self.layers),
                f"a list of at most {MAX_LAYERS}")
        for lp in self.layers:
            _check_layer(lp)
        for name in ("fixes", "notes"):
            value = getattr(self, name)
            _expect(isinstance(value, list) and all(isinstance(v, str) for v in value), name, value,
                    "a list of strings")
        _expect(isinstance(self.options, dict), "options", self.options, "an object")
        _expect(isinstance(self.predicted, dict) and all(isinstance(k, str) and _is_real(v)
                for k, v in self.predicted.items()), "predicted", self.predicted, "an object of finite numbers")
        _expect(isinstance(self.params, dict), "params", self.params, "an object")
        _check_params(self.params, self.backend)
        return self

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
            lines.append("params: " + ", ".join(f"{k}={_short(v)}" for k, v in self.params.items() if k != "fusion"))
        fusion = self.params.get("fusion") if isinstance(self.params.get("fusion"), list) else []
        for f in fusion:  # the planner's decision at each point where two position-mixing linear maps meet
            if isinstance(f, dict):
                op, pending, chosen, why = (str(f.get(k, ""))[:160] for k in ("op", "pending", "chosen", "why"))
                lines.append(f"fusion: {op} after {pending}: {chosen}" + (f" ({why})" if why else ""))
        if self.fixes:
            lines.append("fixes: " + "; ".join(self.fixes))
        if self.predicted:
            lines.append("predicted: " + ", ".join(f"{k}={v:.4g}" for k, v in self.predicted.items()))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    __repr__ = __str__


def _head(v: object, n: int = 120) -> str:
    """A bounded repr for error messages (a crafted plan must not make them huge)."""
    try:
        text = repr(v)
    except (RecursionError, ValueError):
        text = f"<{type(v).__name__}>"
    return text if len(text) <= n else text[:n] + "..."


def _expect(ok: bool, name: str, value: object, what: str) -> None:
    if not ok:
        raise MalformedInput(f"privml: plan field {name} must be {what}, got {_head(value)}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def usable_range(r: object) -> bool:
    """Whether ``r`` is a pair of finite numbers with lo < hi."""
    return isinstance(r, (list, tuple)) and len(r) == 2 and all(_is_real(v) for v in r) and r[0] < r[1]


def _check_size(d: object) -> None:
    """Bounded nesting and item count, walked without recursion (a deeply nested plan cannot overflow the stack)."""
    stack, count = [(d, 0)], 0
    while stack:
        v, depth = stack.pop()
        count += 1
        if depth > MAX_NESTING or count > MAX_ITEMS:
            raise MalformedInput(f"privml: plan nests deeper than {MAX_NESTING} levels or holds more than "
                                 f"{MAX_ITEMS} items")
        if isinstance(v, dict):
            stack.extend((x, depth + 1) for x in v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend((x, depth + 1) for x in v)
        elif isinstance(v, float) and not math.isfinite(v):
            raise MalformedInput(f"privml: plan holds a non-finite number ({v})")


def _check_layer(lp: LayerPlan) -> None:
    where = f"layers[{lp.name!r}]" if isinstance(lp.name, str) else "layers[?]"
    for name in ("name", "node", "op", "kind", "approx"):
        _expect(isinstance(getattr(lp, name), str), f"{where}.{name}", getattr(lp, name), "a string")
    _expect(isinstance(lp.out_shape, tuple) and all(_is_int(v) and v >= 0 for v in lp.out_shape),
            f"{where}.out_shape", lp.out_shape, "non-negative integers")
    for name in ("in_range", "out_range"):
        r = getattr(lp, name)
        _expect(r is None or (len(r) == 2 and all(_is_real(v) for v in r) and r[0] <= r[1]), f"{where}.{name}", r,
                "None or two finite numbers lo <= hi")
    for name in ("degree", "depth", "level"):
        v = getattr(lp, name)
        _expect(v is None or (_is_int(v) and v >= 0), f"{where}.{name}", v, "None or a non-negative integer")
    _expect(_is_real(lp.est_error), f"{where}.est_error", lp.est_error, "a finite number")
    _expect(lp.coeffs is None or (isinstance(lp.coeffs, list) and all(_is_real(c) for c in lp.coeffs)),
            f"{where}.coeffs", lp.coeffs, "None or a list of finite numbers")
    for name in ("cost", "spec"):
        _expect(getattr(lp, name) is None or isinstance(getattr(lp, name), dict), f"{where}.{name}",
                getattr(lp, name), "None or an object")


def _check_params(params: dict[str, Any], backend: str) -> None:
    """The parameters the client acts on: output/input ranges, and for CKKS the ring, chain and rotations."""
    out = params.get("output_range")
    if backend in ENCRYPTED_BACKENDS or out is not None:
        _expect(usable_range(out), "params.output_range", out, "two finite numbers lo < hi (an encrypted backend's "
                "decryptions are checked against it, so a plan cannot leave it out)")
    inp = params.get("input_range")
    _expect(inp is None or usable_range(inp), "params.input_range", inp, "None or two finite numbers lo < hi")
    _expect(params.get("layout", "latency") in ("latency", "throughput"), "params.layout", params.get("layout"),
            "latency or throughput")
    _expect(isinstance(params.get("client_ops", []), list), "params.client_ops", params.get("client_ops"), "a list")
    if backend == "hybrid":
        _check_hybrid(params.get("hybrid"))
    if backend not in ("ckks", "hybrid") and "ckks" not in params:
        return
    ck = params.get("ckks")
    _expect(isinstance(ck, dict), "params.ckks", ck, "an object with poly_modulus_degree, coeff_mod_bit_sizes, "
            "scale_bits")
    n, chain, sb = ck.get("poly_modulus_degree"), ck.get("coeff_mod_bit_sizes"), ck.get("scale_bits")
    _expect(n in HE_STANDARD_128 and _is_int(n), "params.ckks.poly_modulus_degree", n,
            f"one of {sorted(HE_STANDARD_128)}")
    _expect(isinstance(chain, list) and 2 <= len(chain) <= MAX_CHAIN_PRIMES and all(
        _is_int(b) and 2 <= b <= MAX_PRIME_BITS for b in chain), "params.ckks.coeff_mod_bit_sizes", chain,
        f"2 to {MAX_CHAIN_PRIMES} prime sizes of 2 to {MAX_PRIME_BITS} bits")
    _expect(_is_int(sb) and 1 <= sb <= MAX_PRIME_BITS, "params.ckks.scale_bits", sb,
            f"an integer in [1, {MAX_PRIME_BITS}]")
    _expect(isinstance(ck.get("allow_insecure", False), bool), "params.ckks.allow_insecure", ck.get("allow_insecure"),
            "true or false (and a client ignores it: its own session decides)")
    steps = params.get("rotation_steps", [])
    limit = ROTATION_STEPS_PER_LOG_N * int(math.log2(n))
    _expect(isinstance(steps, list) and len(steps) <= limit and all(_is_int(s) and 0 < abs(s) < n // 2 for s in steps),
            "params.rotation_steps", steps if isinstance(steps, list) and len(steps) <= 8 else f"{len(steps)} steps"
            if isinstance(steps, list) else steps, f"at most {limit} integers 0 < |step| < {n // 2} at N={n}")
    for name in ("depth", "security_bits", "poly_modulus_degree"):
        v = params.get(name)
        _expect(v is None or (_is_int(v) and v >= 0), f"params.{name}", v, "a non-negative integer")
    _expect(params.get("input_expansion") is None or isinstance(params["input_expansion"], dict),
            "params.input_expansion", params.get("input_expansion"), "None or an object")
    _expect(params.get("key_mode", "direct") in ("direct", "few"), "params.key_mode", params.get("key_mode"),
            "'direct' or 'few'")
    lanes = params.get("lanes")
    _expect(lanes is None or (_is_int(lanes) and 1 <= lanes <= n // 4 and lanes & (lanes - 1) == 0),
            "params.lanes", lanes, f"None or a power of two <= {n // 4}")


def _check_hybrid(hy: Any) -> None:
    """The hybrid section a client provisions the enclave from: finite, positive flooding and budgets."""
    _expect(isinstance(hy, dict), "params.hybrid", hy, "an object (segment, flooding, masks, budget)")
    for name in ("flood_sigma", "release_sigma", "value_bound"):
        v = hy.get(name)
        _expect(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0,
                f"params.hybrid.{name}", v, "a positive finite number")
    for name, lo, hi in (("decryption_budget", 1, 1 << 40), ("flood_security_bits", 30, 256), ("mask_bits", 1, 40),
                         ("relu_mask_bits", 0, 16), ("segment", 1, MAX_CHAIN_PRIMES)):
        v = hy.get(name)
        _expect(_is_int(v) and lo <= v <= hi, f"params.hybrid.{name}", v, f"an integer in [{lo}, {hi}]")
    _expect(isinstance(hy.get("enclave_activations"), bool), "params.hybrid.enclave_activations",
            hy.get("enclave_activations"), "true or false")
    _expect(hy.get("flooding", "refresh") in ("refresh", "release"), "params.hybrid.flooding", hy.get("flooding"),
            "refresh or release")
    if hy.get("flooding") == "release":
        v = hy.get("output_noise_bound")
        _expect(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0,
                "params.hybrid.output_noise_bound", v, "a positive finite number")


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
