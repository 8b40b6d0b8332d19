"""The enclave process: a Unix-socket server holding CKKS secret keys and refreshing ciphertexts.

One thread per connection (MPC parties may talk to it concurrently); every request goes through
:data:`HANDLERS` after its frame, session and sequence number are checked.  State that must
survive a restart lives in the state directory: sealed key records (``sealed/<key_id>.bin``), a small
sealed budget counter per key (``sealed/<key_id>.ctr``, rewritten before every decryption) and the
append-only audit log (``audit.log``, whose refresh entries are a second witness of the budget spent).
Rollback of the whole state directory is not detected (a real TEE would use a hardware monotonic counter).
Nothing here logs plaintext values or key bytes.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from privml.enclave import protocol
from privml.enclave.attest import (
    NONCE_MAX,
    NONCE_MIN,
    Device,
    EnclaveConfig,
    attestation_document,
    expected_measurement,
)
from privml.enclave.audit import AuditLog
from privml.enclave.policy import Policy, PolicyRefused, TokenBucket
from privml.enclave.provision import (
    KEY_ID_RE,
    EphemeralKeys,
    Sealer,
    check_key_id,
    open_provisioning,
    token_hash,
    write_sealed,
)
from privml.errors import DecryptionBudgetExhausted, KeyMaterialError, MalformedInput, PrivmlError
from privml.he.noise import secure_normal
from privml.he.serialize import dump_ciphertexts, load_ciphertexts, load_context

log = logging.getLogger("privml.enclave")


@dataclass
class KeyRecord:
    key_id: str
    secret_context: bytes
    policy: Policy
    budget_used: int
    token_hash: bytes
    created: int
    ctx: Any = None
    bucket: TokenBucket | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def budget_left(self) -> int:
        return max(0, self.policy.decryption_budget - self.budget_used)

    def to_record(self) -> dict:
        return {"key_id": self.key_id, "secret_context": self.secret_context, "policy": self.policy.to_dict(),
                "budget_used": self.budget_used, "token_hash": self.token_hash, "created": self.created}

    @classmethod
    def from_record(cls, rec: dict) -> KeyRecord:
        if set(rec) != {"key_id", "secret_context", "policy", "budget_used", "token_hash", "created"}:
            raise KeyMaterialError("sealed record has the wrong fields")
        policy = Policy.from_dict(rec["policy"])
        return cls(check_key_id(rec["key_id"]), rec["secret_context"], policy, int(rec["budget_used"]),
                   rec["token_hash"], int(rec["created"]), ctx=load_context(rec["secret_context"]),
                   bucket=TokenBucket.for_policy(policy))

    @property
    def actor(self) -> str:
        return "server:" + self.token_hash[:4].hex()


@dataclass
class Connection:
    """One client connection: its session id and last sequence number."""

    sock: socket.socket
    ident: int
    session: bytes | None = None
    seq: int = 0
    actor: str = "client"
    data: dict = field(default_factory=dict)  # per-connection state for other handlers (the dealer)


class Enclave:
    """The enclave's state: device identity, measurement, keys, audit log."""

    def __init__(self, state_dir: str | Path, vendor_dir: str | Path, config: EnclaveConfig) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.sealed_dir = self.state_dir / "sealed"
        self.sealed_dir.mkdir(exist_ok=True, mode=0o700)
        self.config = config
        self.region = config.region
        self.device = Device.load(vendor_dir)
        self.pcrs = expected_measurement(config)  # the running code measures itself
        self.sealer = Sealer(self.state_dir, self.pcrs[0], self.pcrs[1])
        self.ephemeral = EphemeralKeys(config.ephemeral_ttl_s, config.max_ephemeral)
        self.audit = AuditLog(self.state_dir / "audit.log")
        self.lock = threading.RLock()
        self.keys: dict[str, KeyRecord] = {}
        self.unavailable: dict[str, str] = {}
        self._load_keys()
        self.audit.append(actor="enclave", op="start", count=len(self.keys))

    def _load_keys(self) -> None:
        for path in sorted(self.sealed_dir.glob("*.bin")):
            key_id = path.stem
            try:
                check_key_id(key_id)
                rec = KeyRecord.from_record(self.sealer.unseal(key_id, path.read_bytes()))
                if rec.key_id != key_id:
                    raise KeyMaterialError("sealed record names another key")
                counter = path.with_suffix(".ctr")
                if counter.exists():  # the budget spent since provisioning (small, rewritten per refresh)
                    ctr = self.sealer.unseal(key_id + ".ctr", counter.read_bytes())
                    if set(ctr) != {"key_id", "budget_used"} or ctr["key_id"] != key_id \
                            or not isinstance(ctr["budget_used"], int):
                        raise KeyMaterialError("sealed budget counter is malformed")
                    rec.budget_used = max(rec.budget_used, ctr["budget_used"])
                # the audit log is a second witness: a rolled-back counter file alone does not refill the budget
                logged = [e["budget_left"] for e in self.audit.entries
                          if e["op"] == "refresh" and e["key_id"] == key_id and isinstance(e["budget_left"], int)]
                if logged:
                    rec.budget_used = max(rec.budget_used, rec.policy.decryption_budget - min(logged))
                self.keys[key_id] = rec
            except (PrivmlError, OSError) as exc:
                self.unavailable[key_id] = type(exc).__name__
                log.warning("key %s unavailable: %s", key_id, exc)
                self.audit.append(actor="enclave", op="unseal_failed", key_id=key_id)

    def persist(self, rec: KeyRecord) -> None:
        """Seal the whole key record (at provisioning)."""
        write_sealed(self.sealed_dir / f"{rec.key_id}.bin", self.sealer.seal(rec.key_id, rec.to_record()))

    def persist_budget(self, rec: KeyRecord) -> None:
        """Seal the budget spent (every refresh): a small record next to the key's, so a refresh does not
        re-encrypt the whole secret context (18 MB at N=16384)."""
        write_sealed(self.sealed_dir / f"{rec.key_id}.ctr",
                     self.sealer.seal(rec.key_id + ".ctr", {"key_id": rec.key_id, "budget_used": rec.budget_used}))

    def key(self, key_id: Any) -> KeyRecord:
        key_id = check_key_id(key_id)
        rec = self.keys.get(key_id)
        if rec is None:
            if key_id in self.unavailable:
                raise KeyMaterialError(f"key {key_id} is unavailable in this enclave: its sealed record could "
                                       "not be unsealed (different code/configuration, or tampered)")
            raise KeyMaterialError(f"no key {key_id} was provisioned to this enclave")
        return rec


