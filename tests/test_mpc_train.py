"""Private training on the breast-cancer data from two data owners, against plaintext training.

Same split, initial weights, batch order, epochs and learning rate; the private run must reach
a test accuracy within 2 percentage points of the plaintext run (and in fact close weights).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn

from models.breast_cancer import BreastCancerLogReg, BreastCancerMLP
from privml.backends.mpc import fingerprint
from privml.data import load_breast_cancer_split
from privml.errors import InvalidInput, UnsupportedModule
from privml.mpc.train import accuracy, layer_chain, train_plain, train_private


def owner_half(which: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hospital ``which`` holds one half of the training rows (first / second half of the split)."""
    x, y = load_breast_cancer_split()[0].tensors
    n = len(x) // 2
    return (x[:n], y[:n]) if which == 0 else (x[n:], y[n:])


def run_and_compare(model: nn.Module, epochs: int, lr: float) -> tuple[float, float, float]:
    (x, y), (xt, yt) = (ds.tensors for ds in load_breast_cancer_split())
    private = train_private(model, {0: functools.partial(owner_half, 0), 1: functools.partial(owner_half, 1)},
                            epochs=epochs, lr=lr, batch_size=32, seed=0, timeout=120)
    plain = train_plain(model, x, y, epochs=epochs, lr=lr, batch_size=32, seed=0)
    gap = max(float((a - b).abs().max()) for a, b in zip(private.model.state_dict().values(),
                                                          plain.state_dict().values(), strict=True))
    # privacy: each owner's heap never held the other owner's rows; both got only the trained weights
    a, b = private.parties
    rows = [fingerprint(owner_half(i)[0]) for i in (0, 1)]
    assert rows[0] in a["fingerprints"] and rows[0] not in b["fingerprints"]
    assert rows[1] in b["fingerprints"] and rows[1] not in a["fingerprints"]
    assert a["received_weights"] and b["received_weights"]
    assert private.provider == "TFP" and private.costs["scopes"]["forward"]["rounds"] > 0
    return accuracy(private.model, xt, yt), accuracy(plain, xt, yt), gap


def test_private_mlp_training_matches_plaintext_training() -> None:
    torch.manual_seed(0)
    acc_private, acc_plain, gap = run_and_compare(BreastCancerMLP(), epochs=3, lr=0.5)
    assert acc_plain > 0.9
    assert abs(acc_private - acc_plain) <= 0.02
    assert gap < 0.05  # fixed-point SGD follows the plaintext trajectory closely


@pytest.mark.slow
@pytest.mark.parametrize("cls", [BreastCancerLogReg, BreastCancerMLP])
def test_private_training_ten_epochs(cls: type) -> None:
    torch.manual_seed(1)
    acc_private, acc_plain, gap = run_and_compare(cls(), epochs=10, lr=0.1)
    assert acc_plain > 0.9
    assert abs(acc_private - acc_plain) <= 0.02
    assert gap < 0.05


def test_only_linear_relu_chains_are_trainable() -> None:
    assert [name for name, _ in layer_chain(BreastCancerMLP())] == ["fc1", "act", "fc2"]
    with pytest.raises(UnsupportedModule, match="Linear or ReLU"):
        layer_chain(nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 2)))
    with pytest.raises(UnsupportedModule):
        train_private(nn.Sequential(nn.Conv2d(1, 2, 3)), {0: owner_half})
    with pytest.raises(InvalidInput):
        train_private(BreastCancerMLP(), {}, epochs=1)
    with pytest.raises(InvalidInput):
        train_plain(BreastCancerMLP(), torch.zeros(2, 30), torch.zeros(2, dtype=torch.long), epochs=0)
