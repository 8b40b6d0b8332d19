"""Packings: where an encrypted tensor's values live (dense, multiplexed grids, throughput lanes)."""

from __future__ import annotations

import numpy as np
import pytest

from privml.errors import InvalidInput
from privml.he import packing as pk
from privml.he.packing import Packing


@pytest.mark.parametrize("shape,slots", [((3, 32, 32), 4096), ((16, 32, 32), 8192), ((10,), 16), ((5, 3, 3), 8)])
def test_fresh_packing_round_trips(shape: tuple, slots: int) -> None:
    p = pk.for_shape(shape, slots)
    values = np.random.default_rng(0).normal(size=int(np.prod(shape)))
    vectors = p.scatter(values, slots)
    assert len(vectors) == p.n_cts == -(-values.size // slots)
    assert np.array_equal(p.gather(vectors), values)


@pytest.mark.parametrize("c,h,gap", [(32, 16, 2), (64, 8, 4), (3, 16, 2), (16, 32, 1)])
def test_grid_units_are_injective_and_fill_the_gaps(c: int, h: int, gap: int) -> None:
    p = Packing("grid", c * h * h, 1, 4096, (c, h, h, gap, 32, 32))
    assert np.unique(p.units).size == p.n
    planes = -(-c // (gap * gap))
    assert p.n_units <= planes * 32 * 32
    if c % (gap * gap) == 0:
        assert p.n_units == p.n  # every slot of every plane carries a value


def test_strided_outputs_keep_the_grid() -> None:
    src = pk.for_shape((16, 32, 32), 4096)
    out = pk.output_packing(src, (32, 16, 16), 4096)
    assert out.kind == "grid" and out.grid == (32, 16, 16, 2, 32, 32) and out.fill == 1.0
    again = pk.output_packing(out, (64, 8, 8), 4096)
    assert again.grid[3] == 4 and again.n_cts == 1
    assert pk.output_packing(again, (64, 8, 8), 4096) == again  # stride 1 keeps the packing
    assert pk.output_packing(again, (10,), 4096).kind == "dense"
    # sizes that do not divide the grid start a new dense grid
    assert pk.output_packing(src, (16, 30, 30), 4096).grid == (16, 30, 30, 1, 30, 30)


def test_throughput_lanes_round_trip() -> None:
    p = pk.dense(18, 8192, width=450)
    assert p.per_ct == 18 and p.n_cts == 1
    values = np.random.default_rng(1).normal(size=(18, 450))
    assert np.array_equal(p.gather(p.scatter(values, 8192)), values)


@pytest.mark.parametrize("shape,slots,width,f", [((8, 8, 8), 8192, 512, 2), ((3, 28, 28), 8192, 512, 7),
                                                  ((4, 6, 6), 4096, 512, 3), ((2, 8, 8), 4096, 16, 0)])
def test_lanes_use_a_polyphase_packing_when_a_plane_does_not_fit_a_ciphertext(shape, slots, width, f) -> None:
    p = pk.for_shape(shape, slots, width)
    if not f:  # 64 cells fit 256 units per ciphertext: a gap-1 grid
        assert p.kind == "grid" and p.per_ct == slots // width
        return
    c, h, w = shape
    plane = p.grid[4]
    assert p.kind == "phase" and p.grid[3] == f and plane >= (h // f) * (w // f) and p.per_ct % plane == 0
    assert np.unique(p.units).size == p.n
    # a plane never straddles two ciphertexts
    planes, _ = np.divmod(p.units, plane)
    assert np.all(planes * plane // p.per_ct == (planes * plane + plane - 1) // p.per_ct)
    # cells of one 2x2 pooling window (f even) sit at the same position of different planes
    if f % 2 == 0:
        u = p.units.reshape(c, h, w)
        assert len({int(x) % plane for x in (u[0, 0, 0], u[0, 0, 1], u[0, 1, 0], u[0, 1, 1])}) == 1
    values = np.random.default_rng(2).normal(size=(p.n, width))
    assert np.array_equal(p.gather(p.scatter(values, slots)), values)
    assert Packing.from_dict(p.to_dict()) == p
    # the pooled map fits a ciphertext again: back to a grid
    assert pk.output_packing(p, (c, h // f, w // f), slots).kind in ("grid", "phase")


def test_latency_layouts_never_use_the_phase_packing() -> None:
    assert pk.for_shape((16, 256, 256), 8192).kind == "grid"


def test_packing_serializes_and_refuses_nonsense() -> None:
    p = pk.output_packing(pk.for_shape((16, 32, 32), 4096), (32, 16, 16), 4096)
    assert Packing.from_dict(p.to_dict()) == p
    with pytest.raises(InvalidInput):
        Packing("grid", 10, 1, 16, (2, 2, 2, 2, 2, 2))  # the gapped map does not fit the grid
    with pytest.raises(InvalidInput):
        Packing.from_dict({"kind": "dense"})
    with pytest.raises(InvalidInput):
        Packing("phase", 256, 512, 16, (4, 8, 8, 3, 16))  # 3 does not divide 8
    with pytest.raises(InvalidInput):
        Packing("phase", 256, 512, 16, (4, 8, 8, 2, 8))  # 4x4 planes in 8 units
    with pytest.raises(InvalidInput):
        Packing("phase", 256, 512, 16, (4, 8, 8, 2))  # a field missing
    with pytest.raises(InvalidInput):
        pk.dense(10, 64, width=65)
