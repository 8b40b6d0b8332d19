"""The op registry: every operation a private tensor can meet, declared once.

Each :class:`OpSpec` names one operation, the torch entry points that reach it (functions,
operators, in-place forms, ``Tensor`` methods as torch.fx records them, ``nn.Module`` types) and,
per backend, how that backend computes it:

* ``"exact"``: the backend has a protocol for it (a handler in its op table);
* ``"identity"``: it is the identity in eval mode (dropout, stochastic depth);
* ``"approx"``: the compiler replaces it by a polynomial fitted on its calibrated range before the
  backend sees it (ReLU on CKKS, GELU on MPC), so the backend needs no handler;
* ``"client"``: only allowed as the model's last op; the compiler moves it to the client, which
  applies it after decryption (softmax on CKKS);
* missing: refused, with ``refusals[backend]`` as the reason when there is one.

Validation (:mod:`privml.compiler.validate`), the compiler's approximation pass, the plan's kinds and
depths, ``supported_ops()``, error messages and the backends' op tables all read this table;
``tests/test_registry.py`` checks that they agree on every (op, backend) pair. Argument-dependent
limits (``check``) run both on graph nodes at compile time and on every call at run time.
Users extend it with :func:`register`:

    >>> import privml.registry as R
    >>> def my_scale(x): return x * 0.5                      # doctest: +SKIP
    >>> R.register(R.OpSpec("my_scale", "elementwise", functions=(my_scale,),
    ...                     support={"plain": "exact"}))      # doctest: +SKIP

and give each backend a handler with ``@PlainTensor.implements("my_scale")``.
"""

from __future__ import annotations

import importlib
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from privml import functional as PF
from privml.errors import InvalidInput

T = torch.Tensor

KINDS = ("linear", "elementwise", "activation", "norm", "pool", "shape", "reduction", "identity", "output",
         "metadata")
SUPPORT = ("exact", "identity", "approx", "client")
BACKENDS = ("plain", "ckks", "mpc", "hybrid")
"""Backends the registry describes (``privml.config`` declares which backends exist; each must appear here)."""
HE_BACKENDS = ("ckks", "hybrid")
"""Backends computing on CKKS ciphertexts: ``hybrid`` runs every op as ``ckks`` does unless a spec says otherwise
(ReLU: exact, by the enclave on masked values)."""


@dataclass(frozen=True)
class OpSpec:
    """One operation: its torch entry points and, per backend, how (or whether) it is computed.

    ``functions`` holds callables or dotted paths (resolved on first use, so optional libraries such as
    torchvision are imported only when needed). ``depth`` is the CKKS multiplicative depth the op
    consumes when exact (linear maps: 1, fused with neighbours; additions and shapes: 0; None: decided
    by the approximation). ``check(args, kwargs, private, backend)`` may refuse particular arguments
    (division *by* a private value), returning the reason; ``private(a)`` says whether an argument is
    private. The validator calls it on graph nodes, the tensor core on every call, with the same rule.
    """

    name: str
    kind: str
    functions: tuple[Any, ...] = ()
    methods: tuple[str, ...] = ()
    modules: tuple[Any, ...] = ()
    support: Mapping[str, str] = field(default_factory=dict)
    refusals: Mapping[str, str] = field(default_factory=dict)
    depth: int | None = 0
    check: Callable[[tuple, dict, Callable[[Any], bool], str], str | None] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidInput(f"privml: op {self.name!r} has unknown kind {self.kind!r}; choose one of {KINDS}")
        bad = {b: s for b, s in self.support.items() if s not in SUPPORT}
        if bad:
            raise InvalidInput(f"privml: op {self.name!r} declares unknown support levels {bad}; use {SUPPORT}")

    def how(self, backend: str) -> str | None:
        """'exact', 'identity', 'approx', 'client', or None when ``backend`` cannot compute this op."""
        if backend == "hybrid" and backend not in self.support and backend not in self.refusals:
            backend = "ckks"  # hybrid = CKKS ciphertexts plus enclave refreshes
        return self.support.get(backend)

    def needs_handler(self, backend: str) -> bool:
        """True when ``backend``'s tensor class must have a handler for every entry point of this op
        (metadata reads such as ``x.size()`` are answered by the tensor core itself)."""
        return self.kind != "metadata" and self.how(backend) in ("exact", "identity")

    def refusal(self, backend: str) -> str:
        """Why ``backend`` does not run this op here (for error messages)."""
        if backend in self.refusals:
            return self.refusals[backend]
        if backend == "hybrid" and "hybrid" not in self.support and "ckks" in self.refusals:
            return self.refusals["ckks"]
        if self.how(backend) == "approx":
            return (f"the {backend} backend has no exact protocol for {self.name}: compile the model with "
                    f"privml.compile(..., backend={backend!r}), which replaces it by a polynomial fitted on its "
                    "calibrated range.")
        return f"{self.name} has no private implementation on the {backend} backend."


