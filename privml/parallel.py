"""Encrypted CKKS requests evaluated in parallel by worker processes, over ``torch.distributed`` (gloo).

:class:`ParallelServer` is a drop-in for :class:`privml.backends.ckks.CKKSServer` whose ``run(request)``
splits a latency-layout batch by samples into one shard per worker, has the workers evaluate the shards
at the same time, and joins their answers into one response, byte for byte the format (and, evaluation
being deterministic, the bytes) ``CKKSServer.run`` returns. Workers are processes on this machine
(``workers=``, spawned and stopped by the server) and/or processes on other machines (``remote=``) that
join with::

    python -m privml.parallel --init-method tcp://HOST:PORT --rank R --world-size W \\
        --plan plan.json --context context.bin --model model.pt

(files from :func:`write_worker_files`; rank 0 is the coordinator, ranks ``1..workers`` the local workers,
the remote ones take ``workers+1 .. W-1``). Every process runs the same code path: a ``TCPStore`` on the
coordinator for the start-up handshake (each worker proves it holds the same plan, public context and
model weights), then a gloo ``ProcessGroupGloo`` for the requests (uint8 tensors, length first). The process
group is an object of this server, not torch's global default group, so it coexists with other users of
``torch.distributed`` in the same process.

Trust: workers are the server; they see what it sees (ciphertexts, the public context, the model). The
store and gloo connections are neither authenticated nor encrypted: run them on a network you trust. With
the default (or any loopback) address everything listens on loopback only; with ``tcp://HOST:PORT`` the
coordinator's store listens on HOST, and gloo on torch's default interface (``GLOO_SOCKET_IFNAME``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import io
import ipaddress
import json
import math
import os
import socket
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from privml import errors
from privml.backends.ckks import CKKSServer, CKKSTensor, ExpandedInput, Runtime, dumps, loads
from privml.compiler.plan import Plan
from privml.errors import InvalidInput, MalformedInput, PartyFailure, PrivmlError
from privml.parties.launcher import _describe_exit, _die_with_parent, _stop_all

_OP_STOP, _OP_RUN = 0, 1
_OK, _ERROR = 0, 1
_TAG = 0
_IDLE = datetime.timedelta(days=365)  # how long an idle worker waits for its next request (gloo needs a bound)
_POLL_S = 0.05


# --------------------------------------------------------------------------------------------- split / concat
def split_request(data: bytes, runtime: Runtime, shards: int) -> list[bytes]:
    """A serialized latency-layout batch as at most ``shards`` serialized sub-batches of consecutive samples.

    Same header format, packing and expansion flag as the input; a batch of one sample, or a throughput-layout
    tensor (its batch is spread over the slots of every ciphertext, so it cannot be cut by samples), comes
    back whole. Malformed bytes raise the errors of :func:`privml.backends.ckks.loads`.
    """
    t = loads(data, runtime)
    batch = t.shape[0]
    if runtime.layout != "latency" or batch == 1 or shards <= 1:
        return [bytes(data)]
    k, n = t.packing.n_cts, min(shards, batch)
    sizes = [batch // n + (1 if i < batch % n else 0) for i in range(n)]
    out, start = [], 0
    for size in sizes:
        payload = list(t.payload[start * k:(start + size) * k])
        if isinstance(t.payload, ExpandedInput):
            payload = ExpandedInput(payload)
        out.append(dumps(CKKSTensor(payload, (size, *t.shape[1:]), t.dtype, runtime=runtime, pending=None,
                                    packing=t.packing)))
        start += size
    return out


def concat_responses(parts: list[bytes], runtime: Runtime) -> bytes:
    """Serialized latency-layout tensors joined along the batch (inverse of :func:`split_request`)."""
    if len(parts) == 1:
        return bytes(parts[0])
    tensors = [loads(p, runtime) for p in parts]
    first = tensors[0]
    for t in tensors[1:]:
        if (t.shape[1:] != first.shape[1:] or t.packing != first.packing
                or isinstance(t.payload, ExpandedInput) != isinstance(first.payload, ExpandedInput)):
            raise MalformedInput(f"privml: worker answers disagree (sample shape {list(t.shape[1:])} vs "
                                 f"{list(first.shape[1:])}, packing or expansion): cannot join them")
    payload = [ct for t in tensors for ct in t.payload]
    if all(isinstance(t.payload, ExpandedInput) for t in tensors):  # requests (first-layer inputs) keep the flag
        payload = ExpandedInput(payload)
    shape = (sum(t.shape[0] for t in tensors), *first.shape[1:])
    return dumps(CKKSTensor(payload, shape, first.dtype, runtime=runtime, pending=None, packing=first.packing))


# --------------------------------------------------------------------------------------------- helpers
def _digest(plan: Plan, public_context: bytes, model: torch.nn.Module) -> str:
    """What every worker must share with the coordinator: plan, public context, architecture and weights."""
    h = hashlib.sha256(plan.to_json(indent=None).encode())
    h.update(hashlib.sha256(public_context).digest())
    for name, m in model.named_modules():  # a GraphModule's class name changes when it is unpickled: not hashed
        kind = "GraphModule" if isinstance(m, torch.fx.GraphModule) else type(m).__qualname__
        h.update(f"{name}:{kind}:{m.extra_repr()}:{m.training};".encode())
        if isinstance(m, torch.fx.GraphModule):
            h.update(m.code.encode())
    for name, value in model.state_dict().items():
        v = value.detach().cpu().contiguous()
        h.update(f"{name}:{v.dtype}:{tuple(v.shape)};".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _model_bytes(model: torch.nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save(model, buf)
    return buf.getvalue()


def _load_model(data: bytes) -> torch.nn.Module:
    # weights_only=False unpickles code: only for model files the worker's operator trusts (its own server's).
    model = torch.load(io.BytesIO(data), weights_only=False)
    if not isinstance(model, torch.nn.Module):
        raise InvalidInput(f"privml: the model file holds a {type(model).__name__}, not a torch.nn.Module")
    return model


def _address(init_method: str | None) -> tuple[str, int]:
    """(host, port) of ``tcp://HOST:PORT``; localhost and port 0 (any free one) without one."""
    if init_method is None:
        return "127.0.0.1", 0
    url = urllib.parse.urlparse(init_method) if isinstance(init_method, str) else None
    try:
        port = url.port if url is not None else None
    except ValueError:
        port = None
    if url is None or url.scheme != "tcp" or not url.hostname or port is None or url.path not in ("", "/"):
        raise InvalidInput(f"privml: init_method must be tcp://HOST:PORT, got {init_method!r}")
    return url.hostname, port


