"""Sparse affine maps of linear ops, built without any dense n x n matrix.

The CKKS backend turns every linear op on an encrypted tensor into y = W x + b on the per-sample flattened
vector (row-major, batch dimension excluded). ``ckks.extract_affine`` evaluates the op on the dense identity
basis, which is O(n^2) memory (2 GB for one ResNet-20 conv). :func:`linear_map` builds the same W as a
``scipy.sparse.csr_matrix`` instead:

* structured generators (numpy index arithmetic, memory O(nnz)) for conv1d/2d/3d, linear/matmul by a plain
  matrix, eval-mode batch_norm, neg, and add/sub/mul/div by a plain scalar or broadcastable tensor;
* pooling (avg_pool2d, adaptive_avg_pool2d) acts on every channel alike: the map of ONE channel is extracted
  generically and repeated over channels with a Kronecker product, so padding/ceil_mode/divisor rules are
  whatever torch does;
* :func:`sparse_extract` for everything else: the identity basis in chunks, keeping the non-zeros only.

The bias is always the op's response to a zero sample, exactly as ``extract_affine`` computes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Real

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import ArpackNoConvergence, svds

from privml.errors import InvalidInput
from privml.registry import REGISTRY
from privml.tensor import PrivateTensor

PerSample = Callable[[torch.Tensor], torch.Tensor]
MapGenerator = Callable[..., "sp.csr_matrix | None"]  # (func, args, kwargs, private, shape, out_shape, per_sample)

_TINY = 1e-300  # |w| below this is a zero, as in extract_affine
_DENSE_GRAM = 1024  # spectral_norm: exact eigenvalues of the Gram matrix up to this smaller dimension
_UNREGISTERED = {F.conv1d: "conv1d", F.conv3d: "conv3d"}


def _mixing() -> InvalidInput:
    return InvalidInput("privml: this op mixes samples of the batch; the CKKS backend needs ops that act on "
                        "each sample independently (batch first).")


def _numel(shape: tuple[int, ...]) -> int:
    return int(math.prod(shape))


def _finish(w: sp.spmatrix, shape: tuple[int, int]) -> sp.csr_matrix:
    """Canonical float64 CSR: duplicates summed, explicit zeros dropped, indices sorted."""
    w = sp.csr_matrix(w, dtype=np.float64, shape=shape)
    w.sum_duplicates()
    w.eliminate_zeros()
    w.sort_indices()
    return w


def _plain(a: object) -> bool:
    return isinstance(a, torch.Tensor) and not isinstance(a, PrivateTensor)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def _const(c: object) -> np.ndarray | None:
    """A plain scalar or tensor operand as float64 numpy, None when it is anything else."""
    if isinstance(c, Real):
        return np.asarray(float(c))
    if _plain(c) and not c.is_complex():
        return _np(c)
    return None


def _bind(args: tuple, kwargs: dict, names: tuple[str, ...], defaults: dict) -> dict | None:
    """The call's arguments by parameter name; None when they do not fit the signature (then: fallback)."""
    if len(args) > len(names) or any(k not in names or k in names[:len(args)] for k in kwargs):
        return None
    p = {**defaults, **dict(zip(names, args, strict=False)), **kwargs}
    return p if all(n in p for n in names) else None


def _tup(v: object, d: int) -> tuple[int, ...] | None:
    if isinstance(v, int):
        return (v,) * d
    if isinstance(v, (tuple, list)) and len(v) == d and all(isinstance(e, int) for e in v):
        return tuple(v)
    return None


