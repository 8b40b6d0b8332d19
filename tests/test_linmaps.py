"""privml.backends.linmaps: sparse affine maps equal the dense identity-basis extraction, without its memory."""

from __future__ import annotations

import math
import operator
import time
import tracemalloc
from unittest import mock

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, currently_in_test_context, given, settings
from hypothesis import strategies as st
from torch.utils._pytree import tree_map

from privml.backends import linmaps
from privml.backends.ckks import extract_affine
from privml.backends.linmaps import inf_norm, linear_map, sparse_extract, spectral_norm
from privml.errors import InvalidInput
from privml.tensor import out_of_place

X = object()  # stands for the encrypted operand
FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def per_sample_of(func, args: tuple, kwargs: dict):
    """The per-sample callable exactly as ckks._affine builds it."""
    kwargs = {k: v for k, v in kwargs.items() if k != "inplace"}
    target = out_of_place(func)

    def per_sample(z: torch.Tensor) -> torch.Tensor:
        def swap(a: object) -> object:
            if a is X:
                return z
            if isinstance(a, torch.Tensor) and a.is_floating_point():
                return a.detach().double()
            return a

        with torch._C.DisableTorchFunctionSubclass():
            return target(*tree_map(swap, args), **tree_map(swap, kwargs))

    return per_sample


def valid_call(func, args: tuple, kwargs: dict, shape: tuple[int, ...]) -> bool:
    try:
        per_sample_of(func, args, kwargs)(torch.zeros((2, *shape), dtype=torch.float64))
    except (RuntimeError, ValueError):
        return False
    return True


def check(func, args: tuple, kwargs: dict, shape: tuple[int, ...], structured: bool = True,
          one_channel: bool = False) -> sp.csr_matrix:
    """linear_map == extract_affine (W, b, out shape); with ``structured`` the generic fallback is not used
    (``one_channel``: only on a 1-channel input, as pooling does)."""
    if currently_in_test_context():
        assume(valid_call(func, args, kwargs, shape))
    fn = per_sample_of(func, args, kwargs)
    with mock.patch.object(linmaps, "sparse_extract", wraps=linmaps.sparse_extract) as fallback:
        w, b, out = linear_map(func, args, kwargs, X, shape, fn)
    if structured:
        allowed = [(1, *shape[1:])] if one_channel else []
        assert all(tuple(call.args[1]) in allowed for call in fallback.call_args_list), "went to the fallback"
    dense, bd, od = extract_affine(fn, shape)
    assert isinstance(w, sp.csr_matrix) and w.dtype == np.float64 and w.has_sorted_indices
    assert np.all(w.data != 0)
    assert out == od and w.shape == dense.shape and b.shape == bd.shape and b.dtype == np.float64
    np.testing.assert_allclose(w.toarray(), dense, rtol=0, atol=1e-12)
    np.testing.assert_allclose(b, bd, rtol=0, atol=1e-12)
    return w


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float32)


# --------------------------------------------------------------------------------------------- structured ops
@FAST
@given(groups=st.integers(1, 3), cin_g=st.integers(1, 3), cout_g=st.integers(1, 3), kh=st.integers(1, 4),
       kw=st.integers(1, 4), stride=st.integers(1, 3), dilation=st.sampled_from([1, 2, (1, 2)]),
       padding=st.sampled_from([0, 1, 2, (2, 0), "same", "valid"]), bias=st.booleans(), h=st.integers(1, 9),
       w=st.integers(1, 9), positional=st.booleans())
def test_conv2d(groups, cin_g, cout_g, kh, kw, stride, dilation, padding, bias, h, w, positional):
    cin, cout = groups * cin_g, groups * cout_g
    assume(cin <= 6 and cout <= 6 and (padding != "same" or stride == 1))
    weight, b = rand(cout, cin_g, kh, kw), (rand(cout) if bias else None)
    if positional:
        args, kwargs = (X, weight, b, stride, padding, dilation, groups), {}
    else:
        args, kwargs = (X, weight), {"bias": b, "stride": stride, "padding": padding, "dilation": dilation,
                                     "groups": groups}
    check(F.conv2d, args, kwargs, (cin, h, w))