def _check_count(name: str, value: Any, least: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise InvalidInput(f"privml: {name} must be an int >= {least}, got {value!r}")
    return value


def _check_seconds(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise InvalidInput(f"privml: {name} must be a positive number of seconds, got {value!r}")
    return float(value)


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _group(store: Any, rank: int, world_size: int, timeout: float, host: str) -> Any:
    """This process's gloo group (not torch's global default group). With a loopback ``host`` every process is on
    this machine and gloo listens on loopback only; otherwise on torch's default interface (``GLOO_SOCKET_IFNAME``
    chooses another)."""
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = _seconds(timeout)
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1") if _is_loopback(host)
                     else dist.ProcessGroupGloo.create_default_device()]
    return dist.ProcessGroupGloo(dist.PrefixStore("pg", store), rank, world_size, opts)


def _seconds(s: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(s, 0.001))


def _send(pg: Any, rank: int, code: int, payload: bytes) -> list:
    """Post a message (int64 [code, length], then the bytes as uint8); returns the works to wait on."""
    works = [pg.send([torch.tensor([code, len(payload)], dtype=torch.int64)], rank, _TAG)]
    if payload:
        works.append(pg.send([torch.frombuffer(bytearray(payload), dtype=torch.uint8)], rank, _TAG))
    return works


def _recv(pg: Any, rank: int, timeout: datetime.timedelta, body_timeout: datetime.timedelta) -> tuple[int, bytes]:
    """One message from ``rank``: waits up to ``timeout`` for its header, ``body_timeout`` for its bytes."""
    head = torch.zeros(2, dtype=torch.int64)
    pg.recv([head], rank, _TAG).wait(timeout)
    code, n = (int(v) for v in head.tolist())
    if n < 0:
        raise MalformedInput(f"privml: rank {rank} announced a message of {n} bytes")
    if n == 0:
        return code, b""
    body = torch.empty(n, dtype=torch.uint8)
    pg.recv([body], rank, _TAG).wait(body_timeout)
    return code, body.numpy().tobytes()


def _error_of(rank: int, info: bytes) -> PrivmlError:
    """A worker's error report as the privml error it raised (other exceptions: PartyFailure)."""
    try:
        d = json.loads(info)
        kind, message = str(d["type"]), str(d["message"])
    except (ValueError, KeyError, TypeError):
        return PartyFailure(f"privml: worker {rank} sent an unreadable error report")
    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, PrivmlError):
        with contextlib.suppress(Exception):
            return cls(message)
    return PartyFailure(f"privml: worker {rank} raised {kind}: {message}")


