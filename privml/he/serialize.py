"""Versioned binary formats for CKKS contexts and ciphertexts.

Layout (little endian)::

    magic   8 bytes  b"PRIVMLHE"
    version u16      FORMAT_VERSION
    kind    u8       1 = context, 2 = ciphertexts
    flags   u8       bit 0: a secret key is included (contexts only)
    fp      32 bytes context fingerprint (blake2b of params + public key)
    count   u32      number of sections
    count x (u64 length, payload)
    check   32 bytes blake2b over everything above

Loading never hands unchecked bytes to SEAL (it can allocate without bound or crash
on garbage): the checksum, every length, the SEAL header of each blob and an upper
bound of its decompressed size (from the zstd block headers) are verified first, and
SEAL's own validity checks run after.  Anything wrong raises ``MalformedInput``;
ciphertexts made under another key set raise ``KeyMaterialError``.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from typing import Any

from privml.errors import InvalidInput, KeyMaterialError, MalformedInput
from privml.he.context import CKKSContext
from privml.he.keys import KeySet, build_seal_context, fingerprint_of, galois_elt
from privml.he.params import CKKSParams
from privml.he.sealio import seal, seal_from_bytes, seal_to_bytes

MAGIC = b"PRIVMLHE"
FORMAT_VERSION = 1
KIND_CONTEXT = 1
KIND_CIPHERTEXTS = 2
FLAG_SECRET = 1

_HEADER = struct.Struct("<8sHBB32sI")
_LEN = struct.Struct("<Q")
_CHECK = 32
_MAX_SECTIONS = 1 << 20
_META_MAX = 1 << 16

_SEAL_HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, major, minor, compr mode, reserved, size
_SEAL_MAGIC = 0xA15E
_COMPR_NONE, _COMPR_ZSTD = 0, 2
_SLACK = 4096  # metadata bytes per SEAL object, beyond its coefficient data


def _checksum(data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=_CHECK, person=b"privml-he-v1").digest()


def _pack(kind: int, flags: int, fingerprint: bytes, sections: list[bytes]) -> bytes:
    parts = [_HEADER.pack(MAGIC, FORMAT_VERSION, kind, flags, fingerprint, len(sections))]
    for s in sections:
        parts.append(_LEN.pack(len(s)))
        parts.append(s)
    body = b"".join(parts)
    return body + _checksum(body)


def _unpack(data: Any, kind: int) -> tuple[int, bytes, list[memoryview]]:
    """Check magic, version, checksum and lengths; return (flags, fingerprint, sections)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MalformedInput(f"expected bytes, got {type(data).__name__}")
    buf = memoryview(bytes(data))
    if len(buf) < _HEADER.size + _CHECK:
        raise MalformedInput(f"{len(buf)} bytes is too short for a privml HE blob")
    magic, version, got_kind, flags, fp, count = _HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise MalformedInput("not a privml HE blob (bad magic)")
    if version != FORMAT_VERSION:
        raise MalformedInput(f"unsupported format version {version} (this privml reads {FORMAT_VERSION})")
    body = buf[: len(buf) - _CHECK]
    if _checksum(body) != bytes(buf[len(buf) - _CHECK :]):
        raise MalformedInput("checksum mismatch: the bytes are truncated or were modified")
    if got_kind != kind:
        names = {KIND_CONTEXT: "context", KIND_CIPHERTEXTS: "ciphertexts"}
        raise MalformedInput(f"expected a {names.get(kind)} blob, got kind {got_kind}")
    if count > _MAX_SECTIONS:
        raise MalformedInput(f"implausible section count {count}")
    sections = []
    pos = _HEADER.size
    for _ in range(count):
        if pos + _LEN.size > len(body):
            raise MalformedInput("truncated section header")
        (n,) = _LEN.unpack_from(body, pos)
        pos += _LEN.size
        if n > len(body) - pos:
            raise MalformedInput("section length runs past the end of the data")
        sections.append(body[pos : pos + n])
        pos += n
    if pos != len(body):
        raise MalformedInput("trailing bytes after the last section")
    return flags, bytes(fp), sections


