"""The attested enclave deals Beaver triples and other correlated randomness to CrypTen parties.

Unit tests call the enclave-side handlers (:mod:`privml.enclave.dealer`) with a small stand-in for the
server's state (dealing logic only); the end-to-end tests use a real enclave process
(``privml.enclave.launch``) and real CrypTen parties across processes (``privml.parties.run_parties``).
"""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch

from privml.enclave import dealer as D
from privml.enclave.policy import PolicyRefused
from privml.errors import MalformedInput

# ----------------------------------------------------------------------------- dealing logic (unit)


class FakeState:
    """What the handlers need of the server's state: attributes, and an audit log."""

    def __init__(self) -> None:
        self.audit_log = self
        self.entries: list[dict] = []

    def append(self, **entry: object) -> None:
        self.entries.append(entry)


class Party:
    def __init__(self, state: FakeState, sid: bytes, rank: int, key: bytes | None = None) -> None:
        self.state, self.sid, self.rank = state, sid, rank
        self.key = key or os.urandom(32)
        self.n = 0

    def deal(self, kind: str, sizes: list, op: str | None = None, kwargs: dict | None = None,
             request: int | None = None) -> list[torch.Tensor]:
        body = {"deal_session": self.sid, "party": self.rank, "party_key": self.key,
                "request": self.n if request is None else request, "kind": kind, "sizes": sizes}
        if op:
            body["op"] = op
        if kwargs:
            body["kwargs"] = kwargs
        reply = D.handle_deal(self.state, body)
        assert reply["request"] == body["request"] and reply["kind"] == kind
        self.n += 1
        return [torch.from_numpy(np.frombuffer(s["data"], dtype="<i8").copy()).reshape(s["shape"])
                for s in reply["shares"]]


def open_parties(world_size: int = 2, **body: object) -> tuple[FakeState, list[Party]]:
    state = FakeState()
    keys = [os.urandom(32) for _ in range(world_size)]
    import hashlib

    sid = D.handle_deal_open(state, {"world_size": world_size,
                                     "party_keys": [hashlib.sha256(k).digest() for k in keys], **body})["deal_session"]
    return state, [Party(state, sid, r, keys[r]) for r in range(world_size)]


def add(shares: list[torch.Tensor]) -> torch.Tensor:
    out = shares[0].clone()
    for s in shares[1:]:
        out += s
    return out


def xor(shares: list[torch.Tensor]) -> torch.Tensor:
    out = shares[0].clone()
    for s in shares[1:]:
        out ^= s
    return out


def deal_all(parties: list[Party], *args: object, **kwargs: object) -> list[list[torch.Tensor]]:
    """Each party's shares of the same request; returned as [share index][party]."""
    per_party = [p.deal(*args, **kwargs) for p in parties]
    return [list(t) for t in zip(*per_party, strict=True)]


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize(("op", "s0", "s1", "kwargs"), [
    ("mul", [4, 5], [4, 5], None),
    ("mul", [4, 1], [1, 5], None),
    ("matmul", [3, 4], [4, 2], None),
    ("conv2d", [1, 2, 5, 5], [3, 2, 3, 3], {"stride": 2, "padding": [1, 1]}),
    ("conv1d", [2, 2, 7], [4, 1, 3], {"groups": 2}),
    ("conv_transpose2d", [1, 3, 4, 4], [3, 2, 2, 2], {"stride": 2, "output_padding": 1}),
])
def test_triples_reconstruct_in_the_int64_ring(world_size: int, op: str, s0: list, s1: list, kwargs: dict | None):
    _, parties = open_parties(world_size)
    a, b, c = (add(s) for s in deal_all(parties, "triple", [s0, s1], op=op, kwargs=kwargs))
    assert list(a.shape) == s0 and list(b.shape) == s1
    expected = a * b if op == "mul" else getattr(torch, op)(a, b, **(kwargs or {}))
    assert torch.equal(c, expected)  # exact, with int64 wrap-around
    assert a.abs().max() > 2**40  # full-ring randomness, not small integers


@pytest.mark.parametrize("world_size", [2, 3])
def test_square_binary_wrap_b2a_reconstruct(world_size: int):
    _, parties = open_parties(world_size)
    r, r2 = (add(s) for s in deal_all(parties, "square", [[6, 3]]))
    assert torch.equal(r * r, r2)
    a, b, c = (xor(s) for s in deal_all(parties, "binary", [[5, 1], [1, 4]]))
    assert torch.equal(a & b, c) and tuple(c.shape) == (5, 4)
    r_shares, theta = deal_all(parties, "wrap", [[200]])
    from privml.parties.compat import import_crypten

    count_wraps = import_crypten().common.util.count_wraps
    assert torch.equal(add(theta), count_wraps(r_shares))
    assert add(theta).abs().sum() > 0  # some wrap-arounds among 200 random pairs
    ra, rb = deal_all(parties, "b2a", [[300]])
    bit = xor(rb)
    assert set(bit.unique().tolist()) == {0, 1} and all(set(s.unique().tolist()) <= {0, 1} for s in rb)
    assert torch.equal(add(ra), bit)


