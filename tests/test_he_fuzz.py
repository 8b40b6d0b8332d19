"""Fuzzing the HE loaders: mutated bytes must end in MalformedInput / KeyMaterialError, never a crash or hang.

Two kinds of mutation:
* plain (truncation, bit flips, header edits, random bytes, splices): the checksum catches
  every one of them deterministically, so nothing may load;
* crafted (mutate, then recompute the checksum, as an attacker who knows the format would):
  these reach the length checks, the SEAL header / zstd bound checks and SEAL's own
  validation.  They must not crash or hang; loading may succeed only when SEAL finds the
  bytes a valid ciphertext (the format is integrity-checked, not authenticated).
"""

from __future__ import annotations

import struct

import numpy as np
import pytest

from privml.errors import KeyMaterialError, MalformedInput
from privml.he import serialize
from privml.he.context import CKKSContext
from privml.he.params import choose_params

OK_ERRORS = (MalformedInput, KeyMaterialError)


@pytest.fixture(scope="module")
def blobs() -> dict:
    params = choose_params(1, precision_bits=12, poly_modulus_degree=4096)
    ctx = CKKSContext.generate(params, rotation_steps=[1])
    rng = np.random.default_rng(0)
    cts = serialize.dump_ciphertexts(ctx, [ctx.encrypt(rng.uniform(-1, 1, 100)), ctx.encrypt(np.ones(3))])
    return {"ctx": ctx, "cts": cts, "context": serialize.dump_context(ctx)}


def section_offsets(blob: bytes) -> list[tuple[int, int]]:
    """(start, length) of each section payload."""
    count = struct.unpack_from("<I", blob, 44)[0]
    pos, out = 48, []
    for _ in range(count):
        (n,) = struct.unpack_from("<Q", blob, pos)
        out.append((pos + 8, n))
        pos += 8 + n
    return out


def plain_mutation(rng: np.random.Generator, blob: bytes) -> bytes:
    kind = rng.integers(7)
    b = bytearray(blob)
    if kind == 0:  # truncation
        return bytes(b[: rng.integers(len(b))])
    if kind == 1:  # bit flips anywhere
        for _ in range(rng.integers(1, 9)):
            i = int(rng.integers(len(b)))
            b[i] ^= 1 << int(rng.integers(8))
        return bytes(b)
    if kind == 2:  # header edits (magic, version, kind, flags, fingerprint, count)
        i = int(rng.integers(48))
        b[i] = (b[i] + int(rng.integers(1, 256))) % 256
        return bytes(b)
    if kind == 3:  # random bytes, sometimes behind a valid magic and version
        junk = rng.bytes(int(rng.integers(0, 4096)))
        return (blob[:12] + junk) if rng.integers(2) else junk
    if kind == 4:  # junk appended
        return bytes(b) + rng.bytes(int(rng.integers(1, 64)))
    if kind == 5:  # a chunk cut out of the middle
        i = int(rng.integers(len(b) - 1))
        j = min(len(b), i + int(rng.integers(1, 5000)))
        return bytes(b[:i] + b[j:])
    i = int(rng.integers(48, len(b) - 8))  # a length-like field overwritten
    b[i : i + 8] = struct.pack("<Q", int(rng.choice([0, 1, 2**63, 2**32, len(b)])))
    return bytes(b)


def crafted_mutation(rng: np.random.Generator, blob: bytes) -> bytes:
    """Edit a structural byte (our lengths, a SEAL header, a zstd frame/block header) and re-checksum."""
    body = bytearray(blob[:-32])
    secs = section_offsets(blob)
    start, n = secs[int(rng.integers(len(secs)))]
    spots = list(range(start - 8, start)) + list(range(start, start + min(n, 40)))  # length + headers
    i = int(rng.choice(spots)) if rng.integers(4) else int(rng.integers(start, start + n))
    body[i] = (body[i] + int(rng.integers(1, 256))) % 256 if rng.integers(2) else body[i] ^ 0xFF
    if rng.integers(5) == 0:
        body = body[: int(rng.integers(len(body)))]
    body = bytes(body)
    return body + serialize._checksum(body)


def run(load, data: bytes, blob: bytes, crafted: bool) -> str:
    if data == blob:
        return "same"
    try:
        load(data)
    except OK_ERRORS:
        return "refused"
    if not crafted:
        raise AssertionError("mutated bytes with a broken checksum were accepted")
    return "accepted-valid"


def fuzz(blobs: dict, n_plain: int, n_crafted: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    ctx = blobs["ctx"]
    outcomes: dict[str, int] = {}
    targets = [
        (lambda d: serialize.load_ciphertexts(ctx, d), blobs["cts"], 4),
        (serialize.load_context, blobs["context"], 1),
    ]
    for i in range(n_plain + n_crafted):
        load, blob, _ = targets[0] if i % 5 else targets[1]
        crafted = i >= n_plain
        data = crafted_mutation(rng, blob) if crafted else plain_mutation(rng, blob)
        key = run(load, data, blob, crafted)
        outcomes[key] = outcomes.get(key, 0) + 1
    return outcomes


@pytest.mark.timeout(120)
def test_fuzz_fast(blobs: dict) -> None:
    outcomes = fuzz(blobs, n_plain=150, n_crafted=60, seed=1)
    assert outcomes.get("refused", 0) >= 190, outcomes


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_fuzz_many(blobs: dict) -> None:
    outcomes = fuzz(blobs, n_plain=2500, n_crafted=1500, seed=2)
    assert outcomes.get("refused", 0) >= 3500, outcomes


def test_decompression_bomb_is_refused_before_seal(blobs: dict) -> None:
    """A well-formed zstd stream of RLE blocks (4 bytes each inflate to 128 KiB) is refused from its headers."""
    ctx, blob = blobs["ctx"], blobs["cts"]
    start, _ = section_offsets(blob)[0]
    seal_header = bytearray(blob[start : start + 16])
    block = ((1 << 17) << 3) | (1 << 1)  # RLE block of 128 KiB
    frame = struct.pack("<I", 0xFD2FB528) + bytes([0x00, 88])  # no content size, 2 MiB window
    frame += (struct.pack("<I", block)[:3] + b"\0") * 9999 + struct.pack("<I", block | 1)[:3] + b"\0"
    seal_header[8:16] = struct.pack("<Q", 16 + len(frame))
    data = serialize._pack(serialize.KIND_CIPHERTEXTS, 0, ctx.fingerprint, [bytes(seal_header) + frame])
    with pytest.raises(MalformedInput, match="decompresses to up to"):
        serialize.load_ciphertexts(ctx, data)
