"""Kernels on real SEAL ciphertexts: BSGS diagonal mat-vec (dense and conv), polynomials, throughput dense."""

from __future__ import annotations

from math import comb

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numpy.polynomial import polynomial as P

from privml.errors import DepthExhausted, InvalidInput, KeyMaterialError, RangeViolation
from privml.he.context import CKKSContext
from privml.he.kernels import (
    BlockMatVec,
    dense_throughput,
    eval_poly,
    poly_depth,
    poly_mult_count,
    poly_value_bound,
)
from privml.he.params import choose_params

SLOTS = 4096
RNG = np.random.default_rng(7)


def conv_matrix(weight: torch.Tensor, in_shape: tuple[int, int, int], stride: int, padding: int) -> np.ndarray:
    """The (m, n) matrix of a conv2d on a flattened input: conv applied to the identity basis."""
    n = int(np.prod(in_shape))
    eye = torch.eye(n, dtype=torch.float64).reshape(n, *in_shape)
    cols = F.conv2d(eye, weight, stride=stride, padding=padding)
    return cols.reshape(n, -1).T.numpy()


# Plans are built first: the context gets Galois keys for exactly the steps they need.
W_TALL, B_TALL = RNG.normal(size=(40, 24)) / 5, RNG.normal(size=40)
W_WIDE, B_WIDE = RNG.normal(size=(12, 50)) / 7, RNG.normal(size=12)
CONV_W = torch.tensor(RNG.normal(size=(2, 1, 3, 3)) / 3)
CONV_B = RNG.normal(size=2)
CONV_M = conv_matrix(CONV_W, (1, 8, 8), stride=2, padding=1)  # 32 x 64
FC1_W, FC1_B = RNG.normal(size=(16, 32)) / 6, RNG.normal(size=16) / 4
FC2_W, FC2_B = RNG.normal(size=(10, 16)) / 4, RNG.normal(size=10) / 4
PLANS = {
    "tall": BlockMatVec.from_dense(W_TALL, B_TALL, SLOTS, key_mode="few"),
    "tall_direct": BlockMatVec.from_dense(W_TALL, B_TALL, SLOTS, key_mode="direct"),
    "conv_direct": BlockMatVec.from_dense(CONV_M, np.repeat(CONV_B, 16), SLOTS, key_mode="direct"),
    "wide": BlockMatVec.from_dense(W_WIDE, B_WIDE, SLOTS, key_mode="few"),
    "conv": BlockMatVec.from_dense(CONV_M, np.repeat(CONV_B, 16), SLOTS, key_mode="few"),
    "fc1": BlockMatVec.from_dense(FC1_W, FC1_B, SLOTS, key_mode="few"),
    "fc2": BlockMatVec.from_dense(FC2_W, FC2_B, SLOTS, key_mode="few"),
}


@pytest.fixture(scope="module")
def ctx() -> CKKSContext:
    params = choose_params(4, precision_bits=16, poly_modulus_degree=8192)  # scale 2^35
    steps = set().union(*(p.rotation_steps() for p in PLANS.values()))
    return CKKSContext.generate(params, rotation_steps=steps)


def test_conv_matrix_is_the_convolution() -> None:
    x = torch.tensor(RNG.normal(size=(1, 1, 8, 8)))
    ref = F.conv2d(x, CONV_W, stride=2, padding=1).reshape(-1).numpy()
    assert np.allclose(CONV_M @ x.reshape(-1).numpy(), ref)


@pytest.mark.parametrize(
    "name, w, b",
    [("tall", W_TALL, B_TALL), ("tall_direct", W_TALL, B_TALL), ("wide", W_WIDE, B_WIDE), ("fc1", FC1_W, FC1_B)],
)
def test_diagonal_matvec_dense(ctx: CKKSContext, name: str, w: np.ndarray, b: np.ndarray) -> None:
    plan = PLANS[name]
    m, n = w.shape
    x = RNG.uniform(-1, 1, n)
    ct = ctx.encrypt(x)
    ctx.reset_stats()
    out = plan.apply(ctx, [ct])[0]
    assert ctx.stats["rotations"] == plan.rotation_count
    assert ctx.stats["ct_pt_mults"] == plan.mult_count == m + n - 1  # dense: every extended diagonal
    assert ctx.stats["rescales"] == 1
    assert plan.rotation_count <= 2 * np.sqrt(m + n) + 2 < m + n
    assert ctx.level(out) == ctx.level(ct) - 1 and out.scale == ctx.scale_at(ctx.level(out))
    y = ctx.decrypt(out)
    assert np.abs(y[:m] - (w @ x + b)).max() < 1e-4
    assert np.abs(y[m:]).max() < 1e-4  # output slots beyond m stay zero
    plan.apply(ctx, [ct])[0]  # the diagonals are encoded once per level: a second apply encodes only the bias
    ctx.reset_stats()
    plan.apply(ctx, [ct])[0]
    assert ctx.stats["encodes"] == 0


