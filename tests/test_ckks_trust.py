"""CKKS trust boundaries (issue 9): caches keyed by content, ciphertexts bound to their keys, crafted bytes and
responses refused with privml errors, never a bare Python exception or a silently wrong number."""

from __future__ import annotations

import gc
import json
import random
import struct
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

import privml
from privml.backends import ckks
from privml.backends.ckks import CKKSServer, CKKSTensor, Runtime
from privml.errors import InvalidInput, KeyMaterialError, MalformedInput, PrivmlError
from privml.he import serialize
from privml.he.context import CKKSContext
from privml.he.params import choose_params
from privml.he.sealio import seal_to_bytes

TOL = 5e-3


# --------------------------------------------------------------------------------------------- helpers
def split_tensor_bytes(data: bytes) -> tuple[dict, bytes]:
    """(header, ciphertext body) of ``ckks.dumps`` bytes."""
    _, hlen = struct.unpack_from("<HI", data, 8)
    return json.loads(data[14:14 + hlen]), data[14 + hlen:-32]


def tensor_bytes(header: bytes | dict, body: bytes, version: int = ckks._TENSOR_VERSION) -> bytes:
    """Tensor bytes with any header and body and a valid checksum (the format is checked, not authenticated)."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    data = ckks._TENSOR_MAGIC + struct.pack("<HI", version, len(raw)) + raw + body
    return data + ckks._digest(data)


def raw_ciphertext(ct, ntt: bool | None = None, zero: bool = False) -> bytes:
    """SEAL's uncompressed serialization of ``ct``, optionally with the NTT flag rewritten or all-zero data."""
    magic, hsize, major, minor = struct.unpack_from("<HBBB", seal_to_bytes(ct), 0)
    arr = ct.dyn_array()
    values = [0] * arr.size() if zero else [arr.at(i) for i in range(arr.size())]
    inner = struct.pack("<Q", len(values)) + struct.pack(f"<{len(values)}Q", *values)
    inner = struct.pack("<HBBBBHQ", magic, hsize, major, minor, 0, 0, 16 + len(inner)) + inner
    flag = ct.is_ntt_form() if ntt is None else ntt
    members = (struct.pack("<4QB", *ct.parms_id(), flag)
               + struct.pack("<QQQdQ", ct.size(), ct.poly_modulus_degree(), ct.coeff_modulus_size(), ct.scale, 1)
               + inner)
    return struct.pack("<HBBBBHQ", magic, hsize, major, minor, 0, 0, 16 + len(members)) + members


def with_first_ciphertext(request: bytes, ctx: CKKSContext, blob: bytes) -> bytes:
    """``request`` with its first ciphertext replaced by ``blob``, every checksum recomputed."""
    header, body = split_tensor_bytes(request)
    _, fp, sections = serialize._unpack(body, serialize.KIND_CIPHERTEXTS)
    body = serialize._pack(serialize.KIND_CIPHERTEXTS, 0, fp, [blob] + [bytes(s) for s in sections[1:]])
    return tensor_bytes(header, body)


@pytest.fixture(scope="module")
def latency():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    compiled = privml.compile(model, torch.randn(64, 6), backend="ckks", layout="latency")
    session = privml.Session(compiled.plan)
    x = torch.randn(2, 6)
    x_enc = session.encrypt(x)
    return compiled, session, x, x_enc, session.backend.dumps(x_enc)


@pytest.fixture(scope="module")
def small_runtime() -> Runtime:
    params = choose_params(2, precision_bits=14, poly_modulus_degree=8192, min_slots=8)
    return Runtime(CKKSContext.generate(params, rotation_steps=[1, 2, 3, -1, -2, -3]), "latency")


_SERVERS: dict[int, CKKSServer] = {}


def server(setup) -> CKKSServer:
    """One server per fixture (loading a public context takes seconds)."""
    compiled, session = setup[0], setup[1]
    if id(setup) not in _SERVERS:
        _SERVERS[id(setup)] = CKKSServer(compiled.plan, session.backend.public_context())
    return _SERVERS[id(setup)]


def encrypted(rt: Runtime, x: torch.Tensor) -> CKKSTensor:
    return CKKSTensor(rt.encrypt(x), tuple(x.shape), torch.float32, runtime=rt, pending=None,
                      packing=rt.input_packing(tuple(x.shape)))


def decrypted(rt: Runtime, t: CKKSTensor) -> np.ndarray:
    t = t.materialized()
    return rt.decrypt(t.payload, t.shape[0], t.packing)


