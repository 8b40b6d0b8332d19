"""Encrypted accuracy on the test split (slow): CKKS results must track plaintext within 0.5 points."""

from __future__ import annotations

import pytest
import torch

import privml
from privml.cli import _tensors

pytestmark = pytest.mark.slow


def _encrypted_predictions(compiled, session, x: torch.Tensor, batch: int) -> torch.Tensor:
    out = [session.decrypt(compiled(session.encrypt(x[i:i + batch]))) for i in range(0, len(x), batch)]
    return torch.cat(out)


def test_tutorial_cnn_throughput_whole_test_split() -> None:
    from privml.train import train_or_load

    model, dm = train_or_load("configs/mnist_tutorial_digits28.yaml")
    x, y = _tensors(dm.test_set)
    calib, _ = _tensors(dm.train_set, 512)
    compiled = privml.compile(model, calib, backend="ckks", layout="throughput")
    session = privml.Session(compiled.plan)
    logits = _encrypted_predictions(compiled, session, x, len(x))
    clear = model(x)
    clear_acc = (clear.argmax(1) == y).float().mean().item()
    enc_acc = (logits.argmax(1) == y).float().mean().item()
    assert abs(clear_acc - enc_acc) <= 0.005, (clear_acc, enc_acc)
    assert (logits - clear).abs().max() < 1e-2  # square activations are exact: only CKKS noise remains