Private = Callable[[Any], bool]


def _check_div(args: tuple, kwargs: dict, private: Private, backend: str) -> str | None:
    if len(args) > 1 and private(args[1]):
        return "division by a private value is not available; divide by a public constant."
    if kwargs.get("rounding_mode") is not None and backend != "plain":
        return "rounding division is not polynomial."
    return None


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    """An op's argument given by position or by keyword."""
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def _check_pow(args: tuple, kwargs: dict, private: Private, backend: str) -> str | None:
    e = _arg(args, kwargs, 1, "exponent")
    if private(e) or not (isinstance(e, int) or (isinstance(e, float) and float(e).is_integer())) or e < 0:
        return f"only non-negative integer powers are polynomial (got exponent {e!r})."
    if backend in HE_BACKENDS and e < 1:
        return "CKKS needs a positive integer exponent."
    return None


def _check_matmul(args: tuple, kwargs: dict, private: Private, backend: str) -> str | None:
    if backend in HE_BACKENDS and (len(args) < 2 or private(args[1]) or not private(args[0])):
        return "CKKS supports only (encrypted batch) @ (plain matrix): the batch must stay the first dimension."
    return None


def _check_batch_norm(args: tuple, kwargs: dict, private: Private, backend: str) -> str | None:
    if _arg(args, kwargs, 5, "training", False) or _arg(args, kwargs, 1, "running_mean") is None:
        return ("batch norm with batch statistics (training mode, or track_running_stats=False) mixes the samples "
                "of a batch and is not affine per sample; use running statistics (model.eval()).")
    return None


def _check_dropout(training_index: int) -> Callable[[tuple, dict, Private, str], str | None]:
    def check(args: tuple, kwargs: dict, private: Private, backend: str) -> str | None:
        p = _arg(args, kwargs, 1, "p", 0.5)
        if _arg(args, kwargs, training_index, "training", True) and p:
            return ("dropout in training mode is random (F.dropout defaults to training=True): pass "
                    "training=self.training and call model.eval(), or remove it.")
        return None

    return check


METADATA_ATTRIBUTES = ("shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout")


def _check_metadata(args: tuple, kwargs: dict, private: Private, backend: str) -> str | None:
    if len(args) > 1 and isinstance(args[1], str) and args[1] not in METADATA_ATTRIBUTES:
        return f"attribute .{args[1]} of a private tensor is not available (only {', '.join(METADATA_ATTRIBUTES)})."
    return None


def _check_reduction(args: tuple, kwargs: dict, private: Private, backend: str) -> str | None:
    if backend in HE_BACKENDS and _arg(args, kwargs, 1, "dim") is None:
        return "CKKS reductions must keep the batch dimension: pass dim= (e.g. x.sum(dim=1))."
    return None


def _check_softmax(args: tuple, kwargs: dict, private: Private, backend: str) -> str | None:
    if _arg(args, kwargs, 1, "dim") is None and backend != "plain":
        return "softmax needs an explicit dim= on private tensors."
    return None


def _check_avg_pool(args: tuple, kwargs: dict, private: Private, backend: str) -> str | None:
    if backend == "mpc" and _arg(args, kwargs, 6, "divisor_override") is not None:
        return "avg_pool2d with divisor_override is not available on MPC."
    return None


