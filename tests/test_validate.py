"""Validation collects every problem with qualified names; fixes are safe and numerically checked."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import privml
from privml.compiler.validate import errors, fix, validate
from privml.errors import UnsupportedModule


def test_resnet18_full_problem_list_with_qualified_names() -> None:
    model = torchvision.models.resnet18(num_classes=10)
    problems = validate(model, "ckks")
    by_kind: dict[str, set[str]] = {}
    for p in problems:
        by_kind.setdefault(p.kind, set()).add(p.name)
    # every BatchNorm is reported as foldable into its conv, by qualified name
    bn_names = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert by_kind["batchnorm"] == bn_names and len(bn_names) == 20
    assert "layer3.0.downsample.1" in by_kind["batchnorm"]
    inplace = {n for n, m in model.named_modules() if isinstance(m, nn.ReLU)}
    assert inplace <= by_kind["inplace"]
    assert by_kind["maxpool"] == {"maxpool"}
    assert [p.name for p in errors(problems)] == ["maxpool"]
    assert all(p.fix for p in problems if p.severity in ("error", "fixable"))


def test_resnet18_passes_after_fixes_and_folding_is_exact() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    for m in model.modules():  # non-trivial BN statistics so folding is really tested
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    gm, applied = fix(model, x)  # raises if outputs moved
    assert sum("folded" in a for a in applied) == 20
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-4)
    with pytest.warns(UserWarning, match="AvgPool2d"):
        gm2, applied2 = fix(model, x, replace_maxpool=True)
    assert errors(validate(gm2, "ckks")) == []
    assert any("MaxPool2d -> AvgPool2d" in a for a in applied2)


def test_maxpool_is_fine_for_plain_and_mpc() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2))
    assert errors(validate(model, "plain")) == []
    assert errors(validate(model, "mpc")) == []


class _Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.exp(self.fc(x))  # invisible to a module walk
        return torch.sort(y, dim=-1).values


class _DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x
        return -x


class _InplaceWrite(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * 2
        y[:, 0] = 0
        return y


def test_functional_calls_inside_forward_are_found() -> None:
    problems = errors(validate(_Functional(), "plain"))
    text = " | ".join(str(p) for p in problems)
    assert "exp" in text and "sort" in text


def test_data_dependent_control_flow_is_a_clear_error() -> None:
    problems = errors(validate(_DataDependent(), "plain"))
    assert [p.kind for p in problems] == ["control_flow"]
    with pytest.raises(UnsupportedModule, match="control flow"):
        privml.compile(_DataDependent(), torch.randn(4, 3))


def test_inplace_write_into_tensor_is_reported() -> None:
    problems = errors(validate(_InplaceWrite(), "plain"))
    assert any(p.kind == "inplace" for p in problems)


def test_unsupported_layers_are_all_listed_at_once() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.GroupNorm(2, 8), nn.Sequential(nn.Linear(8, 8), nn.LSTM(8, 8)))
    with pytest.raises(UnsupportedModule) as info:
        privml.compile(model, torch.randn(4, 8))
    names = {p.name for p in info.value.problems}
    assert {"1", "2.1"} <= names
    assert "GroupNorm" in str(info.value) and "LSTM" in str(info.value)


def test_unknown_backend() -> None:
    with pytest.raises(privml.errors.PrivmlError, match="unknown backend"):
        validate(nn.Linear(2, 2), "quantum")


def test_functional_max_pool_replacement() -> None:
    class M(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.max_pool2d(x, 2)

    assert [p.kind for p in errors(validate(M(), "ckks"))] == ["maxpool"]
    gm, applied = fix(M(), torch.randn(1, 1, 4, 4), replace_maxpool=True)
    x = torch.randn(1, 1, 4, 4)
    torch.testing.assert_close(gm(x), F.avg_pool2d(x, 2))
