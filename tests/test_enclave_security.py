"""The enclave refuses what it must: forged attestations, damaged frames, replays, wrong tokens, spent
budgets, edited audit logs; the secret key never crosses the wire or lands on disk in the clear; a
dead or hung enclave is a PartyFailure in bounded time.

Real processes and sockets; raw frames are sent with a plain socket to check the enclave's side.
"""

from __future__ import annotations

import copy
import os
import signal
import socket
import threading
import time
import types

import cbor2
import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization

import privml.enclave.client as client_mod
from privml.enclave import (
    EnclaveClient,
    Policy,
    attest_and_provision,
    expected_measurement,
    launch,
    protocol,
    verify_attestation,
    verify_audit_log,
)
from privml.enclave.attest import make_root
from privml.enclave.provision import provisioning_message
from privml.errors import (
    AttestationError,
    AuditLogError,
    DecryptionBudgetExhausted,
    KeyMaterialError,
    MalformedInput,
    PartyFailure,
    PrivmlError,
)
from privml.he.context import CKKSContext
from privml.he.params import CKKSParams
from privml.he.sealio import seal_to_bytes
from privml.he.serialize import dump_ciphertexts, dump_context, load_ciphertexts

REGION = "eu-central-1"
SIGMA = 1e-5


@pytest.fixture(scope="module")
def ctx() -> CKKSContext:
    return CKKSContext.generate(CKKSParams(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40, 40, 60),
                                           scale_bits=40))


@pytest.fixture(scope="module")
def secret(ctx) -> bytes:
    return dump_context(ctx, include_secret=True)


@pytest.fixture(scope="module")
def enclave(tmp_path_factory):
    proc = launch(tmp_path_factory.mktemp("enclave-sec"), region=REGION)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(enclave):
    with EnclaveClient(enclave.address, timeout=30) as c:
        yield c


def policy(**kw) -> Policy:
    return Policy(**{"decryption_budget": 100, "flood_sigma": SIGMA, "allowed_regions": (REGION,), **kw})


def provision(client, enclave, secret, **kw):
    return attest_and_provision(client, root_certificate=enclave.root_certificate, region_allowed=[REGION],
                                secret_context=secret, policy=policy(**kw), config=enclave.config)


def one_ct(ctx, n=1, values=(0.5, -0.5)) -> bytes:
    return dump_ciphertexts(ctx, [ctx.encrypt(list(values))] * n)


# ----------------------------------------------------------------------------- attestation


@pytest.fixture(scope="module")
def document(client):
    nonce = os.urandom(32)
    return nonce, client.attest(nonce)


def verify(enclave, doc, nonce, **kw):
    args = {"root_certificate": enclave.root_certificate, "expected_pcrs": expected_measurement(enclave.config),
            "nonce": nonce, "allowed_regions": [REGION], **kw}
    return verify_attestation(doc, **args)


def test_attestation_good_document_verifies(enclave, document):
    nonce, doc = document
    assert verify(enclave, doc, nonce).region == REGION


def test_attestation_wrong_pcr0(enclave, document):
    nonce, doc = document
    pcrs = expected_measurement(enclave.config)
    pcrs[0] = bytes(48)
    with pytest.raises(AttestationError, match="PCR0"):
        verify(enclave, doc, nonce, expected_pcrs=pcrs)


def test_attestation_wrong_pcr1_other_configuration(enclave, document):
    nonce, doc = document
    from privml.enclave import EnclaveConfig

    with pytest.raises(AttestationError, match="PCR1"):
        verify(enclave, doc, nonce, expected_pcrs=expected_measurement(EnclaveConfig(region="us-east-1")))


def test_attestation_needs_pcr0(enclave, document):
    nonce, doc = document
    with pytest.raises(AttestationError, match="PCR0"):
        verify(enclave, doc, nonce, expected_pcrs={1: bytes(48)})


def test_attestation_wrong_root(enclave, document):
    nonce, doc = document
    _, other = make_root()
    for encoding in (serialization.Encoding.PEM, serialization.Encoding.DER):
        with pytest.raises(AttestationError, match="certificate chain"):
            verify(enclave, doc, nonce, root_certificate=other.public_bytes(encoding))