# --------------------------------------------------------------------------------------------- 1. caches
def test_three_freed_temporaries_each_get_their_own_bias(small_runtime: Runtime) -> None:
    """CPython reuses the id of a freed temporary: an id-keyed cache gave bias 1.0 to all three adds."""
    x = torch.randn(2, 4)
    x_enc = encrypted(small_runtime, x)
    sums = []
    for v in (1.0, 5.0, 9.0):
        sums.append(x_enc + torch.full((4,), v))  # the temporary is freed right after the add
    got = [decrypted(small_runtime, s) - x.numpy() for s in sums]
    for v, d in zip((1.0, 5.0, 9.0), got, strict=True):
        assert np.abs(d - v).max() < TOL, (v, d)


def test_module_attribute_changes_between_calls_are_seen(latency) -> None:
    """A module whose forward adds torch.full((4,), self.shift), run three times on one session."""
    torch.manual_seed(1)

    class Shift(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.shift = 1.0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) + torch.full((4,), self.shift)

    model = Shift().eval()
    compiled = privml.compile(model, torch.randn(64, 4), backend="ckks", layout="latency")
    session = privml.Session(compiled.plan, range_slack=None)
    x = torch.randn(2, 4)
    x_enc, outs, shifts = session.encrypt(x), [], (1.0, 1.2, 1.4)
    with torch.no_grad():
        for shift in shifts:
            model.shift = shift
            outs.append(model(x_enc))
        wants = [model.lin(x) + shift for shift in shifts]
    errors = [float((session.decrypt(o) - w).abs().max()) for o, w in zip(outs, wants, strict=True)]
    assert max(errors) < TOL, errors


def test_compiled_models_dropped_and_rebuilt_on_one_session() -> None:
    """Three compiled models (shift 1.0, 1.2, 1.4), each dropped before the next: their constants may share ids."""
    calib, x = torch.randn(64, 4), torch.randn(2, 4)
    session, errors = None, []
    for shift in (1.0, 1.2, 1.4):
        torch.manual_seed(int(shift * 10))
        model = nn.Sequential(nn.Linear(4, 4)).eval()
        model[0].bias.data += shift
        compiled = privml.compile(model, calib, backend="ckks", layout="latency")
        session = session or privml.Session(compiled.plan, range_slack=None)
        errors.append(float((session.decrypt(compiled(session.encrypt(x))) - compiled(x)).abs().max()))
        del compiled, model
        gc.collect()
    assert max(errors) < TOL, errors


def test_keys_are_by_content_not_identity() -> None:
    """Equal content gives equal keys (the cache stays effective); any change of value, dtype or shape does not.
    Tensors inside kwargs were keyed by ``repr`` (4 decimals, summarised beyond 1000 values)."""
    a = torch.arange(2000.0)
    b = a.clone()
    b[1000] += 1.0
    assert ckks._arg_key(a) == ckks._arg_key(a.clone())
    assert ckks._arg_key({"other": a}) != ckks._arg_key({"other": b})
    assert ckks._arg_key({"other": torch.tensor([1.0])}) != ckks._arg_key({"other": torch.tensor([1.00001])})
    assert ckks._arg_key(a) != ckks._arg_key(a.double()) and ckks._arg_key(a) != ckks._arg_key(a.reshape(2, 1000))
    assert ckks._arg_key(np.arange(2000.0)) != ckks._arg_key(b.double().numpy())
    assert ckks._arg_key(a.t() if a.dim() == 2 else a[::2]) == ckks._arg_key(a[::2].contiguous())


def test_same_weights_encode_nothing_new(latency) -> None:
    """A second call with the same weights hashes them to the same keys: no affine map, diagonal or bias is
    rebuilt or re-encoded (what is still encoded per call is the inputs and the ReLU's scalar constants)."""
    compiled, session, x, _, _ = latency
    session.decrypt(compiled(session.encrypt(x)))
    rt, stats, cache = session.backend.runtime, session.backend.ctx.stats, session.backend.ctx._encoder.cache.items
    sizes = (len(rt._affine_cache), len(rt._matvec_cache), len(cache))
    before = stats["encodes"]
    out = session.decrypt(compiled(session.encrypt(x)))
    per_call = stats["encodes"] - before
    assert (out - compiled(x)).abs().max() < TOL
    assert (len(rt._affine_cache), len(rt._matvec_cache), len(cache)) == sizes
    session.decrypt(compiled(session.encrypt(x)))
    assert stats["encodes"] - before == 2 * per_call


