"""``privml serve``: a long-running CKKS / hybrid inference service over HTTP(S) (aiohttp).

A client uploads its public evaluation context once (``POST /v1/keys``, hybrid: with the enclave credentials
in the ``X-Privml-Credentials`` header) and gets a key id; each request then sends only ciphertexts
(``POST /v1/infer/{key_id}``). The server never holds a secret key: uploads carrying one are refused.

What a demanding deployment needs and this provides:
- limits: upload and request sizes (413, checked on ``Content-Length`` and again while reading), a read
  timeout (408) for clients that stall, ``max_clients`` key sets kept (least recently used dropped: 404,
  the client uploads again);
- bounded concurrency: ``workers`` evaluation processes, each holding its clients' keys (or, with ``workers=0``,
  ``concurrency`` threads: :mod:`privml.serve_pool`); one client's requests run one at a time; at most
  ``queue`` waiting (then 503 with ``Retry-After``), ``timeout`` for wait + run (504);
- ``GET /health`` (status, backend, plan SHA-256) and ``GET /metrics`` (counts, bytes, latency p50/p95);
- structured logs: one JSON object per line, sizes, ids, timings and error classes; never a body, a key or a
  value;
- integrity: HTTPS with ``tls_cert``/``tls_key`` (refused to listen beyond loopback in clear unless
  ``insecure_http``); each response names the SHA-256 of the request it answers, and
  :class:`privml.client.Client` checks that and the result's batch size against what it sent.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import json
import logging
import math
import ssl
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from privml.compiler.api import CompiledModel
from privml.config import ServeConfig
from privml.errors import InvalidInput, PrivmlError
from privml.serve_pool import ProcessEvaluator, ThreadEvaluator, status_of

LOG = logging.getLogger("privml.serve")
MAX_CREDENTIALS = 4096
SERVED_BACKENDS = ("ckks", "hybrid")


def log_event(event: str, **fields: Any) -> None:
    """One structured log line (JSON); callers pass sizes, ids and timings only."""
    LOG.info(json.dumps({"ts": round(time.time(), 3), "event": event, **fields}, sort_keys=True))


@dataclass
class Metrics:
    requests: int = 0
    uploads: int = 0
    errors: dict[int, int] = field(default_factory=dict)
    rejected_busy: int = 0
    timeouts: int = 0
    abandoned: int = 0
    bytes_in_keys: int = 0
    bytes_in_requests: int = 0
    bytes_out: int = 0
    latencies: deque = field(default_factory=lambda: deque(maxlen=2048))

    def snapshot(self) -> dict[str, Any]:
        lat = sorted(self.latencies)

        def pct(q: float) -> float | None:
            return round(lat[max(0, math.ceil(q * len(lat)) - 1)] * 1e3, 1) if lat else None  # nearest rank

        return {"requests": self.requests, "uploads": self.uploads,
                "errors": {str(k): v for k, v in sorted(self.errors.items())}, "rejected_busy": self.rejected_busy,
                "timeouts": self.timeouts, "abandoned": self.abandoned, "bytes_in_keys": self.bytes_in_keys,
                "bytes_in_requests": self.bytes_in_requests, "bytes_out": self.bytes_out,
                "latency_ms": {"count": len(lat), "p50": pct(0.5), "p95": pct(0.95)}}


class _Refused(Exception):
    """An HTTP error answer: status, a message for the client, and extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class InferenceService:
    """The service's state and handlers (one per process; no global state)."""

    def __init__(self, compiled: CompiledModel, config: ServeConfig) -> None:
        if not isinstance(compiled, CompiledModel):
            raise InvalidInput(f"privml serve needs a compiled model, got {type(compiled).__name__}")
        if compiled.plan.backend not in SERVED_BACKENDS:
            raise InvalidInput(f"privml serve runs {' and '.join(SERVED_BACKENDS)} models; this one is compiled for "
                               f"{compiled.plan.backend!r} (MPC parties stay up with privml.Session(...).start())")
        self.compiled, self.cfg = compiled, config
        self.plan_sha256 = compiled.plan.sha256()
        if config.workers > 0:
            self.evaluator: Any = ProcessEvaluator(compiled, config.warm_up, config.workers)
        else:
            self.evaluator = ThreadEvaluator(compiled, config.warm_up, config.concurrency)
        self.clients: OrderedDict[str, None] = OrderedDict()  # key ids, least recently used first
        self.metrics = Metrics()
        self.executor = ThreadPoolExecutor(sum(self.evaluator.slots) + 2, thread_name_prefix="privml-eval")
        self.waiting = 0
        self.in_flight = 0
        self._slots: list[asyncio.Semaphore] | None = None

    # ---- plumbing
    def app(self) -> Any:
        from aiohttp import web

        limit = int(max(self.cfg.max_upload_mb, self.cfg.max_request_mb) * 1e6)

        @web.middleware
        async def errors(request: Any, handler: Callable) -> Any:
            return await self._errors(request, handler)

        app = web.Application(client_max_size=limit, middlewares=[errors])
        app.add_routes([web.get("/health", self.health), web.get("/metrics", self.get_metrics),
                        web.get("/v1/plan", self.get_plan), web.post("/v1/keys", self.upload_keys),
                        web.delete("/v1/keys/{key_id}", self.drop_keys),
                        web.post("/v1/infer/{key_id}", self.infer)])
        app.on_cleanup.append(self._cleanup)
        return app

    async def _cleanup(self, _app: Any) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.evaluator.close()

    def _slot(self, key_id: str) -> asyncio.Semaphore:
        """The evaluation slots the key's requests queue for (one pool, or the slot of its worker process)."""
        if self._slots is None:  # made on the event loop that serves
            self._slots = [asyncio.Semaphore(n) for n in self.evaluator.slots]
        return self._slots[self.evaluator.group(key_id)]

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> Any:
        from aiohttp import web

        self.metrics.errors[status] = self.metrics.errors.get(status, 0) + 1
        return web.json_response({"error": message, "status": status}, status=status, headers=headers)

    async def _errors(self, request: Any, handler: Callable) -> Any:
        """Middleware: refusals become JSON errors; anything unexpected a 500 with no traceback for the client."""
        from aiohttp import web

        try:
            return await handler(request)
        except _Refused as r:
            return self._error(r.status, r.message, r.headers)
        except web.HTTPException as h:
            if h.status >= 400:
                self.metrics.errors[h.status] = self.metrics.errors.get(h.status, 0) + 1
            raise
        except Exception as exc:  # noqa: BLE001 - a bug must not kill the service or leak a traceback to clients
            log_event("internal_error", path=request.path, error=type(exc).__name__)
            LOG.debug("internal error", exc_info=True)
            return self._error(500, "privml serve: internal error (see the server log)")

    async def _body(self, request: Any, limit_mb: float, what: str) -> bytes:
        """The request body, refused beyond ``limit_mb`` (413) or when it is not sent within ``read_timeout``."""
        import aiohttp

        limit = int(limit_mb * 1e6)
        if request.content_length is not None and request.content_length > limit:
            raise _Refused(413, f"{what} of {request.content_length} bytes exceeds the limit of {limit} bytes")
        buf = bytearray()

        async def read() -> None:
            async for chunk in request.content.iter_chunked(1 << 20):
                buf.extend(chunk)
                if len(buf) > limit:
                    raise _Refused(413, f"{what} exceeds the limit of {limit} bytes")

        try:
            await asyncio.wait_for(read(), self.cfg.read_timeout)
        except asyncio.TimeoutError:
            raise _Refused(408, f"{what} not received within {self.cfg.read_timeout:g} s") from None
        except (aiohttp.ClientError, ConnectionError, asyncio.IncompleteReadError) as exc:
            self.metrics.abandoned += 1
            log_event("abandoned", path=request.path, received=len(buf), error=type(exc).__name__)
            raise _Refused(400, f"{what} was not completed") from None
        if not buf:
            raise _Refused(400, f"empty {what}")
        return bytes(buf)

    async def _in_thread(self, fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # ---- endpoints
    async def health(self, _request: Any) -> Any:
        from aiohttp import web

        return web.json_response({"status": "ok", "backend": self.compiled.plan.backend,
                                  "plan_sha256": self.plan_sha256, "clients": len(self.clients)})

    async def get_metrics(self, _request: Any) -> Any:
        from aiohttp import web

        return web.json_response({**self.metrics.snapshot(), "in_flight": self.in_flight, "queued": self.waiting,
                                  "clients": len(self.clients), "slots": sum(self.evaluator.slots),
                                  "workers": self.cfg.workers})

    async def get_plan(self, _request: Any) -> Any:
        from aiohttp import web

        return web.Response(text=self.compiled.plan.to_json(), content_type="application/json")

    async def upload_keys(self, request: Any) -> Any:
        from aiohttp import web

        t0 = time.perf_counter()
        credentials = self._credentials(request)
        body = await self._body(request, self.cfg.max_upload_mb, "evaluation-key upload")
        key_id = hashlib.sha256(body).hexdigest()[:32]
        if not self.evaluator.has(key_id):
            try:
                await self._in_thread(self.evaluator.add, key_id, body, credentials)
            except PrivmlError as exc:
                log_event("keys_refused", bytes=len(body), error=type(exc).__name__)
                raise _Refused(status_of(exc), str(exc)) from None
        self.clients[key_id] = None
        self.clients.move_to_end(key_id)
        while len(self.clients) > self.cfg.max_clients:
            old_id, _ = self.clients.popitem(last=False)
            log_event("keys_dropped", key_id=old_id, reason="max_clients")
            await self._in_thread(self.evaluator.drop, old_id)
        self.metrics.uploads += 1
        self.metrics.bytes_in_keys += len(body)
        log_event("keys", key_id=key_id, bytes=len(body), ms=round((time.perf_counter() - t0) * 1e3, 1))
        return web.json_response({"key_id": key_id, "plan_sha256": self.plan_sha256})

    def _credentials(self, request: Any) -> dict[str, Any] | None:
        """Hybrid: the enclave address, key id and refresh token from ``X-Privml-Credentials`` (base64 JSON)."""
        if self.compiled.plan.backend != "hybrid":
            return None
        raw = request.headers.get("X-Privml-Credentials", "")
        if not raw or len(raw) > MAX_CREDENTIALS:
            raise _Refused(400, "a hybrid key upload needs the X-Privml-Credentials header (base64 JSON of "
                                "session.backend.server_credentials())")
        try:
            cred = json.loads(base64.b64decode(raw, validate=True))
            cred = {"address": str(cred["address"]), "key_id": str(cred["key_id"]),
                    "token": base64.b64decode(cred["token"], validate=True)}
        except (ValueError, KeyError, TypeError, IndexError):
            raise _Refused(400, "malformed X-Privml-Credentials header") from None
        return cred

    async def drop_keys(self, request: Any) -> Any:
        from aiohttp import web

        key_id = request.match_info["key_id"]
        if self.clients.pop(key_id, 0) == 0 or not self.evaluator.has(key_id):
            raise _Refused(404, "unknown key id")
        await self._in_thread(self.evaluator.drop, key_id)
        log_event("keys_dropped", key_id=request.match_info["key_id"], reason="client")
        return web.json_response({"dropped": True})

    async def infer(self, request: Any) -> Any:
        from aiohttp import web

        t0 = time.perf_counter()
        key_id = request.match_info["key_id"]
        unknown = "unknown key id: upload the evaluation keys first (POST /v1/keys)"
        if not self.evaluator.has(key_id):
            self.clients.pop(key_id, None)
            raise _Refused(404, unknown)
        body = await self._body(request, self.cfg.max_request_mb, "inference request")
        slot = self._slot(key_id)
        if self.waiting >= self.cfg.queue and slot.locked():
            self.metrics.rejected_busy += 1
            log_event("busy", key_id=key_id, queued=self.waiting)
            raise _Refused(503, f"busy: {self.waiting} requests already waiting", {"Retry-After": "1"})
        self.waiting += 1
        try:
            await asyncio.wait_for(slot.acquire(), self.cfg.timeout)
        except asyncio.TimeoutError:
            self.metrics.timeouts += 1
            raise _Refused(504, f"no evaluation slot within {self.cfg.timeout:g} s") from None
        finally:
            self.waiting -= 1
        if key_id in self.clients:
            self.clients.move_to_end(key_id)
        self.in_flight += 1
        future = asyncio.get_running_loop().run_in_executor(self.executor, self.evaluator.run, key_id, body)

        def done(_f: Any) -> None:  # the slot is held until the evaluation really ends, also after a 504
            self.in_flight -= 1
            slot.release()

        future.add_done_callback(done)
        left = max(0.0, self.cfg.timeout - (time.perf_counter() - t0))
        try:
            response = await asyncio.wait_for(asyncio.shield(future), left)
        except asyncio.TimeoutError:
            self.metrics.timeouts += 1
            log_event("timeout", key_id=key_id, bytes_in=len(body))
            raise _Refused(504, f"evaluation did not finish within {self.cfg.timeout:g} s") from None
        except KeyError:  # dropped (or its worker restarted) while waiting
            raise _Refused(404, unknown) from None
        except PrivmlError as exc:
            log_event("infer_refused", key_id=key_id, bytes_in=len(body), error=type(exc).__name__)
            raise _Refused(status_of(exc), str(exc)) from None
        elapsed = time.perf_counter() - t0
        self.metrics.requests += 1
        self.metrics.bytes_in_requests += len(body)
        self.metrics.bytes_out += len(response)
        self.metrics.latencies.append(elapsed)
        log_event("infer", key_id=key_id, bytes_in=len(body), bytes_out=len(response), ms=round(elapsed * 1e3, 1))
        return web.Response(body=response, content_type="application/octet-stream",
                            headers={"X-Privml-Request-Sha256": hashlib.sha256(body).hexdigest()})


def check_listen(config: ServeConfig) -> ssl.SSLContext | None:
    """The TLS context to serve with, or None; refuses clear HTTP beyond loopback unless ``insecure_http``."""
    if (config.tls_cert is None) != (config.tls_key is None):
        raise InvalidInput("privml serve: give both --tls-cert and --tls-key, or neither")
    if config.tls_cert is not None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ctx.load_cert_chain(config.tls_cert, config.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise InvalidInput(f"privml serve: cannot load the TLS certificate/key: {exc}") from None
        return ctx
    try:
        loopback = ipaddress.ip_address(config.host).is_loopback
    except ValueError:
        loopback = config.host == "localhost"
    if not loopback and not config.insecure_http:
        raise InvalidInput(f"privml serve: refusing clear HTTP on {config.host}: pass --tls-cert/--tls-key (or "
                           "--insecure-http on a network you trust)")
    return None


async def _run(service: InferenceService, config: ServeConfig, tls: ssl.SSLContext | None,
               ready: Callable[[int], None] | None) -> None:
    from aiohttp import web

    runner = web.AppRunner(service.app(), access_log=None, handle_signals=True)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, ssl_context=tls)
    await site.start()
    port = runner.addresses[0][1]
    log_event("listening", host=config.host, port=port, tls=tls is not None, backend=service.compiled.plan.backend,
              plan_sha256=service.plan_sha256)
    if ready is not None:
        ready(port)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def serve(compiled: CompiledModel, config: ServeConfig | None = None, ready: Callable[[int], None] | None = None,
          **options: Any) -> None:
    """Serve ``compiled`` until interrupted (``ready(port)`` is called once listening)."""
    cfg = config.replace(**options) if config is not None else ServeConfig.from_options(**options)
    tls = check_listen(cfg)
    service = InferenceService(compiled, cfg)
    if not LOG.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        LOG.addHandler(handler)
        LOG.setLevel(logging.INFO)
        LOG.propagate = False
    try:
        asyncio.run(_run(service, cfg, tls, ready))
    except KeyboardInterrupt:
        pass


class ServiceProcess:
    """``privml serve BUNDLE FLAGS...`` as a child process, for scripts, benchmarks and tests.

    Waits until the service listens (``port``, ``url``); its JSON log lines collect in ``lines``
    (``events(name)`` parses them). ``stop()`` terminates it (also on ``with`` exit)."""

    def __init__(self, bundle: str | Any, *flags: str, start_timeout: float = 120.0) -> None:
        import subprocess

        self.proc = subprocess.Popen([sys.executable, "-m", "privml.cli", "serve", str(bundle), "--port", "0",
                                      *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._listening = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._listening.wait(start_timeout):
            self.stop()
            raise PrivmlError("privml serve did not start:\n" + "\n".join(self.lines[-20:]))
        listening = self.events("listening")[0]
        self.port = int(listening["port"])
        self.url = f"{'https' if listening['tls'] else 'http'}://127.0.0.1:{self.port}"

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if '"listening"' in line:
                self._listening.set()
        self._listening.set()  # exited before listening: stop waiting

    def events(self, name: str) -> list[dict[str, Any]]:
        """The parsed log records of one event kind, in order."""
        out = []
        for line in self.lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("event") == name:
                out.append(record)
        return out

    def stop(self) -> None:
        import subprocess

        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
