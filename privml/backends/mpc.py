"""The ``mpc`` backend: ``MPCTensor`` over CrypTen secret shares, computed by real party processes.

An :class:`MPCTensor` lives in one of two worlds:

* **Inside a party process** (started by :func:`privml.mpc.run_parties` or joined with
  :func:`privml.mpc.join_party`) its payload is a CrypTen ``MPCTensor`` and every op runs the
  CrypTen protocol at once. A :class:`PartyRuntime` carries the party's state: the cost meter
  (bytes, rounds, seconds per layer) and a ledger of every plaintext tensor the party held.
* **In the caller's process** (``privml.Session(plan)``) CrypTen is never initialised:
  ``session.encrypt(x)`` returns a lazy handle, the compiled model records its ops on it into a
  :class:`Program`, and the model's output ``finalize()`` (called by ``CompiledModel``) launches
  the parties, which replay the program on secret shares. The data party receives only ``x``, the
  weight party only the weights (each as its own process argument), and only the output party's
  opened result comes back; ``session.decrypt`` returns it.

Ops route to CrypTen's protocols directly (no ONNX): linear/conv with plain or secret-shared
weights (Beaver products), exact comparison-based ReLU and max pooling, CrypTen's sigmoid/tanh/
softmax approximations, and ``privml.functional.polyval`` for the compiler's polynomial
activations (powers batched so degree d costs ceil(log2 d) rounds). CrypTen's fixed point has 16
fractional bits in a 64-bit ring: :func:`check_fixed_point` checks a plan's calibrated ranges
before anything runs.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from privml import functional as PF
from privml.errors import InvalidInput, PrivmlError, RangeViolation
from privml.tensor import PrivateTensor, current_module, ops
from privml.tensor.base import private_args, unsupported

aten = torch.ops.aten
T = torch.Tensor

FRAC_BITS = 16  # CrypTen's default fixed-point precision
RING_BITS = 64


# --------------------------------------------------------------------------------------------- fixed point
def fixed_point_limit(frac_bits: int = FRAC_BITS) -> float:
    """Largest |value| a product can reach before its encoding (value * 2^(2 f)) wraps the 64-bit ring."""
    return 2.0 ** (RING_BITS - 1 - 2 * frac_bits)


def check_fixed_point(plan: Any, frac_bits: int = FRAC_BITS, margin: float = 2.0,
                      warn_bits: int = 10) -> list[str]:
    """Check every layer's calibrated input/output range against CrypTen's fixed-point headroom.

    A product of encoded values is value * 2^(2 f) before truncation and must stay below 2^63, so
    |value| * ``margin`` must stay below ``2^(63 - 2 f)`` (2^31 for f = 16): otherwise the result
    wraps around silently and :class:`RangeViolation` names the layer. Within ``warn_bits`` bits of
    that bound the 2-party truncation fails with probability ~|value| * 2^-(64 - 2 f) per element,
    so a warning string is returned (the caller decides how to show it).
    """
    limit = fixed_point_limit(frac_bits)
    notes: list[str] = []
    for lp in getattr(plan, "layers", []):
        peaks = [abs(float(v)) for r in (lp.in_range, lp.out_range) if r for v in r]
        if not peaks:
            continue
        peak = max(peaks)
        if not math.isfinite(peak) or peak * margin >= limit:
            raise RangeViolation(
                f"privml: layer '{lp.name}' ({lp.op}) reaches |value| = {peak:.4g} on the calibration data; "
                f"with margin {margin:g} that is beyond the MPC fixed-point bound 2^{RING_BITS - 1 - 2 * frac_bits} "
                f"= {limit:.4g} ({frac_bits} fractional bits in a {RING_BITS}-bit ring): products would wrap around "
                "silently. Rescale the inputs (or the layer's weights) before running it under MPC.")
        if peak * margin >= limit / 2.0**warn_bits:
            notes.append(f"privml: layer '{lp.name}' reaches |value| = {peak:.4g}, within {warn_bits} bits of the "
                         f"MPC fixed-point bound {limit:.4g}: 2-party truncation may fail with probability "
                         f"~{peak * 2.0 ** -(RING_BITS - 2 * frac_bits):.1e} per element.")
    return notes


# --------------------------------------------------------------------------------------------- party side
def fingerprint(t: torch.Tensor) -> str:
    """Short sha256 of a tensor's float32 values and shape (to recognise a plaintext without holding it)."""
    data = t.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(str(tuple(data.shape)).encode())
    h.update(data.numpy().tobytes())
    return h.hexdigest()[:20]


def live_fingerprints(min_numel: int = 2) -> list[str]:
    """Fingerprints of every live plain floating-point tensor in this process (a scan of the heap).

    Used to show what a party process holds at the end of a run: another party's data or weights
    would appear here if they had ever been handed to it and kept.
    """
    found = set()
    for obj in gc.get_objects():
        kind = type(obj)
        if not issubclass(kind, torch.Tensor) or issubclass(kind, PrivateTensor):
            continue
        try:
            if obj.is_meta or not obj.is_floating_point() or obj.numel() < min_numel:
                continue
            found.add(fingerprint(obj))
        except (RuntimeError, TypeError):
            continue
    return sorted(found)


