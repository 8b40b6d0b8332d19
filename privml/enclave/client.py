"""Talking to the enclave: one connection, a session id, strictly increasing sequence numbers.

Used by the data owner (attest, provision, audit) and by the untrusted server (refresh, with the
server token from the owner's :class:`Receipt`).  Every transport failure (dead enclave, closed
socket, no answer within ``timeout``) is a :class:`~privml.errors.PartyFailure` naming the enclave;
error responses become the privml error their code names.
"""

from __future__ import annotations

import hmac
import os
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

from privml.enclave import protocol
from privml.enclave.attest import Attestation, EnclaveConfig, expected_measurement, verify_attestation
from privml.enclave.policy import Policy
from privml.enclave.provision import TOKEN_BYTES, provisioning_message
from privml.errors import MalformedInput, PartyFailure


@dataclass(frozen=True)
class Receipt:
    """What the data owner gets back from provisioning; hand both to the server for refreshes."""

    key_id: str
    server_token: bytes


class EnclaveClient:
    """A connection to an enclave at ``address`` (Unix socket path); thread-safe, one request at a time."""

    def __init__(self, address: str, *, timeout: float = 30.0) -> None:
        self.address = str(address)
        self.timeout = timeout
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._session = b""
        self._seq = 0
        self.hello: dict = {}
        self._connect()

    @property
    def _name(self) -> str:
        return f"enclave at {self.address}"

    def _connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.address)
        except (TimeoutError, OSError) as exc:
            sock.close()
            raise PartyFailure(f"cannot connect to the {self._name}: {exc}") from exc
        self._sock = sock
        self._session = os.urandom(protocol.SESSION_BYTES)
        self._seq = 0
        self.hello = self._exchange("hello", {"protocol": protocol.VERSION}, seq=0)

    def reconnect(self) -> None:
        """Drop the connection (if any) and open a new one with a fresh session."""
        with self._lock:
            self._drop()
        self._connect()

    def _drop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def close(self) -> None:
        with self._lock:
            self._drop()

    def __enter__(self) -> EnclaveClient:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------------------- transport

    def _exchange(self, kind: str, body: dict, seq: int) -> dict:
        sock = self._sock
        if sock is None:
            raise PartyFailure(f"the connection to the {self._name} is closed (call reconnect())")
        try:
            frame = protocol.encode(kind, seq, self._session, body)
            try:
                sock.sendall(frame)
            except (TimeoutError, OSError) as exc:
                raise PartyFailure(f"sending to the {self._name} failed: {exc}") from exc
            try:
                msg = protocol.read_message(sock, protocol.RESPONSE_KINDS, peer=self._name)
            except protocol.ConnectionClosed as exc:
                raise PartyFailure(f"the {self._name} closed the connection without answering "
                                   "(it died or refused the connection)") from exc
            if msg.seq != seq or not hmac.compare_digest(msg.session, self._session):
                raise MalformedInput(f"the {self._name} answered with the wrong session or sequence number")
        except BaseException:
            self._drop()  # the stream is out of step: never reuse it
            raise
        if msg.kind == "error":
            code = msg.body.get("code")
            text = msg.body.get("message")
            if not isinstance(code, str) or not isinstance(text, str):
                self._drop()
                raise MalformedInput(f"the {self._name} sent an error response without code and message")
            if code == "malformed":  # the enclave closes the connection after these
                self._drop()
            raise protocol.error_class(code)(f"{self._name}: {text}")
        return msg.body

    def request(self, kind: str, body: dict) -> dict:
        """Send one request of ``kind`` and return the ``ok`` response's body (raises on ``error``)."""
        if kind not in protocol.REQUEST_KINDS or kind == "hello":
            raise MalformedInput(f"unknown request kind {kind!r}")
        with self._lock:
            self._seq += 1
            return self._exchange(kind, body, self._seq)

    # ------------------------------------------------------------------------- operations

    def attest(self, nonce: bytes) -> bytes:
        """The enclave's attestation document answering ``nonce`` (verify it with verify_attestation)."""
        doc = self.request("attest", {"nonce": bytes(nonce)})
        return protocol.field(doc, "document", bytes)

    def provision(self, attestation: Attestation, secret_context: bytes, policy: Policy,
                  key_id: str | None = None) -> Receipt:
        """Send ``secret_context`` (``dump_context(ctx, include_secret=True)``) sealed to a verified attestation."""
        key_id = key_id or os.urandom(12).hex()
        token = os.urandom(TOKEN_BYTES)
        out = self.request("provision", provisioning_message(attestation, secret_context, policy, key_id, token))
        if out.get("key_id") != key_id:
            raise MalformedInput("the enclave confirmed another key id")
        return Receipt(key_id=key_id, server_token=token)

    def refresh(self, key_id: str, token: bytes, mode: str, ciphertexts: bytes, count: int) -> tuple[bytes, int]:
        """Refresh ``count`` serialized ciphertexts: (new ciphertext bytes at the top level, budget left)."""
        out = self.request("refresh", {"key_id": key_id, "token": bytes(token), "mode": mode,
                                       "ciphertexts": bytes(ciphertexts), "count": int(count)})
        return protocol.field(out, "ciphertexts", bytes), protocol.field(out, "budget_left", int)

    def audit(self, nonce: bytes) -> tuple[list[dict], bytes]:
        """The audit log and the enclave's signature over its head (check with verify_audit_log)."""
        out = self.request("audit", {"nonce": bytes(nonce)})
        entries = protocol.field(out, "entries", list)
        return entries, protocol.field(out, "signed_head", bytes)

    def status(self) -> dict:
        return self.request("status", {})


def attest_and_provision(client: EnclaveClient, *, root_certificate: bytes | str, region_allowed: Sequence[str] | None,
                         secret_context: bytes, policy: Policy, config: EnclaveConfig | None = None,
                         key_id: str | None = None, max_age_s: float = 300) -> tuple[Attestation, Receipt]:
    """Fresh nonce, attestation verified against this install's measurement (and ``config``'s PCR1 when
    given), then provisioning to the attested key."""
    nonce = os.urandom(32)
    doc = client.attest(nonce)
    att = verify_attestation(doc, root_certificate=root_certificate, expected_pcrs=expected_measurement(config),
                             nonce=nonce, allowed_regions=region_allowed, max_age_s=max_age_s)
    return att, client.provision(att, secret_context, policy, key_id=key_id)


__all__ = ["EnclaveClient", "Receipt", "attest_and_provision"]
