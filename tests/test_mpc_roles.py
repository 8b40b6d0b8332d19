"""Who holds what: data owner + model owner, several data owners, mismatches and dead parties.

The sources are module-level functions evaluated inside the owning party's process (the test
process recomputes the same values only to check results and fingerprints). Privacy is checked
three ways: each party's ledger of plaintexts it held, a heap scan of every plain float tensor
alive in each party at the end (fingerprints), and the sources' own logs of whom they served.
"""

from __future__ import annotations

import functools
import json
import os
import time

import pytest
import torch

from models.breast_cancer import BreastCancerMLP
from privml.backends.mpc import fingerprint
from privml.data import load_breast_cancer_split
from privml.errors import InvalidInput, PartyFailure
from privml.mpc.roles import Source, evaluate

TOL = {"atol": 5e-3, "rtol": 1e-3}


def hospital_rows(start: int, stop: int, features: int = 30) -> torch.Tensor:
    """Rows of the breast-cancer training split (a hospital's private records)."""
    x = load_breast_cancer_split()[0].tensors[0][start:stop]
    return x[:, :features].contiguous()


def owner_state(seed: int = 3, hidden: int = 16) -> dict[str, torch.Tensor]:
    """The model owner's private weights (seeded so the test can recompute them)."""
    torch.manual_seed(seed)
    return BreastCancerMLP(hidden=hidden).state_dict()


def owner_module(hidden: int) -> torch.nn.Module:
    torch.manual_seed(3)
    return BreastCancerMLP(hidden=hidden)


def dies() -> torch.Tensor:
    os._exit(3)


def hangs() -> torch.Tensor:
    time.sleep(120)
    return torch.zeros(2, 30)


def reference(state: dict, x: torch.Tensor) -> torch.Tensor:
    model = BreastCancerMLP()
    model.load_state_dict(state)
    with torch.no_grad():
        return model.eval()(x)


def logged(path: os.PathLike) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def test_data_owner_and_model_owner_hold_only_their_own_plaintext(tmp_path) -> None:
    data_log, weight_log = tmp_path / "data.log", tmp_path / "weights.log"
    result = evaluate(BreastCancerMLP,
                      data_sources={0: Source(functools.partial(hospital_rows, 0, 8), "clinic", str(data_log))},
                      weight_source=(1, Source(owner_state, "vendor", str(weight_log))),
                      output_party=0, timeout=60)
    x, state = hospital_rows(0, 8), owner_state()
    torch.testing.assert_close(result.output, reference(state, x), **TOL)
    data_fp = fingerprint(x)
    weight_fps = {fingerprint(v) for v in state.values()}
    out_fp = fingerprint(result.output)
    p0, p1 = result.parties
    # positive controls: the heap scan sees what each party legitimately holds
    assert data_fp in p0["fingerprints"] and out_fp in p0["fingerprints"]
    assert weight_fps <= p1["fingerprints"]
    # ... and never the other party's plaintext
    assert not weight_fps & p0["fingerprints"]
    assert data_fp not in p1["fingerprints"] and out_fp not in p1["fingerprints"]
    assert p0["received_output"] and not p1["received_output"]
    # ledgers: party 0 held its rows and the output; party 1 only its weights
    assert {h["sha256"] for h in p0["held"]} == {data_fp, out_fp}
    assert {h["sha256"] for h in p1["held"]} == weight_fps
    assert all(h["what"].startswith("own weight") for h in p1["held"])
    # the sources served only their owners
    assert [(e["rank"], e["pid"]) for e in logged(data_log)] == [(0, p0["pid"])]
    assert [(e["rank"], e["pid"]) for e in logged(weight_log)] == [(1, p1["pid"])]
    assert p0["pid"] != p1["pid"] != os.getpid()
    # costs per layer and total
    assert {"fc1", "act", "fc2"} <= set(result.costs["scopes"])
    assert result.costs["total"]["bytes"] > 0 and result.provider == "TFP"
    assert "party 1" in result.who_held_what()


