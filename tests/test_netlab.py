"""MPC parties in separate network namespaces over shaped links (``privml.parties.netlab``).

Needs root, ``ip`` and ``tc``; each test skips with the machine's reason otherwise (e.g. a kernel without
``sch_netem`` cannot emulate delay, while bandwidth shaping with ``tbf`` still works).
"""

from __future__ import annotations

import time

import pytest
import torch

from privml.parties.netlab import Link, NetLab, capabilities

CAPS = capabilities()



def _product_and_traffic(ctx, n: int, rounds: int) -> dict:
    """A secret-shared product across the link (checked against plaintext), then ``rounds`` exchanges of n int64."""
    from privml.parties.compat import import_crypten

    crypten = import_crypten()
    torch.manual_seed(7)
    x, y = torch.randn(64), torch.randn(64)
    prod = (crypten.cryptensor(x, src=0) * crypten.cryptensor(y, src=1)).get_plain_text()
    comm = crypten.comm.get()
    t = torch.zeros(n, dtype=torch.long)
    comm.barrier()
    t0 = time.perf_counter()
    for _ in range(rounds):
        comm.all_reduce(t)
    return {"error": float((prod - x * y).abs().max()), "seconds": time.perf_counter() - t0}


@pytest.mark.skipif(not CAPS["netns"], reason=f"no network namespaces here: {CAPS['reason']}")
@pytest.mark.skipif(not CAPS["bandwidth"], reason=f"no bandwidth shaping here: {CAPS['reason']}")
def test_parties_in_namespaces_compute_correctly_and_feel_the_bandwidth() -> None:
    n, rounds, mbit = 250_000, 2, 20.0  # 2 MB each way per exchange
    with NetLab(2) as lab:
        fast = lab.run_parties(_product_and_traffic, (n, rounds))
    with NetLab(2, Link(rate_mbit=mbit)) as lab:
        slow = lab.run_parties(_product_and_traffic, (n, rounds))
    assert all(r["error"] < 1e-3 for r in fast + slow)  # the MPC product is right over the veth links
    floor = rounds * n * 8 * 8 / (mbit * 1e6)  # bytes one way / bandwidth
    assert slow[0]["seconds"] >= 0.7 * floor, (slow[0]["seconds"], floor)
    assert slow[0]["seconds"] > 3 * fast[0]["seconds"]


@pytest.mark.skipif(not CAPS["netns"], reason=f"no network namespaces here: {CAPS['reason']}")
@pytest.mark.skipif(not CAPS["delay"], reason=f"no delay emulation here: {CAPS['reason']}")
def test_one_way_delay_adds_a_round_trip_per_exchange() -> None:
    with NetLab(2, Link(delay_ms=10)) as lab:
        out = lab.run_parties(_product_and_traffic, (8, 20))
    assert out[0]["seconds"] >= 20 * 0.02 * 0.8


@pytest.mark.skipif(not CAPS["netns"], reason=f"no network namespaces here: {CAPS['reason']}")
def test_the_namespaces_are_removed_afterwards() -> None:
    import subprocess

    with NetLab(2) as lab:
        names = list(lab.names)
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert all(n in listed for n in names)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in listed for n in names)


def test_the_link_prediction_adds_round_trips_and_bytes_over_the_bandwidth() -> None:
    from privml.parties.netlab import predict_seconds

    costs = {"party_seconds": 0.5, "rounds": 10, "bytes": 2_000_000}  # whole-system bytes of 2 parties
    assert predict_seconds(costs, Link()) == 0.5
    assert predict_seconds(costs, Link(delay_ms=10)) == pytest.approx(0.5 + 10 * 0.02)
    assert predict_seconds(costs, Link(rate_mbit=8)) == pytest.approx(0.5 + 1_000_000 * 8 / 8e6)