class PartyRuntime:
    """One party's MPC state: CrypTen, the cost meter and the ledger of plaintexts held.

    Create it inside a party (after ``crypten.init()``, i.e. inside ``run_parties``/``join_party``).
    Every privml op on this party's tensors is metered under the running module's name.
    """

    def __init__(self, meter: bool = True) -> None:
        from privml.parties.compat import import_crypten
        from privml.parties.costs import CostMeter

        self.crypten = import_crypten()
        if not self.crypten.is_initialized():
            raise PrivmlError("privml: PartyRuntime must be created inside an MPC party (after crypten.init())")
        comm = self.crypten.comm.get()
        self.rank: int = comm.get_rank()
        self.world_size: int = comm.get_world_size()
        self.meter = CostMeter() if meter else None
        self.held: list[dict[str, Any]] = []
        self.label: str | None = None  # forces the cost label (used when replaying a recorded program)

    def note(self, what: str, tensor: torch.Tensor, source: str = "") -> None:
        """Record that this party holds ``tensor`` in clear (what it is, where it came from, its fingerprint)."""
        self.held.append({"rank": self.rank, "pid": os.getpid(), "what": what, "source": source,
                          "shape": tuple(tensor.shape), "sha256": fingerprint(tensor)})

    @contextlib.contextmanager
    def scope(self, label: str) -> Iterator[None]:
        if self.meter is None:
            yield
        else:
            with self.meter.scope(label.replace("/", ".")):
                yield

    def share(self, value: torch.Tensor | None, shape: tuple[int, ...], src: int, what: str = "tensor",
              label: str = "<share>") -> MPCTensor:
        """Secret-share ``value`` held by party ``src``; the other parties pass None (they learn only ``shape``)."""
        shape = tuple(int(s) for s in shape)
        if self.rank == src:
            if value is None:
                raise PrivmlError(f"privml: party {src} must provide the {what} it shares")
            value = torch.as_tensor(value).detach().to(torch.float32)
            if tuple(value.shape) != shape:
                raise InvalidInput(f"privml: party {src}'s {what} has shape {tuple(value.shape)}, announced {shape}")
            self.note(f"own {what}", value)
            data = value
        else:
            data = torch.zeros(shape)  # CrypTen reads only the size on non-source parties
        with self.scope(label):
            payload = self.crypten.cryptensor(data, src=src)
        return MPCTensor(payload, shape, torch.float32, runtime=self)

    def public(self, value: torch.Tensor) -> Any:
        """A CrypTen tensor of a value every party knows (shared from party 0 at no communication cost)."""
        return self.crypten.cryptensor(torch.as_tensor(value, dtype=torch.float32), src=0)

    def open(self, t: MPCTensor, dst: int | None = None, what: str = "output",
             label: str = "<open>") -> torch.Tensor | None:
        """Reveal ``t`` to party ``dst`` only (None: to every party); other parties get None."""
        if not isinstance(t, MPCTensor) or t.runtime is not self:
            raise InvalidInput("privml: open() needs an MPCTensor of this party")
        with self.scope(label):
            value = t.payload.get_plain_text(dst=dst)
        if dst is not None and dst != self.rank:
            return None
        self.note(what, value)
        return value

    def costs(self) -> dict[str, Any] | None:
        return self.meter.summary() if self.meter is not None else None


# --------------------------------------------------------------------------------------------- the tensor
@dataclass(frozen=True)
class LazyNode:
    """Payload of a not-yet-computed tensor in the caller's process: node ``node`` of a Program."""

    node: int


@dataclass(frozen=True)
class Opened:
    """Payload of a model output that the parties computed and opened to the caller."""

    value: torch.Tensor


class MPCTensor(PrivateTensor):
    """A secret-shared tensor (CrypTen payload inside a party; a lazy program node in the caller)."""

    backend_name = "mpc"
    metadata_fields = ("runtime",)

    def finalize(self) -> MPCTensor:
        """In the caller's process: run the recorded program across the parties and return the opened result."""
        if isinstance(self.payload, LazyNode):
            return self.runtime.run(self)
        return self

    @property
    def is_lazy(self) -> bool:
        return isinstance(self.payload, LazyNode)

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        if isinstance(self.payload, LazyNode):
            where = f"lazy node {self.payload.node}"
        elif isinstance(self.payload, Opened):
            where = "opened"
        else:
            where = f"shares of party {getattr(self.runtime, 'rank', '?')}"
        return f"MPCTensor(shape={list(self.shape)}, {where})"

    __str__ = __repr__


def _wrap(payload: Any, runtime: Any) -> MPCTensor:
    return MPCTensor(payload, tuple(payload.size()), torch.float32, runtime=runtime)


def _privates(args: tuple, kwargs: dict) -> list[MPCTensor]:
    return [t for t in private_args(list(args) + list(kwargs.values())) if isinstance(t, MPCTensor)]


def _raw(a: Any) -> Any:
    """CrypTen payload of a private operand; plain operands (tensors, numbers) pass unchanged."""
    return a.payload if isinstance(a, MPCTensor) else a


def _is_c(a: Any) -> bool:
    """True for a CrypTen tensor (a raw private value)."""
    return hasattr(a, "get_plain_text")


def _radd(a: Any, b: Any) -> Any:
    if _is_c(a):
        return a.add(b)
    return b.add(a)


def _rsub(a: Any, b: Any) -> Any:
    if _is_c(a):
        return a.sub(b)
    return b.neg().add(a)


def _rmul(a: Any, b: Any) -> Any:
    if _is_c(a) and a is b:
        return a.square()
    if _is_c(a):
        return a.mul(b)
    return b.mul(a)


# ---- registration: one name per operation, one handler per torch entry point
_IMPLS: dict[str, Callable[..., Any]] = {}


def _label(name: str) -> str:
    module = current_module()
    return name if module in (None, "<root>") else module