def _zstd_bound(buf: memoryview) -> int:
    """Upper bound of the decompressed size of zstd frames, read from block headers (RFC 8878)."""
    pos, total, n = 0, 0, len(buf)

    def need(k: int) -> None:
        if pos + k > n:
            raise MalformedInput("truncated compressed stream")

    while pos < n:
        need(4)
        magic = int.from_bytes(buf[pos : pos + 4], "little")
        if (magic & 0xFFFFFFF0) == 0x184D2A50:  # skippable frame
            need(8)
            pos += 8 + int.from_bytes(buf[pos + 4 : pos + 8], "little")
            if pos > n:
                raise MalformedInput("truncated compressed stream")
            continue
        if magic != 0xFD2FB528:
            raise MalformedInput("bad compressed frame")
        pos += 4
        need(1)
        fhd = buf[pos]
        pos += 1
        if fhd & 0x08:
            raise MalformedInput("bad compressed frame header")
        single = (fhd >> 5) & 1
        window = 1 << 17
        if not single:
            need(1)
            wd = buf[pos]
            pos += 1
            base = 1 << (10 + (wd >> 3))
            window = base + (base >> 3) * (wd & 7)
        pos += (0, 1, 2, 4)[fhd & 3]
        fcs_len = ((1 if single else 0), 2, 4, 8)[fhd >> 6]
        need(fcs_len)
        fcs = int.from_bytes(buf[pos : pos + fcs_len], "little") + (256 if fcs_len == 2 else 0)
        pos += fcs_len
        if single:  # the decoder's window (and output) is exactly the declared content size
            window = fcs
        block_max = min(window, 1 << 17)
        frame_total = 0
        while True:
            need(3)
            hdr = int.from_bytes(buf[pos : pos + 3], "little")
            pos += 3
            last, btype, bsize = hdr & 1, (hdr >> 1) & 3, hdr >> 3
            if btype == 3 or (btype != 2 and bsize > block_max):
                raise MalformedInput("bad compressed block")
            frame_total += bsize if btype != 2 else block_max
            pos += bsize if btype != 1 else 1
            need(0)
            if last:
                break
        # A declared content size is enforced by the decoder (it stops with an error beyond it).
        total += min(frame_total, fcs) if fcs_len else frame_total
        if (fhd >> 2) & 1:
            pos += 4
            need(0)
    return total


def _seal_blob(data: memoryview, max_raw: int, what: str) -> bytes:
    """Validate a SEAL-serialized object's header and size bound before SEAL sees it."""
    if len(data) < _SEAL_HEADER.size:
        raise MalformedInput(f"{what}: truncated SEAL header")
    magic, hsize, major, _minor, compr, reserved, size = _SEAL_HEADER.unpack_from(data, 0)
    if magic != _SEAL_MAGIC or hsize != _SEAL_HEADER.size or reserved != 0 or major != _seal_major():
        raise MalformedInput(f"{what}: bad SEAL header")
    if size != len(data):
        raise MalformedInput(f"{what}: SEAL header says {size} bytes, section has {len(data)}")
    payload = data[_SEAL_HEADER.size :]
    if compr == _COMPR_ZSTD:
        raw = _zstd_bound(payload)
    elif compr == _COMPR_NONE:
        raw = len(payload)
    else:
        raise MalformedInput(f"{what}: unsupported SEAL compression mode {compr}")
    if raw > max_raw:
        raise MalformedInput(f"{what}: decompresses to up to {raw} bytes, more than the {max_raw} expected")
    return bytes(data)


_MAJOR: list[int] = []


def _seal_major() -> int:
    if not _MAJOR:
        _MAJOR.append(_SEAL_HEADER.unpack_from(seal_to_bytes(seal.Plaintext()), 0)[2])
    return _MAJOR[0]


# ---------------------------------------------------------------------------------------------
# contexts


def _poly_bytes(params: CKKSParams, primes: int) -> int:
    return 8 * params.poly_modulus_degree * primes


def dump_context(ctx: CKKSContext, include_secret: bool = False) -> bytes:
    """Serialize params, public key, relinearization and Galois keys (and the secret key only on request)."""
    if include_secret and not ctx.has_secret_key:
        raise KeyMaterialError("include_secret=True but this context holds no secret key")
    meta = json.dumps({"params": ctx.params.to_dict(), "rotation_steps": sorted(ctx.rotation_steps)}).encode()
    keys = ctx.keys
    galois = seal_to_bytes(keys.galois_keys) if keys.rotation_steps else b""
    sections = [meta, seal_to_bytes(keys.public_key), seal_to_bytes(keys.relin_keys), galois]
    if include_secret:
        sections.append(seal_to_bytes(keys.secret_key))
    return _pack(KIND_CONTEXT, FLAG_SECRET if include_secret else 0, ctx.fingerprint, sections)