# --------------------------------------------------------------------------------------------- generators
def _conv(func: object, args: tuple, kwargs: dict, private: object, shape: tuple[int, ...],
          out_shape: tuple[int, ...], per_sample: PerSample) -> sp.csr_matrix | None:
    """convNd: W[(co, o), (ci, o*s - p + a*d)] = weight[co, ci mod Cin/groups, a] where the index is in range."""
    p = _bind(args, kwargs, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
              {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1})
    if p is None or p["input"] is not private or not _plain(p["weight"]) or not isinstance(p["groups"], int):
        return None
    w = _np(p["weight"])
    dims = w.ndim - 2
    stride, dil = _tup(p["stride"], dims), _tup(p["dilation"], dims)
    if dims < 1 or len(shape) != dims + 1 or len(out_shape) != dims + 1 or stride is None or dil is None:
        return None
    ksize, spatial, osize = w.shape[2:], shape[1:], out_shape[1:]
    pad = p["padding"]
    if pad == "valid":
        left = (0,) * dims
    elif pad == "same":
        left = tuple(d * (k - 1) // 2 for d, k in zip(dil, ksize, strict=True))
    else:
        left = _tup(pad, dims)
    if left is None:
        return None
    c_out, c_grp = w.shape[:2]
    full = (c_out, c_grp, *ksize, *osize)  # one candidate entry per (co, ci in group, kernel offset, output)
    co = np.arange(c_out).reshape(c_out, 1, *(1,) * (2 * dims))
    ci = (co // (c_out // p["groups"])) * c_grp + np.arange(c_grp).reshape(1, c_grp, *(1,) * (2 * dims))
    col, row, valid = ci * _numel(spatial), co * _numel(osize), np.ones((1,) * len(full), dtype=bool)
    for i in range(dims):
        at_k, at_o = [1] * len(full), [1] * len(full)
        at_k[2 + i], at_o[2 + dims + i] = ksize[i], osize[i]
        o = np.arange(osize[i]).reshape(at_o)
        idx = o * stride[i] - left[i] + np.arange(ksize[i]).reshape(at_k) * dil[i]
        valid = valid & (idx >= 0) & (idx < spatial[i])
        col = col + idx * _numel(spatial[i + 1:])
        row = row + o * _numel(osize[i + 1:])
    vals = w.reshape(*w.shape, *(1,) * dims)
    keep = np.broadcast_to(valid & (vals != 0), full)
    coo = sp.coo_matrix((np.broadcast_to(vals, full)[keep], (np.broadcast_to(row, full)[keep],
                                                              np.broadcast_to(col, full)[keep])),
                        shape=(_numel(out_shape), _numel(shape)))
    return _finish(coo, coo.shape)


def _matrix(weight: np.ndarray, shape: tuple[int, ...], out_shape: tuple[int, ...]) -> sp.csr_matrix | None:
    """``weight`` (out x in) on the last dim of every sample: block diagonal over the leading sample dims."""
    if weight.ndim != 2 or not shape or shape[-1] != weight.shape[1] or out_shape != (*shape[:-1], weight.shape[0]):
        return None
    w = sp.kron(sp.identity(_numel(shape[:-1]), format="csr"), sp.csr_matrix(weight), format="csr")
    return _finish(w, w.shape)


def _linear(func: object, args: tuple, kwargs: dict, private: object, shape: tuple[int, ...],
            out_shape: tuple[int, ...], per_sample: PerSample) -> sp.csr_matrix | None:
    p = _bind(args, kwargs, ("input", "weight", "bias"), {"bias": None})
    if p is None or p["input"] is not private or not _plain(p["weight"]):
        return None
    return _matrix(_np(p["weight"]), shape, out_shape)


def _matmul(func: object, args: tuple, kwargs: dict, private: object, shape: tuple[int, ...],
            out_shape: tuple[int, ...], per_sample: PerSample) -> sp.csr_matrix | None:
    """x @ M with M a plain matrix (the other forms, M @ x included, go to the fallback)."""
    p = _bind(args, kwargs, ("input", "other"), {})
    if p is None or func is torch.Tensor.__rmatmul__ or p["input"] is not private or not _plain(p["other"]):
        return None
    return _matrix(_np(p["other"]).T, shape, out_shape)


_BN_NAMES = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_BN_DEFAULTS = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}


def _batch_norm(func: object, args: tuple, kwargs: dict, private: object, shape: tuple[int, ...],
                out_shape: tuple[int, ...], per_sample: PerSample) -> sp.csr_matrix | None:
    """Eval-mode batch_norm: diagonal, weight / sqrt(running_var + eps) per channel (sample dim 0)."""
    p = _bind(args, kwargs, _BN_NAMES, _BN_DEFAULTS)
    if (p is None or p["input"] is not private or not shape or out_shape != shape
            or not all(_plain(p[k]) for k in ("running_mean", "running_var"))
            or not (p["weight"] is None or _plain(p["weight"])) or not isinstance(p["eps"], Real)):
        return None
    scale = 1.0 / np.sqrt(_np(p["running_var"]) + float(p["eps"]))
    if p["weight"] is not None:
        scale = scale * _np(p["weight"])
    if scale.shape != (shape[0],):
        return None
    n = _numel(shape)
    return _finish(sp.diags(np.repeat(scale, n // shape[0])), (n, n))


def _neg(func: object, args: tuple, kwargs: dict, private: object, shape: tuple[int, ...],
         out_shape: tuple[int, ...], per_sample: PerSample) -> sp.csr_matrix | None:
    p = _bind(args, kwargs, ("input",), {})
    if p is None or p["input"] is not private or out_shape != shape:
        return None
    return _finish(-sp.identity(_numel(shape)), (_numel(shape),) * 2)


_ELEMENTWISE_SIGNATURES = {"add": (("input", "other", "alpha"), {"alpha": 1}),
                           "sub": (("input", "other", "alpha"), {"alpha": 1}),
                           "mul": (("input", "other"), {}),
                           "div": (("input", "other", "rounding_mode"), {"rounding_mode": None})}


def _elementwise(func: object, args: tuple, kwargs: dict, private: object, shape: tuple[int, ...],
                 out_shape: tuple[int, ...], per_sample: PerSample) -> sp.csr_matrix | None:
    """x op c for add/sub/mul/div with c a plain scalar or tensor broadcastable to (1, *shape): every output
    reads one input (its index with x's broadcast dims at 0) times a coefficient (1, +-alpha, c or 1/c)."""
    name = REGISTRY.for_function(func).name
    p = _bind(args, kwargs, *_ELEMENTWISE_SIGNATURES[name])
    first = p is not None and p["input"] is private
    if p is None or (p["other"] is private) == first:  # exactly one of the two operands is x
        return None
    c = _const(p["other"] if first else p["input"])
    alpha = p.get("alpha", 1)
    if c is None or not isinstance(alpha, Real):
        return None
    if name == "mul":
        coef = c
    elif name == "div":
        if not first or p["rounding_mode"] is not None:
            return None
        coef = 1.0 / c
    elif name == "add":
        coef = np.asarray(1.0 if first else float(alpha))
    else:  # x is the subtrahend in sub(c, x), __rsub__(x, c) = c - x and rsub forms alike
        subtrahend = first == (func is torch.Tensor.__rsub__)
        coef = np.asarray(-float(alpha) if subtrahend else 1.0)
    try:
        full = tuple(torch.broadcast_shapes((1, *shape), c.shape))
    except RuntimeError:
        return None
    if len(full) != len(shape) + 1 or full[0] != 1 or full[1:] != out_shape:
        return None
    n, m = _numel(shape), _numel(out_shape)
    cols = np.broadcast_to(np.arange(n).reshape(shape), out_shape).ravel()
    vals = np.broadcast_to(coef, full).ravel()
    return _finish(sp.coo_matrix((vals, (np.arange(m), cols)), shape=(m, n)), (m, n))


def _pool(func: object, args: tuple, kwargs: dict, private: object, shape: tuple[int, ...],
          out_shape: tuple[int, ...], per_sample: PerSample) -> sp.csr_matrix | None:
    """A channel-wise pooling: I_channels (x) (the map of one channel, extracted on a 1-channel input)."""
    x = args[0] if args else kwargs.get("input")
    if x is not private or len(shape) != 3 or len(out_shape) != 3 or out_shape[0] != shape[0]:
        return None
    one, _, one_shape = sparse_extract(per_sample, (1, *shape[1:]))
    if one_shape != (1, *out_shape[1:]):
        return None
    w = sp.kron(sp.identity(shape[0], format="csr"), one, format="csr")
    return _finish(w, w.shape)


_GENERATORS: dict[str, MapGenerator] = {
    "conv1d": _conv, "conv2d": _conv, "conv3d": _conv, "linear": _linear, "matmul": _matmul,
    "batch_norm": _batch_norm, "neg": _neg, "add": _elementwise, "sub": _elementwise, "mul": _elementwise,
    "div": _elementwise, "avg_pool2d": _pool, "adaptive_avg_pool2d": _pool,
}


# --------------------------------------------------------------------------------------------- public API
def sparse_extract(per_sample: PerSample, sample_shape: tuple[int, ...], max_chunk_bytes: int = 64 << 20
                   ) -> tuple[sp.csr_matrix, np.ndarray, tuple[int, ...]]:
    """(W, b, output sample shape) of an affine per-sample function, from the identity basis in chunks.

    A chunk of basis columns plus its response takes about ``max_chunk_bytes`` (peak about twice that with
    the temporaries); only the non-zeros are kept, so memory is O(nnz + chunk), never n^2.
    Same W and b as ``ckks.extract_affine``."""
    sample_shape = tuple(sample_shape)
    n = _numel(sample_shape)
    with torch.no_grad():
        zero = per_sample(torch.zeros((1, *sample_shape), dtype=torch.float64))
    if zero.dim() == 0 or zero.shape[0] != 1:
        raise _mixing()
    out_shape = tuple(zero.shape[1:])
    m = _numel(out_shape)
    b = _np(zero).reshape(-1).copy()
    step = max(1, max_chunk_bytes // (8 * max(1, n + m)))
    rows, cols, vals = [], [], []
    for j0 in range(0, n, step):
        k = min(step, n - j0)
        basis = np.zeros((k, n))
        basis[np.arange(k), j0 + np.arange(k)] = 1.0
        with torch.no_grad():
            out = per_sample(torch.from_numpy(basis).reshape(k, *sample_shape))
        del basis
        if out.dim() == 0 or out.shape[0] != k or tuple(out.shape[1:]) != out_shape:
            raise _mixing()
        d = _np(out).reshape(k, m) - b
        del out
        j, i = np.nonzero(~(np.abs(d) < _TINY))  # NaN is kept, as in extract_affine
        rows.append(i)
        cols.append(j + j0)
        vals.append(d[j, i])
        del d
    if not rows:
        return _finish(sp.csr_matrix((m, n)), (m, n)), b, out_shape
    coo = sp.coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(m, n))
    return _finish(coo, (m, n)), b, out_shape


def linear_map(func: object, args: tuple, kwargs: dict, private: object, sample_shape: tuple[int, ...],
               per_sample: PerSample) -> tuple[sp.csr_matrix, np.ndarray, tuple[int, ...]]:
    """(W: m x n float64 CSR, b: (m,) float64, output sample shape) of an op affine in ``private``.

    ``args``/``kwargs`` are the call's arguments with the encrypted operand as ``private``; ``per_sample``
    evaluates the op on a float64 batch (k, *sample_shape). Structured generators when the op and its
    arguments are recognised, :func:`sparse_extract` otherwise; either way W equals ``extract_affine``'s."""
    sample_shape = tuple(sample_shape)
    spec = REGISTRY.for_function(func)
    name = spec.name if spec is not None else _UNREGISTERED.get(func)
    if name == "batch_norm":
        p = _bind(args, kwargs, _BN_NAMES, _BN_DEFAULTS)
        if p is not None and p["training"]:
            raise InvalidInput("privml: batch_norm in training mode mixes samples of the batch (batch "
                               "statistics); the CKKS backend needs the model in eval mode (model.eval()).")
    gen = _GENERATORS.get(name)
    if gen is None:
        return sparse_extract(per_sample, sample_shape)
    with torch.no_grad():
        zero = per_sample(torch.zeros((1, *sample_shape), dtype=torch.float64))
    if zero.dim() == 0 or zero.shape[0] != 1:
        raise _mixing()
    out_shape = tuple(zero.shape[1:])
    w = gen(func, args, kwargs, private, sample_shape, out_shape, per_sample)
    if w is None or w.shape != (_numel(out_shape), _numel(sample_shape)):
        return sparse_extract(per_sample, sample_shape)
    return w, _np(zero).reshape(-1).copy(), out_shape


def inf_norm(w: sp.spmatrix | np.ndarray) -> float:
    """||W||_inf: the largest row sum of |w| (0 for an empty matrix)."""
    w = sp.csr_matrix(w, dtype=np.float64)
    return float(abs(w).sum(axis=1).max()) if w.shape[0] and w.nnz else 0.0


def spectral_norm(w: sp.spmatrix | np.ndarray) -> float:
    """An upper bound on ||W||_2, the largest singular value, tight to ~1e-3 relative.

    Exact (eigenvalues of the smaller Gram matrix, times 1 + 1e-8 for rounding) when the smaller dimension
    is at most 1024; otherwise Lanczos (``svds``, tol 1e-8) times 1 + 1e-3. Never above the Schur bound
    sqrt(||W||_1 ||W||_inf), which is also the answer if Lanczos does not converge."""
    w = sp.csr_matrix(w, dtype=np.float64)
    if w.nnz == 0:
        return 0.0
    schur = math.sqrt(inf_norm(w.T) * inf_norm(w))
    small = min(w.shape)
    if small <= max(_DENSE_GRAM, 8):
        gram = (w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w).toarray()
        est = math.sqrt(max(float(np.linalg.eigvalsh(gram)[-1]), 0.0)) * (1 + 1e-8)
    else:
        v0 = np.random.default_rng(0).standard_normal(small)
        try:
            est = float(svds(w, k=1, tol=1e-8, v0=v0, return_singular_vectors=False)[0]) * (1 + 1e-3)
        except ArpackNoConvergence:
            est = schur
    return float(min(est, schur))
