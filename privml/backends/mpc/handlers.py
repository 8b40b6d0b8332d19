"""The MPC op handlers: each registry op the mpc backend computes, as CrypTen protocol calls.

One entry handler, :func:`dispatch` (``(func, types, args, kwargs)``), is registered for every
entry point. It checks the operands, then either records the op on a lazy ``Program`` (caller's
process) or runs the protocol now (:func:`execute`, inside a party). Protocols are looked up by a
*key*: the registry op name, or a variant name where entry points of one op take different
arguments (``t``/``permute`` of ``transpose``, ``squeeze`` of ``unsqueeze``, ``rsub``, ``rmatmul``,
``relu6``, ``addmm``). Programs record keys, so the parties replay them by name.

Exact ops: linear maps with plain or secret-shared weights (Beaver products), comparison-based
ReLU, hardtanh/ReLU6, hardswish, hardsigmoid and max pooling; CrypTen's Newton/exp approximations
for sigmoid, tanh, softmax and the inverse square root of batch/layer norm; ``polyval`` for the
compiler's polynomials (degree d in ceil(log2 d) rounds).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from privml import functional as PF
from privml.backends.mpc.tensor import MPCTensor, Opened, PartyRuntime, wrap
from privml.errors import InvalidInput, PrivmlError
from privml.registry import REGISTRY
from privml.tensor import current_module
from privml.tensor.base import private_args, unsupported

aten = torch.ops.aten
T = torch.Tensor

_IMPLS: dict[str, Callable[..., Any]] = {}
_KEYS: dict[Any, str] = {}  # torch entry point -> protocol key


# --------------------------------------------------------------------------------------------- routing
def label(key: str) -> str:
    """Cost label of an op: the running module's name, or the op's key outside any module."""
    module = current_module()
    return key if module in (None, "<root>") else module


def _privates(args: tuple, kwargs: dict) -> list[MPCTensor]:
    return [t for t in private_args(list(args) + list(kwargs.values())) if isinstance(t, MPCTensor)]


def dispatch(func: Any, types: tuple, args: tuple, kwargs: dict) -> Any:
    """Entry handler of every MPC op: record it (lazy program) or run its protocol (inside a party)."""
    privs = _privates(args, kwargs)
    if not privs:
        raise unsupported(MPCTensor, func, args, kwargs, "no private operand found at the top level.")
    runtime = privs[0].runtime
    if any(p.runtime is not runtime for p in privs):
        raise unsupported(MPCTensor, func, args, kwargs, "its operands belong to different MPC sessions/runs.")
    if any(isinstance(p.payload, Opened) for p in privs):
        raise unsupported(MPCTensor, func, args, kwargs, "this tensor was already opened; run every op inside "
                          "the model (or decrypt and continue in clear).")
    key = _KEYS[func]
    if not isinstance(runtime, PartyRuntime):  # a Program in the caller's process
        return runtime.record(key, func, args, kwargs)
    return execute(runtime, key, args, kwargs)


def execute(rt: PartyRuntime, key: str, args: tuple, kwargs: dict, cost_label: str | None = None) -> MPCTensor:
    """Run protocol ``key`` on this party's operands, metered under ``cost_label`` (default: :func:`label`)."""
    with rt.scope(cost_label or label(key)):
        return _IMPLS[key](*args, **kwargs)


def _entry_points(ops: tuple) -> list[Any]:
    found: list[Any] = []
    for op in ops:
        found += REGISTRY.functions(REGISTRY[op]) if isinstance(op, str) else [op]
    return found


def _op(key: str, *ops: Any, aten_ops: tuple = ()) -> Callable[[Callable], Callable]:
    """Make ``impl`` the protocol ``key``, reached from registry op names / torch callables ``ops`` and ``aten_ops``.

    A later registration of an entry point wins (``_op("rsub", T.__rsub__)`` after ``_op("sub", "sub")``).
    """
    def decorator(impl: Callable) -> Callable:
        _IMPLS[key] = impl
        for f in _entry_points(ops):
            _KEYS[f] = key
        MPCTensor.implements(*ops)(dispatch)
        for op in aten_ops:
            _KEYS[op] = key
        if aten_ops:
            MPCTensor.implements_aten(list(aten_ops))(dispatch)
        return impl

    return decorator


# --------------------------------------------------------------------------------------------- raw helpers
def _raw(a: Any) -> Any:
    """CrypTen payload of a private operand; plain operands (tensors, numbers) pass unchanged."""
    return a.payload if isinstance(a, MPCTensor) else a