# --------------------------------------------------------------------------------------------- worker
def serve(plan: Plan, public_context: bytes, model: torch.nn.Module | bytes, *, rank: int, world_size: int,
          init_method: str, timeout: float = 300.0, start_timeout: float = 120.0) -> None:
    """Be worker ``rank`` of a :class:`ParallelServer` at ``init_method`` until the coordinator stops it.

    Connects to the coordinator's store, loads the context into its own ``CKKSServer``, reports its digest
    (or why it could not start), then answers requests. Losing the coordinator raises ``PartyFailure``.
    """
    _check_count("world_size", world_size, 2)
    if not isinstance(rank, int) or not 1 <= rank < world_size:
        raise InvalidInput(f"privml: a worker's rank must be in 1..{world_size - 1} (0 is the coordinator), "
                           f"got {rank!r}")
    host, port = _address(init_method)
    timeout, start_timeout = _check_seconds("timeout", timeout), _check_seconds("start_timeout", start_timeout)
    try:
        store = dist.TCPStore(host, port, world_size, False, _seconds(start_timeout))
    except (RuntimeError, OSError) as exc:
        raise PartyFailure(f"privml: worker {rank} cannot reach the coordinator at {host}:{port}: {exc}") from exc
    try:
        if isinstance(model, (bytes, bytearray)):
            model = _load_model(bytes(model))
        server = CKKSServer(plan, public_context)
        digest = _digest(plan, public_context, model)
    except Exception as exc:
        store.set(f"error/{rank}", json.dumps({"type": type(exc).__name__, "message": str(exc)}))
        raise
    store.set(f"ready/{rank}", digest)
    try:
        pg = _group(store, rank, world_size, start_timeout, host)
        while True:
            code, request = _recv(pg, 0, _IDLE, _seconds(timeout))
            if code == _OP_STOP:
                break
            try:
                answer, status = server.run(model, request), _OK
            except Exception as exc:  # reported to the coordinator, which raises it
                answer, status = json.dumps({"type": type(exc).__name__, "message": str(exc)}).encode(), _ERROR
            for w in _send(pg, 0, status, answer):  # the coordinator takes answers in rank order: wait for it
                w.wait(_IDLE)
    except RuntimeError as exc:
        raise PartyFailure(f"privml: worker {rank} lost the coordinator: {exc}") from exc
    with contextlib.suppress(Exception):
        pg.shutdown()


