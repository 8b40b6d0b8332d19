"""Opened MPC values decode exactly, negative ones included (CrypTen 0.4.1's decoder is off by -1.0 on ~0.8%).

One party launch checks the runtime's open (to everyone and to one party) on a grid, uniform values and
values just above each negative integer in [-1000, 0), and reports how many CrypTen's own
``get_plain_text`` gets wrong (the bug this guards against); one Session run checks a compiled model
whose outputs are all near -500. Both tests failed before privml decoded opened ring elements itself.
"""

from __future__ import annotations

import torch
import torch.nn as nn

import privml
from privml.backends.mpc import PartyRuntime
from privml.parties.launcher import run_parties

# The decoder errs on a ring element -m * 2^16 + r with 0 < r < m, i.e. just above the integer -m: a grid of
# step 0.05 (linspace(-1000, 0, 20001)) never lands there, uniform values do (~0.76%), and so does -m + 2^-16.
_M = torch.arange(1, 1001, dtype=torch.float64)
VALUES = torch.cat([torch.linspace(-1000, 0, 20001), (-_M + 2.0**-16).float(), (-_M + 1 / 2048).float(),
                    torch.rand(20000, generator=torch.Generator().manual_seed(0)) * -1000])


def _encoded(x: torch.Tensor) -> torch.Tensor:
    """What the parties hold after sharing ``x``: CrypTen truncates ``x * 2^16`` to an integer."""
    return ((x.double() * 2**16).long().double() / 2**16).float()


def open_negatives_party(ctx: object) -> dict:
    """Share VALUES from party 0, open them through privml and through CrypTen's decoder."""
    rt = PartyRuntime()
    t = rt.share(VALUES if rt.rank == 0 else None, VALUES.shape, 0, what="values")
    return {"all": rt.open(t), "to_1": rt.open(t, dst=1), "crypten": t.payload.get_plain_text()}


def test_open_decodes_negative_values_exactly() -> None:
    results = run_parties(open_negatives_party, 2, timeout=60)
    want = _encoded(VALUES)
    crypten_wrong = (results[0]["crypten"] - want).abs() > 0.5
    assert crypten_wrong.sum() > 1000  # the upstream bug is still there: this test exercises it
    for r in (0, 1):
        torch.testing.assert_close(results[r]["all"], want, atol=0, rtol=0)
    assert results[0]["to_1"] is None
    torch.testing.assert_close(results[1]["to_1"], want, atol=0, rtol=0)


def test_session_outputs_near_minus_500_match_torch() -> None:
    torch.manual_seed(0)
    model = nn.Linear(8, 64).eval()
    with torch.no_grad():
        model.weight.mul_(0.1)
        model.bias.copy_(torch.linspace(-520, -480, 64))
    calib = torch.rand(32, 8)
    compiled = privml.compile(model, calib, backend="mpc")
    session = privml.Session(compiled.plan, parties=2, timeout=60)
    x = torch.rand(64, 8, generator=torch.Generator().manual_seed(1))
    y = session.decrypt(compiled(session.encrypt(x)))
    with torch.no_grad():
        torch.testing.assert_close(y, model(x), atol=1e-2, rtol=0)