def _is_c(a: Any) -> bool:
    """True for a CrypTen tensor (a raw private value)."""
    return hasattr(a, "get_plain_text")


def _radd(a: Any, b: Any) -> Any:
    return a.add(b) if _is_c(a) else b.add(a)


def _rsub(a: Any, b: Any) -> Any:
    return a.sub(b) if _is_c(a) else b.neg().add(a)


def _rmul(a: Any, b: Any) -> Any:
    if _is_c(a) and a is b:
        return a.square()
    return a.mul(b) if _is_c(a) else b.mul(a)


def _rt(*operands: Any) -> PartyRuntime:
    return _privates(operands, {})[0].runtime


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


# --------------------------------------------------------------------------------------------- linear algebra
@_op("linear", "linear")
def _linear(x: Any, weight: Any, bias: Any = None) -> MPCTensor:
    if isinstance(x, MPCTensor):
        out = x.payload.matmul(weight.payload.t() if isinstance(weight, MPCTensor) else weight.t())
    else:  # plain input, private weight: (W x^T)^T
        if x.dim() != 2:
            raise unsupported(MPCTensor, F.linear, (x, weight, bias), {}, "a plain input with private weights "
                              "must be 2-D.")
        out = weight.payload.matmul(x.t()).t()
    if bias is not None:
        out = out.add(_raw(bias))
    return wrap(out, _rt(x, weight))


class UnsupportedMatmul(PrivmlError):
    """Internal: shapes the private matmul cannot handle (re-raised as UnsupportedOperation)."""


def _matmul_raw(a: Any, b: Any) -> Any:
    if _is_c(a):
        return a.matmul(b)
    if a.dim() < 2 or b.dim() < 2:
        raise UnsupportedMatmul("a plain left operand times a private right operand must both be at least 2-D.")
    return b.transpose(-1, -2).matmul(a.transpose(-1, -2)).transpose(-1, -2)


@_op("matmul", "matmul", aten_ops=(aten.mm.default,))
def _matmul(a: Any, b: Any) -> MPCTensor:
    try:
        return wrap(_matmul_raw(_raw(a), _raw(b)), _rt(a, b))
    except UnsupportedMatmul as err:
        raise unsupported(MPCTensor, torch.matmul, (a, b), {}, str(err)) from None


@_op("rmatmul", T.__rmatmul__)
def _rmatmul(x: Any, other: Any) -> MPCTensor:
    return _matmul(other, x)


@_op("addmm", aten_ops=(aten.addmm.default,))
def _addmm(bias: Any, x: Any, wt: Any, beta: float = 1, alpha: float = 1) -> MPCTensor:
    if beta != 1 or alpha != 1:
        raise unsupported(MPCTensor, aten.addmm.default, (bias, x, wt), {}, "only beta = alpha = 1.")
    return wrap(_radd(_matmul_raw(_raw(x), _raw(wt)), _raw(bias)), _rt(bias, x, wt))


@_op("conv2d", "conv2d")
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
    return wrap(out, x.runtime)


# --------------------------------------------------------------------------------------------- pooling
@_op("avg_pool2d", "avg_pool2d")
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
    return wrap(out, x.runtime)