@FAST
@given(cin=st.integers(1, 4), cout=st.integers(1, 4), k=st.integers(1, 4), stride=st.integers(1, 3),
       padding=st.sampled_from([0, 1, 2, "same"]), length=st.integers(1, 12))
def test_conv1d(cin, cout, k, stride, padding, length):
    assume(padding != "same" or stride == 1)
    check(F.conv1d, (X, rand(cout, cin, k), rand(cout)), {"stride": stride, "padding": padding}, (cin, length))


def test_conv_zero_weights_are_dropped():
    weight = rand(3, 2, 3, 3)
    weight[1] = 0.0
    w = check(F.conv2d, (X, weight), {"padding": 1}, (2, 5, 5))
    assert w[25:50].nnz == 0


@FAST
@given(lead=st.sampled_from([(), (1,), (3,), (2, 3)]), fin=st.integers(1, 6), fout=st.integers(1, 6),
       bias=st.booleans(), matmul=st.booleans())
def test_linear_and_matmul(lead, fin, fout, bias, matmul):
    weight = rand(fout, fin)
    if matmul:
        check(torch.matmul, (X, weight.T.contiguous()), {}, (*lead, fin))
        check(torch.Tensor.__matmul__, (X, weight.T.contiguous()), {}, (*lead, fin))
    else:
        check(F.linear, (X, weight, rand(fout) if bias else None), {}, (*lead, fin))


def test_rmatmul_is_the_fallback():
    m = rand(4, 3)
    check(torch.Tensor.__rmatmul__, (X, m), {}, (3, 2), structured=False)


@FAST
@given(c=st.integers(1, 5), rest=st.sampled_from([(), (4,), (3, 2)]), affine=st.booleans(),
       eps=st.sampled_from([1e-5, 0.1]), keyword=st.booleans())
def test_batch_norm_eval(c, rest, affine, eps, keyword):
    mean, var = rand(c), rand(c).abs() + 0.1
    weight, bias = (rand(c), rand(c)) if affine else (None, None)
    if keyword:
        check(F.batch_norm, (X, mean, var), {"weight": weight, "bias": bias, "training": False, "eps": eps},
              (c, *rest))
    else:
        check(F.batch_norm, (X, mean, var, weight, bias, False, 0.1, eps), {}, (c, *rest))


def test_batch_norm_training_is_refused():
    c = 3
    fn = per_sample_of(F.batch_norm, (X, rand(c), rand(c).abs()), {"training": True})
    with pytest.raises(InvalidInput, match="training"):
        linear_map(F.batch_norm, (X, rand(c), rand(c).abs()), {"training": True}, X, (c, 4), fn)


@FAST
@given(c=st.integers(1, 4), k=st.sampled_from([1, 2, 3, (2, 3)]), stride=st.sampled_from([None, 1, 2, 3, (1, 2)]),
       padding=st.integers(0, 1), ceil_mode=st.booleans(), count_include_pad=st.booleans(),
       divisor=st.sampled_from([None, 1, 3]), h=st.integers(1, 9), w=st.integers(1, 9))
def test_avg_pool2d(c, k, stride, padding, ceil_mode, count_include_pad, divisor, h, w):
    kwargs = {"kernel_size": k, "stride": stride, "padding": padding, "ceil_mode": ceil_mode,
              "count_include_pad": count_include_pad, "divisor_override": divisor}
    check(F.avg_pool2d, (X,), kwargs, (c, h, w), one_channel=True)


@FAST
@given(c=st.integers(1, 4), oh=st.sampled_from([None, 1, 2, 3, 5]), ow=st.sampled_from([None, 1, 2, 4, 7]),
       h=st.integers(1, 9), w=st.integers(1, 9))
def test_adaptive_avg_pool2d(c, oh, ow, h, w):
    check(F.adaptive_avg_pool2d, (X, (oh, ow)), {}, (c, h, w), one_channel=True)
    check(F.adaptive_avg_pool2d, (X, 1), {}, (c, h, w), one_channel=True)