Handler = Callable[[Enclave, Connection, dict], dict]


def _nonce(body: dict) -> bytes:
    nonce = protocol.field(body, "nonce", bytes, max_len=NONCE_MAX)
    if len(nonce) < NONCE_MIN:
        raise MalformedInput(f"nonce must be {NONCE_MIN}-{NONCE_MAX} bytes")
    return nonce


def handle_hello(enclave: Enclave, conn: Connection, body: dict) -> dict:
    return {"protocol": protocol.VERSION, "region": enclave.region, "module_id": enclave.device.module_id}


def handle_attest(enclave: Enclave, conn: Connection, body: dict) -> dict:
    protocol.only_fields(body, {"nonce"})
    nonce = _nonce(body)
    pub = enclave.ephemeral.new(nonce)
    doc = attestation_document(enclave.device, pcrs=enclave.pcrs, public_key=pub, region=enclave.region, nonce=nonce)
    enclave.audit.append(actor=conn.actor, op="attest")
    return {"document": doc}


def handle_provision(enclave: Enclave, conn: Connection, body: dict) -> dict:
    key_id, policy, secret, token = open_provisioning(enclave.ephemeral, body)
    if enclave.region not in policy.allowed_regions:
        raise PolicyRefused(f"provisioning refused: this enclave runs in {enclave.region!r}, "
                            f"the key's policy allows only {list(policy.allowed_regions)}")
    if policy.decryption_budget > enclave.config.budget_cap:
        raise PolicyRefused(f"provisioning refused: decryption budget {policy.decryption_budget} exceeds this "
                            f"enclave's cap of {enclave.config.budget_cap}")
    ctx = load_context(secret)
    if not ctx.has_secret_key:
        raise KeyMaterialError("provisioning needs a context with its secret key (dump_context(include_secret=True))")
    rec = KeyRecord(key_id, secret, policy, 0, token_hash(token), int(time.time()), ctx=ctx,
                    bucket=TokenBucket.for_policy(policy))
    with enclave.lock:
        if key_id in enclave.keys or key_id in enclave.unavailable:
            raise KeyMaterialError(f"key id {key_id} is already provisioned")
        enclave.persist(rec)
        enclave.keys[key_id] = rec
    enclave.audit.append(actor=conn.actor, op="provision", key_id=key_id, budget_left=rec.budget_left)
    return {"key_id": key_id, "fingerprint": ctx.fingerprint, "budget_left": rec.budget_left}


