"""Real CrypTen parties as OS processes: joint results, failures, multi-machine joining, agreement.

Party functions live at module level so spawned parties can unpickle them. Every test
checks that no party process outlives ``run_parties``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from privml.errors import InvalidInput, PartyFailure
from privml.parties.compat import import_crypten
from privml.parties.launcher import PartyContext, agree, join_party, model_digest, run_parties

REPO = Path(__file__).resolve().parents[1]
# CrypTen encodes with 16 fractional bits: a sum of k shares is exact to ~k * 2**-16, and a
# product of N(0, 1) values to ~1e-4 (truncation of the 32-bit-scaled product).
SUM_ATOL = 1e-4
PROD_ATOL = 2e-3


def private_inputs(world_size: int) -> list[torch.Tensor]:
    """Each party's private vector (deterministic so the parent can compute the plaintext answer)."""
    gen = torch.Generator().manual_seed(1234)
    return [torch.randn(6, generator=gen) * 3 for _ in range(world_size)]


def sum_and_product(ctx: PartyContext) -> dict:
    crypten = import_crypten()
    agree(ctx, b"same computation everywhere")
    mine = private_inputs(ctx.world_size)[ctx.rank]
    # Party r secret-shares its own vector; the others only pass a tensor of the same shape.
    shared = [crypten.cryptensor(mine if r == ctx.rank else torch.zeros(6), src=r)
              for r in range(ctx.world_size)]
    total = shared[0]
    for s in shared[1:]:
        total = total + s
    product = shared[0] * shared[1]
    return {"rank": ctx.rank, "role": ctx.role, "provider": ctx.provider, "pid": os.getpid(),
            "sum": total.get_plain_text(), "product": product.get_plain_text()}


def check_joint_results(results: list, world_size: int) -> None:
    inputs = private_inputs(world_size)
    expected_sum = torch.stack(inputs).sum(0)
    expected_product = inputs[0] * inputs[1]
    assert [r["rank"] for r in results] == list(range(world_size))
    assert len({r["pid"] for r in results} | {os.getpid()}) == world_size + 1  # separate processes
    for r in results:
        torch.testing.assert_close(r["sum"], expected_sum, atol=SUM_ATOL, rtol=0)
        torch.testing.assert_close(r["product"], expected_product, atol=PROD_ATOL, rtol=0)


def assert_no_children() -> None:
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("world_size, ttp", [(2, True), (3, False)])
def test_joint_sum_and_product_match_plaintext(world_size, ttp):
    """3 parties with CrypTen's default TFP provider; 2 parties plus the TTP dealer process.

    (2 parties with TFP run in test_mpc_costs.py and in the join_party test below.)
    """
    roles = [f"hospital{r}" for r in range(world_size)]
    results = run_parties(sum_and_product, world_size, timeout=30, roles=roles, ttp=ttp)
    check_joint_results(results, world_size)
    assert len(results) == world_size  # the dealer's process returns nothing to the caller
    assert [r["role"] for r in results] == roles
    provider = "TTP" if ttp else "TFP"
    assert results.provider == provider and all(r["provider"] == provider for r in results)
    assert results.metadata()["world_size"] == world_size
    assert_no_children()


def raise_in_party_1(ctx: PartyContext) -> None:
    crypten = import_crypten()
    x = crypten.cryptensor(torch.ones(3), src=0)
    if ctx.rank == 1:
        raise ValueError("boom: party 1 refuses to continue")
    (x * x).get_plain_text()  # party 0 waits for party 1 here


def test_party_that_raises_is_named():
    start = time.monotonic()
    with pytest.raises(PartyFailure) as info:
        run_parties(raise_in_party_1, 2, timeout=20)
    assert time.monotonic() - start < 30
    err = info.value
    assert err.rank == 1
    assert str(err).startswith("party 1 (party1) raised ValueError: boom: party 1 refuses to continue")
    assert "Traceback" in str(err)  # the remote traceback is part of the message
    assert_no_children()


def die_in_party_1(ctx: PartyContext, how: str) -> None:
    crypten = import_crypten()
    x = crypten.cryptensor(torch.ones(3), src=0)
    if ctx.rank == 1:
        if how == "exit":
            os._exit(3)
        os.kill(os.getpid(), signal.SIGKILL)
    (x * x).get_plain_text()


