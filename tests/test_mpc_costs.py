"""Communication accounting from CrypTen's communicator, checked on operations with known costs."""

from __future__ import annotations

import pytest
import torch

from privml.errors import InvalidInput, PrivmlError
from privml.parties.compat import import_crypten
from privml.parties.costs import CostMeter, combine_summaries
from privml.parties.launcher import PartyContext, run_parties

SIZES = (10, 100)


def metered_party(ctx: PartyContext) -> dict:
    crypten = import_crypten()
    meter = CostMeter()
    pairs = {n: (crypten.cryptensor(torch.randn(n), src=0), crypten.cryptensor(torch.randn(n), src=1))
             for n in SIZES}
    for n, (x, y) in pairs.items():
        with meter.scope(f"mul{n}"):
            z = x * y
        with meter.scope(f"open{n}"):
            z.get_plain_text()
    x, y = pairs[10]
    with meter.scope("block"):
        with meter.scope("inner"):
            x * y
        x * y
    with meter.scope("mul10"):  # entering a scope again accumulates
        x * y
    bad_name_rejected = False
    try:
        with meter.scope("a/b"):
            pass
    except InvalidInput:
        bad_name_rejected = True
    return {"summary": meter.summary(), "bad_name_rejected": bad_name_rejected}


def counts(summary: dict) -> dict:
    """Bytes and rounds per scope and in total (the deterministic part of a summary)."""
    out = {name: (e["bytes"], e["rounds"]) for name, e in summary["scopes"].items()}
    out["total"] = (summary["total"]["bytes"], summary["total"]["rounds"])
    return out


@pytest.fixture(scope="module")
def two_party_runs() -> list:
    return [run_parties(metered_party, 2, timeout=30) for _ in range(2)]


def test_two_party_private_multiply_has_the_expected_cost(two_party_runs):
    # Beaver multiply with TFP triples: triples cost nothing (party 0's generator + zero
    # sharings); epsilon and delta (n elements each) are opened in ONE batched all_reduce,
    # which CrypTen logs as 2 * 2n ring elements of 8 bytes = 32n bytes; 2-party
    # truncation is local. Opening n elements is one all_reduce: 2n elements = 16n bytes.
    for party in two_party_runs[0]:
        s = party["summary"]
        assert s["provider"] == "TFP" and s["world_size"] == 2
        for n in SIZES:
            assert (s["scopes"][f"open{n}"]["bytes"], s["scopes"][f"open{n}"]["rounds"]) == (16 * n, 1)
        mul = s["scopes"]["mul100"]
        assert (mul["bytes"], mul["rounds"], mul["calls"]) == (32 * 100, 1, 1)
        # mul10 was entered twice: costs add up and calls are counted
        twice = s["scopes"]["mul10"]
        assert (twice["bytes"], twice["rounds"], twice["calls"]) == (2 * 32 * 10, 2, 2)
        assert twice["comm_seconds"] > 0 and twice["seconds"] > 0
    assert all(p["bad_name_rejected"] for p in two_party_runs[0])


def test_costs_are_identical_across_identical_runs(two_party_runs):
    first, second = two_party_runs
    for rank in range(2):
        a, b = counts(first[rank]["summary"]), counts(second[rank]["summary"])
        assert a == b
        assert a["total"][0] > 0 and a["total"][1] > 0


def test_scopes_add_up_to_the_total(two_party_runs):
    for party in two_party_runs[0]:
        s = party["summary"]
        top = [e for name, e in s["scopes"].items() if "/" not in name]
        for key in ("bytes", "rounds"):
            assert sum(e[key] for e in top) + s["unscoped"][key] == s["total"][key]
            assert s["unscoped"][key] == 0  # everything after the meter started was in a scope
        # a nested scope is named outer/inner and is also counted in its outer scope
        assert s["scopes"]["block/inner"]["bytes"] == 32 * 10
        assert s["scopes"]["block"]["bytes"] == 2 * 32 * 10
        assert s["scopes"]["block"]["rounds"] == 2


def test_combined_view_halves_the_double_counted_bytes(two_party_runs):
    combined = combine_summaries([p["summary"] for p in two_party_runs[0]])
    assert combined["parties"] == 2 and combined["provider"] == "TFP"
    # each party logs the 32n bytes it sent and received; the system moved 32n bytes in total
    assert combined["scopes"]["mul100"]["bytes"] == 32 * 100
    assert combined["scopes"]["mul100"]["rounds"] == 1
    per_party = sum(p["summary"]["total"]["bytes"] for p in two_party_runs[0])
    assert combined["total"]["bytes"] == per_party // 2


def test_three_party_multiply_needs_more_rounds():
    results = run_parties(metered_party, 3, timeout=30)
    for party in results:
        s = party["summary"]
        # with 3 parties fixed-point truncation is a protocol of its own: more than one round
        assert s["scopes"]["mul100"]["rounds"] > 1 and s["scopes"]["mul100"]["bytes"] > 32 * 100
        top = [e for name, e in s["scopes"].items() if "/" not in name]
        assert sum(e["bytes"] for e in top) + s["unscoped"]["bytes"] == s["total"]["bytes"]


def test_cost_meter_outside_a_party_is_an_error():
    with pytest.raises(PrivmlError, match="inside an MPC party"):
        CostMeter()


def test_combine_summaries_needs_input():
    with pytest.raises(InvalidInput):
        combine_summaries([])