def test_mismatched_requests_are_refused_and_close_the_session():
    _, (p0, p1) = open_parties()
    p0.deal("triple", [[2, 3], [3, 4]], op="matmul")
    with pytest.raises(PolicyRefused, match="differs from what another party asked for at 0"):
        p1.deal("triple", [[2, 3], [3, 5]], op="matmul")
    with pytest.raises(PolicyRefused, match="session was closed"):
        p0.deal("square", [[2]])


def test_order_keys_and_limits():
    state, (p0, p1) = open_parties(max_outstanding=2)
    p0.deal("square", [[2]])
    with pytest.raises(PolicyRefused, match="next request is 1"):  # a replay of request 0
        p0.deal("square", [[2]], request=0)
    with pytest.raises(PolicyRefused, match="next request is 0"):  # a gap
        p1.deal("square", [[2]], request=1)
    thief = Party(state, p1.sid, 1)  # another process claiming party 1's slot
    with pytest.raises(PolicyRefused, match="key does not match"):
        thief.deal("square", [[2]])
    p0.deal("square", [[2]])
    with pytest.raises(PolicyRefused, match="at most 2 undelivered"):
        p0.deal("square", [[2]])
    p1.deal("square", [[2]])
    p0.deal("square", [[2]])  # party 1 caught up by one: room again
    with pytest.raises(MalformedInput, match="kind must be one of"):
        p0.deal("cube", [[2]])
    with pytest.raises(MalformedInput, match="not a valid product"):
        p0.deal("triple", [[2, 3], [4, 5]], op="matmul")
    with pytest.raises(MalformedInput, match="kwarg .bias. is not one of"):
        p0.deal("triple", [[1, 1, 3, 3], [1, 1, 1, 1]], op="conv2d", kwargs={"bias": 1})
    with pytest.raises(PolicyRefused, match="more than"):
        p0.deal("square", [[1 << 13, 1 << 12]])
    with pytest.raises(PolicyRefused, match="unknown or expired"):
        Party(state, os.urandom(16), 0).deal("square", [[2]])
    assert [e["actor"] for e in state.entries] == ["party0", "party0", "party1", "party0"]
    assert state.entries[0]["op"] == "deal.square" and state.entries[0]["count"] == 4


def test_trust_on_first_use_without_party_keys():
    state = FakeState()
    sid = D.handle_deal_open(state, {"world_size": 2})["deal_session"]
    first, second = Party(state, sid, 0), Party(state, sid, 0)
    first.deal("square", [[1]])
    with pytest.raises(PolicyRefused, match="key does not match"):
        second.deal("square", [[1]], request=1)


def test_concurrent_parties_get_consistent_shares():
    """Several threads (as the server's connections) dealing the same sequence."""
    _, parties = open_parties(3)
    got: dict[int, list] = {}
    errors: list[BaseException] = []

    def run(p: Party) -> None:
        try:
            got[p.rank] = [p.deal("triple", [[8, 8], [8, 8]], op="matmul") for _ in range(30)]
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(p,)) for p in parties]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(30):
        a, b, c = (add([got[r][i][k] for r in range(3)]) for k in range(3))
        assert torch.equal(a @ b, c)


# ----------------------------------------------------------------------------- real enclave, real parties
# Party functions live at module level so spawned parties can unpickle them.

import time  # noqa: E402

from privml.errors import AttestationError, InvalidInput, PartyFailure  # noqa: E402

# CrypTen's 16-bit fixed point: products of N(0, 1) values are exact to ~1e-4 (truncation)
PROD_ATOL = 2e-3


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(4, 6, generator=g), torch.randn(6, 3, generator=g)


def products_and_relu(ctx) -> dict:  # noqa: ANN001
    from privml.parties.compat import import_crypten

    crypten = import_crypten()
    x, w = _inputs()
    X = crypten.cryptensor(x if ctx.rank == 0 else torch.zeros_like(x), src=0)  # noqa: N806
    W = crypten.cryptensor(w if ctx.rank == 1 else torch.zeros_like(w), src=1)  # noqa: N806
    from privml.parties.fixed_point import open_plain  # not get_plain_text: CrypTen 0.4.1's decoder is off by 1

    provider = crypten.mpc.get_default_provider()
    out = {"provider": ctx.provider, "cfg": crypten.cfg.mpc.provider, "class": type(provider).__name__,
           "product": open_plain(X * X), "matmul": open_plain(X.matmul(W)),
           "relu": open_plain(X.relu()), "square": open_plain(X.square())}
    out["requests"] = provider.requests
    return out


