"""The compiler's MPC cost model predicts the rounds the MPC backend really spends (2 real parties)."""

from __future__ import annotations

import torch
import torch.nn as nn

import privml
from privml.compiler.choose import MPC_RELU_ROUNDS, mpc_poly_cost
from privml.nn import PolyActivation


def test_predicted_rounds_match_measured() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), PolyActivation([0.1, 0.5, 0.3, 0.0, -0.05], (-4.0, 4.0)),
                          nn.Linear(6, 6), PolyActivation([0.0, 1.0, 0.0, -0.2, 0.0, 0.0, 0.0, 0.01], (-4.0, 4.0)),
                          nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    compiled = privml.compile(model, torch.randn(64, 6), backend="mpc")
    session = privml.Session(compiled.plan, parties=2, weight_party=None)
    x = torch.randn(3, 6)
    out = session.decrypt(compiled(session.encrypt(x)))
    assert (out - model(x)).abs().max() < 5e-2
    layers = session.backend.costs()["layers"]
    measured = {name: row["rounds"] for name, row in layers.items()}
    assert measured["1"] == mpc_poly_cost(4)[0] == 2
    assert measured["3"] == mpc_poly_cost(7)[0] == 3
    assert measured["5"] == MPC_RELU_ROUNDS