REFRESH_FIELDS = {"key_id", "token", "mode", "ciphertexts", "count"}


def handle_refresh(enclave: Enclave, conn: Connection, body: dict) -> dict:
    protocol.only_fields(body, REFRESH_FIELDS)
    for name in REFRESH_FIELDS:
        if name not in body:
            raise MalformedInput(f"missing field {name!r}")
    rec = enclave.key(protocol.field(body, "key_id", str, max_len=64))
    token = protocol.field(body, "token", bytes, max_len=64)
    if not hmac.compare_digest(token_hash(token), rec.token_hash):
        raise KeyMaterialError(f"refresh refused: wrong server token for key {rec.key_id}")
    mode = protocol.field(body, "mode", str, max_len=16)
    if mode not in rec.policy.modes:
        raise PolicyRefused(f"refresh refused: mode {mode!r} is not allowed by the key's policy "
                            f"(allowed: {list(rec.policy.modes)})")
    count = protocol.field(body, "count", int)
    if not 1 <= count <= enclave.config.max_ciphertexts:
        raise MalformedInput(f"count must be in [1, {enclave.config.max_ciphertexts}]")
    data = protocol.field(body, "ciphertexts", bytes, max_len=enclave.config.max_body)
    actor = rec.actor
    with rec.lock:  # one refresh per key at a time: budget check and spend are atomic
        if count > rec.budget_left:
            raise DecryptionBudgetExhausted(
                f"decryption budget exhausted for key {rec.key_id}: {count} ciphertext(s) requested, "
                f"{rec.budget_left} left of {rec.policy.decryption_budget}; nothing was decrypted")
        assert rec.bucket is not None
        rec.bucket.take(count)
        cts = load_ciphertexts(rec.ctx, data)
        if len(cts) != count:
            raise MalformedInput(f"count says {count} ciphertexts, the payload holds {len(cts)}")
        # spend (and persist) the budget before decrypting anything
        rec.budget_used += count
        enclave.persist_budget(rec)
        sigma = rec.policy.flood_sigma
        relu = mode == "relu"
        out = []
        for ct in cts:
            v = rec.ctx.decrypt(ct)
            r = np.maximum(v, 0.0)  # computed in both modes: the same work per message
            v = r if relu else v
            v = v + secure_normal(v.size, sigma).reshape(v.shape)  # flooding from the OS CSPRNG
            out.append(rec.ctx.encrypt_symmetric(v))
            del v, r
        payload = dump_ciphertexts(rec.ctx, out)
        left = rec.budget_left
    enclave.audit.append(actor=actor, op="refresh", key_id=rec.key_id, mode=mode, count=count, budget_left=left)
    return {"ciphertexts": payload, "budget_left": left}


def handle_audit(enclave: Enclave, conn: Connection, body: dict) -> dict:
    protocol.only_fields(body, {"nonce"})
    nonce = _nonce(body)
    enclave.audit.append(actor=conn.actor, op="audit")
    entries, signed = enclave.audit.signed_head(enclave.device.key, nonce)
    return {"entries": entries, "signed_head": signed}


def handle_status(enclave: Enclave, conn: Connection, body: dict) -> dict:
    protocol.only_fields(body, set())
    with enclave.lock:
        keys = {k: {"budget_left": r.budget_left, "budget": r.policy.decryption_budget}
                for k, r in enclave.keys.items()}
        return {"region": enclave.region, "module_id": enclave.device.module_id, "pid": os.getpid(),
                "keys": keys, "unavailable": sorted(enclave.unavailable), "audit_length": len(enclave.audit.entries)}


def _dealer(kind: str) -> Handler:
    def handler(enclave: Enclave, conn: Connection, body: dict) -> dict:
        try:
            from privml.enclave import dealer  # written separately; imported lazily
        except ImportError as exc:
            raise PrivmlError(f"this enclave has no MPC dealer ({exc})") from exc
        fn = getattr(dealer, f"handle_{kind}", None)
        if fn is None:
            raise PrivmlError(f"the dealer module has no handle_{kind}")
        return fn(enclave, conn, body)

    handler.__name__ = f"handle_{kind}"
    return handler


HANDLERS: dict[str, Handler] = {
    "hello": handle_hello,
    "attest": handle_attest,
    "provision": handle_provision,
    "refresh": handle_refresh,
    "audit": handle_audit,
    "status": handle_status,
    "deal_open": _dealer("deal_open"),
    "deal": _dealer("deal"),
}
assert set(HANDLERS) == protocol.REQUEST_KINDS


# ----------------------------------------------------------------------------- connection loop


