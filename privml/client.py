"""``privml.Client``: encrypt, send to a ``privml serve`` service, check and decrypt the answer.

    client = privml.Client("https://host:8443", "bundle/client", ca_file="ca.pem")
    logits = client.infer(x)          # keys uploaded on first use, then ciphertexts only

The client refuses a server whose plan differs from its own (SHA-256 from ``/health``), a response that does
not name the SHA-256 of the request it answers, and a result whose batch is not the one it sent. Evaluation
keys are uploaded once and referenced by id; after a server restart or eviction (404) they are uploaded
again, once. Standard library HTTP(S) only (``http.client``), so a client needs no web stack.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import ssl
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch

from privml.compiler.plan import Plan
from privml.errors import InvalidInput, MalformedInput, ServiceError
from privml.session import Session


class Client:
    """One client of an inference service: its own session (keys), the service's URL, byte counters.

    ``plan``: a Plan or a client bundle directory (:func:`privml.bundle.load_client`); ``session``: an existing
    session for that plan (e.g. ``Session.from_keys``), else a new one with ``session_options``;
    ``ca_file``: the certificate (or CA) an ``https://`` server must present."""

    def __init__(self, url: str, plan: Plan | str | Path, *, session: Session | None = None,
                 ca_file: str | Path | None = None, timeout: float = 600.0, **session_options: Any) -> None:
        from privml.bundle import load_client

        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidInput(f"privml: Client needs an http:// or https:// URL, got {url!r}")
        self.plan = plan if isinstance(plan, Plan) else load_client(plan)
        self.session = session if session is not None else Session(self.plan, **session_options)
        if self.session.plan.backend != self.plan.backend:
            raise InvalidInput("privml: the session was made for another plan")
        self.host, self.port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
        self.tls = ssl.create_default_context(cafile=str(ca_file) if ca_file else None) \
            if parts.scheme == "https" else None
        self.timeout = timeout
        self.key_id: str | None = None
        self._fingerprint: bytes | None = None
        self.bytes_keys = 0       # evaluation keys uploaded (once per key set)
        self.bytes_requests = 0   # ciphertexts sent, all requests
        self.bytes_responses = 0
        self.requests = 0

    # ---- HTTP
    def _call(self, method: str, path: str, body: bytes | None = None,
              headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        cls = http.client.HTTPSConnection if self.tls is not None else http.client.HTTPConnection
        kwargs = {"context": self.tls} if self.tls is not None else {}
        conn = cls(self.host, self.port, timeout=self.timeout, **kwargs)
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "application/octet-stream",
                                                           **(headers or {})})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        except ssl.SSLError as exc:
            raise ServiceError(f"privml: TLS with {self.host}:{self.port} failed: {exc}") from None
        except (OSError, http.client.HTTPException) as exc:
            raise ServiceError(f"privml: cannot reach the service at {self.host}:{self.port}: "
                               f"{type(exc).__name__}: {exc}") from None
        finally:
            conn.close()

    @staticmethod
    def _raise(status: int, body: bytes, what: str) -> None:
        try:
            message = json.loads(body)["error"]
        except (ValueError, KeyError, TypeError):
            message = body[:200].decode("utf-8", "replace")
        raise ServiceError(f"privml: the service refused {what} (HTTP {status}): {message}", status)

    def _json(self, path: str) -> dict[str, Any]:
        status, _, body = self._call("GET", path)
        if status != 200:
            self._raise(status, body, f"GET {path}")
        return json.loads(body)

    def health(self) -> dict[str, Any]:
        return self._json("/health")

    def metrics(self) -> dict[str, Any]:
        return self._json("/metrics")

    # ---- protocol
    def check_server(self) -> None:
        """``MalformedInput`` unless the service runs this client's plan."""
        theirs = self.health().get("plan_sha256")
        if theirs != self.plan.sha256():
            raise MalformedInput(f"privml: the service runs another plan (SHA-256 {str(theirs)[:16]}..., this "
                                 f"client's is {self.plan.sha256()[:16]}...): get the client bundle saved with "
                                 "the server's")

    def upload_keys(self) -> str:
        """Send the public evaluation context (hybrid: and the enclave credentials); returns the key id."""
        self.check_server()
        backend = self.session.backend
        context = backend.public_context()
        headers = {}
        if self.plan.backend == "hybrid":
            cred = backend.server_credentials()
            cred = {**cred, "token": base64.b64encode(cred["token"]).decode()}
            headers["X-Privml-Credentials"] = base64.b64encode(json.dumps(cred).encode()).decode()
        status, _, body = self._call("POST", "/v1/keys", context, headers)
        if status != 200:
            self._raise(status, body, "the evaluation keys")
        answer = json.loads(body)
        self.key_id = str(answer["key_id"])
        self._fingerprint = backend.ctx.fingerprint
        self.bytes_keys += len(context)
        return self.key_id

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """The model's output on ``x``, computed by the service on ciphertexts, decrypted and checked here."""
        session = self.session
        encrypted = session.encrypt(x)  # input checks and (hybrid) a key rotation happen here
        if self.key_id is None or session.backend.ctx.fingerprint != self._fingerprint:
            self.upload_keys()
        request = session.backend.dumps(encrypted)
        for attempt in range(2):
            status, headers, body = self._call("POST", f"/v1/infer/{self.key_id}", request)
            if status == 404 and attempt == 0:  # the service restarted or dropped our keys: upload them again
                self.upload_keys()
                continue
            break
        if status != 200:
            self._raise(status, body, "the request")
        if headers.get("x-privml-request-sha256") != hashlib.sha256(request).hexdigest():
            raise MalformedInput("privml: the response does not answer this request (its request hash differs)")
        result = session.backend.loads(body)
        if result.shape[0] != x.shape[0]:
            raise MalformedInput(f"privml: the response holds {result.shape[0]} samples for a request of "
                                 f"{x.shape[0]}: forged or mixed up")
        self.requests += 1
        self.bytes_requests += len(request)
        self.bytes_responses += len(body)
        return session.decrypt(result)

    def close(self) -> None:
        """Ask the service to drop this client's keys, and close the session."""
        if self.key_id is not None:
            try:
                self._call("DELETE", f"/v1/keys/{self.key_id}")
            except ServiceError:
                pass
            self.key_id = None
        self.session.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def wait_ready(url: str, timeout: float = 120.0, ca_file: str | Path | None = None) -> None:
    """Block until ``url``'s ``/health`` answers (for scripts that just started ``privml serve``)."""
    parts = urlsplit(url)
    deadline = time.monotonic() + timeout
    tls = ssl.create_default_context(cafile=str(ca_file) if ca_file else None) if parts.scheme == "https" else None
    while True:
        cls = http.client.HTTPSConnection if tls is not None else http.client.HTTPConnection
        conn = cls(parts.hostname, parts.port, timeout=5, **({"context": tls} if tls else {}))
        try:
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except (OSError, http.client.HTTPException):
            pass
        finally:
            conn.close()
        if time.monotonic() > deadline:
            raise ServiceError(f"privml: no service answered at {url} within {timeout:g} s")
        time.sleep(0.2)