@pytest.mark.parametrize("name", ["conv", "conv_direct"])
def test_diagonal_matvec_conv(ctx: CKKSContext, name: str) -> None:
    plan = PLANS[name]
    x = torch.tensor(RNG.uniform(-1, 1, size=(1, 1, 8, 8)))
    ref = (F.conv2d(x, CONV_W, torch.tensor(CONV_B), stride=2, padding=1)).reshape(-1).numpy()
    padded = RNG.uniform(-1, 1, SLOTS)  # slots beyond the input hold garbage: the diagonals ignore it
    padded[:64] = x.reshape(-1).numpy()
    ctx.reset_stats()
    out = plan.apply(ctx, [ctx.encrypt(padded)])[0]
    assert ctx.stats["rotations"] == plan.rotation_count
    assert plan.mult_count < 64 + 32 - 1  # a strided conv leaves many extended diagonals empty
    y = ctx.decrypt(out)
    assert np.abs(y[:32] - ref).max() < 1e-4
    assert np.abs(y[32:]).max() < 1e-4


def test_layers_chain_without_reencryption(ctx: CKKSContext) -> None:
    x = torch.tensor(RNG.uniform(-1, 1, size=(1, 1, 8, 8)))
    h = F.conv2d(x, CONV_W, torch.tensor(CONV_B), stride=2, padding=1).reshape(-1)
    h = h * h
    h = torch.tensor(FC1_W) @ h + torch.tensor(FC1_B)
    ref = (torch.tensor(FC2_W) @ h + torch.tensor(FC2_B)).numpy()
    ct = ctx.encrypt(x.reshape(-1).numpy())
    ctx.reset_stats()
    ct = PLANS["conv"].apply(ctx, [ct])[0]
    ct = ctx.square(ct)
    ct = PLANS["fc1"].apply(ctx, [ct])[0]
    ct = PLANS["fc2"].apply(ctx, [ct])[0]
    assert ctx.level(ct) == 0
    assert ctx.stats["rotations"] == sum(PLANS[k].rotation_count for k in ("conv", "fc1", "fc2"))
    y = ctx.decrypt(ct)
    assert np.abs(y[:10] - ref).max() < 1e-3
    assert np.abs(y[10:]).max() < 1e-3
    with pytest.raises(DepthExhausted):
        PLANS["fc2"].apply(ctx, [ct])[0]


def test_matvec_guards(ctx: CKKSContext) -> None:
    with pytest.raises(InvalidInput, match="slots"):
        BlockMatVec.from_dense(np.ones((SLOTS + 1, 20)), None, SLOTS, key_mode="few")  # rows beyond the slots
    with pytest.raises(InvalidInput):
        BlockMatVec.from_dense(np.ones((3, 3)), np.ones(4), SLOTS, key_mode="few")
    with pytest.raises(InvalidInput):
        BlockMatVec.from_dense(np.array([[np.nan]]), None, SLOTS, key_mode="few")
    far = BlockMatVec.from_dense(np.eye(4, 300, k=250), None, SLOTS, key_mode="direct")  # needs step 250: no key
    with pytest.raises(KeyMaterialError, match="Galois key"):
        far.apply(ctx, [ctx.encrypt(np.ones(300))])
    zero = BlockMatVec.from_dense(np.zeros((5, 5)), np.arange(5.0), SLOTS, key_mode="few")
    assert zero.rotation_count == 0
    y = ctx.decrypt(zero.apply(ctx, [ctx.encrypt(np.ones(5))])[0])
    assert np.abs(y[:5] - np.arange(5.0)).max() < 1e-4


