"""A client's secret key at rest: sealed with AES-256-GCM under a key derived from a password or a key file.

``seal(data, password=...)`` derives the key with scrypt (n=2^15, r=8, p=1; a fresh 16-byte salt), ``key_file=``
with HKDF-SHA256 from a file of at least 32 random bytes (:func:`new_key_file` writes one). The header
(format, KDF and its parameters, salt, nonce) is authenticated as associated data, so a changed header, a
flipped byte or the wrong password all give the same ``KeyMaterialError`` and never a partial key.

Low layer: ``cryptography`` and the standard library only.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from privml.errors import InvalidInput, KeyMaterialError, MalformedInput

MAGIC = b"PRIVMLKEY1"
SCRYPT = {"n": 1 << 15, "r": 8, "p": 1}
MIN_KEY_FILE_BYTES = 32
MAX_HEADER = 4096


def new_key_file(path: str | Path) -> Path:
    """Write 32 random bytes to ``path`` (mode 0600) for ``key_file=``; refuses to overwrite."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(32))
    return path


def _derive(header: dict, password: str | bytes | None, key_file: str | Path | None) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    salt = bytes.fromhex(header["salt"])
    if header["kdf"] == "scrypt":
        if password is None:
            raise KeyMaterialError("privml: these keys are sealed with a password: pass password=")
        secret = password.encode() if isinstance(password, str) else bytes(password)
        n, r, p = int(header["n"]), int(header["r"]), int(header["p"])
        if not (1 << 14 <= n <= 1 << 20 and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16):
            raise MalformedInput("privml: implausible scrypt parameters in the key file header")
        return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(secret)
    if header["kdf"] == "hkdf-sha256":
        if key_file is None:
            raise KeyMaterialError("privml: these keys are sealed with a key file: pass key_file=")
        material = Path(key_file).read_bytes()
        if len(material) < MIN_KEY_FILE_BYTES:
            raise KeyMaterialError(f"privml: a key file needs at least {MIN_KEY_FILE_BYTES} random bytes "
                                   f"(privml.keystore.new_key_file), {key_file} has {len(material)}")
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=b"privml client keys").derive(material)
    raise MalformedInput(f"privml: unknown key derivation {header['kdf']!r}")


def seal(data: bytes, *, password: str | bytes | None = None, key_file: str | Path | None = None) -> bytes:
    """``data`` encrypted and authenticated under a password- or key-file-derived key."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if (password is None) == (key_file is None):
        raise InvalidInput("privml: seal the keys with exactly one of password= or key_file=")
    if password is not None and len(password) < 8:
        raise InvalidInput("privml: a password protecting a secret key needs at least 8 characters")
    header = {"kdf": "scrypt", **SCRYPT} if password is not None else {"kdf": "hkdf-sha256"}
    header |= {"salt": os.urandom(16).hex(), "nonce": os.urandom(12).hex()}
    head = json.dumps(header, sort_keys=True).encode()
    key = _derive(header, password, key_file)
    body = AESGCM(key).encrypt(bytes.fromhex(header["nonce"]), data, MAGIC + head)
    return MAGIC + struct.pack("<I", len(head)) + head + body


def unseal(blob: bytes, *, password: str | bytes | None = None, key_file: str | Path | None = None) -> bytes:
    """The data :func:`seal` protected; ``KeyMaterialError`` for a wrong password/key file or changed bytes."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 4:
        raise MalformedInput("privml: not a privml sealed key file")
    (n,) = struct.unpack_from("<I", blob, len(MAGIC))
    start = len(MAGIC) + 4
    if n > MAX_HEADER or start + n > len(blob):
        raise MalformedInput("privml: the sealed key file's header is truncated or too large")
    head = blob[start:start + n]
    try:
        header = json.loads(head)
        key = _derive(header, password, key_file)
        nonce = bytes.fromhex(header["nonce"])
    except (ValueError, KeyError, TypeError) as exc:
        raise MalformedInput(f"privml: bad sealed key file header: {type(exc).__name__}") from None
    try:
        return AESGCM(key).decrypt(nonce, blob[start + n:], MAGIC + head)
    except (InvalidTag, ValueError):
        raise KeyMaterialError("privml: cannot open the sealed keys: wrong password or key file, or the file was "
                               "changed") from None
