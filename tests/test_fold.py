"""Folded products (the hybrid diagonal method) in the CKKS latency layout, and the bound on what they leave.

A map whose output is narrower than its input (a linear 256 -> 64, a strided conv) gets one diagonal per output
offset and its copies summed by rotate-and-add, so the slots outside its outputs hold partial sums. The planner
bounds them through every later op (squares, polynomials, sums) against each level's modulus, and applies a map
unfolded where its bound could overflow. Real SEAL ciphertexts, compared with the clear compiled model.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import privml
from privml.backends.ckks import Runtime
from privml.errors import DepthExhausted, MalformedInput

pytestmark = pytest.mark.usefixtures("one_thread")


class Square(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


class Cube(nn.Module):
    """A degree-3 polynomial: what a folded map's partial sums become grows as their cube."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x * x


def _compile(model: nn.Module, calib: torch.Tensor, **kw: object) -> privml.CompiledModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return privml.compile(model.eval(), calib, backend="ckks", layout="latency", **kw)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(200, 48), Square(), nn.Linear(48, 10))


def test_folded_plans_match_the_clear_model_with_fewer_products_and_key_switches() -> None:
    model, calib = _mlp(), torch.rand(64, 200)
    folded, plain = _compile(model, calib), _compile(model, calib, fold=False)
    p, q = folded.plan.params, plain.plan.params
    assert p["folded"] and q["folded"] == [] and q["fold_bound"] is None
    assert p["key_switches"] < q["key_switches"] and p["predicted_seconds"] < q["predicted_seconds"]
    assert "fold" in privml.CKKSConfig.__dataclass_fields__
    x = torch.rand(2, 200)
    for compiled in (folded, plain):
        with privml.Session(compiled.plan) as s:
            s.backend.ctx.reset_stats()
            y = s.decrypt(compiled(s.encrypt(x)))
            products = s.backend.ctx.stats["ct_pt_mults"]
        ref = compiled(x)
        assert torch.allclose(y, ref, atol=1e-3 * float(ref.abs().max()) + 1e-4), (y - ref).abs().max()
        if compiled is folded:
            folded_products = products
    assert folded_products < products / 2  # 48 + 10 diagonals per sample instead of 247 + 57


def test_a_map_whose_spill_could_overflow_is_applied_unfolded() -> None:
    """Linear -> cube -> cube -> linear: the first map's partial sums, cubed twice, could exceed a level's modulus
    at this ring, so the planner keeps that map unfolded (no_fold) and the plan still runs."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 16), Cube(), Cube(), nn.Linear(16, 4))
    with torch.no_grad():
        model[0].weight.mul_(4.0)
    calib = torch.rand(64, 64) * 0.05
    compiled = _compile(model, calib, poly_modulus_degree=8192, precision_bits=10)
    p = compiled.plan.params
    assert "0" in p["no_fold"] and "0" not in p["folded"]
    x = torch.rand(1, 64) * 0.05
    with privml.Session(compiled.plan) as s:
        y = s.decrypt(compiled(s.encrypt(x)))
    ref = compiled(x)
    assert torch.allclose(y, ref, atol=5e-2 * float(ref.abs().max()) + 1e-3), (y - ref).abs().max()


def test_the_runtime_refuses_a_spill_its_level_cannot_hold() -> None:
    compiled = _compile(_mlp(), torch.rand(64, 200))
    with privml.Session(compiled.plan) as s:
        rt = s.backend.runtime
        payload = [s.backend.ctx.encrypt([0.0])]
        with pytest.raises(DepthExhausted, match="folded linear map left outside its outputs"):
            rt._mark(payload, rt.value_limit(payload) * 2)
        assert rt._mark(payload, 1.0).spill == 1.0
    plan = compiled.plan
    with pytest.raises(MalformedInput, match="fold_bound"):
        Runtime(None, "latency", fold_bound=float("nan"))
    plan.params["no_fold"] = "0"
    with pytest.raises(MalformedInput, match="no_fold"):
        privml.Session(plan)