def test_bsgs_rotation_count_scales_with_sqrt() -> None:
    w = RNG.normal(size=(256, 784))
    for mode in ("few", "direct"):
        big = BlockMatVec.from_dense(w, None, 8192, key_mode=mode)
        assert big.mult_count == 256 + 784 - 1
        assert big.rotation_count <= 2 * np.sqrt(1039) + 2  # vs 1039 for the plain diagonal method
    few = BlockMatVec.from_dense(w, None, 8192, key_mode="few")
    assert few.rotation_steps() == {1, few.k, -few.k}  # "few": 3 Galois keys
    assert len(big.rotation_steps()) == big.rotation_count  # "direct": one key per rotation
    band = np.eye(64) + np.eye(64, k=1) + np.eye(64, k=-1)
    for mode in ("few", "direct"):
        plan = BlockMatVec.from_dense(band, None, 4096, key_mode=mode)
        assert plan.mult_count == 3 and plan.rotation_count == 2 and plan.rotation_steps() == {1, -1}
    lone = BlockMatVec.from_dense(np.eye(4, 300, k=250), None, 4096, key_mode="few")  # one far diagonal
    assert lone.rotation_count <= 2 * np.sqrt(250) + 2
    assert BlockMatVec.from_dense(np.eye(4, 300, k=250), None, 4096, key_mode="direct").rotation_count == 1
    with pytest.raises(InvalidInput):
        BlockMatVec.from_dense(band, None, 4096, key_mode="all")


# ---------------------------------------------------------------------------------------------- polynomials


@pytest.fixture(scope="module")
def pctx() -> CKKSContext:
    return CKKSContext.generate(choose_params(5, precision_bits=14, poly_modulus_degree=8192))  # scale 2^30


def cheon_sign(n: int) -> np.ndarray:
    """f_n of Cheon et al. (2020): odd, degree 2n+1, |f_n| <= 1 on [-1, 1], a sign-composition stage."""
    c = np.zeros(2 * n + 2)
    for i in range(n + 1):
        term = P.polymul([0, 1], P.polypow([1, 0, -1], i)) * comb(2 * i, i) / 4**i
        c[: len(term)] += term
    return c


def test_poly_depth_values() -> None:
    assert [poly_depth(d) for d in (0, 1, 2, 3, 4, 7, 8, 15, 16, 27, 31)] == [0, 1, 2, 2, 3, 3, 4, 4, 5, 5, 5]


def test_eval_poly_all_degrees(pctx: CKKSContext) -> None:
    x = RNG.uniform(-1, 1, pctx.slots)
    ct = pctx.encrypt(x)
    top = pctx.level(ct)
    for d in range(1, 32):
        c = RNG.normal(size=d + 1)
        c /= np.abs(c).sum()  # |p(x)| <= 1: fits the first prime's headroom
        pctx.reset_stats()
        out = eval_poly(pctx, ct, c)
        assert top - pctx.level(out) == poly_depth(d), d
        assert pctx.stats["ct_ct_mults"] == poly_mult_count(c), d
        assert out.scale == pctx.scale_at(pctx.level(out))
        err = np.abs(pctx.decrypt(out) - P.polyval(x, c)).max()
        assert err < 1e-4, (d, err)  # scale 2^30: measured <= 2e-5


def test_eval_poly_sign_stages(pctx: CKKSContext) -> None:
    x = RNG.uniform(-1, 1, pctx.slots)
    ct = pctx.encrypt(x)
    for n, max_mults in ((3, 5), (6, 7), (7, 8), (13, 11)):
        c = cheon_sign(n)
        d = 2 * n + 1
        assert poly_value_bound(c) <= 1.0 + 1e-9
        pctx.reset_stats()
        out = eval_poly(pctx, ct, c)
        assert pctx.level(ct) - pctx.level(out) == poly_depth(d)
        assert pctx.stats["ct_ct_mults"] == poly_mult_count(c) <= max_mults
        err = np.abs(pctx.decrypt(out) - P.polyval(x, c)).max()
        assert err < 1e-5 * np.abs(c).sum(), (d, err)  # coefficients up to ~550 for degree 27