def _check_max_pool(args: tuple, kwargs: dict, private: Private, backend: str) -> str | None:
    if backend != "plain" and _arg(args, kwargs, 6, "return_indices", False):
        return "max_pool2d(return_indices=True) would reveal positions of private values."
    return None


_ALL = {"plain": "exact", "ckks": "exact", "mpc": "exact"}
_IDENTITY = {"plain": "identity", "ckks": "identity", "mpc": "identity"}
_POLY_ON_CKKS = "CKKS evaluates only polynomials: privml.compile replaces this activation by a fitted polynomial."
_CKKS_SHAPE = "this shape op is not available on CKKS yet (flatten/reshape/view are)."


def _activation(name: str, functions: tuple, methods: tuple = (), modules: tuple = (), mpc: str = "exact",
                hybrid: str = "approx") -> OpSpec:
    return OpSpec(name, "activation", functions, methods, modules,
                  {"plain": "exact", "ckks": "approx", "mpc": mpc, "hybrid": hybrid}, depth=None)


_SPECS: tuple[OpSpec, ...] = (
    # ---- linear maps (CKKS: fused into one diagonal product, one level)
    OpSpec("linear", "linear", (F.linear,), (), (nn.Linear,), _ALL, depth=1),
    OpSpec("conv2d", "linear", (F.conv2d,), (), (nn.Conv2d,), _ALL, depth=1),
    OpSpec("avg_pool2d", "linear", (F.avg_pool2d,), (), (nn.AvgPool2d,), _ALL, depth=1, check=_check_avg_pool),
    OpSpec("adaptive_avg_pool2d", "linear", (F.adaptive_avg_pool2d,), (), (nn.AdaptiveAvgPool2d,), _ALL, depth=1),
    OpSpec("batch_norm", "linear", (F.batch_norm,), (), (nn.BatchNorm1d, nn.BatchNorm2d), _ALL, depth=1,
           check=_check_batch_norm),
    OpSpec("matmul", "linear", (torch.matmul, T.matmul, T.__matmul__, T.__rmatmul__, torch.mm, T.mm, operator.matmul),
           ("matmul", "mm", "__matmul__", "__rmatmul__"), (), _ALL, depth=1, check=_check_matmul),
    OpSpec("sum", "reduction", (torch.sum, T.sum), ("sum",), (), _ALL, depth=1, check=_check_reduction),
    OpSpec("mean", "reduction", (torch.mean, T.mean), ("mean",), (), _ALL, depth=1, check=_check_reduction),
    # ---- elementwise arithmetic (in-place forms return a new tensor; the validator checks aliasing)
    OpSpec("add", "elementwise", (torch.add, T.add, T.__add__, T.__radd__, T.add_, T.__iadd__, operator.add,
                                  operator.iadd), ("add", "add_", "__add__", "__radd__", "__iadd__"), (), _ALL),
    OpSpec("sub", "elementwise", (torch.sub, T.sub, T.__sub__, T.__rsub__, T.sub_, T.__isub__, operator.sub,
                                  operator.isub), ("sub", "sub_", "__sub__", "__rsub__", "__isub__"), (), _ALL),
    OpSpec("mul", "elementwise", (torch.mul, T.mul, T.__mul__, T.__rmul__, T.mul_, T.__imul__, operator.mul,
                                  operator.imul), ("mul", "mul_", "__mul__", "__rmul__", "__imul__"), (), _ALL,
           depth=1),
    OpSpec("div", "elementwise", (torch.div, T.div, T.__truediv__, T.div_, T.__itruediv__, operator.truediv,
                                  operator.itruediv), ("div", "div_", "__truediv__", "__itruediv__"), (), _ALL,
           depth=1, check=_check_div),
    OpSpec("neg", "elementwise", (torch.neg, T.neg, T.__neg__, operator.neg), ("neg", "__neg__"), (), _ALL),
    OpSpec("square", "elementwise", (torch.square, T.square), ("square",), (), _ALL, depth=1),
    OpSpec("pow", "elementwise", (torch.pow, T.pow, T.__pow__, operator.pow), ("pow", "__pow__"), (), _ALL,
           depth=None, check=_check_pow),
    OpSpec("polyval", "activation", (PF.polyval,), (), (), _ALL, depth=None),
    # ---- shapes
    OpSpec("flatten", "shape", (torch.flatten, T.flatten), ("flatten",), (nn.Flatten,), _ALL),
    OpSpec("reshape", "shape", (torch.reshape, T.reshape, T.view), ("reshape", "view"), (), _ALL),
    OpSpec("cat", "shape", (torch.cat, torch.concat), (), (), {"plain": "exact", "mpc": "exact"},
           {"ckks": "concatenating encrypted tensors is not available on CKKS yet (their slots would need "
                    "re-packing); concatenate on the client, or use the mpc backend."}),
    OpSpec("identity", "identity", (T.contiguous, T.detach, T.clone, T.float), ("contiguous", "detach", "clone",
                                                                                 "float"), (nn.Identity,), _ALL),
    OpSpec("transpose", "shape", (T.t, torch.t, T.transpose, torch.transpose, T.permute, torch.permute),
           ("t", "transpose", "permute"), (), {"plain": "exact", "mpc": "exact"}, {"ckks": _CKKS_SHAPE}),
    OpSpec("unsqueeze", "shape", (T.unsqueeze, torch.unsqueeze, T.squeeze, torch.squeeze),
           ("unsqueeze", "squeeze"), (), {"plain": "exact", "mpc": "exact"}, {"ckks": _CKKS_SHAPE}),
    OpSpec("getitem", "shape", (T.__getitem__, operator.getitem), ("__getitem__",), (),
           {"plain": "exact", "mpc": "exact"}, {"ckks": "indexing an encrypted tensor is not available on CKKS."}),
    OpSpec("metadata", "metadata", (getattr,), ("size", "dim", "numel"), (), _ALL, check=_check_metadata),
    # ---- eval-mode identities
    OpSpec("dropout", "identity", (F.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout, F.feature_alpha_dropout),
           (), (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.FeatureAlphaDropout), _IDENTITY,
           check=_check_dropout(2)),
    OpSpec("stochastic_depth", "identity", ("torchvision.ops.stochastic_depth",), (),
           ("torchvision.ops.StochasticDepth",), _IDENTITY, check=_check_dropout(3)),
    # ---- pooling by comparison
    OpSpec("max_pool2d", "pool", (F.max_pool2d,), (), (nn.MaxPool2d,), {"plain": "exact", "mpc": "exact"},
           {"ckks": "max pooling needs comparisons, which CKKS cannot compute exactly."}, depth=None,
           check=_check_max_pool),
    # ---- normalisation by a data-dependent statistic
    OpSpec("layer_norm", "norm", (F.layer_norm,), (), (nn.LayerNorm,),
           {"plain": "exact", "mpc": "exact", "ckks": "approx"}, depth=None),
    # ---- activations (CKKS: always a polynomial; MPC: exact where CrypTen has a protocol, else a polynomial)
    _activation("relu", (F.relu, torch.relu, T.relu, F.relu_, torch.relu_, T.relu_), ("relu", "relu_"), (nn.ReLU,),
                hybrid="exact"),  # hybrid: the enclave applies it to positively masked values during a refresh
    _activation("leaky_relu", (F.leaky_relu, F.leaky_relu_), (), (nn.LeakyReLU,)),
    _activation("hardtanh", (F.hardtanh, F.hardtanh_, F.relu6), (), (nn.Hardtanh,)),
    _activation("hardswish", (F.hardswish,), (), (nn.Hardswish,)),
    _activation("hardsigmoid", (F.hardsigmoid,), (), (nn.Hardsigmoid,)),
    _activation("silu", (F.silu,), (), (nn.SiLU,)),
    _activation("sigmoid", (torch.sigmoid, T.sigmoid, F.sigmoid), ("sigmoid",), (nn.Sigmoid,)),
    _activation("tanh", (torch.tanh, T.tanh, F.tanh), ("tanh",), (nn.Tanh,)),
    _activation("gelu", (F.gelu,), (), (nn.GELU,), mpc="approx"),
    _activation("softplus", (F.softplus,), (), (nn.Softplus,), mpc="approx"),
    _activation("elu", (F.elu, F.elu_), (), (nn.ELU,), mpc="approx"),
    OpSpec("softmax", "output", (F.softmax, torch.softmax, T.softmax), ("softmax",), (nn.Softmax,),
           {"plain": "exact", "mpc": "exact", "ckks": "client"},
           {"ckks": "softmax is not polynomial: it can only end the model, where privml moves it to the client."},
           check=_check_softmax),
)