def _local_worker(plan: Plan, public_context: bytes, model: bytes, rank: int, world_size: int, init_method: str,
                  timeout: float, start_timeout: float) -> None:
    """Entry point of a spawned local worker: dies with its parent, one intra-op thread."""
    _die_with_parent()
    torch.set_num_threads(1)
    try:
        serve(plan, public_context, model, rank=rank, world_size=world_size, init_method=init_method,
              timeout=timeout, start_timeout=start_timeout)
    except BaseException as exc:  # noqa: B036 - a worker reports and leaves at once
        print(f"privml worker {rank}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        os._exit(1)


# --------------------------------------------------------------------------------------------- coordinator
class ParallelServer:
    """``CKKSServer.run`` spread over worker processes; use as a context manager (or call :meth:`close`).

    ``workers``: local worker processes to spawn; ``remote``: workers that join from elsewhere with
    ``python -m privml.parallel`` (ranks ``workers+1 .. workers+remote``; needs ``init_method``, the
    ``tcp://HOST:PORT`` this coordinator listens on and they connect to; default: a free localhost port).
    ``timeout``: seconds a request may take on a worker; ``start_timeout``: seconds for every worker to join.

    A latency-layout batch is cut into at most one shard of consecutive samples per worker; a batch of one
    sample runs on one worker. The throughput layout spreads one batch over the slots of every ciphertext, so
    it cannot be split by samples: the whole request runs on one worker (no speed-up).

    A worker that dies, stops answering past ``timeout`` or holds a different plan / context / model raises
    ``PartyFailure`` and the server shuts every worker down; a privml error a worker raised (e.g.
    ``MalformedInput``) is raised here with its message and the server stays usable.
    """

    def __init__(self, plan: Plan, public_context: bytes, model: torch.nn.Module, workers: int = 2, *,
                 remote: int = 0, init_method: str | None = None, timeout: float = 300.0,
                 start_timeout: float = 120.0) -> None:
        if not isinstance(plan, Plan):
            raise InvalidInput(f"privml: ParallelServer needs a Plan, got {type(plan).__name__}")
        if not isinstance(model, torch.nn.Module):
            raise InvalidInput(f"privml: ParallelServer needs a torch.nn.Module, got {type(model).__name__}")
        _check_count("workers", workers, 0)
        _check_count("remote", remote, 0)
        if workers + remote < 1:
            raise InvalidInput("privml: a ParallelServer needs at least one worker (workers + remote >= 1)")
        if remote and init_method is None:
            raise InvalidInput("privml: remote workers need init_method='tcp://HOST:PORT' (an address of this "
                               "machine they can reach)")
        self.timeout = _check_seconds("timeout", timeout)
        start_timeout = _check_seconds("start_timeout", start_timeout)
        host, port = _address(init_method)
        self.world_size = 1 + workers + remote
        self._server = CKKSServer(plan, public_context)  # checks the context; its runtime splits and joins
        self._model = model
        self._procs: dict[int, Any] = {}
        self._pg: Any = None
        self._broken = False
        try:  # our own listening socket: bound to HOST only (TCPStore alone would listen on every interface)
            listener = socket.create_server((host, port))
        except OSError as exc:
            raise PartyFailure(f"privml: cannot listen on {host}:{port}: {exc}") from exc
        port = listener.getsockname()[1]
        self.init_method = f"tcp://{host}:{port}"
        fd = listener.detach()  # the store owns (and closes) it from here
        try:
            self._store = dist.TCPStore(host, port, self.world_size, True, _seconds(start_timeout),
                                        wait_for_workers=False, master_listen_fd=fd)
        except (RuntimeError, OSError) as exc:
            os.close(fd)
            raise PartyFailure(f"privml: cannot listen on {host}:{port}: {exc}") from exc
        try:
            mp = torch.multiprocessing.get_context("spawn")
            blob = _model_bytes(model)
            for rank in range(1, workers + 1):
                proc = mp.Process(target=_local_worker, name=f"privml-worker-{rank}", daemon=True,
                                  args=(plan, public_context, blob, rank, self.world_size, self.init_method,
                                        self.timeout, start_timeout))
                proc.start()
                self._procs[rank] = proc
            self._await_workers(_digest(plan, public_context, model), start_timeout)
            try:  # the group's own timeout covers only connecting; every request wait passes its own
                self._pg = _group(self._store, 0, self.world_size, start_timeout, host)
            except RuntimeError as exc:
                raise PartyFailure(f"privml: the workers joined but could not connect to each other within "
                                   f"{start_timeout:g} s: {str(exc).splitlines()[0]}") from exc
        except BaseException:
            self._broken = True
            self.close()
            raise

    @property
    def workers(self) -> int:
        """Number of workers (local and remote)."""
        return self.world_size - 1

    @property
    def pids(self) -> list[int]:
        """Process ids of the local workers."""
        return [p.pid for p in self._procs.values()]

    def _await_workers(self, digest: str, start_timeout: float) -> None:
        """Wait until every worker reported its digest; PartyFailure for a failed, dead, late or different one."""
        deadline, pending = time.monotonic() + start_timeout, set(range(1, self.world_size))
        while pending:
            for rank in sorted(pending):
                if self._store.check([f"error/{rank}"]):
                    info = self._store.get(f"error/{rank}")
                    raise PartyFailure(f"privml: worker {rank} could not start: {_error_of(rank, info)}")
                if self._store.check([f"ready/{rank}"]):
                    if self._store.get(f"ready/{rank}").decode() != digest:
                        raise PartyFailure(f"privml: worker {rank} holds a different plan, public context or model "
                                           "than the coordinator (digest mismatch)")
                    pending.discard(rank)
                elif rank in self._procs and not self._procs[rank].is_alive():
                    raise PartyFailure(f"privml: worker {rank} {_describe_exit(self._procs[rank].exitcode)} while "
                                       "starting")
            if pending and time.monotonic() > deadline:
                raise PartyFailure(f"privml: workers {sorted(pending)} did not join {self.init_method} within "
                                   f"{start_timeout:g} s")
            if pending:
                time.sleep(_POLL_S)

    def _failure(self, rank: int, exc: BaseException) -> PartyFailure:
        """The PartyFailure for a communication error met while waiting on ``rank``.

        A timeout blames ``rank`` (alive but silent; the others may drop their connections right after). A lost
        connection can surface on another worker's pair than the one that died: a dead local worker is named."""
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        timed_out = "timed out" in text.lower() or "timeout" in text.lower()
        deadline = time.monotonic() + (0.0 if timed_out else 1.0)
        while True:
            dead = [r for r, p in self._procs.items() if not p.is_alive()]
            if dead:
                return PartyFailure(f"privml: worker {dead[0]} {_describe_exit(self._procs[dead[0]].exitcode)} "
                                    "during the request")
            if time.monotonic() >= deadline:
                break
            time.sleep(_POLL_S)
        if timed_out:
            return PartyFailure(f"privml: worker {rank} did not answer within {self.timeout:g} s ({text})")
        return PartyFailure(f"privml: lost worker {rank}: {text}")

    def run(self, request: bytes) -> bytes:
        """Evaluate the model on a serialized encrypted batch; returns the serialized encrypted result."""
        if self._pg is None or self._broken:
            raise PartyFailure("privml: this ParallelServer is closed (or lost a worker): start a new one")
        dead = [r for r, p in self._procs.items() if not p.is_alive()]
        if dead:  # died between requests: say so now (gloo may accept a send to it and wait out the timeout)
            self._broken = True
            failure = PartyFailure(f"privml: worker {dead[0]} {_describe_exit(self._procs[dead[0]].exitcode)} "
                                   "before the request")
            self.close()
            raise failure
        shards = split_request(request, self._server.runtime, self.workers)
        ranks = list(range(1, len(shards) + 1))
        deadline = time.monotonic() + self.timeout
        answers: list[tuple[int, bytes]] = []
        rank = ranks[0]
        try:
            posted = [(rank, _send(self._pg, rank, _OP_RUN, shard)) for rank, shard in zip(ranks, shards, strict=True)]
            for r, works in posted:
                rank = r  # the worker to blame if this send fails
                for w in works:
                    w.wait(_seconds(deadline - time.monotonic()))
            for rank in ranks:
                answers.append(_recv(self._pg, rank, _seconds(deadline - time.monotonic()), _seconds(self.timeout)))
        except (RuntimeError, MalformedInput) as exc:
            self._broken = True
            failure = self._failure(rank, exc)
            self.close()
            raise failure from exc
        for rank, (status, data) in zip(ranks, answers, strict=True):
            if status != _OK:
                raise _error_of(rank, data)
        return concat_responses([data for _, data in answers], self._server.runtime)

    def close(self) -> None:
        """Stop every worker (local ones are reaped; killed if they do not exit); idempotent."""
        pg, self._pg = self._pg, None
        if pg is not None and not self._broken:
            with contextlib.suppress(Exception):
                for rank in range(1, self.world_size):
                    for w in _send(pg, rank, _OP_STOP, b""):
                        w.wait(_seconds(5.0))
        procs = list(self._procs.values())
        _stop_all(procs, wait=5.0 if not self._broken else 0.0)
        if pg is not None:
            with contextlib.suppress(Exception):
                pg.shutdown()
        self._broken = True
        self._store = None

    def __enter__(self) -> ParallelServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------------------------- files and CLI
def write_worker_files(directory: str | Path, plan: Plan, public_context: bytes,
                       model: torch.nn.Module) -> dict[str, Path]:
    """Write what a remote worker loads (``plan.json``, ``context.bin``, ``model.pt``) into ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    paths = {"plan": d / "plan.json", "context": d / "context.bin", "model": d / "model.pt"}
    plan.save(paths["plan"])
    paths["context"].write_bytes(public_context)
    paths["model"].write_bytes(_model_bytes(model))
    return paths


def main(argv: list[str] | None = None) -> int:
    """``python -m privml.parallel``: be one remote worker of a ParallelServer."""
    p = argparse.ArgumentParser(prog="python -m privml.parallel", description=main.__doc__)
    p.add_argument("--init-method", required=True, help="the coordinator's tcp://HOST:PORT")
    p.add_argument("--rank", type=int, required=True, help="this worker's rank (1 .. world size - 1)")
    p.add_argument("--world-size", type=int, required=True, help="1 (coordinator) + local + remote workers")
    p.add_argument("--plan", required=True, help="plan JSON (Plan.save)")
    p.add_argument("--context", required=True, help="public CKKS context bytes (session.public_context())")
    p.add_argument("--model", required=True, help="torch.save'd compiled model (unpickled: trusted files only)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a request or send may take")
    p.add_argument("--start-timeout", type=float, default=120.0, help="seconds to reach the coordinator")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    try:
        plan = Plan.load(args.plan)
        serve(plan, Path(args.context).read_bytes(), Path(args.model).read_bytes(), rank=args.rank,
              world_size=args.world_size, init_method=args.init_method, timeout=args.timeout,
              start_timeout=args.start_timeout)
    except (PrivmlError, OSError) as exc:
        print(f"privml worker {args.rank}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