@pytest.mark.parametrize("how, expected", [
    ("exit", "exited with code 3"),
    pytest.param("sigkill", "was killed by SIGKILL", marks=pytest.mark.slow),  # same path, other exit status
])
def test_dead_party_fails_the_run_within_the_timeout(how, expected):
    start = time.monotonic()
    with pytest.raises(PartyFailure) as info:
        run_parties(die_in_party_1, 2, (how,), timeout=10)
    assert time.monotonic() - start < 30
    assert info.value.rank == 1
    assert str(info.value).startswith(f"party 1 (party1) died: it {expected}")
    assert_no_children()


def hang_in_party_1(ctx: PartyContext) -> None:
    crypten = import_crypten()
    x = crypten.cryptensor(torch.ones(3), src=0)
    if ctx.rank == 1:
        time.sleep(600)  # alive but silent
    (x * x).get_plain_text()


def test_silent_party_is_detected_by_the_gloo_timeout():
    start = time.monotonic()
    with pytest.raises(PartyFailure) as info:
        run_parties(hang_in_party_1, 2, timeout=3)
    elapsed = time.monotonic() - start
    assert elapsed < 30
    assert info.value.rank == 1
    assert "party 1 (party1) stopped answering" in str(info.value)
    # party 0 really hit the gloo timeout (3 s) rather than being killed first
    assert info.value.failures[0]["comm"] is True
    assert_no_children()


def digest_party(ctx: PartyContext) -> None:
    width = 3 if ctx.rank == 0 else 2  # party 1 loaded a different model
    agree(ctx, model_digest(torch.nn.Linear(4, width), (1, 4)))


def test_agree_detects_a_model_mismatch_in_every_party():
    with pytest.raises(PartyFailure) as info:
        run_parties(digest_party, 2, timeout=20)
    assert "party 1 has a different model/shape" in str(info.value)
    # every party raised the same PartyFailure (none of them went on computing)
    assert {f["type"] for f in info.value.failures.values()} == {"PartyFailure"}
    assert set(info.value.failures) == {0, 1}
    assert_no_children()


def test_model_digest_sees_shapes_not_weights():
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    assert model_digest(a, (1, 4)) == model_digest(b, (1, 4))  # different random weights
    assert model_digest(a, (1, 4)) != model_digest(a, (2, 4))
    assert model_digest(a) != model_digest(torch.nn.Linear(4, 2))


JOIN_SCRIPT = """
    import json, torch
    from privml.parties.compat import import_crypten
    from privml.parties.launcher import join_party

    def party(ctx):
        crypten = import_crypten()
        gen = torch.Generator().manual_seed(7)
        inputs = [torch.randn(5, generator=gen) for _ in range(ctx.world_size)]
        x = crypten.cryptensor(inputs[0] if ctx.rank == 0 else torch.zeros(5), src=0)
        y = crypten.cryptensor(inputs[1] if ctx.rank == 1 else torch.zeros(5), src=1)
        return {"rank": ctx.rank, "product": (x * y).get_plain_text().tolist(),
                "expected": (inputs[0] * inputs[1]).tolist()}

    print(json.dumps(join_party(party, timeout=20)))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_join_party_from_environment_variables_across_processes():
    """What two machines would do: each runs its own interpreter with RANK/WORLD_SIZE/MASTER_*."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "PYTHONPATH": str(REPO), "RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-c", textwrap.dedent(JOIN_SCRIPT)], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err[-3000:]
            outputs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [o["rank"] for o in outputs] == [0, 1]
    for o in outputs:
        expected = torch.tensor(o["expected"])
        torch.testing.assert_close(torch.tensor(o["product"]), expected, atol=PROD_ATOL, rtol=0)


def test_join_party_without_rendezvous_information_is_a_clear_error(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "RENDEZVOUS"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(InvalidInput, match="RANK"):
        join_party(print)
    with pytest.raises(InvalidInput, match="rendezvous"):
        join_party(print, rank=0, world_size=2)
    with pytest.raises(InvalidInput, match="rank must be in 0..1"):
        join_party(print, rank=2, world_size=2, master_addr="127.0.0.1", master_port=1)


@pytest.mark.parametrize("kwargs", [{"world_size": 0}, {"world_size": 2, "roles": ["only-one"]},
                                    {"world_size": 2, "roles": ["a", "a"]}, {"world_size": 2, "timeout": 0}])
def test_bad_arguments_are_rejected_before_spawning(kwargs):
    with pytest.raises(InvalidInput):
        run_parties(sum_and_product, **kwargs)
    assert_no_children()