def _make_handler(name: str, func: Any) -> Callable[..., Any]:
    def handler(*args: Any, **kwargs: Any) -> Any:
        privs = _privates(args, kwargs)
        if not privs:
            raise unsupported(MPCTensor, func, args, kwargs, "no private operand found at the top level.")
        runtime = privs[0].runtime
        if any(p.runtime is not runtime for p in privs):
            raise unsupported(MPCTensor, func, args, kwargs, "its operands belong to different MPC sessions/runs.")
        if any(isinstance(p.payload, Opened) for p in privs):
            raise unsupported(MPCTensor, func, args, kwargs, "this tensor was already opened; run every op inside "
                              "the model (or decrypt and continue in clear).")
        if isinstance(runtime, Program):
            return runtime.record(name, func, args, kwargs)
        with runtime.scope(runtime.label or _label(name)):
            return _IMPLS[name](*args, **kwargs)

    return handler


def _op(name: str, funcs: list, aten_ops: list | None = None) -> Callable[[Callable], Callable]:
    def decorator(impl: Callable) -> Callable:
        _IMPLS[name] = impl
        for f in funcs:
            MPCTensor.implements(f)(_make_handler(name, f))
        for op in aten_ops or []:
            MPCTensor.implements_aten(op)(_make_handler(name, op))
        return impl

    return decorator


def _refuse(funcs: list, why: str) -> None:
    for f in funcs:
        def handler(*args: Any, _f: Any = f, **kwargs: Any) -> Any:
            raise unsupported(MPCTensor, _f, args, kwargs, why)

        MPCTensor.implements(f)(handler)


# ---- linear algebra
def _transposed(w: Any) -> Any:
    return w.payload.t() if isinstance(w, MPCTensor) else w.t()


@_op("linear", ops.LINEAR)
def _linear(x: Any, weight: Any, bias: Any = None) -> MPCTensor:
    if isinstance(x, MPCTensor):
        out = x.payload.matmul(_transposed(weight))
        rt = x.runtime
    else:  # plain input, private weight: (W x^T)^T
        if x.dim() != 2:
            raise unsupported(MPCTensor, F.linear, (x, weight, bias), {}, "a plain input with private weights "
                              "must be 2-D.")
        out = weight.payload.matmul(x.t()).t()
        rt = weight.runtime
    if bias is not None:
        out = out.add(_raw(bias))
    return _wrap(out, rt)


def _addmm(bias: Any, x: Any, wt: Any, beta: float = 1, alpha: float = 1) -> MPCTensor:
    if beta != 1 or alpha != 1:
        raise unsupported(MPCTensor, aten.addmm.default, (bias, x, wt), {}, "only beta = alpha = 1.")
    rt = _privates((bias, x, wt), {})[0].runtime
    return _wrap(_radd(_matmul_raw(_raw(x), _raw(wt)), _raw(bias)), rt)


class UnsupportedMatmul(PrivmlError):
    """Internal: shapes the private matmul cannot handle (re-raised as UnsupportedOperation)."""


def _matmul_raw(a: Any, b: Any) -> Any:
    if _is_c(a):
        return a.matmul(b)
    if a.dim() < 2 or b.dim() < 2:
        raise UnsupportedMatmul("a plain left operand times a private right operand must both be at least 2-D.")
    return b.transpose(-1, -2).matmul(a.transpose(-1, -2)).transpose(-1, -2)


@_op("matmul", [torch.matmul, T.matmul, T.__matmul__, torch.mm, T.mm], [aten.mm.default])
def _matmul(a: Any, b: Any) -> MPCTensor:
    rt = _privates((a, b), {})[0].runtime
    try:
        return _wrap(_matmul_raw(_raw(a), _raw(b)), rt)
    except UnsupportedMatmul as err:
        raise unsupported(MPCTensor, torch.matmul, (a, b), {}, str(err)) from None


_op("addmm", [], [aten.addmm.default])(_addmm)


@_op("rmatmul", [T.__rmatmul__])
def _rmatmul(x: Any, other: Any) -> MPCTensor:
    return _matmul(other, x)


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