class OpRegistry:
    """Lookup of :class:`OpSpec` by name, torch callable, method name or module type."""

    def __init__(self, specs: Iterable[OpSpec] = ()) -> None:
        self._specs: dict[str, OpSpec] = {}
        self._by_function: dict[Any, OpSpec] = {}
        self._by_method: dict[str, OpSpec] = {}
        self._modules: list[tuple[type, OpSpec]] = []
        self._pending: list[tuple[str, OpSpec, str]] = []  # dotted paths not imported yet
        for spec in specs:
            self.register(spec)

    def register(self, spec: OpSpec, replace: bool = False) -> OpSpec:
        """Add ``spec``; re-registering a name needs ``replace=True`` (so typos do not shadow privml's ops)."""
        if spec.name in self._specs:
            if not replace:
                raise InvalidInput(f"privml: an op named {spec.name!r} is already registered (pass replace=True)")
            self.unregister(spec.name)
        self._specs[spec.name] = spec
        for f in spec.functions:
            if isinstance(f, str):
                self._pending.append(("function", spec, f))
            else:
                self._by_function[f] = spec
        for m in spec.methods:
            self._by_method[m] = spec
        for m in spec.modules:
            if isinstance(m, str):
                self._pending.append(("module", spec, m))
            else:
                self._modules.append((m, spec))
        return spec

    def unregister(self, name: str) -> None:
        """Remove the op ``name`` (and its entry points) from the registry."""
        spec = self._specs.pop(name)
        self._by_function = {f: s for f, s in self._by_function.items() if s is not spec}
        self._by_method = {m: s for m, s in self._by_method.items() if s is not spec}
        self._modules = [(m, s) for m, s in self._modules if s is not spec]
        self._pending = [p for p in self._pending if p[1] is not spec]

    def _resolve(self) -> None:
        while self._pending:
            what, spec, path = self._pending.pop()
            module_name, _, attr = path.rpartition(".")
            try:
                obj = getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError):
                continue  # the optional library is absent: nothing can call this entry point
            if what == "function":
                self._by_function[obj] = spec
            else:
                self._modules.append((obj, spec))

    def __getitem__(self, name: str) -> OpSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise InvalidInput(f"privml: no op named {name!r} is registered") from None

    def __iter__(self):
        return iter(self._specs.values())

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def functions(self, spec: OpSpec) -> list[Any]:
        """Every resolved callable entry point of ``spec``."""
        self._resolve()
        return [f for f, s in self._by_function.items() if s is spec]

    def for_function(self, func: Any) -> OpSpec | None:
        self._resolve()
        try:
            return self._by_function.get(func)
        except TypeError:  # unhashable target
            return None

    def for_method(self, name: str) -> OpSpec | None:
        return self._by_method.get(name)

    def for_module(self, module: nn.Module) -> OpSpec | None:
        """The op a leaf module computes (most specific registered type first: ReLU6 is a Hardtanh)."""
        self._resolve()
        best = None
        for cls, spec in self._modules:
            if isinstance(module, cls) and (best is None or issubclass(cls, best[0])):
                best = (cls, spec)
        return best[1] if best else None

    def supported(self, backend: str) -> list[str]:
        """Names of the ops ``backend`` can run (exactly, as identities, approximated or on the client)."""
        return sorted(s.name for s in self if s.how(backend) is not None)


REGISTRY = OpRegistry(_SPECS)
"""privml's op table. Extend it with :func:`register`; read it with ``REGISTRY[name]`` or the lookups."""


def register(spec: OpSpec, replace: bool = False) -> OpSpec:
    """Declare a new op (or, with ``replace=True``, change privml's declaration of one)."""
    return REGISTRY.register(spec, replace=replace)