@_op("adaptive_avg_pool2d", "adaptive_avg_pool2d")
def _adaptive_avg_pool2d(x: MPCTensor, output_size: Any) -> MPCTensor:
    """A plain average pool when the sizes divide (always for (1, 1)); CrypTen's adaptive pool otherwise."""
    h, w = x.shape[-2:]
    size = output_size if isinstance(output_size, (tuple, list)) else (output_size, output_size)
    oh = h if size[0] is None else int(size[0])
    ow = w if size[1] is None else int(size[1])
    if h % oh == 0 and w % ow == 0:  # cheapest, and exact up to fixed point
        k = (h // oh, w // ow)
        return wrap(x.payload.avg_pool2d(k, stride=k), x.runtime)
    return wrap(x.payload.adaptive_avg_pool2d((oh, ow)), x.runtime)


@_op("max_pool2d", "max_pool2d")
def _max_pool2d(x: MPCTensor, kernel_size: Any, stride: Any = None, padding: Any = 0, dilation: Any = 1,
                ceil_mode: bool = False, return_indices: bool = False) -> MPCTensor:
    """Exact max by secure comparisons (padding and ceil_mode included).

    CrypTen pads each party's share with -2^24, so a padded position counts as -256 * parties: exact
    unless every real value of a window that overlaps the border is below that (after a ReLU: never).
    """
    if return_indices:
        raise unsupported(MPCTensor, F.max_pool2d, (x, kernel_size), {}, "return_indices=True would reveal "
                          "positions; not supported.")
    stride = kernel_size if stride is None or stride == [] else stride
    out = x.payload.max_pool2d(_pair(kernel_size), padding=_pair(padding), stride=_pair(stride),
                               dilation=_pair(dilation), ceil_mode=bool(ceil_mode))
    return wrap(out, x.runtime)


# --------------------------------------------------------------------------------------------- normalisation
def _channel_view(v: Any, ndim: int) -> Any:
    shape = (1, -1) + (1,) * (ndim - 2)
    return v.view(*shape) if _is_c(v) else v.reshape(shape)


@_op("batch_norm", "batch_norm")
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
    return wrap(_radd(out, _channel_view(shift, n)), x.runtime)


LAYER_NORM_EXTRA_NEWTON = 8
"""Newton steps for 1/sqrt(var + eps) beyond CrypTen's 3 (so small variances, down to ~1e-3, converge)."""


@_op("layer_norm", "layer_norm")
def _layer_norm(x: MPCTensor, normalized_shape: Any, weight: Any = None, bias: Any = None,
                eps: float = 1e-5) -> MPCTensor:
    """(x - mean) / sqrt(var + eps) over the trailing dims, then the affine map (plain or shared weight/bias).

    The statistics are private, so 1/sqrt(var + eps) is CrypTen's ``inv_sqrt`` (exp initial guess and 3
    Newton steps, accurate for var + eps in about [0.1, 200]) followed by :data:`LAYER_NORM_EXTRA_NEWTON`
    more Newton steps, which extend the domain down to about 1e-3 (from below, Newton's error shrinks by
    1/3 per step until it converges quadratically). Each step costs 3 rounds.
    """
    n = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
    dims = tuple(range(-n, 0))
    centred = x.payload.sub(x.payload.mean(dims, keepdim=True))
    v = centred.square().mean(dims, keepdim=True).add(eps)
    inv = v.inv_sqrt()
    for _ in range(LAYER_NORM_EXTRA_NEWTON):
        inv = inv.mul(v.mul(inv.square()).neg().add(3.0)).div(2)
    out = centred.mul(inv)
    if weight is not None:
        out = out.mul(_raw(weight))
    if bias is not None:
        out = out.add(_raw(bias))
    return wrap(out, x.runtime)


# --------------------------------------------------------------------------------------------- eval-mode identities
@_op("dropout", "dropout")
def _dropout(x: MPCTensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> MPCTensor:
    if training and p > 0:
        raise unsupported(MPCTensor, F.dropout, (x,), {}, "dropout in training mode; call model.eval().")
    return wrap(x.payload, x.runtime)


@_op("stochastic_depth", "stochastic_depth")
def _stochastic_depth(x: MPCTensor, p: float, mode: str = "row", training: bool = True) -> MPCTensor:
    if training and p > 0:
        raise InvalidInput("privml: stochastic depth in training mode drops rows at random; call model.eval().")
    return wrap(x.payload, x.runtime)


# --------------------------------------------------------------------------------------------- arithmetic
def _scaled(b: Any, alpha: Any) -> Any:
    rb = _raw(b)
    if alpha == 1:
        return rb
    return rb.mul(alpha) if _is_c(rb) else rb * alpha


@_op("add", "add", aten_ops=(aten.add.Tensor,))
def _add(a: Any, b: Any, alpha: Any = 1) -> MPCTensor:
    return wrap(_radd(_raw(a), _scaled(b, alpha)), _rt(a, b))


@_op("sub", "sub")
def _sub(a: Any, b: Any, alpha: Any = 1) -> MPCTensor:
    return wrap(_rsub(_raw(a), _scaled(b, alpha)), _rt(a, b))


@_op("rsub", T.__rsub__)
def _rsub_op(x: MPCTensor, other: Any) -> MPCTensor:
    return wrap(_rsub(_raw(other), x.payload), x.runtime)


@_op("mul", "mul", aten_ops=(aten.mul.Tensor,))
def _mul(a: Any, b: Any) -> MPCTensor:
    """Elementwise product with broadcasting (Beaver triples of the broadcast shapes when both are private)."""
    return wrap(_rmul(_raw(a), _raw(b)), _rt(a, b))


@_op("div", "div")
def _div(a: MPCTensor, b: Any, rounding_mode: Any = None) -> MPCTensor:
    """Division by a public constant (the registry refuses private divisors before this runs)."""
    if not isinstance(a, MPCTensor) or rounding_mode is not None:
        raise unsupported(MPCTensor, torch.div, (a, b), {}, "only division of a private value by a public "
                          "constant (no rounding_mode) is available.")
    return wrap(a.payload.div(b), a.runtime)


@_op("neg", "neg")
def _neg(x: MPCTensor) -> MPCTensor:
    return wrap(x.payload.neg(), x.runtime)


@_op("square", "square")
def _square(x: MPCTensor) -> MPCTensor:
    return wrap(x.payload.square(), x.runtime)


@_op("pow", "pow")
def _pow(x: MPCTensor, exponent: Any) -> MPCTensor:
    """A non-negative integer power (the registry's check refuses other exponents)."""
    return wrap(x.payload.pow(int(exponent)), x.runtime)


@_op("sum", "sum")
def _sum(x: MPCTensor, dim: Any = None, keepdim: bool = False, dtype: Any = None) -> MPCTensor:
    if dtype not in (None, torch.float32):
        raise unsupported(MPCTensor, torch.sum, (x,), {"dtype": dtype}, "private sums are float32.")
    out = x.payload.sum() if dim is None else x.payload.sum(dim, keepdim=keepdim)
    return wrap(out, x.runtime)


@_op("mean", "mean")
def _mean(x: MPCTensor, dim: Any = None, keepdim: bool = False, dtype: Any = None) -> MPCTensor:
    if dtype not in (None, torch.float32):
        raise unsupported(MPCTensor, torch.mean, (x,), {"dtype": dtype}, "private means are float32.")
    out = x.payload.mean() if dim is None else x.payload.mean(dim, keepdim=keepdim)
    return wrap(out, x.runtime)


@_op("cat", "cat")
def _cat(tensors: Any, dim: int = 0) -> MPCTensor:
    rt = _rt(*tensors)
    parts = [t.payload if isinstance(t, MPCTensor) else rt.public(t) for t in tensors]
    return wrap(rt.crypten.cat(parts, dim=dim), rt)


# --------------------------------------------------------------------------------------------- shapes (local, free)
@_op("flatten", "flatten")
def _flatten(x: MPCTensor, start_dim: int = 0, end_dim: int = -1) -> MPCTensor:
    return wrap(x.payload.flatten(start_dim, end_dim), x.runtime)


def _shape_arg(args: tuple, kwargs: dict) -> tuple[int, ...]:
    shape = kwargs.get("shape", kwargs.get("size", args[0] if len(args) == 1 else args))
    if isinstance(shape, torch.dtype) or (len(args) == 1 and isinstance(args[0], torch.dtype)):
        raise InvalidInput("privml: view(dtype) reinterprets bits; not available on private tensors")
    if isinstance(shape, int):
        shape = (shape,)
    return tuple(int(s) for s in shape)


@_op("reshape", "reshape", aten_ops=(aten.view.default, aten._unsafe_view.default))
def _reshape(x: MPCTensor, *args: Any, **kwargs: Any) -> MPCTensor:
    return wrap(x.payload.reshape(_shape_arg(args, kwargs)), x.runtime)


@_op("identity", "identity", aten_ops=(aten.detach.default, aten.alias.default, aten.clone.default))
def _identity(x: MPCTensor, *args: Any, **kwargs: Any) -> MPCTensor:
    return wrap(x.payload, x.runtime)


@_op("transpose", "transpose")
def _transpose(x: MPCTensor, dim0: int, dim1: int) -> MPCTensor:
    return wrap(x.payload.transpose(dim0, dim1), x.runtime)


@_op("t", T.t, torch.t, aten_ops=(aten.t.default,))
def _t(x: MPCTensor) -> MPCTensor:
    return wrap(x.payload.t(), x.runtime)


@_op("permute", T.permute, torch.permute)
def _permute(x: MPCTensor, *dims: Any) -> MPCTensor:
    dims = tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
    return wrap(x.payload.permute(*dims), x.runtime)


@_op("unsqueeze", "unsqueeze")
def _unsqueeze(x: MPCTensor, dim: int) -> MPCTensor:
    return wrap(x.payload.unsqueeze(dim), x.runtime)


@_op("squeeze", T.squeeze, torch.squeeze)
def _squeeze(x: MPCTensor, dim: Any = None) -> MPCTensor:
    return wrap(x.payload.squeeze() if dim is None else x.payload.squeeze(dim), x.runtime)


def _check_index(idx: Any) -> None:
    items = idx if isinstance(idx, tuple) else (idx,)
    for i in items:
        if not (i is None or i is Ellipsis or isinstance(i, (int, slice))):
            raise InvalidInput("privml: private tensors take only int/slice/None/... indices (public positions)")


@_op("getitem", "getitem")
def _getitem(x: MPCTensor, idx: Any) -> MPCTensor:
    _check_index(idx)
    return wrap(x.payload[idx], x.runtime)


# --------------------------------------------------------------------------------------------- activations
@_op("relu", "relu", aten_ops=(aten.relu.default,))
def _relu(x: MPCTensor, inplace: bool = False) -> MPCTensor:
    return wrap(x.payload.relu(), x.runtime)  # exact: x * [x >= 0] from a secure comparison


@_op("leaky_relu", "leaky_relu")
def _leaky_relu(x: MPCTensor, negative_slope: float = 0.01, inplace: bool = False) -> MPCTensor:
    s = float(negative_slope)
    return wrap(x.payload.relu().mul(1.0 - s).add(x.payload.mul(s)), x.runtime)  # (1 - s) relu(x) + s x, exact


@_op("hardtanh", "hardtanh")
def _hardtanh(x: MPCTensor, min_val: float = -1.0, max_val: float = 1.0, inplace: bool = False) -> MPCTensor:
    """relu(x - min) - relu(x - max) + min: both comparisons in one batched round trip (CrypTen's hardtanh)."""
    return wrap(x.payload.hardtanh(float(min_val), float(max_val)), x.runtime)


@_op("relu6", F.relu6)
def _relu6(x: MPCTensor, inplace: bool = False) -> MPCTensor:
    return _hardtanh(x, 0.0, 6.0)


@_op("hardswish", "hardswish")
def _hardswish(x: MPCTensor, inplace: bool = False) -> MPCTensor:
    """x * hardtanh(x + 3, 0, 6) / 6, written x * (hardtanh(x, -3, 3) + 3) / 6: one comparison round, one product."""
    gate = x.payload.hardtanh(-3.0, 3.0).add(3.0)
    return wrap(x.payload.mul(gate).div(6), x.runtime)


@_op("hardsigmoid", "hardsigmoid")
def _hardsigmoid(x: MPCTensor, inplace: bool = False) -> MPCTensor:
    """hardtanh(x / 6 + 1/2, 0, 1), written hardtanh(x, -3, 3) / 6 + 1/2 (the clip stays exact)."""
    return wrap(x.payload.hardtanh(-3.0, 3.0).div(6).add(0.5), x.runtime)


@_op("silu", "silu")
def _silu(x: MPCTensor, inplace: bool = False) -> MPCTensor:
    return wrap(x.payload.mul(x.payload.sigmoid()), x.runtime)


@_op("sigmoid", "sigmoid")
def _sigmoid(x: MPCTensor) -> MPCTensor:
    return wrap(x.payload.sigmoid(), x.runtime)


@_op("tanh", "tanh")
def _tanh(x: MPCTensor) -> MPCTensor:
    return wrap(x.payload.tanh(), x.runtime)


@_op("softmax", "softmax")
def _softmax(x: MPCTensor, dim: Any = None, _stacklevel: int = 3, dtype: Any = None) -> MPCTensor:
    if dim is None:
        raise unsupported(MPCTensor, F.softmax, (x,), {}, "give softmax an explicit dim.")
    return wrap(x.payload.softmax(dim), x.runtime)


# --------------------------------------------------------------------------------------------- polynomials
def power_schedule(degree: int) -> list[list[tuple[int, int, int]]]:
    """Rounds of (k, a, b) with t^k = t^a * t^b: every power up to ``degree`` in ceil(log2(degree)) rounds."""
    rounds, top = [], 1
    while top < degree:
        new = min(2 * top, degree)
        rounds.append([(k, top, k - top) for k in range(top + 1, new + 1)])
        top = new
    return rounds


@_op("polyval", "polyval")
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
    out = None
    for k in range(1, len(c)):
        if c[k] != 0.0:
            term = powers[k].mul(c[k])
            out = term if out is None else out.add(term)
    if out is None:
        out = t.mul(0.0)
    return wrap(out.add(c[0]), x.runtime)