@st.composite
def shape_and_operand(draw):
    """A sample shape and a plain operand broadcastable against (1, *shape) (possibly widening x's size-1 dims)."""
    shape = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)))
    if draw(st.booleans()):
        return shape, draw(st.sampled_from([2.5, -3, 0.5, True]))
    ndim = draw(st.integers(0, len(shape)))
    dims = [draw(st.sampled_from([1, s, 2] if s == 1 else [1, s])) for s in shape[len(shape) - ndim:]]
    if draw(st.booleans()):
        dims = [1, *dims]  # a leading (batch) dimension of 1
    sign = torch.where(torch.rand(dims) < 0.5, -1.0, 1.0)
    return shape, sign * (0.5 + torch.rand(dims, dtype=torch.float64))


ELEMENTWISE = {
    "add": [torch.add, torch.Tensor.__add__, torch.Tensor.__radd__, torch.Tensor.add_, operator.add],
    "sub": [torch.sub, torch.Tensor.__sub__, torch.Tensor.__rsub__, torch.Tensor.sub, operator.sub],
    "mul": [torch.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__, operator.mul],
    "div": [torch.div, torch.Tensor.__truediv__, torch.Tensor.div_, operator.truediv],
}


@settings(max_examples=200, deadline=None)
@given(case=shape_and_operand(), op=st.sampled_from(sorted(ELEMENTWISE)), which=st.integers(0, 4),
       swapped=st.booleans(), alpha=st.sampled_from([None, 2, -0.5]))
def test_elementwise(case, op, which, swapped, alpha):
    shape, c = case
    func = ELEMENTWISE[op][which % len(ELEMENTWISE[op])]
    kwargs = {"alpha": alpha} if alpha is not None and func in (torch.add, torch.sub, torch.Tensor.sub) else {}
    swapped = swapped and op != "div" and func in (torch.add, torch.sub, torch.mul, operator.add, operator.sub,
                                                   operator.mul)
    args = (c, X) if swapped else (X, c)
    check(func, args, kwargs, shape)


def test_neg():
    for func in (torch.neg, torch.Tensor.neg, torch.Tensor.__neg__):
        check(func, (X,), {}, (2, 3))


def test_c_minus_x_signs():
    c = torch.tensor([1.0, 2.0, 3.0])
    for func, args, kwargs, coef in [(torch.Tensor.__rsub__, (X, c), {}, -1.0), (torch.sub, (c, X), {}, -1.0),
                                     (torch.sub, (c, X), {"alpha": 2}, -2.0), (torch.sub, (X, c), {"alpha": 2}, 1.0),
                                     (torch.add, (c, X), {"alpha": 3}, 3.0), (operator.sub, (5.0, X), {}, -1.0)]:
        w = check(func, args, kwargs, (3,))
        np.testing.assert_array_equal(w.toarray(), coef * np.eye(3))


# --------------------------------------------------------------------------------------------- fallback
@FAST
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple), data=st.data())
def test_sum_mean_fallback(shape, data):
    dims = data.draw(st.lists(st.integers(1, len(shape)), min_size=1, max_size=len(shape), unique=True))
    keepdim = data.draw(st.booleans())
    for func in (torch.sum, torch.Tensor.sum, torch.mean, torch.Tensor.mean):
        check(func, (X,), {"dim": dims, "keepdim": keepdim}, shape, structured=False)


def test_unregistered_and_unrecognised_arguments_use_the_fallback():
    check(F.pad, (X, (1, 2)), {}, (2, 3), structured=False)
    check(torch.flip, (X, (1,)), {}, (2, 3), structured=False)
    check(F.conv2d, (X, rand(2, 1, 3, 3)), {"padding": [1, 1]}, (1, 4, 4))  # a list is read like a tuple
    check(torch.mul, (X, np.float64(1.5)), {}, (3,))


def test_fallback_chunks_agree():
    fn = per_sample_of(torch.Tensor.transpose, (X, 1, 2), {})
    w1, b1, o1 = sparse_extract(fn, (3, 4, 5), max_chunk_bytes=1)
    w2, b2, o2 = sparse_extract(fn, (3, 4, 5))
    assert o1 == o2 == (4, 3, 5) and (w1 != w2).nnz == 0 and np.array_equal(b1, b2)


