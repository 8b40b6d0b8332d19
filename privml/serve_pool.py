"""Where ``privml serve`` evaluates: threads of the service process, or worker processes holding the clients.

SEAL (through TenSEAL) keeps the GIL during its operations, so threads take turns rather than cores: measured,
4 clients on 2 threads serve no more requests per second than 1. :class:`ProcessEvaluator` runs ``workers``
processes instead; each client's evaluation keys live in one of them (the least loaded at upload), so its
requests run there one at a time while other clients' run in the other processes. A worker that dies is
restarted; the keys it held are forgotten and their clients get 404 and upload again (``privml.Client`` does
so by itself); a request it was evaluating when it died gets 503.

Both evaluators are synchronous (the service calls them from executor threads) and offer the same methods:
``add(key_id, context, credentials)``, ``run(key_id, request) -> bytes``, ``drop(key_id)``, ``has(key_id)``,
``group(key_id)`` (which pool of ``slots[group]`` evaluation slots the key's requests queue for), ``close()``.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
from typing import Any

from privml.compiler.api import CompiledModel
from privml.errors import (
    DecryptionBudgetExhausted,
    InvalidInput,
    KeyMaterialError,
    MalformedInput,
    PartyFailure,
    PrivmlError,
)


def status_of(exc: PrivmlError) -> int:
    """The HTTP status the service answers a privml error with."""
    if isinstance(exc, WorkerError):
        return exc.status
    if isinstance(exc, DecryptionBudgetExhausted):
        return 429
    if isinstance(exc, PartyFailure):
        return 503
    if isinstance(exc, (MalformedInput, InvalidInput, KeyMaterialError)):
        return 400
    return 422


def make_server(compiled: CompiledModel, context: bytes, credentials: dict[str, Any] | None, warm_up: bool,
                others: Any = ()) -> Any:
    """The backend's server object for one client's public context (hybrid: and its enclave credentials). A CKKS
    server shares the linear maps and encoded weight diagonals of one of ``others`` (the same process's servers of
    this plan for other clients): they depend on the plan only, so a second client's upload encodes nothing."""
    plan = compiled.plan
    if plan.backend == "hybrid":
        from privml.backends.hybrid import HybridServer

        return HybridServer(plan, context, credentials)  # no warm-up: it would spend enclave decryption budget
    from privml.backends.ckks import CKKSServer

    like = next((s for s in others if isinstance(s, CKKSServer)), None)
    server = CKKSServer(plan, context, like=like)
    if warm_up:
        server.warm(compiled, plan.input_shape)
    return server


def _close(server: Any) -> None:
    close = getattr(server, "close", None)
    if close is not None:
        close()


class ThreadEvaluator:
    """Evaluations in ``concurrency`` threads of the service process; one client's requests one at a time."""

    def __init__(self, compiled: CompiledModel, warm_up: bool, concurrency: int) -> None:
        self.compiled, self.warm_up = compiled, warm_up
        self.slots = [concurrency]
        self._servers: dict[str, tuple[Any, threading.Lock]] = {}

    def group(self, key_id: str) -> int:
        return 0

    def has(self, key_id: str) -> bool:
        return key_id in self._servers

    def add(self, key_id: str, context: bytes, credentials: dict[str, Any] | None) -> None:
        if key_id not in self._servers:
            others = [server for server, _ in self._servers.values()]
            self._servers[key_id] = (make_server(self.compiled, context, credentials, self.warm_up, others),
                                     threading.Lock())

    def run(self, key_id: str, request: bytes) -> bytes:
        entry = self._servers.get(key_id)
        if entry is None:
            raise KeyError(key_id)
        server, lock = entry
        with lock:
            return server.run(self.compiled, request)

    def drop(self, key_id: str) -> None:
        entry = self._servers.pop(key_id, None)
        if entry is not None:
            _close(entry[0])

    def close(self) -> None:
        for key_id in list(self._servers):
            self.drop(key_id)


