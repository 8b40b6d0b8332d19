"""Fidelity-first defaults: without a budget, compile keeps the original model's predictions or warns.

Regression tests for issue 9: the defaults (once degree 4 everywhere) lost ~25 points on a small
residual CNN, and a MaxPool -> AvgPool swap "passed" accuracy_tolerance because the baseline was the
swapped model. Models are trained here in about a second on 256 of scikit-learn's digits (full-batch Adam).
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import privml
from privml.errors import BudgetError, FidelityWarning

pytestmark = pytest.mark.usefixtures("one_thread")


class ResidualCNN(nn.Module):
    """Stem conv, one residual block, adaptive average pool, ReLUs: the held-out case of issue 9."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.act0 = nn.ReLU()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.act2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act0(self.stem(x))
        h = self.act2(h + self.conv2(self.act1(self.conv1(h))))
        return self.fc(self.pool(h).flatten(1))


def maxpool_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 10))


@functools.lru_cache(maxsize=1)
def digits() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    from privml.data import get_dataset

    train, test = get_dataset("digits", seed=0)
    return train.tensors, test.tensors


@functools.lru_cache(maxsize=2)
def trained(name: str) -> nn.Module:
    (xtr, ytr), _ = digits()
    torch.manual_seed(0)
    model = ResidualCNN() if name == "residual" else maxpool_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(model(xtr[:256]), ytr[:256]).backward()
        opt.step()
    return model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def compile_recording(*args, **kwargs):
    """privml.compile, returning (compiled, the FidelityWarnings it gave)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = privml.compile(*args, **kwargs)
    return compiled, [w for w in caught if issubclass(w.category, FidelityWarning)]


def test_defaults_keep_the_residual_cnn_within_two_points_or_warn() -> None:
    model = trained("residual")
    (xtr, _), (xte, yte) = digits()
    base = accuracy(model, xte, yte)
    assert base > 0.8
    compiled, warned = compile_recording(model, xtr[:512], backend="ckks")
    plan = compiled.plan
    drop = base - accuracy(compiled, xte, yte)
    assert drop <= 0.02 or warned
    assert plan.params["approximation"]["mode"] == "agreement"
    agreement = plan.predicted["agreement"]
    with torch.no_grad():
        measured = float((compiled(xtr[:512]).argmax(1) == model(xtr[:512]).argmax(1)).float().mean())
    assert agreement == pytest.approx(measured)
    assert (agreement >= 0.99) != bool(warned)  # warned exactly when the target is missed
    if warned:
        message = str(warned[0].message)
        assert "privml.train.finetune" in message and "act" in message  # blames layers, names the remedies
        assert message in plan.notes
    assert all(r.est_error is not None for r in plan.layers if r.spec)  # the error per approximated layer
    # the old default stays available when asked for, and loses what the issue measured
    fixed, _ = compile_recording(model, xtr[:512], backend="ckks", degree=4)
    assert base - accuracy(fixed, xte, yte) > 0.1
    assert fixed.plan.predicted["agreement"] < 0.9


def test_maxpool_swap_is_measured_against_the_original_model() -> None:
    model = trained("maxpool")
    (xtr, _), (xte, yte) = digits()
    base = accuracy(model, xte, yte)
    assert base > 0.9
    with pytest.raises(BudgetError, match="MaxPool -> AvgPool"):  # once "passed": the baseline was the swapped model
        privml.compile(model, xtr[:256], backend="ckks", replace_maxpool=True, accuracy_tolerance=0.01,
                       validation=(xte, yte))
    for backend in ("ckks", "mpc"):
        compiled, warned = compile_recording(model, xtr[:256], backend=backend, replace_maxpool=True)
        assert warned and "MaxPool -> AvgPool" in str(warned[0].message), backend
        assert compiled.plan.predicted["agreement"] < 0.99
    compiled = privml.compile(model, xtr[:256], backend="ckks", replace_maxpool=True, degree=4,
                              validation=(xte, yte))
    assert compiled.plan.predicted["accuracy_original"] == pytest.approx(base)


def test_a_model_with_nothing_to_approximate_is_unchanged() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).eval()
    compiled, warned = compile_recording(model, torch.randn(32, 4), backend="ckks")
    assert not warned and "agreement" not in compiled.plan.predicted