# --------------------------------------------------------------------------------------------- 2. key fingerprints
@pytest.mark.parametrize("range_slack", ["default", None])
def test_decrypt_under_another_sessions_keys_is_refused(latency, range_slack) -> None:
    compiled, _, x, x_enc, _ = latency
    other = privml.Session(compiled.plan) if range_slack == "default" else privml.Session(compiled.plan, None)
    with pytest.raises(KeyMaterialError, match="another key set"):
        other.decrypt(x_enc)
    with pytest.raises(KeyMaterialError, match="another key set"):
        other.decrypt(compiled(x_enc))


def test_bytes_from_another_session_are_refused(latency) -> None:
    compiled, _, _, _, request = latency
    other = privml.Session(compiled.plan)
    with pytest.raises(KeyMaterialError):
        other.backend.loads(request)
    server = CKKSServer(compiled.plan, other.backend.public_context())
    with pytest.raises(KeyMaterialError):
        server.run(compiled, request)


# --------------------------------------------------------------------------------------------- 3. crafted inputs
CRAFTED_HEADERS = {
    "huge int": b'{"shape": [100000000000000000000000000000, 6], "layout": "latency", "expanded": false}',
    "int64 overflow": b'{"shape": [2, 9223372036854775807, 9223372036854775807], "layout": "latency"}',
    "thousands of digits": b'{"shape": [' + b"9" * 3000 + b'], "layout": "latency"}',
    "deep nesting": b'{"shape": ' + b"[" * 2000 + b"]" * 2000 + b', "layout": "latency"}',
    "shape a string": b'{"shape": "26", "layout": "latency"}',
    "shape floats": b'{"shape": [2.0, 6.0], "layout": "latency"}',
    "shape bools": b'{"shape": [true, 6], "layout": "latency"}',
    "shape nested": b'{"shape": [[2], 6], "layout": "latency"}',
    "zero dim": b'{"shape": [2, 0], "layout": "latency"}',
    "no dims": b'{"shape": [], "layout": "latency"}',
    "layout an int": b'{"shape": [2, 6], "layout": 5}',
    "layout a list": b'{"shape": [2, 6], "layout": ["latency"]}',
    "expanded a string": b'{"shape": [2, 6], "layout": "latency", "expanded": "yes"}',
    "header a list": b'[[2, 6], "latency"]',
    "header a number": b"1e999999",
    "unknown field": b'{"shape": [2, 6], "layout": "latency", "levels": 3}',
    "not utf-8": b'{"shape": [2, 6], "layout": "\xff\xfe"}',
    "too many slots": b'{"shape": [2, 100000], "layout": "latency"}',
    "NaN": b'{"shape": [NaN, 6], "layout": "latency"}',
}


@pytest.mark.parametrize("name", sorted(CRAFTED_HEADERS))
def test_crafted_header_is_malformed_input(latency, name: str) -> None:
    _, session, _, _, request = latency
    _, body = split_tensor_bytes(request)
    with pytest.raises(MalformedInput):
        session.backend.loads(tensor_bytes(CRAFTED_HEADERS[name], body))


@pytest.mark.parametrize("kind", ["ntt flag cleared", "all zero"])
def test_server_refuses_a_crafted_ciphertext(latency, kind: str) -> None:
    compiled, session, _, x_enc, request = latency
    ctx = session.backend.ctx
    ct = x_enc.payload[0]
    assert serialize.load_ciphertexts(ctx, serialize._pack(serialize.KIND_CIPHERTEXTS, 0, ctx.fingerprint,
                                                           [raw_ciphertext(ct)]))  # the raw writer is faithful
    blob = raw_ciphertext(ct, ntt=False) if kind == "ntt flag cleared" else raw_ciphertext(ct, zero=True)
    with pytest.raises(MalformedInput):
        server(latency).run(compiled, with_first_ciphertext(request, ctx, blob))


def test_empty_batch_is_refused(latency) -> None:
    """SEAL raised a bare RuntimeError for it (np.stack of nothing at decrypt, a zero-length reshape before)."""
    _, session, _, _, _ = latency
    for empty in (torch.empty(0, 6), torch.empty(2, 0)):
        with pytest.raises(InvalidInput, match="empty batch"):
            session.backend.encrypt(empty)
    with pytest.raises(InvalidInput, match="empty batch"):  # and through the public API
        session.encrypt(torch.empty(0, 6))


