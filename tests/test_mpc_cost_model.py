"""The compiler's MPC cost model predicts the rounds the MPC backend really spends (2 real parties)."""

from __future__ import annotations

import pytest
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


def test_plan_predicts_a_requests_rounds_and_bytes_exactly() -> None:
    """The plan's whole-request cost (linear layers, exact ReLU, a polynomial, the output opening) equals what
    two real parties spend, at batch 1 and (scaled by the model) at batch 3."""
    import warnings

    from privml.compiler.calibrate import calibrate
    from privml.compiler.costs import mpc_request_cost

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(36, 16),
                          PolyActivation([0.1, 0.5, 0.3, 0.0, -0.05], (-40.0, 40.0)), nn.Linear(16, 10)).eval()
    x = torch.rand(64, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = privml.compile(model, x, backend="mpc", link_delay_ms=10.0, link_mbit=100.0)
    predicted = compiled.plan.params["mpc_cost"]
    stats = calibrate(compiled.module, [x], (1, 8, 8))
    batch3 = mpc_request_cost(compiled.module, stats, batch=3)
    with privml.Session(compiled.plan, parties=2) as session:
        measured = []
        for b in (1, 3):
            before = session.backend.costs()
            session.decrypt(compiled(session.encrypt(x[:b])))
            after = session.backend.costs()
            measured.append((after["rounds"] - before["rounds"], after["bytes"] - before["bytes"]))
    assert measured[0] == (predicted["rounds"], predicted["bytes"])
    assert measured[1] == (batch3["rounds"], batch3["bytes"])
    seconds = predicted["predicted_seconds"]
    assert set(seconds) >= {"loopback", "WAN 50 ms, 100 Mbit/s", "configured 10 ms, 100 Mbit/s"}
    # each one-way ms adds a round trip per round
    assert seconds["WAN 50 ms, 100 Mbit/s"] - seconds["WAN 10 ms, 100 Mbit/s"] == pytest.approx(
        predicted["rounds"] * 0.08, rel=1e-3)
    assert "predicted" in compiled.plan.notes[-1]
    assert privml.Plan.from_json(compiled.plan.to_json()).params["mpc_cost"] == predicted


def test_link_orders_candidates_by_predicted_seconds() -> None:
    """A wide activation: on a fast local link bytes dominate and exact ReLU (9 rounds, 464 B) beats a polynomial
    of 5 rounds and 608 B per element; 50 ms away, rounds dominate and the polynomial wins."""
    from privml.compiler.approx import ActivationSite
    from privml.compiler.calibrate import RangeStats
    from privml.compiler.candidates import Candidate, frontier
    from privml.compiler.choose import _site_seconds

    exact = Candidate("exact", (), 0.0, 1e-4, 0, 0, 9, 464)
    poly = Candidate("poly", (20,), 0.01, 0.0, 5, 19, 5, 608)
    node = type("N", (), {"name": "act"})()
    site = ActivationSite(node, "act", "relu", {}, -1.0, 1.0)
    stats = {"act": RangeStats(shape=(10_000,))}
    fast = frontier([poly, exact], "mpc", _site_seconds(site, stats, (0.0, 10_000.0)))
    slow = frontier([poly, exact], "mpc", _site_seconds(site, stats, (50.0, 10_000.0)))
    assert [c.kind for c in fast] == ["exact"]  # cheaper and more accurate: the polynomial is not worth paying for
    assert [c.kind for c in slow] == ["poly", "exact"]
    assert [c.kind for c in frontier([poly, exact], "mpc")] == ["poly", "exact"]  # rounds first without a link