def test_sparse_polynomials_are_cheaper(pctx: CKKSContext) -> None:
    ct = pctx.encrypt(RNG.uniform(-1, 1, 64))
    for d in (7, 15, 27):
        dense = RNG.normal(size=d + 1) / (d + 1)
        odd = dense.copy()
        odd[0::2] = 0.0
        assert poly_mult_count(odd) <= poly_mult_count(dense)
        costs = []
        for c in (dense, odd):
            pctx.reset_stats()
            eval_poly(pctx, ct, c)
            costs.append((pctx.stats["ct_ct_mults"], pctx.stats["ct_pt_mults"]))
        assert costs[1][0] <= costs[0][0] and costs[1][1] < costs[0][1], (d, costs)
    assert poly_mult_count([0, 0, 1]) == 1 and poly_mult_count([3, 2]) == 0
    assert poly_mult_count([0] * 16 + [1]) == 4  # x^16: four squarings


def test_eval_poly_edge_cases(pctx: CKKSContext) -> None:
    x = RNG.uniform(-1, 1, 64)
    ct = pctx.encrypt(x)
    const = eval_poly(pctx, ct, [0.25, 0.0, 0.0])  # degree 0 after trimming: no level used
    assert pctx.level(const) == pctx.level(ct)
    assert np.abs(pctx.decrypt(const)[:64] - 0.25).max() < 1e-4
    even = [0.1, 0, -0.5, 0, 0.3]
    out = eval_poly(pctx, ct, even)
    assert np.abs(pctx.decrypt(out)[:64] - P.polyval(x, even)).max() < 1e-4
    low = pctx.mod_switch_to_level(ct, 2)
    with pytest.raises(DepthExhausted, match="degree-7"):
        eval_poly(pctx, low, cheon_sign(3))
    with pytest.raises(InvalidInput):
        eval_poly(pctx, ct, [])
    with pytest.raises(InvalidInput):
        eval_poly(pctx, ct, [1.0, np.inf])
    with pytest.raises(RangeViolation):
        eval_poly(pctx, pctx.mod_switch_to_level(ct, 1), [100.0, 1.0])  # exceeds the last level's headroom


# ---------------------------------------------------------------------------------------------- throughput


def test_dense_throughput(pctx: CKKSContext) -> None:
    batch = 300
    n, m = 12, 7
    w = RNG.normal(size=(m, n)) / 4
    w[RNG.uniform(size=w.shape) < 0.4] = 0.0
    w[0, :3] = w[1, 3:6] = 0.125  # a value repeated along a row is encoded once
    w[6] = 0.0  # an all-zero row gives bias only
    b = RNG.normal(size=m) / 4
    feats = RNG.uniform(-1, 1, size=(n, batch))
    cts = [pctx.encrypt(f) for f in feats]
    pctx.reset_stats()
    out = dense_throughput(pctx, cts, w, b)
    nnz = int(np.count_nonzero(w))
    assert len(out) == m
    assert pctx.stats["ct_pt_mults"] == nnz
    assert pctx.stats["rotations"] == 0
    assert pctx.stats["rescales"] == m - 1
    assert pctx.stats["encodes"] == nnz - 4 + np.count_nonzero(b)
    ref = w @ feats + b[:, None]
    for j in range(m):
        assert pctx.level(out[j]) == pctx.level(cts[0]) - 1
        assert np.abs(pctx.decrypt(out[j])[:batch] - ref[j]).max() < 1e-4
    # a second layer on the outputs, with a square in between (TutorialCNN shape)
    sq = [pctx.square(o) for o in out]
    w2 = RNG.normal(size=(3, m)) / 3
    out2 = dense_throughput(pctx, sq, w2, None)
    ref2 = w2 @ (ref**2)
    for j in range(3):
        assert np.abs(pctx.decrypt(out2[j])[:batch] - ref2[j]).max() < 1e-4


def test_dense_throughput_guards(pctx: CKKSContext) -> None:
    ct = pctx.encrypt(np.ones(4))
    with pytest.raises(InvalidInput):
        dense_throughput(pctx, [ct], np.ones((2, 2)), None)
    with pytest.raises(InvalidInput):
        dense_throughput(pctx, [ct, ct], np.ones((2, 2)), np.ones(3))
    last = pctx.mod_switch_to_level(ct, 0)
    with pytest.raises(DepthExhausted):
        dense_throughput(pctx, [last, ct], np.ones((2, 2)), None)