def _worker_main(conn: Any, compiled: CompiledModel, warm_up: bool) -> None:
    """A worker process: holds some clients' servers and answers ("ok", value) / ("error", status, message)."""
    import torch

    torch.set_num_threads(1)
    servers: dict[str, Any] = {}
    conn.send(("ok", None))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        op = msg[0]
        try:
            if op == "keys":
                _, key_id, context, credentials = msg
                if key_id not in servers:
                    servers[key_id] = make_server(compiled, context, credentials, warm_up, list(servers.values()))
                conn.send(("ok", None))
            elif op == "infer":
                conn.send(("ok", servers[msg[1]].run(compiled, msg[2])))
            elif op == "drop":
                server = servers.pop(msg[1], None)
                if server is not None:
                    _close(server)
                conn.send(("ok", None))
            else:  # "stop"
                for server in servers.values():
                    _close(server)
                conn.send(("ok", None))
                return
        except KeyError:
            conn.send(("error", 404, "unknown key id"))
        except PrivmlError as exc:
            conn.send(("error", status_of(exc), str(exc)))
        except Exception as exc:  # noqa: BLE001 - reported to the service, which logs the class only
            conn.send(("error", 500, f"internal error in an evaluation worker: {type(exc).__name__}"))


class WorkerError(PrivmlError):
    """An evaluation worker refused a job; ``status`` is the HTTP status the service answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Worker:
    def __init__(self, compiled: CompiledModel, warm_up: bool, start_timeout: float) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, compiled, warm_up), daemon=True)
        self.proc.start()
        child.close()
        self.lock = threading.Lock()
        self.keys: set[str] = set()
        if not self.conn.poll(start_timeout):
            self.kill()
            raise PartyFailure(f"privml serve: an evaluation worker did not start within {start_timeout:g} s")
        self.conn.recv()

    def call(self, *msg: Any) -> Any:
        with self.lock:
            try:
                self.conn.send(msg)
                answer = self.conn.recv()
            except (EOFError, OSError, BrokenPipeError):
                raise PartyFailure("privml serve: the evaluation worker died (it is restarted; clients it held "
                                   "upload their keys again)") from None
        if answer[0] == "error":
            raise WorkerError(answer[1], answer[2])
        return answer[1]

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()


class ProcessEvaluator:
    """``workers`` processes, each holding the keys of the clients assigned to it (the least loaded at upload)."""

    def __init__(self, compiled: CompiledModel, warm_up: bool, workers: int, start_timeout: float = 300.0) -> None:
        self.compiled, self.warm_up, self.start_timeout = compiled, warm_up, start_timeout
        self.workers = [_Worker(compiled, warm_up, start_timeout) for _ in range(workers)]
        self.slots = [1] * workers
        self._home: dict[str, int] = {}
        self._lock = threading.Lock()

    def group(self, key_id: str) -> int:
        return self._home.get(key_id, 0)

    def has(self, key_id: str) -> bool:
        return key_id in self._home

    def _restart(self, index: int, worker: _Worker) -> None:
        """Replace a dead ``worker`` (once, whoever notices first) and forget the keys it held."""
        with self._lock:
            if self.workers[index] is worker:
                worker.kill()
                for key_id in worker.keys:
                    self._home.pop(key_id, None)
                self.workers[index] = _Worker(self.compiled, self.warm_up, self.start_timeout)

    def _revive(self) -> None:
        """Restart the workers that died between calls: their clients' next request is a 404 (upload again)."""
        for index, worker in enumerate(list(self.workers)):
            if not worker.proc.is_alive():
                self._restart(index, worker)

    def _call(self, index: int, *msg: Any) -> Any:
        worker = self.workers[index]
        try:
            return worker.call(*msg)
        except PartyFailure:  # died during the call: this job is lost
            self._restart(index, worker)
            raise

    def add(self, key_id: str, context: bytes, credentials: dict[str, Any] | None) -> None:
        self._revive()
        if key_id in self._home:
            return
        with self._lock:
            index = min(range(len(self.workers)), key=lambda i: len(self.workers[i].keys))
            self.workers[index].keys.add(key_id)
        try:
            self._call(index, "keys", key_id, context, credentials)
        except Exception:
            self.workers[index].keys.discard(key_id)
            raise
        self._home[key_id] = index

    def run(self, key_id: str, request: bytes) -> bytes:
        self._revive()
        index = self._home.get(key_id)
        if index is None:
            raise KeyError(key_id)
        return self._call(index, "infer", key_id, request)

    def drop(self, key_id: str) -> None:
        index = self._home.pop(key_id, None)
        if index is not None:
            self.workers[index].keys.discard(key_id)
            try:
                self._call(index, "drop", key_id)
            except PrivmlError:
                pass

    def close(self) -> None:
        for w in self.workers:
            try:
                w.call("stop")
            except PrivmlError:
                pass
            w.kill()