def test_attestation_bad_signature(enclave, document):
    nonce, doc = document
    for pos in (len(doc) - 1, len(doc) - 50):  # inside the 96-byte ES384 signature
        bad = bytearray(doc)
        bad[pos] ^= 0x01
        with pytest.raises(AttestationError, match="signature"):
            verify(enclave, bytes(bad), nonce)


def test_attestation_tampered_payload_or_garbage(enclave, document):
    nonce, doc = document
    bad = bytearray(doc)
    i = bytes(doc).find(b"SHA384")
    bad[i + 5] ^= 0x01  # "SHA384" -> "SHA385": payload edit
    with pytest.raises(AttestationError):
        verify(enclave, bytes(bad), nonce)
    for junk in (b"", b"\xd2", doc[:-10], b"\xd3" + doc[1:], cbor2.dumps([1, 2, 3]), os.urandom(200)):
        with pytest.raises(AttestationError):
            verify(enclave, junk, nonce)


def test_attestation_stale_nonce(enclave, document):
    _, doc = document
    with pytest.raises(AttestationError, match="nonce"):
        verify(enclave, doc, os.urandom(32))


def test_attestation_too_old(enclave, document):
    nonce, doc = document
    time.sleep(0.05)
    with pytest.raises(AttestationError, match="age"):
        verify(enclave, doc, nonce, max_age_s=0.01)
    with pytest.raises(AttestationError, match="age"):
        verify(enclave, doc, nonce, max_age_s=0)


def test_attestation_region_not_allowed(enclave, document):
    nonce, doc = document
    with pytest.raises(AttestationError, match="region"):
        verify(enclave, doc, nonce, allowed_regions=["us-east-1", "eu-west-3"])


# ----------------------------------------------------------------------------- frames (decoder, client side)


SESSION = bytes(range(16))


def frame(kind="status", seq=1, session=SESSION, body=None) -> bytes:
    return protocol.encode(kind, seq, session, body or {"x": b"abc", "n": 3})


def raw_frame(obj) -> bytes:
    payload = cbor2.dumps(obj)
    return protocol.HEADER.pack(protocol.MAGIC, protocol.VERSION, 0, len(payload)) + payload


def msg(**over):
    m = {"kind": "status", "seq": 1, "session": SESSION, "body": {}}
    m.update(over)
    return m