@pytest.mark.slow  # ~14 s; owners in two parties: test_data_owner_and_model_owner_hold_only_their_own_plaintext
def test_two_hospitals_and_a_model_owner_three_parties() -> None:
    sources = {0: functools.partial(hospital_rows, 0, 5), 1: functools.partial(hospital_rows, 5, 12)}
    result = evaluate(BreastCancerMLP, data_sources=sources, weight_source=(2, owner_state), output_party="owners",
                      timeout=60)
    state = owner_state()
    xa, xb = hospital_rows(0, 5), hospital_rows(5, 12)
    torch.testing.assert_close(result.output[0], reference(state, xa), **TOL)
    torch.testing.assert_close(result.output[1], reference(state, xb), **TOL)
    ha, hb, vendor = result.parties
    fa, fb = fingerprint(xa), fingerprint(xb)
    weight_fps = {fingerprint(v) for v in state.values()}
    assert fa in ha["fingerprints"] and fa not in hb["fingerprints"] and fa not in vendor["fingerprints"]
    assert fb in hb["fingerprints"] and fb not in ha["fingerprints"] and fb not in vendor["fingerprints"]
    assert not weight_fps & (ha["fingerprints"] | hb["fingerprints"])
    # each hospital learned only its own rows' predictions; the vendor learned nothing
    assert fingerprint(result.output[1]) not in ha["fingerprints"]
    assert fingerprint(result.output[0]) not in hb["fingerprints"]
    assert not vendor["received_output"]
    assert result.roles == ["party0-data-output", "party1-data-output", "party2-model"]


def test_mismatched_model_is_detected_at_the_start() -> None:
    with pytest.raises(PartyFailure, match="party 1 has a different model architecture"):
        evaluate(BreastCancerMLP, data_sources={0: functools.partial(hospital_rows, 0, 4)},
                 weight_source=(1, functools.partial(owner_module, 8)), timeout=30)


def test_mismatched_row_shapes_are_detected_at_the_start() -> None:
    with pytest.raises(PartyFailure, match=r"data owners \[1\] share rows of a different shape"):
        evaluate(BreastCancerMLP, data_sources={0: functools.partial(hospital_rows, 0, 4),
                                                1: functools.partial(hospital_rows, 4, 8, 29)},
                 weight_source=(0, owner_state), timeout=30)


def test_dead_party_fails_fast() -> None:
    start = time.monotonic()
    with pytest.raises(PartyFailure, match="party 1 .* died"):
        evaluate(BreastCancerMLP, data_sources={0: functools.partial(hospital_rows, 0, 4)},
                 weight_source=(1, dies), timeout=30)
    assert time.monotonic() - start < 30


@pytest.mark.slow  # ~13 s; a silent party is caught by the same timeout in test_mpc_launcher
def test_silent_party_fails_within_timeout() -> None:
    start = time.monotonic()
    with pytest.raises(PartyFailure, match="party 1 .*stopped answering"):
        evaluate(BreastCancerMLP, data_sources={0: functools.partial(hospital_rows, 0, 4)},
                 weight_source=(1, hangs), timeout=4)
    assert time.monotonic() - start < 40  # start-up (~10 s on a busy machine) + 4 s timeout + grace


def test_bad_arguments_fail_before_launching() -> None:
    with pytest.raises(InvalidInput):
        evaluate(BreastCancerMLP, data_sources={}, weight_source=(1, owner_state))
    with pytest.raises(InvalidInput):
        evaluate(BreastCancerMLP, data_sources={0: owner_state}, weight_source=owner_state)
    with pytest.raises(InvalidInput):
        evaluate(BreastCancerMLP, data_sources={0: owner_state}, weight_source=(5, owner_state), world_size=2)
    with pytest.raises(InvalidInput):
        Source(42)
