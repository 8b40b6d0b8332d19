"""Fusing consecutive linear maps is the planner's decision, shown in the plan, and every choice runs.

Where two maps that both move values meet (a conv then a pooling, a pooling then a linear), the CKKS planner
prices both ways: fused (one level, the product's diagonals) and applied apart (one level more, each map's own
diagonals). The plan's ``fusion`` table holds both predictions and the choice; ``split_before`` is what the
runtime follows. Real SEAL ciphertexts, compared with the clear compiled model.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import torch.nn as nn

import privml
from privml.errors import MalformedInput, PrivmlError

pytestmark = pytest.mark.usefixtures("one_thread")


class Square(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), Square(), nn.Conv2d(4, 4, 3, padding=1),
                          nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).eval()
    with torch.no_grad():
        for m in model:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(0.5)
    return model


def _compile(fusion: str) -> tuple[privml.CompiledModel, torch.Tensor]:
    calib = torch.rand(32, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return privml.compile(_model(), calib, backend="ckks", fusion=fusion), calib


@pytest.fixture(scope="module")
def plans() -> dict[str, privml.CompiledModel]:
    return {f: _compile(f)[0] for f in ("always", "never", "auto")}


def test_the_plan_lists_every_fusion_point_with_its_choice(plans) -> None:
    fused, apart = plans["always"].plan.params, plans["never"].plan.params
    points = [row["op"] for row in fused["fusion"]]
    assert points == ["4", "6"]  # the pooling after conv 3, the linear after the pooling; BatchNorm always fuses
    assert [row["pending"] for row in fused["fusion"]] == ["3", "3+4"]
    assert fused["split_before"] == [] and all(row["chosen"] == "fused" for row in fused["fusion"])
    assert apart["split_before"] == ["4", "6"] and apart["depth"] == fused["depth"] + 2  # a level per split
    text = str(plans["always"].plan)
    assert "fusion: 4 after 3: fused" in text


def test_auto_prices_both_ways_and_follows_its_own_rule(plans) -> None:
    p = plans["auto"].plan.params
    assert [row["op"] for row in p["fusion"]] == ["4", "6"]
    chosen = []
    for row in p["fusion"]:
        assert row["fused"]["predicted_seconds"] > 0 and row["split"] is not None
        assert row["split"]["depth"] == row["fused"]["depth"] + 1
        faster = row["split"]["predicted_seconds"] < 0.9 * row["fused"]["predicted_seconds"]
        assert row["chosen"] == ("split" if faster else "fused"), row
        if faster:
            chosen.append(row["op"])
    assert p["split_before"] == chosen


@pytest.mark.parametrize("fusion", ["always", "never", "auto"])
def test_every_choice_runs_and_matches_the_clear_model(plans, fusion) -> None:
    compiled = plans[fusion]
    x = torch.rand(2, 1, 8, 8)
    with privml.Session(compiled.plan) as s:
        y = s.decrypt(compiled(s.encrypt(x)))
    ref = compiled(x)
    assert torch.allclose(y, ref, atol=1e-3 * float(ref.abs().max()) + 1e-4), (y - ref).abs().max()


def test_a_forged_split_is_refused_or_runs_out_of_levels_loudly(plans) -> None:
    plan = plans["always"].plan
    bad = dataclasses.replace(plan, params={**plan.params, "split_before": "4"})
    with pytest.raises(MalformedInput, match="split_before"):
        privml.Session(bad)
    # a split the parameters were not sized for needs keys and levels the session lacks: an error, not a wrong number
    deeper = dataclasses.replace(plan, params={**plan.params, "split_before": ["4", "6"]})
    with privml.Session(deeper) as s:
        with pytest.raises(PrivmlError, match="level|depth|Galois key"):
            s.decrypt(plans["always"](s.encrypt(torch.rand(1, 1, 8, 8))))


class PoolThenLinear(nn.Module):
    """Two position-mixing maps inside one module: a split named by the module could not tell them apart."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 2 * 4 * 4) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(nn.functional.avg_pool2d(x, 2).flatten(1), self.weight)