BAD_FRAMES = {
    "bad magic": b"XXXX" + frame()[4:],
    "bad version": frame()[:4] + b"\x00\x02" + frame()[6:],
    "reserved set": frame()[:6] + b"\x00\x01" + frame()[8:],
    "oversize length": protocol.HEADER.pack(protocol.MAGIC, 1, 0, protocol.MAX_BODY + 1),
    "length mismatch": frame() + b"\x00",
    "unknown kind": raw_frame(msg(kind="exec")),
    "kind not a string": raw_frame(msg(kind=5)),
    "seq a string": raw_frame(msg(seq="1")),
    "seq a bool": raw_frame(msg(seq=True)),
    "negative seq": raw_frame(msg(seq=-1)),
    "short session": raw_frame(msg(session=b"x" * 15)),
    "session a string": raw_frame(msg(session="x" * 16)),
    "body a list": raw_frame(msg(body=[1, 2])),
    "extra field": raw_frame({**msg(), "extra": 1}),
    "missing field": raw_frame({k: v for k, v in msg().items() if k != "body"}),
    "not a map": raw_frame([1, 2, 3]),
    "datetime tag": raw_frame(msg(body={"t": cbor2.CBORTag(1, 5)})),
    "bignum tag": raw_frame(msg(seq=cbor2.CBORTag(2, b"\x01" + bytes(8)))),
    "shared value tag": raw_frame(msg(body={"t": cbor2.CBORTag(28, 1)})),
    "unknown tag": raw_frame(msg(body={"t": cbor2.CBORTag(999, b"obj")})),
    "self-describe tag": raw_frame(cbor2.CBORTag(55799, msg())),
    "too deep": raw_frame(msg(body={"t": [[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]})),
    "nan": raw_frame(msg(body={"t": float("nan")})),
    "trailing bytes": (lambda p: protocol.HEADER.pack(protocol.MAGIC, 1, 0, len(p)) + p)(cbor2.dumps(msg()) + b"\x00"),
    "duplicate keys": (lambda p: protocol.HEADER.pack(protocol.MAGIC, 1, 0, len(p)) + p)(
        b"\xa5" + cbor2.dumps("kind")[0:] + cbor2.dumps("status") + cbor2.dumps("seq") + b"\x01"
        + cbor2.dumps("session") + cbor2.dumps(SESSION) + cbor2.dumps("body") + b"\xa0" + cbor2.dumps("seq") + b"\x02"),
    "indefinite map": (lambda p: protocol.HEADER.pack(protocol.MAGIC, 1, 0, len(p)) + p)(
        b"\xbf" + cbor2.dumps("kind") + cbor2.dumps("status") + cbor2.dumps("seq") + b"\x01"
        + cbor2.dumps("session") + cbor2.dumps(SESSION) + cbor2.dumps("body") + b"\xa0\xff"),
}


def test_frame_round_trip():
    m = protocol.decode(frame())
    assert (m.kind, m.seq, m.session, m.body) == ("status", 1, SESSION, {"x": b"abc", "n": 3})


@pytest.mark.parametrize("name", sorted(BAD_FRAMES))
def test_bad_frames_are_malformed(name):
    with pytest.raises(MalformedInput):
        protocol.decode(BAD_FRAMES[name])


def test_truncated_frames_are_malformed():
    f = frame()
    for n in range(len(f)):
        with pytest.raises(MalformedInput):
            protocol.decode(f[:n])


def test_bit_flips_give_malformed_input_or_a_message():
    f = frame()
    for i in range(len(f) * 8):
        bad = bytearray(f)
        bad[i // 8] ^= 1 << (i % 8)
        try:
            m = protocol.decode(bytes(bad))
        except MalformedInput:
            continue
        assert i >= protocol.HEADER.size * 8  # header damage is always caught
        assert m != protocol.decode(f)


class FakeEnclave:
    """A Unix-socket server that answers hello properly, then the next request with ``reply(msg)`` bytes."""

    def __init__(self, path, reply):
        self.path, self.reply = str(path), reply
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(1)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        conn, _ = self.sock.accept()
        with conn:
            hello = protocol.read_message(conn, protocol.REQUEST_KINDS)
            conn.sendall(protocol.encode("ok", hello.seq, hello.session, {}))
            req = protocol.read_message(conn, protocol.REQUEST_KINDS)
            data = self.reply(req)
            if data:
                conn.sendall(data)
        self.sock.close()


def _ok(kind="ok", seq=0, session=None, body=None):
    return lambda m: protocol.encode(kind, m.seq + seq, session or m.session, body or {})


CLIENT_CASES = {
    "wrong seq": (_ok(seq=1), MalformedInput),
    "replayed seq": (_ok(seq=-1), MalformedInput),
    "wrong session": (_ok(session=os.urandom(16)), MalformedInput),
    "request kind as response": (_ok(kind="status"), MalformedInput),
    "tagged body": (lambda m: raw_frame({"kind": "ok", "seq": m.seq, "session": m.session,
                                          "body": {"x": cbor2.CBORTag(1, 0)}}), MalformedInput),
    "bad magic": (lambda m: b"NOPE" + protocol.encode("ok", m.seq, m.session, {})[4:], MalformedInput),
    "truncated": (lambda m: protocol.encode("ok", m.seq, m.session, {"x": b"y" * 50})[:-10], MalformedInput),
    "oversize": (lambda m: protocol.HEADER.pack(protocol.MAGIC, 1, 0, protocol.MAX_BODY + 1), MalformedInput),
    "error without code": (_ok(kind="error", body={"message": "x"}), MalformedInput),
    "closed without answer": (lambda m: b"", PartyFailure),
    "budget error": (_ok(kind="error", body={"code": "budget", "message": "spent"}), DecryptionBudgetExhausted),
    "key error": (_ok(kind="error", body={"code": "key", "message": "no"}), KeyMaterialError),
    "policy error": (_ok(kind="error", body={"code": "policy", "message": "no"}), AttestationError),
    "unknown code": (_ok(kind="error", body={"code": "weird", "message": "no"}), PrivmlError),
}


@pytest.mark.parametrize("name", sorted(CLIENT_CASES))
def test_client_refuses_bad_responses(tmp_path, name):
    reply, exc = CLIENT_CASES[name]
    fake = FakeEnclave(tmp_path / "fake.sock", reply)
    c = EnclaveClient(fake.path, timeout=5)
    with pytest.raises(exc):
        c.status()
    fake.thread.join(5)
    if exc in (MalformedInput, PartyFailure):  # the stream is out of step: never reused
        with pytest.raises(PartyFailure):
            c.status()
    c.close()


# ----------------------------------------------------------------------------- frames (enclave side)


def raw_conn(enclave) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(enclave.address)
    return s


def reply(s):
    try:
        return protocol.read_message(s, protocol.RESPONSE_KINDS)
    except PartyFailure:  # closed (or reset: the enclave hung up with our bytes unread)
        return None


def expect_refused(s):
    """The enclave answers a malformed error (or just closes), then closes the connection."""
    r = reply(s)
    assert r is None or (r.kind == "error" and r.body["code"] == "malformed"), r
    assert reply(s) is None
    s.close()


def hello(s, session=SESSION):
    s.sendall(protocol.encode("hello", 0, session, {}))
    r = reply(s)
    assert r.kind == "ok" and r.seq == 0 and r.session == session


ENCLAVE_CASES = {
    **{k: v for k, v in BAD_FRAMES.items() if k not in ("length mismatch", "trailing bytes")},
    "status before hello": frame(kind="status", seq=0),
    "hello with seq 1": frame(kind="hello", seq=1),
}


@pytest.mark.parametrize("name", sorted(ENCLAVE_CASES))
def test_enclave_refuses_bad_frames_and_stays_up(enclave, name):
    s = raw_conn(enclave)
    if name not in ("status before hello", "hello with seq 1"):
        hello(s)
    s.sendall(ENCLAVE_CASES[name])
    expect_refused(s)
    with EnclaveClient(enclave.address, timeout=10) as c:  # the next client is served
        assert c.status()["region"] == REGION


def test_enclave_refuses_truncated_frame(enclave):
    s = raw_conn(enclave)
    hello(s)
    s.sendall(frame()[:20])
    s.shutdown(socket.SHUT_WR)
    expect_refused(s)


def test_enclave_refuses_random_bytes(enclave):
    for _ in range(5):
        s = raw_conn(enclave)
        s.sendall(os.urandom(64))
        expect_refused(s)
    assert EnclaveClient(enclave.address, timeout=10).status()["region"] == REGION


@pytest.mark.parametrize("case", ["replayed seq", "skipped seq", "wrong session", "second hello"])
def test_enclave_refuses_out_of_order_requests(enclave, case):
    s = raw_conn(enclave)
    hello(s)
    s.sendall(protocol.encode("status", 1, SESSION, {}))
    assert reply(s).kind == "ok"
    bad = {"replayed seq": protocol.encode("status", 1, SESSION, {}),
           "skipped seq": protocol.encode("status", 3, SESSION, {}),
           "wrong session": protocol.encode("status", 2, os.urandom(16), {}),
           "second hello": protocol.encode("hello", 2, SESSION, {})}[case]
    s.sendall(bad)
    expect_refused(s)


def test_enclave_refuses_bad_bodies(client, enclave):
    cases = [("attest", {}), ("attest", {"nonce": b"short"}), ("attest", {"nonce": "text" * 8}),
             ("attest", {"nonce": os.urandom(32), "extra": 1}), ("status", {"x": 1}),
             ("refresh", {"key_id": "k"}), ("refresh", {"key_id": "../../etc", "token": b"", "mode": "refresh",
                                                        "ciphertexts": b"", "count": 1}),
             ("provision", {"key_id": "k"}), ("audit", {"nonce": 5})]
    for kind, body in cases:
        with pytest.raises((MalformedInput, KeyMaterialError)):
            client.request(kind, body)
        if client._sock is None:
            client.reconnect()
    assert client.status()["region"] == REGION


# ----------------------------------------------------------------------------- provisioning and refresh


def test_replayed_provisioning_message_is_refused(client, enclave, secret):
    nonce = os.urandom(32)
    att = verify(enclave, client.attest(nonce), nonce)
    body = provisioning_message(att, secret, policy(), "replayed-key", os.urandom(32))
    assert client.request("provision", body)["key_id"] == "replayed-key"
    with pytest.raises(AttestationError, match="single use"):
        client.request("provision", body)
    with EnclaveClient(enclave.address) as other, pytest.raises(AttestationError, match="single use"):
        other.request("provision", {**body, "key_id": "replayed-key-2"})


def test_tampered_provisioning_message_is_refused(client, enclave, secret):
    nonce = os.urandom(32)
    att = verify(enclave, client.attest(nonce), nonce)
    body = provisioning_message(att, secret, policy(), "tampered-key", os.urandom(32))
    body["policy"] = policy(decryption_budget=10**6).to_cbor()  # the server raises the budget: AAD breaks
    with pytest.raises(MalformedInput, match="authentication"):
        client.request("provision", body)
    client.reconnect()


def test_provisioning_refused_outside_the_policy_regions(client, enclave, secret):
    with pytest.raises(AttestationError, match="runs in"):
        attest_and_provision(client, root_certificate=enclave.root_certificate, region_allowed=[REGION],
                             secret_context=secret, policy=policy(allowed_regions=("us-east-1",)),
                             config=enclave.config)


def test_provisioning_a_public_context_is_refused(client, enclave, ctx):
    with pytest.raises(KeyMaterialError, match="secret key"):
        attest_and_provision(client, root_certificate=enclave.root_certificate, region_allowed=[REGION],
                             secret_context=dump_context(ctx.public()), policy=policy(), config=enclave.config)


def test_policy_validation():
    for bad in ({"flood_security_bits": 29}, {"flood_sigma": 0.0}, {"flood_sigma": float("inf")},
                {"rate_limit": 0}, {"decryption_budget": -1}, {"modes": ("decrypt",)}, {"allowed_regions": ()}):
        with pytest.raises(MalformedInput):
            policy(**bad)
    p = policy(modes=("refresh",))
    assert Policy.from_cbor(p.to_cbor()) == p


def test_wrong_token_and_unknown_key(client, enclave, secret, ctx):
    _, receipt = provision(client, enclave, secret)
    with pytest.raises(KeyMaterialError, match="token"):
        client.refresh(receipt.key_id, os.urandom(32), "refresh", one_ct(ctx), 1)
    with pytest.raises(KeyMaterialError, match="no key"):
        client.refresh("nokey", receipt.server_token, "refresh", one_ct(ctx), 1)
    # ciphertexts under another key set
    other = CKKSContext.generate(ctx.params)
    with pytest.raises(KeyMaterialError, match="fingerprint"):
        client.refresh(receipt.key_id, receipt.server_token, "refresh", one_ct(other), 1)
    with pytest.raises(MalformedInput, match="count"):
        client.refresh(receipt.key_id, receipt.server_token, "refresh", one_ct(ctx, 2), 3)
    client.reconnect()


def test_mode_not_allowed(client, enclave, secret, ctx):
    _, receipt = provision(client, enclave, secret, modes=("refresh",))
    with pytest.raises(AttestationError, match="mode"):
        client.refresh(receipt.key_id, receipt.server_token, "relu", one_ct(ctx), 1)


def test_budget_exhausted_refuses_before_decrypting(client, enclave, secret, ctx):
    _, receipt = provision(client, enclave, secret, decryption_budget=3)
    _, left = client.refresh(receipt.key_id, receipt.server_token, "refresh", one_ct(ctx, 2), 2)
    assert left == 1
    with pytest.raises(DecryptionBudgetExhausted, match=r"budget exhausted.*2 ciphertext\(s\) requested, 1 left"):
        client.refresh(receipt.key_id, receipt.server_token, "refresh", one_ct(ctx, 2), 2)
    # refused before the ciphertexts are even parsed: nothing was decrypted
    with pytest.raises(DecryptionBudgetExhausted, match="nothing was decrypted"):
        client.refresh(receipt.key_id, receipt.server_token, "refresh", b"not ciphertexts", 2)
    assert client.status()["keys"][receipt.key_id]["budget_left"] == 1
    _, left = client.refresh(receipt.key_id, receipt.server_token, "relu", one_ct(ctx), 1)
    assert left == 0
    with pytest.raises(DecryptionBudgetExhausted):
        client.refresh(receipt.key_id, receipt.server_token, "refresh", one_ct(ctx), 1)
    nonce = os.urandom(16)
    entries, _ = client.audit(nonce)
    refusals = [e for e in entries if e["op"] == "refuse" and e["key_id"] == receipt.key_id]
    assert [e["mode"] for e in refusals] == ["refresh:budget"] * 3


def test_rate_limit(client, enclave, secret, ctx):
    _, receipt = provision(client, enclave, secret, rate_limit=1.0)
    _, left = client.refresh(receipt.key_id, receipt.server_token, "refresh", one_ct(ctx), 1)
    with pytest.raises(DecryptionBudgetExhausted, match="rate limit"):
        client.refresh(receipt.key_id, receipt.server_token, "refresh", one_ct(ctx), 1)
    with pytest.raises(DecryptionBudgetExhausted, match="rate limit.*fewer per request"):
        client.refresh(receipt.key_id, receipt.server_token, "refresh", one_ct(ctx, 2), 2)
    assert client.status()["keys"][receipt.key_id]["budget_left"] == left  # refused: nothing spent
    time.sleep(1.1)
    _, left2 = client.refresh(receipt.key_id, receipt.server_token, "refresh", one_ct(ctx), 1)
    assert left2 == left - 1


# ----------------------------------------------------------------------------- audit log


def test_audit_log_tampering_is_detected(client, enclave, secret, ctx):
    att, receipt = provision(client, enclave, secret)
    client.refresh(receipt.key_id, receipt.server_token, "refresh", one_ct(ctx), 1)
    nonce = os.urandom(16)
    entries, signed = client.audit(nonce)
    assert len(entries) >= 6
    verify_audit_log(entries, signed, attestation=att, nonce=nonce)
    mid = len(entries) // 2

    def edited(i, field, value):
        e = copy.deepcopy(entries)
        e[i][field] = value
        return e

    cases = {
        "edit middle count": edited(mid, "count", entries[mid]["count"] + 1),
        "edit middle actor": edited(mid, "actor", "server:00000000"),
        "edit last budget": edited(-1, "budget_left", 10**6),
        "drop middle": entries[:mid] + entries[mid + 1:],
        "drop last": entries[:-1],
        "drop first": entries[1:],
        "reorder": entries[:mid] + [entries[mid + 1], entries[mid]] + entries[mid + 2:],
        "insert": entries[:mid] + [copy.deepcopy(entries[mid])] + entries[mid:],
        "append": entries + [copy.deepcopy(entries[-1])],
        "extra field": [dict(e, extra=1) if i == mid else e for i, e in enumerate(entries)],
    }
    for name, tampered in cases.items():
        try:
            verify_audit_log(tampered, signed, attestation=att, nonce=nonce)
        except AuditLogError:
            continue
        pytest.fail(f"audit log tampering not detected: {name}")
    with pytest.raises(AuditLogError, match="nonce"):
        verify_audit_log(entries, signed, attestation=att, nonce=os.urandom(16))
    bad = bytearray(signed)
    bad[-3] ^= 0x10
    with pytest.raises(AuditLogError, match="signature"):
        verify_audit_log(entries, bytes(bad), attestation=att, nonce=nonce)
    other_key, _ = make_root()
    with pytest.raises(AuditLogError, match="signature"):
        verify_audit_log(entries, signed, leaf_public_key=other_key.public_key(), nonce=nonce)
    # an old signed head does not cover a shorter (rolled back) log
    entries2, signed2 = client.audit(nonce)
    with pytest.raises(AuditLogError):
        verify_audit_log(entries, signed2, attestation=att, nonce=nonce)
    verify_audit_log(entries2, signed2, attestation=att, nonce=nonce)


# ----------------------------------------------------------------------------- the secret key stays inside


def test_secret_key_never_in_the_clear_on_the_wire_or_on_disk(enclave, ctx, secret, monkeypatch):
    seen: list[bytes] = []

    class RecordingSocket(socket.socket):
        def sendall(self, data, *args):
            seen.append(bytes(data))
            return super().sendall(data, *args)

        def recv(self, n, *args):
            data = super().recv(n, *args)
            seen.append(bytes(data))
            return data

    monkeypatch.setattr(client_mod, "socket", types.SimpleNamespace(
        socket=RecordingSocket, AF_UNIX=socket.AF_UNIX, SOCK_STREAM=socket.SOCK_STREAM))
    with EnclaveClient(enclave.address) as c:
        att, receipt = provision(c, enclave, secret)
        x = np.linspace(-1, 1, ctx.slots)
        ct = ctx.mul_plain(ctx.encrypt(x), 1.0)
        for mode in ("refresh", "relu"):
            data, _ = c.refresh(receipt.key_id, receipt.server_token, mode, dump_ciphertexts(ctx, [ct]), 1)
            assert np.abs(ctx.decrypt(load_ciphertexts(ctx, data)[0]) - (x if mode == "refresh" else np.maximum(x, 0))
                          ).max() < 6 * SIGMA + 1e-6
        nonce = os.urandom(16)
        entries, signed = c.audit(nonce)
        verify_audit_log(entries, signed, attestation=att, nonce=nonce)
        c.status()
    wire = b"".join(seen)
    assert len(wire) > len(secret)  # the recording did see the traffic
    sk = seal_to_bytes(ctx.keys.secret_key)
    mid = len(sk) // 2
    needles = {"secret key": sk, "secret key window": sk[mid:mid + 64], "secret context": secret,
               "secret context window": secret[len(secret) // 2: len(secret) // 2 + 64]}
    files = [p for p in enclave.state_dir.rglob("*") if p.is_file()]
    assert any(p.parent.name == "sealed" for p in files)
    blobs = {"wire": wire, **{str(p): p.read_bytes() for p in files}}
    for where, blob in blobs.items():
        for what, needle in needles.items():
            assert needle not in blob, f"{what} found in {where}"
    # private key files and the socket are owner-only
    for p in files:
        if p.name.endswith("key.pem") or p.name == "device_secret" or p.suffix == ".bin":
            assert p.stat().st_mode & 0o077 == 0, p
    assert os.stat(enclave.address).st_mode & 0o077 == 0


# ----------------------------------------------------------------------------- a dead or hung enclave


def wait_stopped(pid: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] in ("T", "t"):
                return
        time.sleep(0.01)
    pytest.fail(f"process {pid} did not stop")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc to see that SIGSTOP took effect")
def test_dead_or_hung_enclave_is_a_party_failure_in_time(tmp_path):
    proc = launch(tmp_path / "victim", region=REGION)
    try:
        fast = EnclaveClient(proc.address, timeout=1.0)
        waiting = EnclaveClient(proc.address, timeout=5.0)
        os.kill(proc.pid, signal.SIGSTOP)
        wait_stopped(proc.pid)  # delivery is asynchronous: under load the enclave could still answer once
        t0 = time.monotonic()
        with pytest.raises(PartyFailure, match="enclave at .* did not answer in time"):
            fast.status()
        assert 0.9 <= time.monotonic() - t0 < 2.5
        with pytest.raises(PartyFailure):  # the connection is not reused after a timeout
            fast.status()

        result: dict = {}

        def ask():
            t = time.monotonic()
            try:
                waiting.status()
            except BaseException as exc:  # noqa: BLE001
                result["exc"] = exc
            result["elapsed"] = time.monotonic() - t

        th = threading.Thread(target=ask)
        th.start()
        time.sleep(0.3)
        proc.kill()  # SIGKILL while the client waits
        th.join(10)
        assert isinstance(result.get("exc"), PartyFailure), result
        assert "enclave at" in str(result["exc"])
        assert result["elapsed"] < 5.0 + 1.0
        with pytest.raises(PartyFailure, match="cannot connect"):
            EnclaveClient(proc.address, timeout=1.0)
    finally:
        proc.kill()


def test_launch_that_is_not_ready_in_time_is_a_party_failure(tmp_path):
    with pytest.raises(PartyFailure, match="did not become ready"):
        launch(tmp_path / "slow", timeout=0.01)


def test_audit_verification_rejects_garbage_keys_and_entries(client):
    nonce = os.urandom(16)
    entries, signed = client.audit(nonce)
    with pytest.raises(AuditLogError):
        verify_audit_log(entries, signed, leaf_public_key=b"not a certificate", nonce=nonce)
    with pytest.raises(AuditLogError):
        verify_audit_log(entries, signed, nonce=nonce)