def many_products(ctx, marker: str) -> None:  # noqa: ANN001
    """Multiplies for up to a minute (one deal per product); writes ``marker`` after the first ones."""
    from pathlib import Path

    from privml.parties.compat import import_crypten

    crypten = import_crypten()
    x = crypten.cryptensor(torch.ones(8), src=0)
    y = crypten.cryptensor(torch.ones(8), src=1)
    deadline = time.monotonic() + 60
    i = 0
    while time.monotonic() < deadline:
        x = x * y  # a private product: one Beaver triple from the enclave each time
        i += 1
        if i == 3 and ctx.rank == 0:
            Path(marker).write_text("dealing")
        time.sleep(0.02)


def _unused_triple_run(ctx) -> dict:  # noqa: ANN001
    return {"provider": ctx.provider}


@pytest.fixture(scope="module")
def enclave(tmp_path_factory: pytest.TempPathFactory):
    from privml.enclave import launch

    proc = launch(tmp_path_factory.mktemp("enclave"))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def dealer(enclave):  # noqa: ANN001, ANN201
    from privml.enclave import expected_measurement
    from privml.parties.dealer import EnclaveDealer

    return EnclaveDealer(enclave.address, enclave.root_certificate, expected_measurement(enclave.config),
                         allowed_regions=("eu-central-1",))


def test_parties_take_triples_binary_triples_and_b2a_from_the_enclave(enclave, dealer):  # noqa: ANN001
    from privml.parties.launcher import run_parties

    before = len(_audit_entries(enclave))
    results = run_parties(products_and_relu, 2, timeout=60, dealer=dealer)
    assert results.provider == "ENCLAVE" and results.metadata()["provider"] == "ENCLAVE"
    x, w = _inputs()
    for r in results:
        assert r["provider"] == "ENCLAVE" and r["cfg"] == "ENCLAVE" and r["class"] == "EnclaveTupleProvider"
        torch.testing.assert_close(r["product"], x * x, atol=PROD_ATOL, rtol=0)
        torch.testing.assert_close(r["square"], x * x, atol=PROD_ATOL, rtol=0)
        torch.testing.assert_close(r["matmul"], x @ w, atol=PROD_ATOL, rtol=0)
        torch.testing.assert_close(r["relu"], x.relu(), atol=PROD_ATOL, rtol=0)
    assert results[0]["requests"] == results[1]["requests"] > 5
    # the audit log records every deal, per party, by kind
    deals = [e for e in _audit_entries(enclave)[before:] if e["op"].startswith("deal.")]
    ops = {e["op"] for e in deals}
    assert {"deal.triple.mul", "deal.triple.matmul", "deal.square", "deal.binary", "deal.b2a"} <= ops
    for party in ("party0", "party1"):
        assert sum(e["actor"] == party for e in deals) == results[0]["requests"]


def _audit_entries(enclave) -> list[dict]:  # noqa: ANN001
    """The enclave's audit log, its chain and signature verified against the attested leaf key."""
    from privml.enclave import EnclaveClient, expected_measurement, verify_attestation, verify_audit_log

    with EnclaveClient(enclave.address, timeout=10) as client:
        nonce = os.urandom(32)
        att = verify_attestation(client.attest(nonce), root_certificate=enclave.root_certificate,
                                 expected_pcrs=expected_measurement(enclave.config), nonce=nonce,
                                 allowed_regions=None)
        nonce = os.urandom(32)
        entries, signed = client.audit(nonce)
    verify_audit_log(entries, signed, attestation=att, nonce=nonce)
    return entries


def test_session_runs_a_compiled_mlp_with_the_enclave_dealer(enclave, dealer):  # noqa: ANN001
    import privml

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    compiled = privml.compile(model, torch.randn(32, 6), backend="mpc")
    session = privml.Session(compiled.plan, parties=2, dealer="enclave", enclave=dealer, timeout=60)
    x = torch.randn(5, 6)
    y = session.decrypt(compiled(session.encrypt(x)))
    with torch.no_grad():
        torch.testing.assert_close(y, model(x), atol=5e-3, rtol=1e-3)
    assert session.backend.costs()["provider"] == "ENCLAVE"
    assert any("ENCLAVE" in line and "attest" in line for line in session.backend.trust_statement())
    # a launched enclave process works too (its measurement computed by this install)
    assert privml.Session(compiled.plan, dealer="enclave", enclave=enclave).backend.provider == "ENCLAVE"
    with pytest.raises(InvalidInput, match="needs enclave"):
        privml.Session(compiled.plan, dealer="enclave")
    with pytest.raises(InvalidInput, match="conflict"):
        privml.Session(compiled.plan, dealer="enclave", enclave=dealer, ttp=True)
    with pytest.raises(InvalidInput, match="needs dealer='enclave'"):
        privml.Session(compiled.plan, enclave=dealer)


