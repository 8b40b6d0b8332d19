"""Samples spanning several ciphertexts: multiplexed grid packings, strided convolutions, pooling, residuals.

Each model's input is larger than one ciphertext at the plan's ring, so every linear map is a block diagonal
product over several input and output ciphertexts; the decrypted results must match the clear compiled model.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import privml
from models.resnet import BasicBlock


class Square(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


def _compile(model: nn.Module, calib: torch.Tensor, backend: str, **kw: object) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return privml.compile(model, calib, backend=backend, **kw)


def test_ckks_multi_ciphertext_strided_conv_pool_linear_matches_torch() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(6, 8, 3, stride=2, padding=1), Square(), nn.Conv2d(8, 16, 3, padding=1),
                          nn.AvgPool2d(2), nn.Flatten(), nn.Linear(16 * 8 * 8, 10)).eval()
    with torch.no_grad():
        for m in model:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(0.5)
    calib = torch.rand(32, 6, 32, 32)
    compiled = _compile(model, calib, "ckks", poly_modulus_degree=8192)
    assert compiled.plan.params["poly_modulus_degree"] == 8192  # 4096 slots: 6x32x32 = 6144 values span two
    x = torch.rand(2, 6, 32, 32)
    with privml.Session(compiled.plan, out_of_range="warn") as s:
        enc = s.encrypt(x)
        assert len(enc.payload) == 2 * 2  # two samples of two ciphertexts each
        y = s.decrypt(compiled(enc))
    ref = model(x)
    assert torch.allclose(y, ref, atol=1e-3 * float(ref.abs().max()) + 1e-4), (y - ref).abs().max()


@pytest.mark.slow  # ~16 s; hybrid residuals also run in test_hybrid (SmallResNet)
def test_hybrid_residual_block_with_stride_spanning_ciphertexts_matches_torch() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), BasicBlock(8, 16, stride=2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()
    calib = torch.rand(64, 3, 32, 32)
    with torch.no_grad():  # BatchNorm statistics of real activations
        model.train()
        model(calib)
        model.eval()
    compiled = _compile(model, calib, "hybrid", poly_modulus_degree=8192)
    x = torch.rand(1, 3, 32, 32)
    with privml.Session(compiled.plan, out_of_range="warn") as s:
        enc = s.encrypt(x)
        y = s.decrypt(compiled(enc))
        stats = s.backend.runtime.refresher.stats
    ref = model(x)
    assert stats.ciphertexts >= 2  # the 8x32x32 activations span two ciphertexts at N=8192
    tol = 6 * compiled.plan.params["hybrid"]["flood_sigma"] * 50 + 1e-3
    assert torch.allclose(y, ref, atol=tol), (y - ref).abs().max()


@pytest.mark.parametrize("shape", [(5, 30, 30), pytest.param((9, 20, 28), marks=pytest.mark.slow)])
def test_non_power_of_two_feature_maps_span_ciphertexts(shape: tuple[int, int, int]) -> None:
    torch.manual_seed(2)
    c = shape[0]
    model = nn.Sequential(nn.Conv2d(c, 4, 3, stride=2), Square(), nn.Flatten(),
                          nn.LazyLinear(3)).eval()
    calib = torch.rand(16, *shape)
    model(calib)
    compiled = _compile(model, calib, "ckks", poly_modulus_degree=8192)  # > 4096 values: two ciphertexts
    x = torch.rand(1, *shape)
    with privml.Session(compiled.plan, out_of_range="warn") as s:
        y = s.decrypt(compiled(s.encrypt(x)))
    ref = model(x)
    assert torch.allclose(y, ref, atol=2e-3 * float(ref.abs().max()) + 1e-3), (y - ref).abs().max()
