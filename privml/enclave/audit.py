"""Hash-chained, append-only audit log of everything the enclave does, and its client-side check.

Each entry names the operation, who asked (``client``, ``server:<token-hash prefix>``,
``party:<n>``), the key, the ciphertext count and the budget left, and carries the SHA-256 of the
previous entry's canonical CBOR.  The enclave signs (leaf key, COSE_Sign1) the head hash, the
length and the client's nonce, so a verifier detects an edited, dropped (the last one too),
reordered or inserted entry, and a replayed answer.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from privml.enclave import protocol
from privml.enclave.attest import Attestation, cose_sign1, cose_verify1
from privml.errors import AttestationError, AuditLogError, MalformedInput

GENESIS = bytes(32)
ENTRY_FIELDS = ("index", "time", "actor", "op", "key_id", "mode", "count", "budget_left", "prev")
_LEN = struct.Struct(">I")


def entry_hash(entry: dict) -> bytes:
    """SHA-256 of the entry's canonical CBOR."""
    return hashlib.sha256(protocol.dumps(entry)).digest()


class AuditLog:
    """The enclave's log: in memory plus an append-only file (length-prefixed canonical CBOR)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self.entries: list[dict] = []
        self.head = GENESIS
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        pos, good = 0, 0
        while pos + _LEN.size <= len(data):
            (n,) = _LEN.unpack_from(data, pos)
            if pos + _LEN.size + n > len(data):
                break  # torn tail from a crash mid-append: dropped below
            entry = protocol.loads(data[pos + _LEN.size: pos + _LEN.size + n])
            _check_entry(entry, len(self.entries), self.head)
            self.entries.append(entry)
            self.head = entry_hash(entry)
            pos += _LEN.size + n
            good = pos
        if good != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good)

    def append(self, *, actor: str, op: str, key_id: str | None = None, mode: str | None = None,
               count: int = 0, budget_left: int | None = None) -> dict:
        """Add one entry (persisted, fsynced) and return it."""
        with self._lock:
            entry = {"index": len(self.entries), "time": int(time.time() * 1000), "actor": actor, "op": op,
                     "key_id": key_id, "mode": mode, "count": int(count), "budget_left": budget_left,
                     "prev": self.head}
            raw = protocol.dumps(entry)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, _LEN.pack(len(raw)) + raw)
                os.fsync(fd)
            finally:
                os.close(fd)
            self.entries.append(entry)
            self.head = hashlib.sha256(raw).digest()
            return entry

    def signed_head(self, key: ec.EllipticCurvePrivateKey, nonce: bytes) -> tuple[list[dict], bytes]:
        """All entries and a COSE_Sign1 over {head, length, nonce}."""
        with self._lock:
            entries = [dict(e) for e in self.entries]
            payload = {"head": self.head, "length": len(entries), "nonce": bytes(nonce)}
        return entries, cose_sign1(key, protocol.dumps(payload))


def _check_entry(entry: Any, index: int, prev: bytes) -> None:
    if not isinstance(entry, dict) or set(entry) != set(ENTRY_FIELDS):
        raise AuditLogError(f"audit entry {index}: fields are not {list(ENTRY_FIELDS)}")
    types: dict[str, tuple[type, ...]] = {
        "index": (int,), "time": (int,), "actor": (str,), "op": (str,), "key_id": (str, type(None)),
        "mode": (str, type(None)), "count": (int,), "budget_left": (int, type(None)), "prev": (bytes,)}
    for name, typ in types.items():
        if not isinstance(entry[name], typ) or isinstance(entry[name], bool):
            raise AuditLogError(f"audit entry {index}: field {name} has type {type(entry[name]).__name__}")
    if entry["index"] != index:
        raise AuditLogError(f"audit entry at position {index} has index {entry['index']} "
                            "(an entry was dropped, inserted or reordered)")
    if not hmac.compare_digest(entry["prev"], prev):
        raise AuditLogError(f"audit entry {index} does not chain to its predecessor "
                            "(an earlier entry was edited, dropped, inserted or reordered)")


def verify_audit_log(entries: Sequence[dict], signed_head: bytes, *,
                     leaf_public_key: ec.EllipticCurvePublicKey | bytes | None = None,
                     attestation: Attestation | None = None, nonce: bytes) -> bytes:
    """Check the chain and the enclave's signature over (head, length, nonce); returns the head hash.

    The signing key is the attested leaf's (pass the verified ``attestation``) or ``leaf_public_key``
    (a key, or a PEM/DER certificate). AuditLogError on any mismatch.
    """
    if attestation is not None:
        key: Any = attestation.leaf_public_key
    elif isinstance(leaf_public_key, (bytes, bytearray)):
        raw = bytes(leaf_public_key)
        try:
            cert = x509.load_pem_x509_certificate(raw) if raw.lstrip().startswith(b"-----") \
                else x509.load_der_x509_certificate(raw)
        except ValueError as exc:
            raise AuditLogError(f"leaf_public_key: not a PEM or DER certificate ({exc})") from exc
        key = cert.public_key()
    else:
        key = leaf_public_key
    if not isinstance(entries, Sequence) or isinstance(entries, (bytes, str)):
        raise AuditLogError("entries must be a list of audit entries")
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise AuditLogError("verify_audit_log needs the enclave's leaf public key or a verified attestation")
    try:
        payload = protocol.loads(cose_verify1(signed_head, key))
    except (AttestationError, MalformedInput) as exc:
        raise AuditLogError(f"the audit head's signature does not verify: {exc}") from exc
    if not (isinstance(payload, dict) and set(payload) == {"head", "length", "nonce"}
            and isinstance(payload["head"], bytes) and isinstance(payload["length"], int)
            and isinstance(payload["nonce"], bytes)):
        raise AuditLogError("the signed audit head is not {head, length, nonce}")
    if not hmac.compare_digest(payload["nonce"], bytes(nonce)):
        raise AuditLogError("the signed audit head answers a different nonce (stale or replayed)")
    if payload["length"] != len(entries):
        raise AuditLogError(f"the enclave signed a log of {payload['length']} entries, got {len(entries)} "
                            "(entries were dropped or inserted)")
    head = GENESIS
    for i, entry in enumerate(entries):
        _check_entry(entry, i, head)
        head = entry_hash(entry)
    if not hmac.compare_digest(head, payload["head"]):
        raise AuditLogError("the log's head hash differs from the signed head (an entry was edited)")
    return head
