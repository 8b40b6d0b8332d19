"""``PrivateTensor``: the torch.Tensor subclass every private representation builds on.

A private tensor is a *wrapper* subclass (``torch.Tensor._make_wrapper_subclass``):
it reports the logical shape and dtype of the data it stands for, owns no storage,
and keeps its real content in ``payload`` (ciphertexts, shares, or a clear tensor
for the reference backend) plus the metadata fields its class declares.

Each subclass has its own op tables, filled with the ``implements`` (high-level
``__torch_function__`` calls such as ``F.linear``) and ``implements_aten``
(``__torch_dispatch__`` fallback, e.g. ``aten.addmm``) decorators. Metadata
queries (shape, dim, size, dtype) pass straight through. Anything else raises
``UnsupportedOperation`` naming the op, its argument types and the module that
was running, so users learn *where* their model stepped outside what the backend
can compute.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar

import torch

from privml.errors import UnsupportedOperation
from privml.registry import REGISTRY

_module_path: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("privml_module_path", default=())


def current_module() -> str | None:
    """Qualified name of the innermost module being run under ``module_scope`` (None outside)."""
    path = _module_path.get()
    return path[-1] if path else None


@contextlib.contextmanager
def module_scope(model: torch.nn.Module) -> Iterator[None]:
    """Track which submodule of ``model`` is running, so op errors can name it.

    The hooks act only in the thread that opened the scope: a service running one model for several clients
    at once opens one scope per thread on the same modules."""
    handles = []
    tokens: list[contextvars.Token] = []
    owner = threading.get_ident()

    def pre(name: str) -> Callable:
        def hook(_mod: torch.nn.Module, _inp: Any) -> None:
            if threading.get_ident() == owner:
                tokens.append(_module_path.set(_module_path.get() + (name or "<root>",)))

        return hook

    def post(_mod: torch.nn.Module, _inp: Any, _out: Any) -> None:
        if tokens and threading.get_ident() == owner:
            _module_path.reset(tokens.pop())

    for name, mod in model.named_modules():
        handles.append(mod.register_forward_pre_hook(pre(name)))
        handles.append(mod.register_forward_hook(post))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        while tokens:
            _module_path.reset(tokens.pop())


def _metadata_funcs() -> set:
    """Tensor attribute getters and methods that only read metadata (never data)."""
    props = ["shape", "dtype", "device", "ndim", "requires_grad", "is_leaf", "layout", "grad_fn", "grad",
             "is_sparse", "is_quantized", "is_meta", "is_nested", "is_cuda", "is_cpu", "names", "data",
             "_base", "output_nr", "_version"]
    methods = ["size", "dim", "numel", "nelement", "is_floating_point", "is_complex", "element_size",
               "__len__", "stride", "is_contiguous", "get_device", "requires_grad_", "ndimension"]
    funcs = set()
    for name in props:
        attr = getattr(torch.Tensor, name, None)
        if attr is not None and hasattr(attr, "__get__"):
            funcs.add(attr.__get__)
    for name in methods:
        attr = getattr(torch.Tensor, name, None)
        if attr is not None:
            funcs.add(attr)
    return funcs


_METADATA = _metadata_funcs()

# Ops whose failure has a known cause worth explaining beyond "unsupported".
_HINTS = {
    "__bool__": "Python control flow on a private value would reveal it; make the model's control flow "
    "independent of the data, or decrypt first.",
    "is_nonzero": "Python control flow on a private value would reveal it; decrypt first.",
    "item": "reading a value out of a private tensor needs the key: use session.decrypt(...).",
    "tolist": "reading values out of a private tensor needs the key: use session.decrypt(...).",
    "numpy": "reading values out of a private tensor needs the key: use session.decrypt(...).",
    "gt": "comparisons of private values give private bits, not Python bools; CKKS cannot compare "
    "(use a polynomial sign approximation via privml.compile).",
    "lt": "see 'gt': comparisons are not available on this backend.",
    "ge": "see 'gt': comparisons are not available on this backend.",
    "le": "see 'gt': comparisons are not available on this backend.",
    "eq": "equality tests on private values are not available on this backend.",
    "copy_": "in-place writes into a private tensor are not supported: build a new tensor instead.",
    "index_put_": "in-place writes into a private tensor are not supported: build a new tensor instead.",
    "setitem": "in-place writes into a private tensor are not supported: build a new tensor instead.",
    "__setitem__": "in-place writes into a private tensor are not supported: build a new tensor instead.",
}


def op_name(func: Any) -> str:
    """A readable dotted name for a torch function, method or aten overload."""
    if isinstance(func, torch._ops.OpOverload):
        return f"aten.{func.__name__}"
    qual = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    mod = getattr(func, "__module__", None)
    if "<locals>" in qual:
        qual = getattr(func, "__name__", qual)
    if qual.startswith("_VariableFunctionsClass."):
        return "torch." + qual.split(".", 1)[1]
    if qual.startswith("TensorBase.") or qual.startswith("_TensorBase."):
        qual = "Tensor." + qual.split(".", 1)[1]
    mod = {"torch._C._nn": "torch.nn.functional", "torch._C._VariableFunctions": "torch"}.get(mod, mod)
    if mod and not qual.startswith("Tensor."):
        return f"{mod}.{qual}"
    return f"torch.{qual}" if qual.startswith("Tensor.") else qual


def _describe(arg: Any) -> str:
    if isinstance(arg, PrivateTensor):
        return f"{type(arg).__name__}{list(arg.shape)}"
    if isinstance(arg, torch.Tensor):
        return f"Tensor{list(arg.shape)}"
    if isinstance(arg, (list, tuple)):
        return type(arg).__name__ + "(" + ", ".join(_describe(a) for a in arg) + ")"
    return type(arg).__name__


def unsupported(cls: type, func: Any, args: tuple, kwargs: dict | None, why: str = "") -> UnsupportedOperation:
    """Build the standard UnsupportedOperation error for ``func`` on a ``cls`` tensor."""
    name = op_name(func)
    short = name.rsplit(".", 1)[-1]
    argdesc = ", ".join([_describe(a) for a in args] + [f"{k}={_describe(v)}" for k, v in (kwargs or {}).items()])
    where = current_module()
    msg = f"privml: {name}({argdesc}) is not supported on {cls.__name__} ({cls.backend_name} backend)"
    if where is not None:
        msg += f" in module '{where}'"
    msg += "."
    for extra in (why, _HINTS.get(short, "")):
        if extra:
            msg += " " + extra
    return UnsupportedOperation(msg)


class PrivateTensor(torch.Tensor):
    """Base of all private representations: declared fields, per-class op tables, clear errors.

    Subclasses set ``backend_name`` and ``metadata_fields`` and register handlers
    ``handler(func, types, args, kwargs)`` with ``@Cls.implements("linear", ...)`` (registry op names,
    see :mod:`privml.registry`) or ``@Cls.implements_aten(...)``. Construct with ``Cls(payload, shape, **fields)``.
    """

    backend_name: ClassVar[str] = "abstract"
    metadata_fields: ClassVar[tuple[str, ...]] = ()
    _function_table: ClassVar[dict]
    _aten_table: ClassVar[dict]

    payload: Any

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._function_table = {}
        cls._aten_table = {}

    @staticmethod
    def __new__(cls, payload: Any, shape: Iterable[int], dtype: torch.dtype = torch.float32, **metadata: Any):
        missing = [f for f in cls.metadata_fields if f not in metadata]
        extra = [k for k in metadata if k not in cls.metadata_fields]
        if missing or extra:
            raise TypeError(f"{cls.__name__} needs fields {cls.metadata_fields}; missing {missing}, unexpected {extra}")
        t = torch.Tensor._make_wrapper_subclass(cls, tuple(shape), dtype=dtype, device="cpu", requires_grad=False)
        t.payload = payload
        for k, v in metadata.items():
            setattr(t, k, v)
        return t

    def finalize(self) -> PrivateTensor:
        """Complete any deferred work (e.g. a fused linear map not yet applied); called on model outputs."""
        return self

    def metadata(self) -> dict[str, Any]:
        """The declared metadata fields as a dict (handy for building a result like this one)."""
        return {f: getattr(self, f) for f in self.metadata_fields}

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # never touches storage
        fields = ", ".join(f"{f}={getattr(self, f, None)!r}" for f in self.metadata_fields)
        sep = ", " if fields else ""
        return f"{type(self).__name__}(shape={list(self.shape)}, dtype={self.dtype}{sep}{fields})"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    # ---- op registration -------------------------------------------------------------------
    @classmethod
    def implements(cls, *ops: Any) -> Callable[[Callable], Callable]:
        """Register ``handler(func, types, args, kwargs)`` for ops of this class.

        Each op is a registry name (``"linear"``: every entry point the registry declares for it) or a
        torch callable (that one entry point only, e.g. ``Tensor.__rsub__`` when it needs its own handler).
        """
        funcs: list[Any] = []
        for op in ops:
            for item in op if isinstance(op, (list, tuple)) else [op]:
                funcs += REGISTRY.functions(REGISTRY[item]) if isinstance(item, str) else [item]

        def decorator(handler: Callable) -> Callable:
            for f in funcs:
                cls._function_table[f] = handler
            return handler

        return decorator

    @classmethod
    def implements_aten(cls, ops: Any) -> Callable[[Callable], Callable]:
        """Register ``handler(func, types, args, kwargs)`` for aten ops reached through ``__torch_dispatch__``."""
        ops = ops if isinstance(ops, (list, tuple)) else [ops]

        def decorator(handler: Callable) -> Callable:
            for op in ops:
                cls._aten_table[op] = handler
            return handler

        return decorator

    @classmethod
    def _lookup(cls, table_name: str, func: Any) -> Callable | None:
        for klass in cls.__mro__:
            table = klass.__dict__.get(table_name)
            if table and func in table:
                return table[func]
        return None

    @classmethod
    def handles(cls, func: Any) -> bool:
        """True if this class has a handler for the torch callable ``func``."""
        return cls._lookup("_function_table", func) is not None

    @classmethod
    def supported_ops(cls) -> list[str]:
        """Registry names of every op this class has a handler for (all its entry points covered)."""
        return sorted(spec.name for spec in REGISTRY
                      if (fs := REGISTRY.functions(spec)) and all(cls.handles(f) for f in fs))

    # ---- interception ------------------------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func: Any, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        private_types = {t for t in types if issubclass(t, PrivateTensor)}
        if len(private_types) > 1:
            names = sorted(t.__name__ for t in private_types)
            raise unsupported(cls, func, args, kwargs, f"operands come from different backends: {names}.")
        owner = private_types.pop() if private_types else cls
        handler = owner._lookup("_function_table", func)
        spec = REGISTRY.for_function(func)
        if handler is not None:
            reason = spec.check(args, kwargs, _is_private, owner.backend_name) if spec and spec.check else None
            if reason:
                raise unsupported(owner, func, args, kwargs, reason)
            return handler(func, types, args, kwargs)
        if spec is not None and spec.kind != "metadata":
            raise unsupported(owner, func, args, kwargs, spec.refusal(owner.backend_name))
        # Fall back to the aten level: the call decomposes into aten ops that reach
        # __torch_dispatch__, where the per-class aten table (or a clear error) decides.
        try:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        except UnsupportedOperation as err:
            aten_name = getattr(err, "aten_name", None)
            if aten_name is None:
                raise
            why = f"(It lowers to {aten_name}, which is not implemented either.)"
            raise unsupported(owner, func, args, kwargs, why) from None

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        handler = cls._lookup("_aten_table", func)
        if handler is not None:
            return handler(func, types, args, kwargs)
        err = unsupported(cls, func, args, kwargs)
        err.aten_name = op_name(func)
        raise err


def _is_private(a: Any) -> bool:
    return isinstance(a, PrivateTensor)


def private_args(args: Iterable[Any]) -> list[PrivateTensor]:
    """The private tensors among ``args`` (one level of lists/tuples searched)."""
    found = []
    for a in args:
        if isinstance(a, PrivateTensor):
            found.append(a)
        elif isinstance(a, (list, tuple)):
            found.extend(x for x in a if isinstance(x, PrivateTensor))
    return found
