"""Nitro-style attestation: a simulated vendor CA, the enclave's signed document, and its verification.

The simulator stands in for AWS Nitro Enclaves so a real enclave can replace it: the document is a
COSE_Sign1 (ES384) over a CBOR payload with Nitro's fields (``module_id``, ``digest``,
``timestamp``, ``pcrs``, ``certificate``, ``cabundle``, ``public_key``, ``user_data``, ``nonce``).
PCR0 measures the enclave's code, PCR1 its configuration, PCR2 the privml version; the client
recomputes them from its own install (:func:`expected_measurement`, like a reproducible build) and
trusts only a document signed by a key that chains to the pinned vendor root.

The "vendor" is a self-signed ECDSA P-384 root whose private key is used once, at
:func:`manufacture`, to certify the enclave's "hardware" key (the leaf).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import importlib.metadata
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import ExtensionPolicy, PolicyBuilder, Store, VerificationError
from pycose.algorithms import Es384
from pycose.headers import Algorithm
from pycose.keys import EC2Key
from pycose.keys.curves import P384
from pycose.messages import Sign1Message

from privml.enclave import protocol
from privml.errors import AttestationError, MalformedInput

PCR_BYTES = 48  # SHA-384
NONCE_MIN, NONCE_MAX = 16, 64
CERT_DAYS = 3650
ROOT_KEY, ROOT_CERT, DEVICE_KEY, DEVICE_CERT = "root_key.pem", "root_cert.pem", "device_key.pem", "device_cert.pem"
PAYLOAD_FIELDS = frozenset({"module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle", "public_key",
                            "user_data", "nonce"})


# ----------------------------------------------------------------------------- configuration + PCRs


@dataclass(frozen=True)
class EnclaveConfig:
    """What the enclave is launched with; measured into PCR1 (so the client can pin it)."""

    region: str = "eu-central-1"
    budget_cap: int = 1_000_000  # largest decryption budget a policy may ask for
    max_ciphertexts: int = 4096  # per refresh request
    max_body: int = protocol.MAX_BODY
    ephemeral_ttl_s: float = 300.0  # an attestation's X25519 key expires after this
    max_ephemeral: int = 64  # pending (unused) attestation keys kept at most

    def to_dict(self) -> dict[str, Any]:
        return {"region": self.region, "limits": {
            "budget_cap": int(self.budget_cap), "max_ciphertexts": int(self.max_ciphertexts),
            "max_body": int(self.max_body), "ephemeral_ttl_s": float(self.ephemeral_ttl_s),
            "max_ephemeral": int(self.max_ephemeral)}}

    def canonical(self) -> bytes:
        return protocol.dumps(self.to_dict())


def code_files(root: Path | None = None) -> list[tuple[str, Path]]:
    """The measured code: privml/enclave/*.py and privml/he/*.py, as (relative path, file), sorted."""
    pkg = Path(root) if root is not None else Path(__file__).resolve().parents[1]
    files = [(f"privml/{sub}/{p.name}", p) for sub in ("enclave", "he") for p in (pkg / sub).glob("*.py")]
    return sorted(files)


def code_measurement(root: Path | None = None) -> bytes:
    """PCR0: SHA-384 over (path, length, contents) of every measured file in sorted order."""
    h = hashlib.sha384(b"privml-enclave-code-v1\0")
    for rel, path in code_files(root):
        data = path.read_bytes()
        name = rel.encode()
        h.update(len(name).to_bytes(4, "big") + name + len(data).to_bytes(8, "big"))
        h.update(data)
    return h.digest()


def privml_version() -> str:
    try:
        return importlib.metadata.version("privml")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown"


def expected_measurement(config: EnclaveConfig | None = None) -> dict[int, bytes]:
    """The PCRs an enclave built from this install and launched with ``config`` reports.

    Without ``config`` only PCR0 (code) and PCR2 (version) are returned.
    """
    pcrs = {0: code_measurement(), 2: hashlib.sha384(privml_version().encode()).digest()}
    if config is not None:
        pcrs[1] = hashlib.sha384(config.canonical()).digest()
    return dict(sorted(pcrs.items()))


# ----------------------------------------------------------------------------- vendor (manufacture)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _key_usage(sign: bool, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=sign, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                         encipher_only=False, decipher_only=False)


def make_root(common_name: str = "privml simulated enclave vendor root",
              days: int = CERT_DAYS) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed ECDSA P-384 CA (the simulated manufacturer)."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "privml simulator"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(sign=False, ca=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA384()))
    return key, cert


def make_leaf(root_key: ec.EllipticCurvePrivateKey, root_cert: x509.Certificate,
              days: int = CERT_DAYS) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A device ("hardware") signing key certified by the root."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "privml simulator"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "privml simulated enclave device")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(root_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(sign=True, ca=False), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False)
            .sign(root_key, hashes.SHA384()))
    return key, cert


def manufacture(vendor_dir: str | Path) -> bytes:
    """Create the vendor root and the device key + certificate once; returns the root cert PEM.

    Private keys are written 0600. Later calls only read the root certificate.
    """
    vdir = Path(vendor_dir)
    vdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not (vdir / DEVICE_CERT).exists():
        root_key, root_cert = make_root()
        dev_key, dev_cert = make_leaf(root_key, root_cert)
        _write_private(vdir / ROOT_KEY, _pem_key(root_key))
        _write_private(vdir / DEVICE_KEY, _pem_key(dev_key))
        (vdir / ROOT_CERT).write_bytes(root_cert.public_bytes(serialization.Encoding.PEM))
        tmp = vdir / (DEVICE_CERT + ".tmp")
        tmp.write_bytes(dev_cert.public_bytes(serialization.Encoding.PEM))
        os.replace(tmp, vdir / DEVICE_CERT)  # last: its presence marks a finished manufacture
    return (vdir / ROOT_CERT).read_bytes()


@dataclass(frozen=True)
class Device:
    """The enclave's view of its hardware: signing key, its certificate, the vendor root."""

    key: ec.EllipticCurvePrivateKey
    certificate: bytes  # DER
    root: bytes  # DER

    @classmethod
    def load(cls, vendor_dir: str | Path) -> Device:
        vdir = Path(vendor_dir)
        key = serialization.load_pem_private_key((vdir / DEVICE_KEY).read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise AttestationError("device key is not an EC key")
        leaf = x509.load_pem_x509_certificate((vdir / DEVICE_CERT).read_bytes())
        root = x509.load_pem_x509_certificate((vdir / ROOT_CERT).read_bytes())
        return cls(key, leaf.public_bytes(serialization.Encoding.DER), root.public_bytes(serialization.Encoding.DER))

    @property
    def module_id(self) -> str:
        return "i-sim" + hashlib.sha256(self.certificate).hexdigest()[:16] + "-enc" \
            + hashlib.sha256(self.root).hexdigest()[:16]


# ----------------------------------------------------------------------------- COSE_Sign1


def _cose_key(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> EC2Key:
    pub = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    if not isinstance(pub.curve, ec.SECP384R1):
        raise AttestationError("COSE ES384 needs a P-384 key")
    nums = pub.public_numbers()
    d = key.private_numbers().private_value.to_bytes(48, "big") if isinstance(key, ec.EllipticCurvePrivateKey) else b""
    return EC2Key(crv=P384, x=nums.x.to_bytes(48, "big"), y=nums.y.to_bytes(48, "big"), d=d)


def cose_sign1(key: ec.EllipticCurvePrivateKey, payload: bytes) -> bytes:
    """COSE_Sign1 (tag 18, ES384, empty unprotected header) over ``payload``."""
    msg = Sign1Message(phdr={Algorithm: Es384}, payload=payload)
    msg.key = _cose_key(key)
    return msg.encode(tag=True)


def cose_parse1(data: bytes) -> Sign1Message:
    """Parse a COSE_Sign1 (tagged or not) strictly; MalformedInput on anything else."""
    data = bytes(data)
    if data[:1] == b"\xd2":  # tag 18 (COSE_Sign1) in its one-byte form; no other tag is accepted
        data = data[1:]
    arr = protocol.loads(data)
    if not (isinstance(arr, list) and len(arr) == 4 and isinstance(arr[0], bytes) and isinstance(arr[1], dict)
            and isinstance(arr[2], bytes) and isinstance(arr[3], bytes)):
        raise MalformedInput("not a COSE_Sign1 structure")
    if len(arr[3]) != 2 * PCR_BYTES:
        raise MalformedInput("COSE_Sign1 signature has the wrong length for ES384")
    phdr = protocol.loads(arr[0]) if arr[0] else {}
    if phdr != {1: -35}:  # alg: ES384, nothing else
        raise MalformedInput("COSE_Sign1 protected header must be exactly {alg: ES384}")
    try:
        return Sign1Message.from_cose_obj([arr[0], dict(arr[1]), arr[2], arr[3]], allow_unknown_attributes=False)
    except Exception as exc:  # noqa: BLE001 - pycose raises assorted types
        raise MalformedInput(f"bad COSE_Sign1: {type(exc).__name__}: {exc}") from exc


def cose_verify1(data: bytes, public_key: ec.EllipticCurvePublicKey) -> bytes:
    """The payload of a COSE_Sign1 whose ES384 signature verifies under ``public_key``."""
    msg = cose_parse1(data)
    msg.key = _cose_key(public_key)
    try:
        ok = msg.verify_signature()
    except (InvalidSignature, ValueError, Exception) as exc:  # noqa: BLE001
        raise AttestationError(f"signature check failed: {type(exc).__name__}") from exc
    if not ok:
        raise AttestationError("signature check failed: the COSE_Sign1 signature does not verify")
    return msg.payload


# ----------------------------------------------------------------------------- the document


def attestation_document(device: Device, *, pcrs: Mapping[int, bytes], public_key: bytes, region: str,
                         nonce: bytes) -> bytes:
    """The enclave's signed attestation (Nitro layout) binding its PCRs, a fresh X25519 key and the nonce."""
    payload = {
        "module_id": device.module_id,
        "digest": "SHA384",
        "timestamp": int(time.time() * 1000),
        "pcrs": {int(k): bytes(v) for k, v in pcrs.items()},
        "certificate": device.certificate,
        "cabundle": [device.root],
        "public_key": bytes(public_key),
        "user_data": protocol.dumps({"region": region}),
        "nonce": bytes(nonce),
    }
    return cose_sign1(device.key, protocol.dumps(payload))


@dataclass(frozen=True)
class Attestation:
    """A verified attestation document's contents."""

    pcrs: dict[int, bytes]
    region: str
    public_key: bytes  # the enclave's ephemeral X25519 key for provisioning
    timestamp: int  # ms since the epoch
    module_id: str
    certificate: bytes  # leaf DER
    nonce: bytes = field(repr=False, default=b"")
    document: bytes = field(repr=False, default=b"")  # the verified COSE_Sign1 bytes (the transcript reports keep)

    @property
    def leaf_public_key(self) -> ec.EllipticCurvePublicKey:
        key = x509.load_der_x509_certificate(self.certificate).public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        return key


def load_certificate(data: bytes | str) -> x509.Certificate:
    raw = data.encode() if isinstance(data, str) else bytes(data)
    try:
        if raw.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(raw)
        return x509.load_der_x509_certificate(raw)
    except ValueError as exc:
        raise AttestationError(f"root certificate: cannot parse it ({exc})") from exc


def _fail(check: str, why: str) -> AttestationError:
    return AttestationError(f"attestation check '{check}' failed: {why}")


def verify_attestation(doc: bytes, *, root_certificate: bytes | str, expected_pcrs: Mapping[int, bytes],
                       nonce: bytes, allowed_regions: Sequence[str] | None, max_age_s: float = 300) -> Attestation:
    """Verify an attestation document; AttestationError naming the failed check otherwise.

    Checks, in order: structure, certificate chain to the pinned ``root_certificate`` (validity
    dates included), the COSE signature under the leaf key, the nonce, the age (at most
    ``max_age_s`` old, not from the future), the ``expected_pcrs`` (PCR0 is required) and the region
    (when ``allowed_regions`` is given).
    """
    if 0 not in expected_pcrs:
        raise AttestationError("expected_pcrs must contain at least PCR0 (the code measurement)")
    root = load_certificate(root_certificate)
    try:
        msg = cose_parse1(doc)
        payload = protocol.loads(msg.payload)
    except MalformedInput as exc:
        raise _fail("format", str(exc)) from exc
    if not isinstance(payload, dict) or set(payload) != PAYLOAD_FIELDS:
        raise _fail("format", "payload fields are not those of an attestation document")
    types = {"module_id": str, "digest": str, "timestamp": int, "pcrs": dict, "certificate": bytes,
             "cabundle": list, "public_key": bytes, "user_data": bytes, "nonce": bytes}
    for name, typ in types.items():
        if not isinstance(payload[name], typ) or isinstance(payload[name], bool):
            raise _fail("format", f"field {name} has type {type(payload[name]).__name__}")
    if payload["digest"] != "SHA384":
        raise _fail("format", f"digest {payload['digest']!r} is not SHA384")
    pcrs = payload["pcrs"]
    if not all(isinstance(k, int) and isinstance(v, bytes) and len(v) == PCR_BYTES for k, v in pcrs.items()):
        raise _fail("format", "PCRs must map integers to 48-byte values")
    if len(payload["public_key"]) != 32:
        raise _fail("format", "public_key must be a 32-byte X25519 key")

    # chain: leaf -> pinned root (the document's own cabundle is only a hint for intermediates)
    try:
        leaf = x509.load_der_x509_certificate(payload["certificate"])
        intermediates = [x509.load_der_x509_certificate(c) for c in payload["cabundle"][1:]
                         if isinstance(c, bytes)]
    except ValueError as exc:
        raise _fail("certificate", f"cannot parse the certificate: {exc}") from exc
    verifier = (PolicyBuilder().store(Store([root])).time(dt.datetime.now(dt.timezone.utc))
                .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(),
                                    ee_policy=ExtensionPolicy.permit_all())
                .build_client_verifier())
    try:
        verifier.verify(leaf, intermediates)
    except VerificationError as exc:
        raise _fail("certificate chain", f"the signing certificate does not chain to the pinned root ({exc})") from exc
    leaf_key = leaf.public_key()
    if not isinstance(leaf_key, ec.EllipticCurvePublicKey):
        raise _fail("certificate", "leaf key is not an EC key")
    try:
        cose_verify1(doc, leaf_key)
    except (AttestationError, MalformedInput) as exc:
        raise _fail("signature", str(exc)) from exc

    if not hmac.compare_digest(payload["nonce"], bytes(nonce)):
        raise _fail("nonce", "the document answers a different nonce (stale or replayed)")
    age = time.time() - payload["timestamp"] / 1000.0
    if age > max_age_s:
        raise _fail("age", f"the document is {age:.3f} s old, more than max_age_s={max_age_s}")
    if age < -5.0:
        raise _fail("age", "the document's timestamp lies in the future")
    for idx, want in sorted(expected_pcrs.items()):
        got = pcrs.get(idx)
        if got is None or not hmac.compare_digest(got, bytes(want)):
            raise _fail(f"PCR{idx}", "the enclave's measurement differs from the expected one"
                        + (" (code)" if idx == 0 else " (configuration)" if idx == 1 else ""))
    try:
        user = protocol.loads(payload["user_data"])
        region = user["region"]
        if not isinstance(user, dict) or set(user) != {"region"} or not isinstance(region, str):
            raise MalformedInput("user_data")
    except (MalformedInput, KeyError, TypeError) as exc:
        raise _fail("format", "user_data must be CBOR {'region': str}") from exc
    if allowed_regions is not None and region not in allowed_regions:
        raise _fail("region", f"the enclave runs in {region!r}, not in {list(allowed_regions)}")
    return Attestation(pcrs=dict(sorted(pcrs.items())), region=region, public_key=payload["public_key"],
                       timestamp=payload["timestamp"], module_id=payload["module_id"],
                       certificate=payload["certificate"], nonce=bytes(nonce), document=bytes(doc))
