"""MPC parties that stay up: start the party processes once, run many jobs on them, tear them down cleanly.

``run_parties`` pays for spawning Python, importing torch and CrypTen and a gloo rendezvous on every call
(seconds); a :class:`PartyPool` pays it once. Each party process initialises CrypTen once and then serves
jobs ``fn(ctx, *args)`` one at a time, each ending in a barrier, exactly as ``run_parties`` runs them.

Failure model: a job that raises, a party that dies, or a job that outlives ``deadline`` seconds raises
:class:`~privml.errors.PartyFailure` naming the party, and the pool is torn down at once (its processes may be
stuck in a collective the others left); the next :meth:`PartyPool.run` starts a fresh pool. Party processes
die with their parent (``PR_SET_PDEATHSIG``), so a killed launcher leaves no orphans.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import time
import weakref
from collections.abc import Callable
from typing import Any

from privml.errors import InvalidInput
from privml.parties.compat import import_crypten
from privml.parties.launcher import (
    _DEALER_IDLE_S,
    TTP_ROLE,
    PartyContext,
    RunResult,
    _check_common,
    _check_crypten_installed,
    _collect,
    _die_with_parent,
    _dist_timeout,
    _free_port,
    _party_logger,
    _raise_unfinished,
    _report_error,
    _stop_all,
    check_main_guard,
)


def _send(conn: multiprocessing.connection.Connection, message: Any) -> None:
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def _pool_party(conn: multiprocessing.connection.Connection, rank: int, world_size: int, roles: list[str],
                timeout: float, ttp: bool, env: dict[str, str], log_level: int, enclave: dict | None) -> None:
    """A pooled party: initialise CrypTen once, answer "ready", then run jobs until told to stop."""
    _die_with_parent()
    try:
        crypten = import_crypten()
        is_dealer = ttp and rank == world_size
        os.environ.update({**env, "DISTRIBUTED_BACKEND": "gloo", "WORLD_SIZE": str(world_size), "RANK": str(rank)})
        crypten.cfg.mpc.provider = "TTP" if ttp else "TFP"
        if is_dealer:  # CrypTen's dealer serves triples to the parties until they shut down
            with _dist_timeout(max(timeout, _DEALER_IDLE_S)):
                _send(conn, ("ok", "ready"))
                crypten.mpc.provider.TTPServer()
            os._exit(0)
        with _dist_timeout(timeout):
            crypten.init(party_name=roles[rank])
        if enclave is not None:
            from privml.parties.dealer import install_enclave_provider

            install_enclave_provider(**enclave, rank=rank)
        provider = "TTP" if ttp else "ENCLAVE" if enclave is not None else "TFP"
        ctx = PartyContext(rank=rank, world_size=world_size, roles=list(roles),
                           logger=_party_logger(roles[rank], rank, log_level, True), timeout=timeout,
                           provider=provider)
        _send(conn, ("ok", "ready"))
        while True:
            message = pickle.loads(conn.recv_bytes())
            if message[0] == "stop":
                break
            _, fn, args = message
            result = fn(ctx, *args)
            crypten.comm.get().barrier()  # nobody takes the next job before everyone finished this one
            _send(conn, ("ok", result))
        crypten.uninit()
        conn.close()
        os._exit(0)
    except BaseException as exc:  # noqa: B036 - report everything, including KeyboardInterrupt
        _report_error(conn, exc)


class PartyPool:
    """``world_size`` party processes kept up between jobs (``run``), on this machine or others.

    Same arguments as :func:`~privml.parties.launcher.run_parties` (``ttp``, ``dealer``, ``roles``, ``timeout``:
    the gloo timeout of every wait on another party). ``deadline``: seconds any one job may take in all before
    ``PartyFailure`` (None: no overall limit). ``remote``: ``{rank: "host:port"}`` of party hosts on other
    machines (:mod:`privml.parties.remote`; ``authkey`` their shared key, ``master_addr``/``master_port`` where
    the parties meet, reachable from every machine). Use as a context manager, or ``start()``/``close()``.
    """

    def __init__(self, world_size: int, *, timeout: float = 120.0, roles: list[str] | None = None,
                 ttp: bool = False, dealer: Any = None, log_level: int = logging.WARNING,
                 deadline: float | None = None, remote: dict[int, str] | None = None, authkey: bytes | None = None,
                 master_addr: str | None = None, master_port: int | None = None) -> None:
        self.names = _check_common(world_size, timeout, roles, deadline, ttp, dealer)
        self.remote = dict(remote or {})
        if any(not isinstance(r, int) or not 0 <= r < world_size for r in self.remote):
            raise InvalidInput(f"privml: remote ranks must be party ranks 0..{world_size - 1}, got "
                               f"{sorted(self.remote)}")
        if self.remote and (ttp or dealer is not None):
            raise InvalidInput("privml: remote parties run with CrypTen's TFP provider (no ttp or dealer yet)")
        self.authkey, self.master_addr, self.master_port = authkey, master_addr, master_port
        self.world_size, self.timeout, self.ttp, self.dealer = world_size, float(timeout), ttp, dealer
        self.log_level, self.deadline = log_level, deadline
        self.procs: list[Any] = []
        self.conns: list[Any] = []
        self.jobs = 0
        self.starts = 0
        self._finalizer: weakref.finalize | None = None

    @property
    def provider(self) -> str:
        return "TTP" if self.ttp else "ENCLAVE" if self.dealer is not None else "TFP"

    @property
    def alive(self) -> bool:
        return bool(self.procs) and all(p.is_alive() for p in self.procs)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def start(self) -> PartyPool:
        """Spawn the parties and wait until every one is initialised (a no-op if the pool is up)."""
        if self.alive:
            return self
        self.close()
        _check_crypten_installed()
        check_main_guard()
        deal = None
        if self.dealer is not None:
            from privml.parties.dealer import EnclaveDealer

            deal = EnclaveDealer.coerce(self.dealer).open_session(self.world_size, timeout=self.timeout)
        n = self.world_size + (1 if self.ttp else 0)
        env = {"MASTER_ADDR": self.master_addr or "127.0.0.1",
               "MASTER_PORT": str(self.master_port or _free_port()), "RENDEZVOUS": "env://"}
        mp = multiprocessing.get_context("spawn")
        all_names = self.names + ([TTP_ROLE] if self.ttp else [])
        try:
            for rank in range(n):
                if rank in self.remote:  # a party host on another machine (privml.parties.remote)
                    from privml.parties.remote_link import connect

                    proc, parent = connect(self.remote[rank], self.authkey, (
                        rank, self.world_size, self.names, self.timeout, self.ttp, env, self.log_level, None),
                        self.timeout)
                    self.procs.append(proc)
                    self.conns.append(parent)
                    continue
                parent, child = mp.Pipe(duplex=True)
                enclave = deal.for_party(rank, self.timeout) if deal is not None and rank < self.world_size else None
                proc = mp.Process(target=_pool_party, name=f"privml-pool-{all_names[rank]}", daemon=True,
                                  args=(child, rank, self.world_size, self.names, self.timeout, self.ttp, env,
                                        self.log_level, enclave))
                proc.start()
                child.close()  # EOF on the parent's end once the party is gone
                self.procs.append(proc)
                self.conns.append(parent)
            self._finalizer = weakref.finalize(self, _stop_all, list(self.procs))
            self._collect(range(n), "start", deadline=max(self.timeout, 60.0) + 60.0)
        except BaseException:
            self.close()
            raise
        self.starts += 1
        return self

    def run(self, fn: Callable[..., Any], args: tuple = (), *, rank_args: list[tuple] | None = None) -> RunResult:
        """Run ``fn(ctx, *args, *rank_args[r])`` in every party (starting the pool first if it is down)."""
        if not callable(fn):
            raise InvalidInput(f"fn must be callable, got {type(fn).__name__}")
        if rank_args is not None and (len(rank_args) != self.world_size
                                      or not all(isinstance(a, tuple) for a in rank_args)):
            raise InvalidInput(f"rank_args must be {self.world_size} tuples (one per party), got {rank_args!r:.200}")
        self.start()
        t0 = time.perf_counter()
        try:
            for rank in range(self.world_size):
                own = tuple(rank_args[rank]) if rank_args is not None else ()
                try:
                    payload = pickle.dumps(("job", fn, tuple(args) + own), protocol=pickle.HIGHEST_PROTOCOL)
                except (pickle.PicklingError, AttributeError, TypeError) as exc:
                    raise InvalidInput(f"fn and args must be picklable (a module-level function and plain data) "
                                       f"to reach a party process: {exc}") from exc
                self.conns[rank].send_bytes(payload)
            results = self._collect(range(self.world_size), "job", deadline=self.deadline)
        except BaseException:
            self.close()  # a failed or interrupted job leaves the parties in an unknown state
            raise
        self.jobs += 1
        return RunResult([results[r] for r in range(self.world_size)], provider=self.provider,
                         world_size=self.world_size, roles=self.names, seconds=time.perf_counter() - t0)

    def _collect(self, ranks: Any, what: str, deadline: float | None) -> dict[int, Any]:
        """Every rank's answer; PartyFailure naming the culprit on an error, a death or the deadline."""
        ranks = list(ranks)
        until = None if deadline is None else time.perf_counter() + deadline
        results, failures = _collect(self.procs, self.conns, self.timeout, until, ranks)
        _raise_unfinished(ranks, results, failures, self.names + ([TTP_ROLE] if self.ttp else []), self.timeout,
                          deadline, what, "; the pool was torn down")
        return results

    def close(self) -> None:
        """Stop every party (politely, then by signal) and reap them; safe to call twice."""
        if not self.procs:
            return
        for proc, conn in zip(self.procs, self.conns, strict=True):
            if proc.is_alive():
                with contextlib.suppress(Exception):
                    _send(conn, ("stop",))
        _stop_all(self.procs, wait=2.0)
        for conn in self.conns:
            with contextlib.suppress(Exception):
                conn.close()
        if self._finalizer is not None:
            self._finalizer.detach()
        self.procs, self.conns, self._finalizer = [], [], None

    def __enter__(self) -> PartyPool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
