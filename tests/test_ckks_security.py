"""CKKS client/server split: the server gets no secret key; bad bytes get privml errors, never garbage."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import privml
from privml.backends.ckks import CKKSServer
from privml.errors import KeyMaterialError, MalformedInput
from privml.he import serialize
from privml.he.context import seal_to_bytes


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    calib = torch.randn(64, 6)
    compiled = privml.compile(model, calib, backend="ckks", layout="latency")
    session = privml.Session(compiled.plan)
    x = torch.randn(2, 6)
    request = session.backend.dumps(session.encrypt(x))
    return compiled, session, x, request


def test_server_round_trip_without_secret_key(setup) -> None:
    compiled, session, x, request = setup
    server = CKKSServer(compiled.plan, session.backend.public_context())
    assert not server.ctx.has_secret_key
    out = session.decrypt(session.backend.loads(server.run(compiled, request)))
    assert (out - compiled(x)).abs().max() < 2e-3


def test_nothing_the_server_receives_contains_the_secret_key(setup) -> None:
    compiled, session, x, request = setup
    sk = seal_to_bytes(session.backend.ctx.keys.secret_key)
    windows = [sk[i:i + 64] for i in range(64, len(sk) - 64, (len(sk) - 128) // 16)]
    received = session.backend.public_context() + request + compiled.plan.to_json().encode()
    assert len(windows) >= 16 and not any(w in received for w in windows)
    secret_dump = serialize.dump_context(session.backend.ctx, include_secret=True)
    assert all(w in secret_dump for w in windows)  # positive control: the windows do identify the key


def test_server_refuses_a_context_with_a_secret_key(setup) -> None:
    compiled, session, _, _ = setup
    with pytest.raises(KeyMaterialError, match="secret key"):
        CKKSServer(compiled.plan, serialize.dump_context(session.backend.ctx, include_secret=True))


def test_server_process_cannot_decrypt(setup, tmp_path) -> None:
    compiled, session, x, request = setup
    (tmp_path / "plan.json").write_text(compiled.plan.to_json())
    (tmp_path / "ctx.bin").write_bytes(session.backend.public_context())
    (tmp_path / "req.bin").write_bytes(request)
    script = textwrap.dedent(f"""
        import pathlib, privml
        from privml.backends.ckks import CKKSServer, loads
        from privml.errors import KeyMaterialError
        d = pathlib.Path({str(tmp_path)!r})
        plan = privml.Plan.from_json((d / "plan.json").read_text())
        server = CKKSServer(plan, (d / "ctx.bin").read_bytes())
        t = loads((d / "req.bin").read_bytes(), server.runtime)
        try:
            server.ctx.decrypt(t.payload[0])
        except KeyMaterialError as err:
            print("REFUSED", err)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "REFUSED" in out.stdout and "secret key" in out.stdout, out.stderr[-2000:]


def test_foreign_session_ciphertexts_are_rejected(setup) -> None:
    compiled, session, x, request = setup
    other = privml.Session(compiled.plan)  # same parameters, different keys
    with pytest.raises(KeyMaterialError):
        other.backend.loads(request)


def test_tampered_and_truncated_requests(setup) -> None:
    _, session, _, request = setup
    for bad in (request[:10], request[:len(request) // 2], request + b"x", b"PRIVMLCT" + request[8:20],
                request[:40] + bytes([request[40] ^ 0xFF]) + request[41:], b"", b"garbage" * 10):
        with pytest.raises((MalformedInput, KeyMaterialError)):
            session.backend.loads(bad)
    with pytest.raises(MalformedInput):
        session.backend.loads("not bytes")
    edited = request.replace(b'"shape": [2, 6]', b'"shape": [2, 5]', 1)  # same ciphertexts, forged shape
    assert edited != request
    with pytest.raises(MalformedInput, match="checksum"):
        session.backend.loads(edited)


def _mutations(data: bytes, n: int, seed: int):
    rng = random.Random(seed)
    for _ in range(n):
        kind = rng.randrange(4)
        b = bytearray(data)
        if kind == 0:
            yield bytes(b[:rng.randrange(len(b))])
        elif kind == 1:
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            yield bytes(b)
        elif kind == 2:
            i = rng.randrange(min(len(b), 200))
            b[i:i + 4] = rng.randbytes(4)
            yield bytes(b)
        else:
            yield rng.randbytes(rng.randrange(1, 400))


def _fuzz(session, request: bytes, n: int, seed: int) -> None:
    for bad in _mutations(request, n, seed):
        if bad == request:
            continue
        try:
            session.backend.loads(bad)
        except (MalformedInput, KeyMaterialError):
            continue
        raise AssertionError(f"mutated request of {len(bad)} bytes was accepted")


def test_fuzz_tensor_loader_fast(setup) -> None:
    _, session, _, request = setup
    _fuzz(session, request, 150, seed=1)


@pytest.mark.slow
def test_fuzz_tensor_loader_thousands(setup) -> None:
    _, session, _, request = setup
    _fuzz(session, request, 3000, seed=2)