def test_mixing_samples_is_refused():
    for fn in (lambda z: z.sum(0), lambda z: z.reshape(-1), lambda z: z[:1] * 2.0, lambda z: z.sum()):
        with pytest.raises(InvalidInput, match="mixes samples"):
            sparse_extract(fn, (3, 4))
    for kwargs in ({"dim": 0}, {}):
        with pytest.raises(InvalidInput, match="mixes samples"):
            linear_map(torch.sum, (X,), kwargs, X, (3, 4), per_sample_of(torch.sum, (X,), kwargs))
    fn = per_sample_of(torch.mul, (X, 2.0), {})
    with pytest.raises(InvalidInput, match="mixes samples"):
        linear_map(torch.mul, (X, 2.0), {}, X, (3, 4), lambda z: fn(z).sum(0))


# --------------------------------------------------------------------------------------------- memory and time
def test_resnet_conv_is_fast_and_sparse():
    c, h, k = 16, 32, 3
    weight = rand(c, c, k, k) + 10.0  # no zero weight
    args, kwargs = (X, weight, rand(c)), {"padding": 1}
    fn = per_sample_of(F.conv2d, args, kwargs)
    start = time.perf_counter()
    with mock.patch.object(linmaps, "sparse_extract", side_effect=AssertionError("fallback")):
        w, b, out = linear_map(F.conv2d, args, kwargs, X, (c, h, h), fn)
    assert time.perf_counter() - start < 2.0
    valid_pairs = k * h - 2  # (kernel row, output row) pairs inside the image, per spatial dim
    assert out == (c, h, h) and w.shape == (c * h * h,) * 2
    assert w.nnz == c * c * valid_pairs**2 and c * h * h * c * k * k - w.nnz == 97280
    x = torch.randn(2, c, h, h, dtype=torch.float64)
    np.testing.assert_allclose(w @ x.reshape(2, -1).numpy().T + b[:, None], fn(x).reshape(2, -1).numpy().T,
                               atol=1e-9)


def test_fallback_memory_is_not_quadratic():
    shape = (64, 64)  # 4096 values: a dense W would take 128 MiB
    n = math.prod(shape)
    calls = []
    fn = per_sample_of(torch.Tensor.transpose, (X, 1, 2), {})

    def recording(z: torch.Tensor) -> torch.Tensor:
        calls.append(z.shape[0])
        return fn(z)

    chunk = 1 << 20
    tracemalloc.start()
    try:
        w, _, out = sparse_extract(recording, shape, max_chunk_bytes=chunk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out == (64, 64) and w.nnz == n
    assert peak < n * n * 8 / 16, peak  # numpy side (basis chunks, responses, triplets)
    assert max(calls) * 2 * n * 8 <= chunk  # torch side: no evaluation on more than a chunk of the basis
    calls.clear()
    sparse_extract(recording, shape)
    assert max(calls) * n * 8 < n * n * 8 / 2


# --------------------------------------------------------------------------------------------- norms
@st.composite
def sparse_matrices(draw, lo: int = 1, hi: int = 40):
    m, n = draw(st.integers(lo, hi)), draw(st.integers(lo, hi))
    density = draw(st.sampled_from([0.05, 0.3, 1.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    return sp.random(m, n, density=density, rng=rng, data_rvs=rng.standard_normal, format="csr")


@FAST
@given(w=sparse_matrices())
def test_norms_exact_path(w):
    dense = w.toarray()
    true = np.linalg.norm(dense, 2)
    est = spectral_norm(w)
    assert est >= true and est <= true * (1 + 1e-2) + 1e-300
    assert inf_norm(w) == pytest.approx(np.abs(dense).sum(axis=1).max() if dense.size else 0.0, rel=1e-12)


@settings(max_examples=15, deadline=None)
@given(w=sparse_matrices(lo=9, hi=60))
def test_spectral_norm_lanczos_path(w):
    true = np.linalg.norm(w.toarray(), 2)
    with mock.patch.object(linmaps, "_DENSE_GRAM", 0):
        est = spectral_norm(w)
    assert est >= true and est <= true * (1 + 1e-2) + 1e-300


def test_spectral_norm_edge_cases():
    assert spectral_norm(sp.csr_matrix((5, 3))) == 0.0 and inf_norm(sp.csr_matrix((0, 3))) == 0.0
    assert spectral_norm(sp.csr_matrix(np.array([[3.0, 4.0]]))) == pytest.approx(5.0, rel=1e-7)
    assert spectral_norm(sp.identity(2000, format="csr") * 2.0) == pytest.approx(2.0, rel=2e-3)