NO_SESSION = bytes(protocol.SESSION_BYTES)


def _send(sock: socket.socket, kind: str, seq: int, session: bytes, body: dict) -> None:
    sock.sendall(protocol.encode(kind, seq, session, body))


def _hang_up(sock: socket.socket) -> None:
    """Close after a refusal so the error response is delivered: stop sending, then drain (briefly, bounded)
    what the peer already sent (closing with unread bytes would reset the connection and drop the answer)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(0.2)
        drained = 0
        while drained < (1 << 20):
            chunk = sock.recv(65536)
            if not chunk:
                break
            drained += len(chunk)


def _error_body(exc: BaseException) -> dict:
    code = protocol.error_code(exc)
    message = str(exc) if isinstance(exc, PrivmlError) else f"internal error ({type(exc).__name__})"
    return {"code": code, "message": message[:2000]}


def _refuse(enclave: Enclave, conn: Connection, kind: str, body: Any, exc: BaseException) -> None:
    key_id = body.get("key_id") if isinstance(body, dict) else None
    key_id = key_id if isinstance(key_id, str) and KEY_ID_RE.match(key_id) else None
    with contextlib.suppress(Exception):
        enclave.audit.append(actor=conn.actor, op="refuse", key_id=key_id,
                             mode=f"{kind}:{protocol.error_code(exc)}")


def serve_connection(enclave: Enclave, conn: Connection) -> None:
    """Answer requests on one connection until the peer leaves or sends something malformed."""
    sock = conn.sock
    try:
        while True:
            try:
                msg = protocol.read_message(sock, protocol.REQUEST_KINDS, peer="client")
            except protocol.ConnectionClosed:
                return
            except MalformedInput as exc:
                _refuse(enclave, conn, "frame", None, exc)
                with contextlib.suppress(OSError):
                    _send(sock, "error", 0, conn.session or NO_SESSION, _error_body(exc))
                _hang_up(sock)
                return
            # session and sequence: hello first, then seq = previous + 1 on the same session
            try:
                if conn.session is None:
                    if msg.kind != "hello" or msg.seq != 0:
                        raise MalformedInput("the first message must be hello with seq 0")
                    conn.session, conn.seq = msg.session, 0
                elif msg.kind == "hello":
                    raise MalformedInput("hello sent twice on one connection")
                elif not hmac.compare_digest(msg.session, conn.session):
                    raise MalformedInput("wrong session id")
                elif msg.seq != conn.seq + 1:
                    raise MalformedInput(f"sequence number {msg.seq} out of order (expected {conn.seq + 1}): "
                                         "replayed or reordered request")
                else:
                    conn.seq = msg.seq
            except MalformedInput as exc:
                _refuse(enclave, conn, msg.kind, msg.body, exc)
                with contextlib.suppress(OSError):
                    _send(sock, "error", msg.seq, msg.session, _error_body(exc))
                _hang_up(sock)
                return
            try:
                out = HANDLERS[msg.kind](enclave, conn, msg.body)
                _send(sock, "ok", msg.seq, msg.session, out)
            except OSError:
                return
            except Exception as exc:  # noqa: BLE001 - every failure becomes an error response
                if not isinstance(exc, PrivmlError):
                    log.error("handler %s failed: %s", msg.kind, type(exc).__name__)
                _refuse(enclave, conn, msg.kind, msg.body, exc)
                with contextlib.suppress(OSError):
                    _send(sock, "error", msg.seq, msg.session, _error_body(exc))
    except (OSError, PrivmlError):
        return
    finally:
        with contextlib.suppress(OSError):
            sock.close()


def serve(enclave: Enclave, socket_path: str | Path, ready: Callable[[], None] | None = None) -> None:
    """Listen on ``socket_path`` (mode 0600) and serve connections, one thread each, until SIGTERM/SIGINT."""
    path = str(socket_path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        server.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    server.listen(64)
    stop = threading.Event()

    def _stop(signum: int, frame: Any) -> None:
        stop.set()
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            server.close()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if ready is not None:
        ready()
    ident = 0
    server.settimeout(0.5)
    try:
        while not stop.is_set():
            try:
                sock, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                if stop.is_set():
                    break
                raise
            sock.settimeout(None)
            ident += 1
            conn = Connection(sock, ident)
            threading.Thread(target=serve_connection, args=(enclave, conn), daemon=True,
                             name=f"enclave-conn-{ident}").start()
    finally:
        with contextlib.suppress(OSError):
            server.close()
        with contextlib.suppress(OSError):
            os.unlink(path)