@pytest.mark.parametrize("fusion", ["auto", "never"])
def test_an_op_holding_several_maps_stays_fused_and_runs(fusion) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), Square(), PoolThenLinear()).eval()
    calib = torch.rand(16, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = privml.compile(model, calib, backend="ckks", fusion=fusion)
    p = compiled.plan.params
    assert [row["chosen"] for row in p["fusion"]] == ["fused"]  # traced inline: both maps in one op name
    assert "several" in p["fusion"][0]["why"] and p["split_before"] == []
    x = torch.rand(1, 1, 8, 8)
    with privml.Session(compiled.plan) as s:
        y = s.decrypt(compiled(s.encrypt(x)))
    ref = compiled(x)
    assert torch.allclose(y, ref, atol=1e-3 * float(ref.abs().max()) + 1e-4), (y - ref).abs().max()


def test_hybrid_plans_price_each_point_on_their_ring_and_run_either_way() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.AvgPool2d(2),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).eval()
    calib = torch.rand(32, 1, 8, 8)
    x = torch.rand(1, 1, 8, 8)
    for fusion in ("auto", "always"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = privml.compile(model, calib, backend="hybrid", fusion=fusion)
        p = compiled.plan.params
        assert [row["op"] for row in p["fusion"]] == ["3", "5"]
        if fusion == "always":
            assert p["split_before"] == [] and {row["chosen"] for row in p["fusion"]} == {"fused"}
        for row in p["fusion"]:
            if row.get("split") and not row["why"].startswith("split refused"):
                faster = row["split"]["predicted_seconds"] < 0.9 * row["fused"]["predicted_seconds"]
                assert row["chosen"] == ("split" if faster else "fused"), row
        assert p["split_before"] == [row["op"] for row in p["fusion"] if row["chosen"] == "split"]
        with privml.Session(compiled.plan) as s:
            y = s.decrypt(compiled(s.encrypt(x)))
        assert (y - model(x)).abs().max() <= p["hybrid"]["output_error_bound"] + 1e-4


def _lenet_like() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), Square(), nn.AvgPool2d(2), nn.Conv2d(6, 16, 5), Square(),
                          nn.AvgPool2d(2), nn.Flatten(), nn.Linear(16 * 5 * 5, 10)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.3)
    return model


def _lenet_plans(**kw: object) -> privml.CompiledModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return privml.compile(_lenet_like(), torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(0)),
                              backend="ckks", **kw)


def test_the_planner_splits_where_it_pays_and_never_past_the_depth_budget() -> None:
    """Without folded products, conv 3 after pool 2 has fewer diagonals apart at the same ring: a split pays.
    Folding (the default) makes the fused pair cheaper still, and the planner then keeps it fused."""
    p = _lenet_plans(fold=False).plan.params
    assert p["split_before"] == ["3"] and p["folded"] == []
    q = _lenet_plans(fold=False, depth_budget=p["depth"] - 1).plan.params
    assert q["split_before"] == [] and q["depth"] == p["depth"] - 1
    assert "depth_budget" in q["fusion"][0]["why"]
    f = _lenet_plans().plan.params
    assert f["folded"] and f["split_before"] == [] and f["predicted_seconds"] < p["predicted_seconds"]


@pytest.mark.slow  # ~30 s: a LeNet-shaped model at N=16384
def test_a_split_the_planner_takes_runs() -> None:
    auto = _lenet_plans(fold=False)
    assert auto.plan.params["split_before"] == ["3"]
    x = torch.rand(1, 1, 28, 28)
    with privml.Session(auto.plan) as s:
        y = s.decrypt(auto(s.encrypt(x)))
    ref = auto(x)
    assert torch.allclose(y, ref, atol=1e-3 * float(ref.abs().max()) + 1e-4), (y - ref).abs().max()