def test_forged_throughput_response_with_more_rows_is_refused() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 3)).eval()
    compiled = privml.compile(model, torch.randn(64, 6), backend="ckks", layout="throughput")
    session = privml.Session(compiled.plan, range_slack=None)
    x = torch.randn(2, 6)
    server = CKKSServer(compiled.plan, session.backend.public_context())
    response = server.run(compiled, session.backend.dumps(session.encrypt(x)))
    assert (session.decrypt(session.backend.loads(response)) - compiled(x)).abs().max() < TOL
    header, body = split_tensor_bytes(response)
    assert header["shape"] == [2, 3]
    forged = session.backend.loads(tensor_bytes({**header, "shape": [1000, 3]}, body))  # well-formed bytes
    with pytest.raises(MalformedInput, match="batch of 1000"):
        session.decrypt(forged)


# --------------------------------------------------------------------------------------------- 4. fuzz
def _mutate(rng: random.Random, request: bytes) -> tuple[int, bytes]:
    """Byte flips, truncations, splices (checksum left broken) or header/body rewrites (checksum recomputed)."""
    header, body = split_tensor_bytes(request)
    kind = rng.randrange(7)
    b = bytearray(request)
    if kind == 0:
        return kind, bytes(b[:rng.randrange(len(b))])
    if kind == 1:
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return kind, bytes(b)
    if kind == 2:  # header field rewrite, re-checksummed
        field = rng.choice(["shape", "layout", "expanded", "extra"])
        value = rng.choice([[2, 6], [2, 3], [1, 6], [2, 2, 3], [4, 6], [2, 6, 1], [], [0], [-1, 6], [2 ** 70, 6],
                            "latency", "throughput", True, False, None, 1.5, "x" * rng.randrange(50), {"a": 1}])
        return kind, tensor_bytes({**header, field: value}, body)
    if kind == 3:  # raw header bytes edited, re-checksummed
        raw = bytearray(json.dumps(header).encode())
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return kind, tensor_bytes(bytes(raw), body)
    if kind in (4, 5):  # body edited, every checksum recomputed: 4 structure (lengths, headers), 5 anywhere
        inner = bytearray(body[:-32])
        spots = [i for start, n in _sections(body) for i in range(start - 8, start + 16)]
        i = rng.choice(spots) if kind == 4 else rng.randrange(len(inner))
        inner[i] = rng.randrange(256)
        if rng.randrange(4) == 0:
            inner = inner[:rng.randrange(len(inner))]
        return kind, tensor_bytes(header, bytes(inner) + serialize._checksum(bytes(inner)))
    if rng.randrange(2):
        return kind, tensor_bytes(header, body, version=rng.choice([0, 2, 65535]))  # other format versions
    return kind, rng.randbytes(rng.randrange(1, 400))


def _sections(body: bytes) -> list[tuple[int, int]]:
    """(start, length) of each section of a ``serialize`` ciphertext blob."""
    count = struct.unpack_from("<I", body, 44)[0]
    pos, out = 48, []
    for _ in range(count):
        (n,) = struct.unpack_from("<Q", body, pos)
        out.append((pos + 8, n))
        pos += 8 + n
    return out


def _fuzz(latency, n: int, seed: int, budget_s: float) -> dict[str, int]:
    _, session, x, _, request = latency
    rng = random.Random(seed)
    outcomes: dict[str, int] = {}
    start = time.monotonic()
    expect = x.reshape(2, -1)
    for i in range(n):
        kind, data = _mutate(rng, request)
        try:
            t = session.backend.loads(data)
            got = session.backend.decrypt(t).reshape(t.shape[0], -1)
            assert t.shape[0] == 2 and got.shape[1] <= expect.shape[1], (i, t.shape)
            assert torch.isfinite(got).all(), (i, kind)
            same = (got - expect[:, :got.shape[1]]).abs().max() < TOL
            # Rewritten ciphertext data with recomputed checksums can decrypt to other finite values: CKKS is
            # malleable and the checksum is no MAC (any server can return any valid ciphertext). Nothing else may.
            assert same or kind == 5, (i, kind)
            outcome = "round trip" if same else "altered ciphertext, finite values"
        except PrivmlError as err:
            outcome = type(err).__name__
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        assert time.monotonic() - start < budget_s, f"fuzzing too slow: {i} cases"
    return outcomes


def test_fuzz_tensor_bytes_fast(latency) -> None:
    outcomes = _fuzz(latency, 300, seed=1, budget_s=30)
    assert outcomes.get("MalformedInput", 0) > 200, outcomes


@pytest.mark.slow
def test_fuzz_tensor_bytes_many(latency) -> None:
    outcomes = _fuzz(latency, 5000, seed=2, budget_s=120)
    assert sum(outcomes.values()) == 5000 and outcomes.get("MalformedInput", 0) > 3300, outcomes
