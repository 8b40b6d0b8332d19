"""torchvision's zoo, unmodified (num_classes=10, 3x32x32): compile and one image on plain and on mpc (2 real parties).

Random weights with a fixed seed (nothing downloads); BatchNorm statistics are set to non-trivial values so the
folded layers are not identities. Each run prints its time per image (pytest -s shows it).
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn as nn

import privml

MODELS = ["resnet18", "mobilenet_v2", "squeezenet1_0", "efficientnet_b0"]


def _model(name: str) -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10)
    g = torch.Generator().manual_seed(1)
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
    return model.eval()


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("name", MODELS)
def test_zoo_validates_on_plain_and_mpc(name: str) -> None:
    """Fast check: every zoo model passes validation (after fixes) on plain and mpc, with nothing blocking."""
    model = _model(name)
    for backend in ("plain", "mpc"):
        blocking = [p for p in privml.validate(model, backend) if p.severity == "error"]
        assert not blocking, f"{name} on {backend}: {blocking}"


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_zoo_runs_on_plain_and_mpc(name: str) -> None:
    model = _model(name)
    calib, x = _images(16, 2), _images(1, 3)
    with torch.no_grad():
        want = model(x)
    scale = max(1.0, float(want.abs().max()))

    compiled = privml.compile(model, calib, backend="plain")
    session = privml.Session(compiled.plan)
    t0 = time.perf_counter()
    got = session.decrypt(compiled(session.encrypt(x)))
    plain_s = time.perf_counter() - t0
    assert (got - want).abs().max() <= 1e-4 * scale, f"{name} plain differs from torch"

    compiled = privml.compile(model, calib, backend="mpc")
    session = privml.Session(compiled.plan, parties=2, timeout=600)
    t0 = time.perf_counter()
    got = session.decrypt(compiled(session.encrypt(x)))
    mpc_s = time.perf_counter() - t0
    err = float((got - want).abs().max())
    print(f"\n{name}: plain {plain_s * 1e3:.1f} ms/image, mpc (2 parties, incl. start-up) {mpc_s:.1f} s/image, "
          f"max |logit error| {err:.3g} (logits up to {scale:.3g})")
    assert err <= 5e-2 * scale, f"{name} mpc differs from torch by {err:.3g}"
    assert got.argmax(1).tolist() == want.argmax(1).tolist()