@_op("conv2d", ops.CONV2D)
def _conv2d(x: Any, weight: Any, bias: Any = None, stride: Any = 1, padding: Any = 0, dilation: Any = 1,
            groups: int = 1) -> MPCTensor:
    args = (x, weight, bias)
    if not isinstance(x, MPCTensor):
        raise unsupported(MPCTensor, F.conv2d, args, {}, "a plain input with private weights is not supported; "
                          "share the input too.")
    if isinstance(padding, str):
        kh, kw = weight.shape[-2:]
        dh, dw = _pair(dilation)
        if padding == "valid":
            padding = 0
        elif padding == "same" and (dh * (kh - 1)) % 2 == 0 and (dw * (kw - 1)) % 2 == 0 and _pair(stride) == (1, 1):
            padding = (dh * (kh - 1) // 2, dw * (kw - 1) // 2)
        else:
            raise unsupported(MPCTensor, F.conv2d, args, {}, f"padding={padding!r} needs asymmetric padding here; "
                              "give explicit integer padding.")
    batched = x.dim() == 4
    inp = x.payload if batched else x.payload.unsqueeze(0)
    out = inp.conv2d(_raw(weight), stride=_pair(stride), padding=_pair(padding), dilation=_pair(dilation),
                     groups=int(groups))
    if bias is not None:
        out = out.add(_raw(bias).view(1, -1, 1, 1) if isinstance(bias, MPCTensor) else bias.view(1, -1, 1, 1))
    if not batched:
        out = out.squeeze(0)
    return _wrap(out, x.runtime)


# ---- pooling
@_op("avg_pool2d", ops.AVG_POOL2D)
def _avg_pool2d(x: MPCTensor, kernel_size: Any, stride: Any = None, padding: Any = 0, ceil_mode: bool = False,
                count_include_pad: bool = True, divisor_override: Any = None) -> MPCTensor:
    args = (x, kernel_size)
    if divisor_override is not None or (not count_include_pad and _pair(padding) != (0, 0)):
        raise unsupported(MPCTensor, F.avg_pool2d, args, {}, "only the default divisor (count_include_pad=True, "
                          "no divisor_override) is supported.")
    stride = kernel_size if stride is None or stride == [] else stride
    if ceil_mode:
        with torch._C.DisableTorchFunctionSubclass():
            probe = torch.empty((1, 1, *x.shape[-2:]), device="meta")
            same = (F.avg_pool2d(probe, kernel_size, stride, padding, ceil_mode=True).shape
                    == F.avg_pool2d(probe, kernel_size, stride, padding, ceil_mode=False).shape)
        if not same:
            raise unsupported(MPCTensor, F.avg_pool2d, args, {}, "ceil_mode=True changes the output size here.")
    out = x.payload.avg_pool2d(_pair(kernel_size), stride=_pair(stride), padding=_pair(padding))
    return _wrap(out, x.runtime)


@_op("adaptive_avg_pool2d", ops.ADAPTIVE_AVG_POOL2D)
def _adaptive_avg_pool2d(x: MPCTensor, output_size: Any) -> MPCTensor:
    h, w = x.shape[-2:]
    oh, ow = _pair(output_size) if output_size is not None else (h, w)
    if isinstance(output_size, (tuple, list)):
        oh = h if output_size[0] is None else int(output_size[0])
        ow = w if output_size[1] is None else int(output_size[1])
    if h % oh == 0 and w % ow == 0:  # a plain average pool: cheapest and exact up to fixed point
        k = (h // oh, w // ow)
        return _wrap(x.payload.avg_pool2d(k, stride=k), x.runtime)
    return _wrap(x.payload.adaptive_avg_pool2d((oh, ow)), x.runtime)


@_op("max_pool2d", ops.MAX_POOL2D)
def _max_pool2d(x: MPCTensor, kernel_size: Any, stride: Any = None, padding: Any = 0, dilation: Any = 1,
                ceil_mode: bool = False, return_indices: bool = False) -> MPCTensor:
    if return_indices:
        raise unsupported(MPCTensor, F.max_pool2d, (x, kernel_size), {}, "return_indices=True would reveal "
                          "positions; not supported.")
    stride = kernel_size if stride is None or stride == [] else stride
    out = x.payload.max_pool2d(_pair(kernel_size), padding=_pair(padding), stride=_pair(stride),
                               dilation=_pair(dilation), ceil_mode=bool(ceil_mode))
    return _wrap(out, x.runtime)


# ---- normalisation, dropout
def _channel_view(v: Any, ndim: int) -> Any:
    shape = (1, -1) + (1,) * (ndim - 2)
    return v.view(*shape) if _is_c(v) else v.reshape(shape)


@_op("batch_norm", ops.BATCH_NORM)
def _batch_norm(x: MPCTensor, running_mean: Any, running_var: Any, weight: Any = None, bias: Any = None,
                training: bool = False, momentum: float = 0.1, eps: float = 1e-5) -> MPCTensor:
    """Eval-mode batch norm as a per-channel affine map (exact when the statistics are public)."""
    if training or running_mean is None or running_var is None:
        raise unsupported(MPCTensor, F.batch_norm, (x,), {}, "batch statistics would need a private division; "
                          "call model.eval() (privml.compile folds BatchNorm into the layer before it).")
    var = _raw(running_var)
    inv = var.add(eps).inv_sqrt() if _is_c(var) else torch.rsqrt(var + eps)  # CrypTen: Newton approximation
    scale = inv if weight is None else _rmul(inv, _raw(weight))
    shift = _rmul(_raw(running_mean), scale)
    shift = shift.neg() if bias is None else _rsub(_raw(bias), shift)
    n = x.dim()
    out = _rmul(x.payload, _channel_view(scale, n))
    return _wrap(_radd(out, _channel_view(shift, n)), x.runtime)


@_op("dropout", ops.DROPOUT)
def _dropout(x: MPCTensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> MPCTensor:
    if training:
        raise unsupported(MPCTensor, F.dropout, (x,), {}, "dropout in training mode; call model.eval().")
    return _wrap(x.payload, x.runtime)


# ---- elementwise arithmetic
@_op("add", ops.ADD, [aten.add.Tensor])
def _add(a: Any, b: Any, alpha: Any = 1) -> MPCTensor:
    rt = _privates((a, b), {})[0].runtime
    rb = _raw(b)
    if alpha != 1:
        rb = rb.mul(alpha) if _is_c(rb) else rb * alpha
    return _wrap(_radd(_raw(a), rb), rt)


@_op("sub", [torch.sub, T.sub, T.__sub__, T.sub_, T.__isub__])
def _sub(a: Any, b: Any, alpha: Any = 1) -> MPCTensor:
    rt = _privates((a, b), {})[0].runtime
    rb = _raw(b)
    if alpha != 1:
        rb = rb.mul(alpha) if _is_c(rb) else rb * alpha
    return _wrap(_rsub(_raw(a), rb), rt)


@_op("rsub", [T.__rsub__])
def _rsub_op(x: MPCTensor, other: Any) -> MPCTensor:
    return _wrap(_rsub(_raw(other), x.payload), x.runtime)


@_op("mul", ops.MUL, [aten.mul.Tensor])
def _mul(a: Any, b: Any) -> MPCTensor:
    rt = _privates((a, b), {})[0].runtime
    return _wrap(_rmul(_raw(a), _raw(b)), rt)


@_op("div", ops.DIV)
def _div(a: Any, b: Any, rounding_mode: Any = None) -> MPCTensor:
    if isinstance(b, MPCTensor) or not isinstance(a, MPCTensor) or rounding_mode is not None:
        raise unsupported(MPCTensor, torch.div, (a, b), {}, "only division of a private value by a public "
                          "constant (no rounding_mode) is available; a private divisor needs an approximate "
                          "reciprocal.")
    return _wrap(a.payload.div(b), a.runtime)


@_op("neg", ops.NEG)
def _neg(x: MPCTensor) -> MPCTensor:
    return _wrap(x.payload.neg(), x.runtime)


@_op("square", ops.SQUARE)
def _square(x: MPCTensor) -> MPCTensor:
    return _wrap(x.payload.square(), x.runtime)


@_op("pow", ops.POW)
def _pow(x: Any, exponent: Any) -> MPCTensor:
    ok = isinstance(exponent, int) or (isinstance(exponent, float) and exponent.is_integer())
    if not isinstance(x, MPCTensor) or not ok or exponent < 0:
        raise unsupported(MPCTensor, torch.pow, (x, exponent), {}, "only a private base with a non-negative "
                          "integer exponent is polynomial.")
    return _wrap(x.payload.pow(int(exponent)), x.runtime)


@_op("sum", ops.SUM)
def _sum(x: MPCTensor, dim: Any = None, keepdim: bool = False, dtype: Any = None) -> MPCTensor:
    if dtype not in (None, torch.float32):
        raise unsupported(MPCTensor, torch.sum, (x,), {"dtype": dtype}, "private sums are float32.")
    out = x.payload.sum() if dim is None else x.payload.sum(dim, keepdim=keepdim)
    return _wrap(out, x.runtime)


@_op("mean", ops.MEAN)
def _mean(x: MPCTensor, dim: Any = None, keepdim: bool = False, dtype: Any = None) -> MPCTensor:
    if dtype not in (None, torch.float32):
        raise unsupported(MPCTensor, torch.mean, (x,), {"dtype": dtype}, "private means are float32.")
    out = x.payload.mean() if dim is None else x.payload.mean(dim, keepdim=keepdim)
    return _wrap(out, x.runtime)


@_op("cat", ops.CAT)
def _cat(tensors: Any, dim: int = 0) -> MPCTensor:
    privs = [t for t in tensors if isinstance(t, MPCTensor)]
    rt = privs[0].runtime
    parts = [t.payload if isinstance(t, MPCTensor) else rt.public(t) for t in tensors]
    return _wrap(rt.crypten.cat(parts, dim=dim), rt)


# ---- shape ops (local, free)
@_op("flatten", ops.FLATTEN)
def _flatten(x: MPCTensor, start_dim: int = 0, end_dim: int = -1) -> MPCTensor:
    return _wrap(x.payload.flatten(start_dim, end_dim), x.runtime)


def _shape_arg(args: tuple, kwargs: dict) -> tuple[int, ...]:
    shape = kwargs.get("shape", kwargs.get("size", args[0] if len(args) == 1 else args))
    if isinstance(shape, torch.dtype) or (len(args) == 1 and isinstance(args[0], torch.dtype)):
        raise InvalidInput("privml: view(dtype) reinterprets bits; not available on private tensors")
    if isinstance(shape, int):
        shape = (shape,)
    return tuple(int(s) for s in shape)


@_op("reshape", ops.RESHAPE, [aten.view.default, aten._unsafe_view.default])
def _reshape(x: MPCTensor, *args: Any, **kwargs: Any) -> MPCTensor:
    return _wrap(x.payload.reshape(_shape_arg(args, kwargs)), x.runtime)


@_op("identity", ops.IDENTITY, [aten.detach.default, aten.alias.default, aten.clone.default])
def _identity(x: MPCTensor, *args: Any, **kwargs: Any) -> MPCTensor:
    return _wrap(x.payload, x.runtime)


@_op("t", [T.t, torch.t], [aten.t.default])
def _t(x: MPCTensor) -> MPCTensor:
    return _wrap(x.payload.t(), x.runtime)


@_op("transpose", [T.transpose, torch.transpose])
def _transpose(x: MPCTensor, dim0: int, dim1: int) -> MPCTensor:
    return _wrap(x.payload.transpose(dim0, dim1), x.runtime)


@_op("permute", [T.permute, torch.permute])
def _permute(x: MPCTensor, *dims: Any) -> MPCTensor:
    dims = tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
    return _wrap(x.payload.permute(*dims), x.runtime)


@_op("unsqueeze", [T.unsqueeze, torch.unsqueeze])
def _unsqueeze(x: MPCTensor, dim: int) -> MPCTensor:
    return _wrap(x.payload.unsqueeze(dim), x.runtime)


@_op("squeeze", [T.squeeze, torch.squeeze])
def _squeeze(x: MPCTensor, dim: Any = None) -> MPCTensor:
    return _wrap(x.payload.squeeze() if dim is None else x.payload.squeeze(dim), x.runtime)


def _check_index(idx: Any) -> None:
    items = idx if isinstance(idx, tuple) else (idx,)
    for i in items:
        if not (i is None or i is Ellipsis or isinstance(i, (int, slice))):
            raise InvalidInput("privml: private tensors take only int/slice/None/... indices (public positions)")


@_op("getitem", [T.__getitem__])
def _getitem(x: MPCTensor, idx: Any) -> MPCTensor:
    _check_index(idx)
    return _wrap(x.payload[idx], x.runtime)


# ---- activations
@_op("relu", ops.RELU, [aten.relu.default])
def _relu(x: MPCTensor, inplace: bool = False) -> MPCTensor:
    return _wrap(x.payload.relu(), x.runtime)  # exact: x * [x >= 0] from a secure comparison


@_op("leaky_relu", ops.LEAKY_RELU)
def _leaky_relu(x: MPCTensor, negative_slope: float = 0.01, inplace: bool = False) -> MPCTensor:
    s = float(negative_slope)
    out = x.payload.relu().mul(1.0 - s).add(x.payload.mul(s))  # (1 - s) relu(x) + s x, exact
    return _wrap(out, x.runtime)


@_op("silu", ops.SILU)
def _silu(x: MPCTensor, inplace: bool = False) -> MPCTensor:
    return _wrap(x.payload.mul(x.payload.sigmoid()), x.runtime)


@_op("sigmoid", ops.SIGMOID)
def _sigmoid(x: MPCTensor) -> MPCTensor:
    return _wrap(x.payload.sigmoid(), x.runtime)


@_op("tanh", ops.TANH)
def _tanh(x: MPCTensor) -> MPCTensor:
    return _wrap(x.payload.tanh(), x.runtime)


@_op("softmax", ops.SOFTMAX)
def _softmax(x: MPCTensor, dim: Any = None, _stacklevel: int = 3, dtype: Any = None) -> MPCTensor:
    if dim is None:
        raise unsupported(MPCTensor, F.softmax, (x,), {}, "give softmax an explicit dim.")
    return _wrap(x.payload.softmax(dim), x.runtime)


def power_schedule(degree: int) -> list[list[tuple[int, int, int]]]:
    """Rounds of (k, a, b) with t^k = t^a * t^b: every power up to ``degree`` in ceil(log2(degree)) rounds."""
    rounds, top = [], 1
    while top < degree:
        new = min(2 * top, degree)
        rounds.append([(k, top, k - top) for k in range(top + 1, new + 1)])
        top = new
    return rounds


@_op("polyval", ops.POLYVAL)
def _polyval(x: MPCTensor, coeffs: Any, domain: Any = None) -> MPCTensor:
    """sum_k c_k t^k (t = x or x mapped from ``domain`` to [-1, 1]); each round of powers is one batched product."""
    c = [float(v) for v in (coeffs.tolist() if isinstance(coeffs, torch.Tensor) else coeffs)]
    while len(c) > 1 and c[-1] == 0.0:
        c.pop()
    t = x.payload
    if domain is not None:
        alpha, beta = PF.to_unit_interval(domain)
        t = t.mul(alpha).add(beta)
    powers = {1: t}
    for level in power_schedule(len(c) - 1):
        if len(level) == 1 and level[0][1] == level[0][2]:
            k, a, _ = level[0]
            powers[k] = powers[a].square()
            continue
        crypten = x.runtime.crypten
        left = crypten.stack([powers[a] for _, a, _ in level])
        right = crypten.stack([powers[b] for _, _, b in level])
        prod = left.mul(right)  # one Beaver round for the whole level
        for i, (k, _, _) in enumerate(level):
            powers[k] = prod[i]
    out = t.mul(0.0) if len(c) == 1 else None
    for k in range(1, len(c)):
        if c[k] != 0.0:
            term = powers[k].mul(c[k])
            out = term if out is None else out.add(term)
    if out is None:
        out = t.mul(0.0)
    return _wrap(out.add(c[0]), x.runtime)


_refuse(ops.GELU, "GELU has no exact MPC protocol here: replace it with a polynomial (privml.nn.PolyActivation "
        "fitted on the calibrated range) or use ReLU.")
_refuse(ops.SOFTPLUS, "softplus has no exact MPC protocol here: replace it with a polynomial "
        "(privml.nn.PolyActivation).")


# --------------------------------------------------------------------------------------------- lazy programs
@dataclass(frozen=True)
class Ref:
    """A reference to a program node inside a recorded op's arguments."""

    node: int


@dataclass(frozen=True)
class Const:
    """A plain tensor argument (a model weight) of a recorded op, by index into the program's constants."""

    index: int


@dataclass
class Step:
    name: str
    args: tuple
    kwargs: dict
    label: str
    node: int


def _meta(a: Any) -> Any:
    if isinstance(a, MPCTensor):
        return torch.empty(a.shape, device="meta")
    if isinstance(a, torch.Tensor):
        return torch.empty(a.shape, dtype=a.dtype, device="meta")
    return a


def _zeros(a: Any) -> Any:
    if isinstance(a, MPCTensor):
        return torch.zeros(a.shape)
    if isinstance(a, torch.Tensor):
        return torch.zeros(a.shape, dtype=a.dtype)
    return a


def _infer_shape(func: Any, args: tuple, kwargs: dict) -> tuple[int, ...]:
    """Output shape of ``func`` on stand-ins of the operands (meta tensors, zeros as a fallback)."""
    for stand_in in (_meta, _zeros):
        try:
            with torch._C.DisableTorchFunctionSubclass(), torch.no_grad():
                out = func(*tree_map(stand_in, args), **tree_map(stand_in, kwargs))
            if isinstance(out, torch.Tensor):
                return tuple(out.shape)
        except (RuntimeError, NotImplementedError, TypeError, ValueError, IndexError):
            continue
    raise unsupported(MPCTensor, func, args, kwargs, "its output shape could not be determined.")


class Program:
    """The ops a model applied to one lazy input, recorded in the caller's process and replayed by the parties."""

    def __init__(self, backend: MPCBackend, x: torch.Tensor) -> None:
        self.backend = backend
        self.x = x.detach().to(torch.float32).clone()
        self.steps: list[Step] = []
        self.constants: list[torch.Tensor] = []
        self._const_ids: dict[int, int] = {}
        self.costs: dict[str, Any] | None = None
        self.ran = False

    def input(self) -> MPCTensor:
        return MPCTensor(LazyNode(0), tuple(self.x.shape), torch.float32, runtime=self)

    def _template(self, a: Any) -> Any:
        if isinstance(a, MPCTensor):
            if not isinstance(a.payload, LazyNode) or a.runtime is not self:
                raise InvalidInput("privml: an op mixes tensors from different MPC programs")
            return Ref(a.payload.node)
        if isinstance(a, torch.Tensor):
            key = id(a)
            if key not in self._const_ids:
                self._const_ids[key] = len(self.constants)
                self.constants.append(a)  # keep it alive so the id stays unique
            return Const(self._const_ids[key])
        return a

    def record(self, name: str, func: Any, args: tuple, kwargs: dict) -> MPCTensor:
        if self.ran:
            raise InvalidInput("privml: this MPC program already ran; encrypt a new input for a new evaluation")
        shape = _infer_shape(func, args, kwargs)
        node = len(self.steps) + 1
        self.steps.append(Step(name, tree_map(self._template, args), tree_map(self._template, kwargs),
                               _label(name), node))
        return MPCTensor(LazyNode(node), shape, torch.float32, runtime=self)

    def run(self, out: MPCTensor) -> MPCTensor:
        """Launch the parties, replay the program on secret shares, open ``out`` to the output party."""
        b = self.backend
        self.ran = True
        consts = [c.detach().to(torch.float32).clone() for c in self.constants]
        skeleton = {"steps": self.steps, "input_shape": tuple(self.x.shape), "output": out.payload.node,
                    "const_shapes": [tuple(c.shape) for c in consts], "data_party": b.data_party,
                    "weight_party": b.weight_party, "output_party": b.output_party}
        rank_args = []
        for r in range(b.parties):
            own = {"input": self.x if r == b.data_party else None,
                   "constants": consts if b.weight_party in (None, r) else None}
            rank_args.append((own,))
        from privml.parties.costs import combine_summaries
        from privml.parties.launcher import run_parties

        results = run_parties(_replay_party, b.parties, (skeleton,), timeout=b.timeout, ttp=b.ttp,
                              roles=b.roles, rank_args=rank_args)
        reader = b.output_party if b.output_party is not None else 0
        value = results[reader]["output"]
        self.costs = combine_summaries([r["costs"] for r in results])
        self.costs["seconds_wall"] = results.seconds
        b.runs.append({"costs": self.costs, "held": [r["held"] for r in results]})
        return MPCTensor(Opened(value), tuple(value.shape), torch.float32, runtime=self)


def _resolve(rt: PartyRuntime, template: Any, env: dict[int, MPCTensor], consts: list, skeleton: dict,
             cache: dict[int, Any]) -> Any:
    def one(a: Any) -> Any:
        if isinstance(a, Ref):
            return env[a.node]
        if isinstance(a, Const):
            if a.index not in cache:
                owner = skeleton["weight_party"]
                if owner is None:  # public weights: every party holds them in clear
                    cache[a.index] = consts[a.index]
                else:
                    value = consts[a.index] if rt.rank == owner else None
                    cache[a.index] = rt.share(value, skeleton["const_shapes"][a.index], owner, what="weight",
                                              label="<share weights>")
            return cache[a.index]
        return a

    return tree_map(one, template)


def _replay_party(ctx: Any, skeleton: dict, own: dict) -> dict:
    """Party side of :meth:`Program.run`: share input and weights, replay every step, open the output."""
    from privml.parties.launcher import agree

    h = hashlib.sha256(repr([(s.name, s.node) for s in skeleton["steps"]]).encode())
    h.update(repr((skeleton["input_shape"], skeleton["const_shapes"])).encode())
    agree(ctx, h.digest(), "program (model/shapes)")
    rt = PartyRuntime()
    consts = own["constants"]
    if consts is not None and skeleton["weight_party"] is None:
        for c in consts:
            rt.note("public weight", c)
    x = rt.share(own["input"], skeleton["input_shape"], skeleton["data_party"], what="input", label="<share input>")
    env: dict[int, MPCTensor] = {0: x}
    cache: dict[int, Any] = {}
    for step in skeleton["steps"]:
        args = _resolve(rt, step.args, env, consts, skeleton, cache)
        kwargs = _resolve(rt, step.kwargs, env, consts, skeleton, cache)
        rt.label = step.label
        try:
            result = _make_handler(step.name, step.name)(*args, **kwargs)
        finally:
            rt.label = None
        env[step.node] = result
    value = rt.open(env[skeleton["output"]], dst=skeleton["output_party"], label="<open output>")
    return {"output": value, "costs": rt.costs(), "held": rt.held}


# --------------------------------------------------------------------------------------------- backend object
class MPCBackend:
    """Session side of the MPC backend: party roles, lazy handles, costs and the trust statement.

    ``parties``: how many party processes (2 or more). ``data_party`` secret-shares the input,
    ``weight_party`` secret-shares the model's weights (None: the weights are public to every
    party, which makes linear layers local and cheaper), ``output_party`` is the only party that
    learns the output (None: the data party). ``ttp=True`` adds CrypTen's dealer process for the
    Beaver triples instead of letting party 0 make them. ``timeout`` bounds every wait on another
    party (a dead or silent party raises ``PartyFailure``).
    """

    name = "mpc"

    def __init__(self, plan: Any = None, parties: int = 2, data_party: int = 0, weight_party: int | None = 1,
                 output_party: int | None = None, timeout: float = 120.0, ttp: bool = False,
                 range_margin: float = 2.0) -> None:
        if not isinstance(parties, int) or parties < 2:
            raise InvalidInput(f"privml: the mpc backend needs parties >= 2, got {parties!r}")
        for what, r in (("data_party", data_party), ("weight_party", weight_party), ("output_party", output_party)):
            if r is not None and not (isinstance(r, int) and 0 <= r < parties):
                raise InvalidInput(f"privml: {what} must be a party rank in 0..{parties - 1}, got {r!r}")
        self.plan = plan
        self.parties = parties
        self.data_party = data_party
        self.weight_party = weight_party
        self.output_party = data_party if output_party is None else output_party
        self.timeout = float(timeout)
        self.ttp = bool(ttp)
        self.runs: list[dict[str, Any]] = []
        self.range_notes = check_fixed_point(plan, margin=range_margin) if plan is not None else []
        for note in self.range_notes:
            warnings.warn(note, stacklevel=3)

    @property
    def provider(self) -> str:
        return "TTP" if self.ttp else "TFP"

    @property
    def roles(self) -> list[str]:
        names = []
        for r in range(self.parties):
            tags = [t for t, who in (("data", self.data_party), ("model", self.weight_party),
                                     ("output", self.output_party)) if who == r]
            names.append("-".join([f"party{r}", *tags]))
        return names

    def encrypt(self, x: torch.Tensor) -> MPCTensor:
        """A lazy handle for ``x``: the data party secret-shares it when the model runs."""
        return Program(self, x).input()

    def decrypt(self, t: MPCTensor) -> torch.Tensor:
        """The opened output (runs the parties first if ``t`` was not computed yet)."""
        if isinstance(t.payload, LazyNode):
            t = t.finalize()
        if not isinstance(t.payload, Opened):
            raise PrivmlError("privml: this MPCTensor lives inside a party; open it there with PartyRuntime.open")
        return t.payload.value.clone()

    def costs(self) -> dict[str, Any]:
        """Costs of every run of this session, summed: whole-system bytes, rounds (per party), seconds, per layer.

        Each model call is one run of the parties; ``wall_seconds`` includes starting them. ``layers`` maps
        each module (or op, or a ``<share ...>``/``<open ...>`` step) to its bytes, rounds and seconds.
        """
        out: dict[str, Any] = {"provider": self.provider, "parties": self.parties, "runs": len(self.runs),
                               "bytes": 0, "rounds": 0, "comm_seconds": 0.0, "party_seconds": 0.0,
                               "wall_seconds": 0.0}
        layers: dict[str, dict[str, Any]] = {}
        for run in self.runs:
            c = run["costs"]
            out["bytes"] += c["total"]["bytes"]
            out["rounds"] += c["total"]["rounds"]
            out["comm_seconds"] += c["total"]["comm_seconds"]
            out["party_seconds"] += c["total"]["seconds"]
            out["wall_seconds"] += c.get("seconds_wall") or 0.0
            for name, entry in c["scopes"].items():
                acc = layers.setdefault(name, {"bytes": 0, "rounds": 0, "seconds": 0.0})
                acc["bytes"] += entry["bytes"]
                acc["rounds"] += entry["rounds"]
                acc["seconds"] += entry["seconds"]
        out["layers"] = layers
        return out

    def trust_statement(self) -> list[str]:
        provider = {
            "TFP": "Beaver triples: TFP (CrypTen's trusted first party): party 0 generates every triple itself, so "
                   "a dishonest party 0 could break privacy or correctness; this is a semi-honest test setting, not a "
                   "secure deployment.",
            "TTP": "Beaver triples: TTP: a separate dealer process generates the triples; it sees no inputs, but "
                   "must not collude with any party.",
        }[self.provider]
        weights = (f"party {self.weight_party} secret-shares the model weights; the other parties hold only their "
                   "shares (uniformly random ring elements) and the architecture." if self.weight_party is not None
                   else "the model weights are PUBLIC: every party holds them in clear.")
        return [
            f"MPC over {self.parties} party processes (CrypTen additive secret sharing, {FRAC_BITS}-bit fixed point, "
            f"semi-honest parties, no collusion).",
            f"party {self.data_party} secret-shares the input; the other parties never receive it.",
            weights,
            f"only party {self.output_party} learns the output; the session returns it to the caller.",
            "in a privml.Session the calling process holds input and model and hands the input only to the data "
            "party and the weights only to the weight party (each as its own process arguments).",
            provider,
            "leakage: shapes (batch size, layer sizes), the architecture and timing are visible to every party.",
        ]


def make_backend(plan: Any = None, **options: Any) -> MPCBackend:
    """Backend factory used by ``privml.Session`` (options: see :class:`MPCBackend`)."""
    return MPCBackend(plan, **options)