def test_a_wrong_measurement_or_root_is_refused_before_any_triple(enclave, dealer, tmp_path):  # noqa: ANN001
    import dataclasses

    from privml.enclave.attest import manufacture
    from privml.parties.launcher import run_parties

    wrong_pcr = dataclasses.replace(dealer, expected_pcrs={**dealer.expected_pcrs, 0: bytes(48)})
    with pytest.raises(AttestationError, match="PCR"):
        run_parties(_unused_triple_run, 2, timeout=30, dealer=wrong_pcr)  # the launcher checks before spawning
    other_root = manufacture(tmp_path / "other-vendor")
    with pytest.raises(AttestationError):
        dataclasses.replace(dealer, root_certificate=other_root).open_session(2)
    # each party checks for itself: parties given a wrong measurement refuse before any deal
    before = len(_audit_entries(enclave))
    session = dealer.open_session(2, party_secrets=False)
    with pytest.raises(PartyFailure, match="(?s)AttestationError.*refuses the enclave dealer.*no triple was used"):
        run_parties(_install_then_multiply, 2, (enclave.address, enclave.root_certificate, wrong_pcr.expected_pcrs,
                                                session.deal_session), timeout=30)
    assert not [e for e in _audit_entries(enclave)[before:] if e["op"].startswith("deal.")]


def _install_then_multiply(ctx, address: str, root: bytes, pcrs: dict, deal_session: bytes) -> None:  # noqa: ANN001
    from privml.parties.compat import import_crypten
    from privml.parties.dealer import install_enclave_provider

    crypten = import_crypten()
    install_enclave_provider(address, deal_session, root_certificate=root, expected_pcrs=pcrs, timeout=10)
    x = crypten.cryptensor(torch.ones(3), src=0)
    (x * x).get_plain_text()


def test_mismatched_requests_are_refused_by_the_enclave_process(enclave, dealer):  # noqa: ANN001
    """Two parties whose first requests differ (over the real protocol): the second is refused, then both."""
    from privml.enclave import EnclaveClient

    session = dealer.open_session(2)

    def body(party: int, n: int, sizes: list) -> dict:
        return {"deal_session": session.deal_session, "party": party, "party_key": session.party_keys[party],
                "request": n, "kind": "triple", "op": "matmul", "sizes": sizes}

    with EnclaveClient(enclave.address, timeout=10) as c0, EnclaveClient(enclave.address, timeout=10) as c1:
        c0.request("deal", body(0, 0, [[2, 3], [3, 4]]))
        with pytest.raises(AttestationError, match="differs from what another party asked for at 0"):
            c1.request("deal", body(1, 0, [[2, 3], [3, 5]]))
        with pytest.raises(AttestationError, match="session was closed"):
            c0.request("deal", body(0, 1, [[2, 3], [3, 4]]))
        with pytest.raises(AttestationError, match="key does not match"):  # the other party's slot
            c1.request("deal", {**body(1, 0, [[1, 1], [1, 1]]), "party_key": session.party_keys[0]})
    # and inside CrypTen parties: a party whose computation differs makes the run fail, naming the dealer
    from privml.parties.launcher import run_parties

    with pytest.raises(PartyFailure, match="enclave dealer refused"):
        run_parties(_different_sizes, 2, timeout=30, dealer=dealer)


def _different_sizes(ctx) -> None:  # noqa: ANN001
    from privml.parties.compat import import_crypten

    crypten = import_crypten()
    provider = crypten.mpc.get_default_provider()
    provider.generate_additive_triple((2, 2 + ctx.rank), (2, 2 + ctx.rank), "mul")  # sizes differ by party
    crypten.comm.get().barrier()
    provider.generate_additive_triple((2, 2), (2, 2), "mul")


def test_a_dead_enclave_is_a_party_failure_within_the_timeout(tmp_path):  # noqa: ANN001
    from privml.enclave import launch
    from privml.parties.dealer import EnclaveDealer
    from privml.parties.launcher import run_parties

    proc = launch(tmp_path / "dying")
    marker = tmp_path / "marker"
    result: dict = {}

    def run() -> None:
        try:
            run_parties(many_products, 2, (str(marker),), timeout=15, dealer=EnclaveDealer.coerce(proc))
        except BaseException as exc:  # noqa: BLE001
            result["error"] = exc
        result["end"] = time.monotonic()

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.05)
    assert marker.exists(), result
    proc.kill()
    killed = time.monotonic()
    thread.join(60)
    assert not thread.is_alive()
    assert isinstance(result.get("error"), PartyFailure), result
    assert "enclave" in str(result["error"])
    assert result["end"] - killed < 15 + 10  # the parties' timeout plus shutdown, not a hang
