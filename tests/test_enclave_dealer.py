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
