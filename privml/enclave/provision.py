"""Key provisioning (client -> attested enclave) and sealing of provisioned keys at rest.

Provisioning: the client encrypts the CKKS secret context to the X25519 key of a *verified*
attestation: its own ephemeral X25519 key, the shared secret, HKDF-SHA256 (info binding both public
keys and the attestation nonce), AES-256-GCM with the key id and the policy as associated data.
The enclave keeps each attestation's private key for one provisioning only, and a few minutes at
most, so a replayed message finds no key.

Sealing: records are AES-256-GCM encrypted under HKDF(device secret, salt, info=PCR0||PCR1), so an
enclave with other code or configuration cannot read them (real TEEs derive this from fused keys).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from privml.enclave import protocol
from privml.enclave.attest import Attestation
from privml.enclave.policy import Policy
from privml.errors import AttestationError, KeyMaterialError, MalformedInput

KEY_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
TOKEN_BYTES = 32
PROVISION_INFO = b"privml-enclave-provision-v1"
SEAL_INFO = b"privml-enclave-seal-v1"
SEAL_MAGIC = b"PVSEAL1\0"
DEVICE_SECRET = "device_secret"
PROVISION_FIELDS = {"enclave_public_key", "client_public_key", "nonce", "key_id", "policy", "iv", "ciphertext"}


def check_key_id(key_id: Any) -> str:
    if not isinstance(key_id, str) or not KEY_ID_RE.match(key_id):
        raise MalformedInput("key_id must be 1-64 characters of [A-Za-z0-9_-]")
    return key_id


def _raw(pub: X25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _provision_key(shared: bytes, enclave_pub: bytes, client_pub: bytes, nonce: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=None,
                info=PROVISION_INFO + enclave_pub + client_pub + nonce).derive(shared)


def _aad(key_id: str, policy_cbor: bytes) -> bytes:
    return protocol.dumps([PROVISION_INFO, key_id, policy_cbor])


# ----------------------------------------------------------------------------- client side


def provisioning_message(attestation: Attestation, secret_context: bytes, policy: Policy, key_id: str,
                         server_token: bytes) -> dict:
    """The ``provision`` request body: ``secret_context`` and the server token, sealed to the attested key."""
    check_key_id(key_id)
    enclave_pub = attestation.public_key
    eph = X25519PrivateKey.generate()
    client_pub = _raw(eph.public_key())
    shared = eph.exchange(X25519PublicKey.from_public_bytes(enclave_pub))
    key = _provision_key(shared, enclave_pub, client_pub, attestation.nonce)
    policy_cbor = policy.to_cbor()
    iv = os.urandom(12)
    plaintext = protocol.dumps({"secret_context": bytes(secret_context), "server_token": bytes(server_token)})
    ct = AESGCM(key).encrypt(iv, plaintext, _aad(key_id, policy_cbor))
    return {"enclave_public_key": enclave_pub, "client_public_key": client_pub, "nonce": attestation.nonce,
            "key_id": key_id, "policy": policy_cbor, "iv": iv, "ciphertext": ct}


# ----------------------------------------------------------------------------- enclave side


class EphemeralKeys:
    """Attestation X25519 keys awaiting their one provisioning (expire after ``ttl_s``)."""

    def __init__(self, ttl_s: float, max_keys: int) -> None:
        self.ttl_s, self.max_keys = ttl_s, max_keys
        self._keys: OrderedDict[bytes, tuple[X25519PrivateKey, bytes, float]] = OrderedDict()
        self._lock = threading.Lock()

    def new(self, nonce: bytes) -> bytes:
        key = X25519PrivateKey.generate()
        pub = _raw(key.public_key())
        with self._lock:
            self._expire()
            while len(self._keys) >= self.max_keys:
                self._keys.popitem(last=False)
            self._keys[pub] = (key, bytes(nonce), time.monotonic())
        return pub

    def _expire(self) -> None:
        now = time.monotonic()
        for pub in [p for p, (_, _, t) in self._keys.items() if now - t > self.ttl_s]:
            del self._keys[pub]

    def take(self, pub: bytes) -> tuple[X25519PrivateKey, bytes]:
        """Remove and return the key for ``pub`` (single use); AttestationError if unknown/used/expired."""
        with self._lock:
            self._expire()
            item = self._keys.pop(bytes(pub), None)
        if item is None:
            raise AttestationError("provisioning refused: the attestation key is unknown, expired or already "
                                   "used (attest again; provisioning messages are single use)")
        return item[0], item[1]


def open_provisioning(keys: EphemeralKeys, body: dict) -> tuple[str, Policy, bytes, bytes]:
    """Decrypt a provisioning body: (key_id, policy, secret context bytes, server token)."""
    protocol.only_fields(body, PROVISION_FIELDS)
    enclave_pub = protocol.field(body, "enclave_public_key", bytes, max_len=32)
    client_pub = protocol.field(body, "client_public_key", bytes, max_len=32)
    nonce = protocol.field(body, "nonce", bytes, max_len=64)
    key_id = check_key_id(protocol.field(body, "key_id", str))
    policy_cbor = protocol.field(body, "policy", bytes, max_len=4096)
    iv = protocol.field(body, "iv", bytes, max_len=12)
    ct = protocol.field(body, "ciphertext", bytes)
    if len(enclave_pub) != 32 or len(client_pub) != 32 or len(iv) != 12:
        raise MalformedInput("provisioning keys must be 32 bytes and the IV 12 bytes")
    priv, want_nonce = keys.take(enclave_pub)  # consumed even if what follows fails
    if nonce != want_nonce:
        raise AttestationError("provisioning refused: the nonce differs from the attestation's")
    try:
        shared = priv.exchange(X25519PublicKey.from_public_bytes(client_pub))
    except ValueError as exc:
        raise MalformedInput("bad client public key") from exc
    key = _provision_key(shared, enclave_pub, client_pub, nonce)
    try:
        plaintext = AESGCM(key).decrypt(iv, ct, _aad(key_id, policy_cbor))
    except InvalidTag as exc:
        raise MalformedInput("provisioning message fails authentication (tampered or not for this enclave)") from exc
    policy = Policy.from_cbor(policy_cbor)
    inner = protocol.loads(plaintext)
    if not isinstance(inner, dict) or set(inner) != {"secret_context", "server_token"}:
        raise MalformedInput("provisioning payload must hold exactly secret_context and server_token")
    secret, token = inner["secret_context"], inner["server_token"]
    if not isinstance(secret, bytes) or not isinstance(token, bytes) or len(token) != TOKEN_BYTES:
        raise MalformedInput(f"provisioning payload: secret_context bytes and a {TOKEN_BYTES}-byte server_token")
    return key_id, policy, secret, token


def token_hash(token: bytes) -> bytes:
    return hashlib.sha256(b"privml-server-token\0" + bytes(token)).digest()


class Sealer:
    """Seal/unseal records under a key bound to the device secret and to PCR0 || PCR1."""

    def __init__(self, state_dir: str | Path, pcr0: bytes, pcr1: bytes) -> None:
        path = Path(state_dir) / DEVICE_SECRET
        if not path.exists():
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(os.urandom(32))
            except FileExistsError:
                pass
        secret = path.read_bytes()
        if len(secret) != 32:
            raise KeyMaterialError("the simulated device secret is not 32 bytes")
        self._secret = secret
        self._info = SEAL_INFO + pcr0 + pcr1

    def _key(self, salt: bytes) -> bytes:
        return HKDF(hashes.SHA256(), 32, salt=salt, info=self._info).derive(self._secret)

    def seal(self, key_id: str, record: dict) -> bytes:
        salt, iv = os.urandom(16), os.urandom(12)
        ct = AESGCM(self._key(salt)).encrypt(iv, protocol.dumps(record), SEAL_MAGIC + key_id.encode())
        return SEAL_MAGIC + salt + iv + ct

    def unseal(self, key_id: str, blob: bytes) -> dict:
        if not blob.startswith(SEAL_MAGIC) or len(blob) < len(SEAL_MAGIC) + 28 + 16:
            raise KeyMaterialError(f"sealed record {key_id}: not a sealed record")
        body = blob[len(SEAL_MAGIC):]
        salt, iv, ct = body[:16], body[16:28], body[28:]
        try:
            raw = AESGCM(self._key(salt)).decrypt(iv, ct, SEAL_MAGIC + key_id.encode())
        except InvalidTag as exc:
            raise KeyMaterialError(f"sealed record {key_id} fails authentication: sealed by an enclave with "
                                   "another measurement (code or configuration) or tampered with") from exc
        record = protocol.loads(raw)
        if not isinstance(record, dict):
            raise KeyMaterialError(f"sealed record {key_id} is malformed")
        return record


def write_sealed(path: Path, blob: bytes) -> None:
    """Atomic, durable replacement of a sealed file (0600)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
