"""Regression tests for the architecture findings: validation and backends disagreeing, the shadowed package,
and the zoo's building blocks failing only at run time. (Unknown options: tests/test_config.py.)"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import privml
from privml.errors import UnsupportedModule
from tests.op_cases import Case


def _blocking(model: nn.Module, backend: str) -> list:
    return [p for p in privml.validate(model, backend) if p.severity == "error"]


@pytest.mark.parametrize("backend", ["plain", "ckks", "mpc"])
def test_torch_div_by_a_constant_validates_everywhere(backend: str) -> None:
    assert not _blocking(Case(lambda x: torch.div(x, 2.0)), backend)
    assert _blocking(Case(lambda x: torch.div(x, x + 1.0)), backend)  # by a private value: refused


def test_unsqueeze_squeeze_validate_on_mpc() -> None:
    assert not _blocking(Case(lambda x: x.unsqueeze(1).squeeze(1)), "mpc")


def test_gelu_model_compiles_and_runs_on_mpc_parties() -> None:
    torch.manual_seed(0)  # its weights, not the order the suite happens to run in, decide the approximation error
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3)).eval()
    calib = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
    compiled = privml.compile(model, calib, backend="mpc")
    gelu_rows = [lp for lp in compiled.plan.layers if lp.kind == "activation"]
    assert gelu_rows and all(lp.approx != "exact" for lp in gelu_rows), "the plan must say GELU is approximated"
    x = calib[:2] * 0.8
    session = privml.Session(compiled.plan, parties=2)
    got = session.decrypt(compiled(session.encrypt(x)))
    with torch.no_grad():
        assert (got - compiled(x)).abs().max() < 2e-2  # the parties compute the approximated model
        assert (got - model(x)).abs().max() < 0.1  # which stays close to the original


def test_cat_on_ckks_is_refused_at_compile_with_every_problem() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pool = nn.MaxPool2d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([self.pool(x), self.pool(x) * 2], dim=1)

    with pytest.raises(UnsupportedModule) as info:
        privml.compile(M(), torch.randn(8, 1, 4, 4), backend="ckks")
    kinds = {p.kind for p in info.value.problems}
    assert {"maxpool", "unsupported"} <= kinds
    assert "concatenating" in str(info.value)


def test_compiler_package_does_not_shadow_compile() -> None:
    mod = importlib.import_module("privml.compiler.choose")
    assert callable(mod.choose)
    assert callable(privml.compile) and not hasattr(privml.compile, "__path__")


def test_layernorm_relu6_stochastic_depth_run_on_plain() -> None:
    from torchvision.ops import StochasticDepth

    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU6(), StochasticDepth(0.2, "row"),
                          nn.Hardswish(), nn.Linear(8, 2)).eval()
    calib = torch.randn(32, 6)
    compiled = privml.compile(model, calib, backend="plain")
    session = privml.Session(compiled.plan)
    x = torch.randn(3, 6)
    torch.testing.assert_close(session.decrypt(compiled(session.encrypt(x))), model(x).detach())


def test_relu6_and_hardswish_are_approximated_on_ckks() -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU6(), nn.Linear(8, 8), nn.Hardswish(), nn.Linear(8, 2)).eval()
    calib = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
    compiled = privml.compile(model, calib, backend="ckks")
    assert sum(lp.kind == "activation" and lp.approx != "exact" for lp in compiled.plan.layers) == 2
    session = privml.Session(compiled.plan)
    x = calib[:2] * 0.8
    got = session.decrypt(compiled(session.encrypt(x)))
    with torch.no_grad():
        assert (got - compiled(x)).abs().max() < 1e-3


def test_layernorm_runs_encrypted_on_ckks() -> None:
    """LayerNorm on CKKS: a polynomial 1/sqrt on the calibrated variance range, planned like an activation."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 3)).eval()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.2, 0.2)
    calib = torch.randn(128, 16, generator=torch.Generator().manual_seed(1))
    compiled = privml.compile(model, calib, backend="ckks")
    row = compiled.plan.layer("1")
    assert row.op == "PolyLayerNorm" and row.degree >= 2 and row.est_error > 0
    x = calib[:2]
    session = privml.Session(compiled.plan)
    got = session.decrypt(compiled(session.encrypt(x)))
    with torch.no_grad():
        assert (got - compiled(x)).abs().max() < 2e-3  # encryption adds little to the approximated model
        assert (got - model(x)).abs().max() < 0.05  # which stays close to the original


def test_layernorm_with_a_wide_variance_range_adds_newton_steps() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8)).eval()
    calib = torch.randn(128, 6, generator=torch.Generator().manual_seed(1))
    compiled = privml.compile(model, calib, backend="ckks")
    ln = compiled.module.get_submodule("1")
    assert ln.newton_steps >= 1 and ln.interval[1] / ln.interval[0] > 30
    with torch.no_grad():
        err = float((compiled(calib) - model(calib)).abs().max())
    assert err <= compiled.plan.layer("1").est_error + 1e-4


@pytest.mark.parametrize("features_in,features", [(16, 32), (6, 8)])
def test_layernorm_depth_matches_the_dry_run(features_in: int, features: int) -> None:
    """PolyLayerNorm.depth (used by the approximation search) equals what the CKKS op table consumes: the
    dry run adds exactly the incoming linear map and the output affine map, with and without Newton steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(features_in, features), nn.LayerNorm(features)).eval()
    calib = torch.randn(128, features_in, generator=torch.Generator().manual_seed(1))
    compiled = privml.compile(model, calib, backend="ckks")
    ln = compiled.module.get_submodule("1")
    assert compiled.plan.params["depth"] == ln.depth + 2


@pytest.mark.parametrize("build,backend", [
    (lambda: _InplaceKeyword(), "plain"),
    (lambda: _ViewWrite(), "mpc"),
    (lambda: Case(lambda x: F.batch_norm(x, None, None, training=True)), "ckks"),
    (lambda: nn.Sequential(nn.Flatten(), nn.BatchNorm1d(8, track_running_stats=False)), "ckks"),
    (lambda: Case(lambda x: x.T), "plain"),
    (lambda: Case(lambda x: F.dropout(x, 0.5)), "mpc"),
    (lambda: Case(lambda x: x.sum()), "ckks"),
    (lambda: nn.Softmax(), "mpc"),
    (lambda: Case(lambda x: (x, x * 2)), "plain"),
])
def test_what_would_run_wrong_is_refused_at_validation(build: object, backend: str) -> None:
    """Each of these used to validate and then give a different result from torch (or fail at run time)."""
    assert _blocking(build().eval(), backend)


def test_the_fix_does_not_touch_the_callers_calibration_data() -> None:
    model = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(8, 4)).eval()
    calib = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    before = calib.clone()
    compiled = privml.compile(model, calib, backend="ckks")
    assert torch.equal(calib, before)
    relu = compiled.plan.layers[0]
    assert relu.in_range[0] < -1.0  # calibrated on the real (negative) inputs, not on ReLU outputs


class _InplaceKeyword(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        F.relu(h, inplace=True)
        return h


class _ViewWrite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        v = h.view(x.shape[0], -1)
        v.add_(1.0)
        return h * 2