def load_context(data: bytes, allow_insecure: bool = False) -> CKKSContext:
    """Rebuild a context from :func:`dump_context` bytes (public unless the secret key was included).

    Parameters beyond the 128-bit HE standard are refused unless ``allow_insecure``.
    """
    flags, fp, sections = _unpack(data, KIND_CONTEXT)
    if flags & ~FLAG_SECRET:
        raise MalformedInput(f"unknown context flags {flags:#x}")
    has_secret = bool(flags & FLAG_SECRET)
    if len(sections) != (5 if has_secret else 4):
        raise MalformedInput(f"a context has {5 if has_secret else 4} sections, got {len(sections)}")
    if len(sections[0]) > _META_MAX:
        raise MalformedInput("context metadata too large")
    try:
        meta = json.loads(bytes(sections[0]).decode("utf-8"))
        params = CKKSParams.from_dict(meta["params"])
        steps = [int(s) for s in meta["rotation_steps"]]
    except (ValueError, KeyError, TypeError, InvalidInput, UnicodeDecodeError) as exc:
        raise MalformedInput(f"bad context metadata: {exc}") from exc
    except Exception as exc:  # BudgetError etc. from params.check()
        raise MalformedInput(f"context parameters are invalid: {exc}") from exc
    if params.security_bits < 128 and not allow_insecure:
        raise MalformedInput(
            f"the context's parameters {list(params.coeff_mod_bit_sizes)} (N={params.poly_modulus_degree}) "
            "are below 128-bit security; pass allow_insecure=True to load them anyway"
        )
    if len(steps) > params.slots or any(not 0 < s < params.slots for s in steps):
        raise MalformedInput("bad rotation steps in context metadata")

    pk_bytes = bytes(sections[1])
    if fingerprint_of(params, pk_bytes) != fp:
        raise MalformedInput("context fingerprint does not match its parameters and public key")
    n_key = len(params.coeff_mod_bit_sizes)
    key_size = 2 * _poly_bytes(params, n_key) + _SLACK
    seal_ctx = build_seal_context(params)
    pk = seal_from_bytes(seal.PublicKey(), seal_ctx, _seal_blob(sections[1], key_size, "public key"))
    rk_bound = (n_key - 1) * key_size + _SLACK
    rk = seal_from_bytes(seal.RelinKeys(), seal_ctx, _seal_blob(sections[2], rk_bound, "relinearization keys"))
    gk = seal.GaloisKeys()
    if steps:
        gk_bound = len(steps) * rk_bound + 8 * params.poly_modulus_degree + _SLACK
        seal_from_bytes(gk, seal_ctx, _seal_blob(sections[3], gk_bound, "Galois keys"))
        missing = [s for s in steps if not gk.has_key(galois_elt(s, params.poly_modulus_degree))]
        if missing:
            raise MalformedInput(f"Galois keys lack the listed rotation steps {missing}")
    elif len(sections[3]):
        raise MalformedInput("Galois key bytes present but no rotation steps listed")
    sk = None
    if has_secret:
        sk_bound = _poly_bytes(params, n_key) + _SLACK
        sk = seal_from_bytes(seal.SecretKey(), seal_ctx, _seal_blob(sections[4], sk_bound, "secret key"))
    ctx = CKKSContext(KeySet(params, seal_ctx, pk, rk, gk, steps, secret_key=sk, fingerprint=fp))
    if sk is not None:
        probe = [0.5, -0.25, 0.125]
        got = ctx.decrypt(ctx.encrypt(probe))[:3]
        if max(abs(a - b) for a, b in zip(got, probe, strict=True)) > 1e-3:
            raise KeyMaterialError("the secret key in this context does not match its public key")
    return ctx


# ---------------------------------------------------------------------------------------------
# ciphertexts


def dump_ciphertexts(ctx: CKKSContext, cts: list) -> bytes:
    """Serialize ciphertexts of ``ctx`` (bound to its fingerprint)."""
    sections = []
    for i, ct in enumerate(cts):
        ctx.level(ct)
        if ct.size() != 2:
            raise InvalidInput(f"ciphertext {i} has size {ct.size()}: relinearize before serializing")
        sections.append(seal_to_bytes(ct))
    return _pack(KIND_CIPHERTEXTS, 0, ctx.fingerprint, sections)


def load_ciphertexts(ctx: CKKSContext, data: bytes) -> list:
    """Load :func:`dump_ciphertexts` bytes, checking they belong to ``ctx`` and are well formed."""
    flags, fp, sections = _unpack(data, KIND_CIPHERTEXTS)
    if flags:
        raise MalformedInput(f"unknown ciphertext flags {flags:#x}")
    if fp != ctx.fingerprint:
        raise KeyMaterialError("these ciphertexts were made under a different key set (context fingerprint mismatch)")
    params = ctx.params
    bound = 2 * _poly_bytes(params, ctx.max_level + 1) + _SLACK
    out = []
    for i, sec in enumerate(sections):
        ct = seal_from_bytes(seal.Ciphertext(), ctx.seal_context, _seal_blob(sec, bound, f"ciphertext {i}"))
        if ct.size() != 2:
            raise MalformedInput(f"ciphertext {i} has size {ct.size()}, expected 2")
        if not ct.is_ntt_form():  # SEAL's CKKS evaluator refuses these later with a bare ValueError
            raise MalformedInput(f"ciphertext {i} is not in NTT form (CKKS ciphertexts always are)")
        if ct.is_transparent():  # c1 == 0: "encrypts" its value in the clear, and SEAL refuses to compute on it
            raise MalformedInput(f"ciphertext {i} is transparent (its second polynomial is zero)")
        try:
            lvl = ctx.level(ct)
        except KeyMaterialError as exc:
            raise MalformedInput(f"ciphertext {i} is not on this context's modulus chain") from exc
        if not (seal.is_metadata_valid_for(ct, ctx.seal_context) and seal.is_valid_for(ct, ctx.seal_context)):
            raise MalformedInput(f"ciphertext {i} is not valid for this context")
        s = ct.scale
        if not (math.isfinite(s) and s >= 2.0 ** (params.scale_bits - 8)):
            raise MalformedInput(f"ciphertext {i} has an implausible scale {s!r}")
        if math.log2(s) >= ctx.chain.bits(lvl) - 1:
            raise MalformedInput(f"ciphertext {i}: scale 2^{math.log2(s):.1f} exceeds its level's modulus")
        out.append(ct)
    return out
