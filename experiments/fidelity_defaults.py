"""Fidelity of ``privml.compile`` with default options only, on small models no test uses.

For each model (trained here on scikit-learn's digits in seconds) and backend (ckks, mpc): the
agreement of the compiled model's argmax with the original's that the plan predicts (calibration
samples), the agreement measured on the test split, the accuracy drop, the CKKS depth and whether
compile warned (FidelityWarning). The compiled model runs in clear: it is the approximated model
the ciphertexts compute (tests/test_ckks_backend.py checks that part).

    .venv/bin/python experiments/fidelity_defaults.py
"""

from __future__ import annotations

import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import privml
from privml.data import get_dataset
from privml.errors import FidelityWarning


class ResidualGelu(nn.Module):
    """Stem conv, two residual blocks with GELU, global average pool."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.GELU(),
                                                  nn.Conv2d(width, width, 3, padding=1)) for _ in range(2))
        self.act = nn.GELU()
        self.fc = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.stem(x))
        for block in self.blocks:
            h = self.act(h + block(h))
        return self.fc(h.mean(dim=(2, 3)))


def models() -> dict[str, nn.Module]:
    return {
        "MLP 64-32-16-10, GELU": nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 16),
                                               nn.GELU(), nn.Linear(16, 10)),
        "CNN conv-SiLU-avgpool x2, SiLU head": nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2), nn.Conv2d(6, 12, 3, padding=1), nn.SiLU(),
            nn.AvgPool2d(2), nn.Flatten(), nn.Linear(48, 24), nn.SiLU(), nn.Linear(24, 10)),
        "residual CNN, 2 blocks, GELU": ResidualGelu(),
        "MLP 64-48-10, ReLU + tanh": nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 24),
                                                   nn.Tanh(), nn.Linear(24, 10)),
    }


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 200) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def main() -> None:
    torch.set_num_threads(1)
    train_set, test_set = get_dataset("digits", seed=0)
    (xtr, ytr), (xte, yte) = train_set.tensors, test_set.tensors
    rows = []
    for name, model in models().items():
        torch.manual_seed(0)
        for p in model.parameters():  # the same initialisation whatever ran before
            p.data.normal_(0, 0.3 / max(1, p.shape[-1]) ** 0.5) if p.dim() > 1 else p.data.zero_()
        model = train(model, xtr[:512], ytr[:512])
        with torch.no_grad():
            ref = model(xte).argmax(1)
        base = float((ref == yte).float().mean())
        for backend in ("ckks", "mpc"):
            start = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                compiled = privml.compile(model, xtr[:512], backend=backend)
            seconds = time.perf_counter() - start
            with torch.no_grad():
                pred = compiled(xte).argmax(1)
            rows.append((name, backend, base, float((pred == yte).float().mean()), float((pred == ref).float().mean()),
                         compiled.plan.predicted.get("agreement"), compiled.plan.params.get("depth"),
                         any(issubclass(w.category, FidelityWarning) for w in caught), seconds))
    print("| model | backend | acc. original | acc. compiled | drop (points) | agreement test | agreement calib "
          "(plan) | CKKS depth | FidelityWarning | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, backend, base, acc, agree, predicted, depth, warned, seconds in rows:
        pred = "-" if predicted is None else f"{predicted:.3f}"
        print(f"| {name} | {backend} | {base:.3f} | {acc:.3f} | {100 * (base - acc):+.1f} | {agree:.3f} | {pred} | "
              f"{depth if depth is not None else '-'} | {'yes' if warned else 'no'} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
