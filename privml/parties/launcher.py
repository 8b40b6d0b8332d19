"""Real MPC parties as OS processes, with fault handling.

``run_parties`` spawns one process per party on this machine (plus CrypTen's dealer with
``ttp=True``), rendezvous over loopback, and calls ``crypten.init()`` inside each party so
CrypTen's global state never exists in the caller's process. ``join_party`` is the same
party code for one process of a multi-machine run, configured from arguments or the
standard ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``/``RENDEZVOUS`` variables.

Failure model: a party that raises, dies or stops answering makes ``run_parties`` raise
:class:`~privml.errors.PartyFailure` naming that party; the other parties are stopped. The
torch.distributed (gloo) timeout of every process group is set from ``timeout``, so a
party waiting on a silent peer fails after ``timeout`` seconds, and the parent watches
process exits so a dead party is noticed at once.

Triple provider: CrypTen's default "TFP" (trusted first party) lets party 0 generate every
Beaver triple itself: cheap (no offline traffic) but party 0 could cheat, so it is not a
secure deployment. "TTP" (``ttp=True``) runs a separate dealer process. "ENCLAVE"
(``dealer=EnclaveDealer(...)``, :mod:`privml.parties.dealer`) takes them from the attested enclave:
the launcher opens a dealing session before the parties start and each party verifies the enclave's
attestation before it uses a triple. The choice is recorded in ``PartyContext.provider`` and
``RunResult.provider`` so reports can state it.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib.util
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from privml.errors import BackendUnavailable, InvalidInput, PartyFailure
from privml.parties.compat import INSTALL_HINT, import_crypten

TTP_ROLE = "ttp"
_ENV_KEYS = ("DISTRIBUTED_BACKEND", "RENDEZVOUS", "WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")
# After the first failure, how long the parent keeps listening for the other parties'
# reports (to find the root cause) before it terminates them.
_MAX_GRACE_S = 2.0
_POLL_S = 0.2
# Least time parties get to find each other at start-up (see _dist_timeout).
_RENDEZVOUS_MIN_S = 60.0
# How long CrypTen's dealer waits for party 0's next request before giving up.
_DEALER_IDLE_S = 24 * 3600.0
# How long a finished run waits for parties to exit on their own before terminating them.
_EXIT_GRACE_S = 5.0


@dataclass
class PartyContext:
    """What party code receives as its first argument: who it is and how long to wait."""

    rank: int
    world_size: int
    roles: list[str]
    logger: logging.Logger
    timeout: float
    provider: str  # "TFP" (party 0 deals triples), "TTP" (separate dealer process) or "ENCLAVE" (attested enclave)

    @property
    def role(self) -> str:
        return self.roles[self.rank]


class RunResult(list):
    """Per-rank results of :func:`run_parties` (a plain list) plus run metadata."""

    def __init__(self, results: list[Any], *, provider: str, world_size: int, roles: list[str],
                 seconds: float) -> None:
        super().__init__(results)
        self.provider = provider
        self.world_size = world_size
        self.roles = list(roles)
        self.seconds = seconds

    def metadata(self) -> dict:
        """Picklable description of how the run was made (for reports)."""
        return {"provider": self.provider, "world_size": self.world_size, "roles": self.roles,
                "seconds": self.seconds}


# ----------------------------------------------------------------------------- party side


def _is_comm_error(exc: BaseException) -> bool:
    """True for errors that come from the network layer (a peer vanished, a timeout).

    torch raises most gloo failures as a plain RuntimeError ("Connection closed by peer",
    "Timed out waiting ...", "Application timeout caused pair closure"), so besides
    DistError we look at the message and at where the error was raised.
    """
    try:
        import torch.distributed as dist

        if isinstance(exc, dist.DistError):
            return True
    except (ImportError, AttributeError):
        pass
    if not isinstance(exc, (RuntimeError, OSError, ConnectionError)):
        return False
    text = str(exc).lower()
    markers = ("gloo", "connection closed", "connection reset", "timed out", "timeout", "broken pipe",
               "pair closure", "socket", "connection refused")
    if any(m in text for m in markers):
        return True
    frames = traceback.extract_tb(exc.__traceback__)
    innermost = frames[-1].filename.replace(os.sep, "/") if frames else ""
    return "torch/distributed/" in innermost or "crypten/communicator/" in innermost


@contextlib.contextmanager
def _dist_timeout(seconds: float) -> Iterator[None]:
    """Give every process group CrypTen creates a gloo timeout of ``seconds``.

    CrypTen calls ``dist.init_process_group`` and ``dist.new_group`` without a timeout, so
    both would wait 30 minutes for a silent peer; we fill in the keyword while it sets up.
    The first rendezvous gets at least ``_RENDEZVOUS_MIN_S``: parties start at different
    times (importing torch takes seconds on a busy machine). CrypTen runs all its traffic
    on the groups made by ``new_group``, which get exactly ``seconds``.
    """
    import torch.distributed as dist

    delta = datetime.timedelta(seconds=seconds)
    rendezvous = datetime.timedelta(seconds=max(seconds, _RENDEZVOUS_MIN_S))
    original_init, original_new = dist.init_process_group, dist.new_group

    def init_process_group(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", rendezvous)
        return original_init(*args, **kwargs)

    def new_group(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", delta)
        return original_new(*args, **kwargs)

    dist.init_process_group, dist.new_group = init_process_group, new_group
    try:
        yield
    finally:
        dist.init_process_group, dist.new_group = original_init, original_new


@contextlib.contextmanager
def _party_env(values: dict[str, str]) -> Iterator[None]:
    """Set CrypTen's/torch's rendezvous variables for the duration of a party."""
    saved = {key: os.environ.get(key) for key in _ENV_KEYS}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def _party_logger(role: str, rank: int, level: int, own_handler: bool) -> logging.Logger:
    logger = logging.getLogger(f"privml.mpc.party.{role}")
    logger.setLevel(level)
    if own_handler and not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"%(asctime)s [{role} rank {rank}] %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    return logger


def _run_party(fn: Callable[..., Any], args: tuple, *, rank: int, world_size: int, roles: list[str],
               timeout: float, ttp: bool, env: dict[str, str], log_level: int, spawned: bool,
               enclave: dict | None = None) -> Any:
    """Initialise gloo + CrypTen for one party in this process, run ``fn``, shut down.

    Rank ``world_size`` with ``ttp=True`` is CrypTen's dealer: it serves triples until party
    0 tells it to stop and returns None. ``enclave`` (keyword arguments of
    :func:`privml.parties.dealer.install_enclave_provider`): take triples from the attested enclave.
    """
    crypten = import_crypten()
    provider = "TTP" if ttp else "ENCLAVE" if enclave is not None else "TFP"
    is_dealer = ttp and rank == world_size
    if is_dealer:
        # The dealer idles between triple requests (e.g. while parties do local work), so
        # its waits must not expire; a dead party 0 still closes its socket at once.
        timeout = max(timeout, _DEALER_IDLE_S)
    role = TTP_ROLE if is_dealer else roles[rank]
    env = {**env, "DISTRIBUTED_BACKEND": "gloo", "WORLD_SIZE": str(world_size), "RANK": str(rank)}
    saved_provider = crypten.cfg.mpc.provider
    crypten.cfg.mpc.provider = "TTP" if ttp else "TFP"  # "ENCLAVE" is installed after crypten.init()
    try:
        with _party_env(env), _dist_timeout(timeout):
            if is_dealer:
                crypten.mpc.provider.TTPServer()  # calls crypten.init() itself; returns on "terminate"
                crypten.uninit()
                return None
            crypten.init(party_name=role)
        try:
            if enclave is not None:
                from privml.parties.dealer import install_enclave_provider

                install_enclave_provider(**enclave, rank=rank)  # attestation checked before any triple
            logger = _party_logger(role, rank, log_level, spawned)
            ctx = PartyContext(rank=rank, world_size=world_size, roles=list(roles), logger=logger,
                               timeout=timeout, provider=provider)
            result = fn(ctx, *args)
            # Nobody leaves before everyone finished: a party stuck in local work is then
            # reported by the others' barrier timeout instead of hanging the run.
            crypten.comm.get().barrier()
        except BaseException:
            # A spawned party reports and exits at once; an in-process party (join_party)
            # tears CrypTen down so the process can go on.
            if not spawned and crypten.is_initialized():
                with contextlib.suppress(Exception):
                    crypten.uninit()
            raise
        crypten.uninit()
        return result
    finally:
        if enclave is not None:
            from privml.parties.dealer import uninstall_enclave_provider

            with contextlib.suppress(Exception):
                uninstall_enclave_provider()
        crypten.cfg.mpc.provider = saved_provider


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process if the parent dies, so no party is orphaned."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except OSError:
        pass
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died while this process was still starting up
        os._exit(1)


def _child_main(conn: multiprocessing.connection.Connection, fn: Callable[..., Any], args: tuple,
                rank: int, world_size: int, roles: list[str], timeout: float, ttp: bool,
                env: dict[str, str], log_level: int, enclave: dict | None = None) -> None:
    """Entry point of a spawned party: run it and send ("ok", result) or ("error", info)."""
    _die_with_parent()
    try:
        result = _run_party(fn, args, rank=rank, world_size=world_size, roles=roles, timeout=timeout,
                            ttp=ttp, env=env, log_level=log_level, spawned=True, enclave=enclave)
        # Plain pickle (not multiprocessing's, which passes torch tensors as shared-memory
        # handles that die with this process); an unpicklable result lands in `except`.
        conn.send_bytes(pickle.dumps(("ok", result), protocol=pickle.HIGHEST_PROTOCOL))
        conn.close()
    except BaseException as exc:  # noqa: B036 - report everything, including KeyboardInterrupt
        _report_error(conn, exc)


def _report_error(conn: multiprocessing.connection.Connection, exc: BaseException) -> None:
    """A party's last act on failure: send ("error", info) to the launcher and exit at once."""
    info = {"type": type(exc).__name__, "message": str(exc), "comm": _is_comm_error(exc),
            "traceback": traceback.format_exc()}
    with contextlib.suppress(Exception):
        conn.send_bytes(pickle.dumps(("error", info)))
        conn.close()
    # Skip interpreter teardown: a half-open process group can block it.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(1)


# ----------------------------------------------------------------------------- parent side


def check_main_guard() -> None:
    """Refuse to spawn parties from a script that would start them again when each party re-imports it.

    Party processes are spawned: each imports the main script afresh, so code that starts a session at the top
    level of a script without ``if __name__ == "__main__":`` runs again inside every party (CrypTen then
    fails with a misleading error). Checked on the script's source before anything is spawned.
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path or not str(path).endswith(".py") or getattr(main, "__spec__", None) is not None:
        return  # an interactive session, python -c, python -m (the module's own guard applies), a frozen app
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except (OSError, UnicodeDecodeError):
        return
    if "__name__" in source and "__main__" in source:
        return
    raise InvalidInput(
        f"privml: MPC parties are separate processes that re-import your script {path}; put the code that runs "
        "the session under a main guard, e.g.\n\n    if __name__ == \"__main__\":\n        main()\n\n"
        "(functions and classes the parties need stay at the top level)")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _check_crypten_installed() -> None:
    try:
        found = importlib.util.find_spec("crypten") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise BackendUnavailable(f"cannot find 'crypten'. {INSTALL_HINT}")


def _check_common(world_size: Any, timeout: Any, roles: list[str] | None, deadline: Any = None,
                  ttp: bool = False, dealer: Any = None) -> list[str]:
    """The arguments ``run_parties`` and ``PartyPool`` share, checked; returns the role names."""
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise InvalidInput(f"world_size must be an int >= 1, got {world_size!r}")
    if not isinstance(timeout, (int, float)) or not timeout > 0:
        raise InvalidInput(f"timeout must be a positive number of seconds, got {timeout!r}")
    if deadline is not None and not (isinstance(deadline, (int, float)) and deadline > 0):
        raise InvalidInput(f"deadline must be a positive number of seconds or None, got {deadline!r}")
    if dealer is not None and ttp:
        raise InvalidInput("choose one dealer of Beaver triples: ttp=True (CrypTen's dealer process) or "
                           "dealer=EnclaveDealer(...) (the attested enclave), not both")
    if roles is None:
        return [f"party{r}" for r in range(world_size)]
    roles = list(roles)
    if len(roles) != world_size or not all(isinstance(r, str) and r for r in roles):
        raise InvalidInput(f"roles must be {world_size} non-empty strings, got {roles!r}")
    if len(set(roles)) != len(roles) or TTP_ROLE in roles:
        raise InvalidInput(f"roles must be unique and not {TTP_ROLE!r}, got {roles!r}")
    return roles


def _describe_exit(exitcode: int | str | None) -> str:
    if exitcode is None:
        return "is still running"
    if isinstance(exitcode, str):  # a party on another machine (privml.parties.remote)
        return exitcode
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"was killed by {name}"
    return f"exited with code {exitcode}"


def _failure_error(failures: dict[int, dict], silent: list[int], names: list[str],
                   timeout: float) -> PartyFailure:
    """Pick the root cause among the failures and build one readable PartyFailure.

    Order: a party that died without reporting, then a party that raised a non-network
    error, then (when every report is a network error) a party that never answered, then
    the first network error.
    """
    died = [r for r, f in failures.items() if f["kind"] == "died"]
    raised = [r for r, f in failures.items() if f["kind"] == "raised" and not f["comm"]]
    comm = [r for r, f in failures.items() if f["kind"] == "raised" and f["comm"]]
    if died:
        rank = died[0]
        headline = f"party {rank} ({names[rank]}) died: it {failures[rank]['exit']} without reporting"
    elif raised:
        rank = raised[0]
        f = failures[rank]
        headline = f"party {rank} ({names[rank]}) raised {f['type']}: {f['message']}"
    elif silent:
        rank = silent[0]
        headline = (f"party {rank} ({names[rank]}) stopped answering: the others timed out waiting "
                    f"for it (timeout {timeout:g} s)")
    else:
        rank = comm[0]
        f = failures[rank]
        headline = f"party {rank} ({names[rank]}) raised {f['type']}: {f['message']}"
    lines = [headline]
    for r, f in sorted(failures.items()):
        if r == rank:
            continue
        if f["kind"] == "died":
            lines.append(f"  also: party {r} ({names[r]}) {f['exit']} without reporting")
        else:
            lines.append(f"  also: party {r} ({names[r]}) raised {f['type']}: {f['message'][:300]}")
    tb = failures.get(rank, {}).get("traceback")
    if tb:
        lines.append(f"--- traceback in party {rank} ---\n{tb.rstrip()}")
    err = PartyFailure("\n".join(lines))
    err.rank = rank
    err.role = names[rank]
    err.failures = failures
    return err


def run_parties(fn: Callable[..., Any], world_size: int, args: tuple = (), *, timeout: float = 120.0,
                roles: list[str] | None = None, ttp: bool = False,
                log_level: int = logging.WARNING, rank_args: list[tuple] | None = None,
                dealer: Any = None, deadline: float | None = None) -> RunResult:
    """Run ``fn(ctx, *args)`` in ``world_size`` real party processes and return their results.

    ``rank_args`` (one tuple per party) gives each party extra private arguments, appended to
    ``args``: party r runs ``fn(ctx, *args, *rank_args[r])`` and no other process receives them
    (e.g. the data owner's input goes to the data owner only).

    ``fn`` and ``args`` must be picklable (a module-level function), and so must each
    party's return value. Returns a :class:`RunResult` (a list indexed by rank) whose
    ``provider`` says who dealt the Beaver triples. ``timeout`` (seconds) bounds every wait
    on another party. Raises :class:`PartyFailure` naming the party that raised, died or
    stopped answering; all party processes are gone when this returns or raises.

    ``dealer`` (a :class:`privml.parties.dealer.EnclaveDealer`): the attested enclave deals the
    triples (provider "ENCLAVE"); this process verifies its attestation and opens a dealing session
    before any party starts (AttestationError / PartyFailure if the enclave is not the expected one or
    is unreachable), and every party verifies it again before using a triple.

    ``deadline`` (seconds, None: none): the whole run, start-up included, must finish within it, else
    ``PartyFailure`` naming the parties that never answered (``timeout`` alone cannot see parties that are all
    stuck in local work, or a data owner's source that blocks).
    """
    names = _check_common(world_size, timeout, roles, deadline, ttp, dealer)
    if not callable(fn):
        raise InvalidInput(f"fn must be callable, got {type(fn).__name__}")
    _check_crypten_installed()
    check_main_guard()
    if rank_args is not None and (len(rank_args) != world_size or not all(isinstance(a, tuple) for a in rank_args)):
        raise InvalidInput(f"rank_args must be {world_size} tuples (one per party), got {rank_args!r:.200}")
    deal = None
    if dealer is not None:
        from privml.parties.dealer import EnclaveDealer

        deal = EnclaveDealer.coerce(dealer).open_session(world_size, timeout=float(timeout))
    n_procs = world_size + (1 if ttp else 0)
    all_names = names + ([TTP_ROLE] if ttp else [])
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RENDEZVOUS": "env://"}
    mp = multiprocessing.get_context("spawn")
    start = time.perf_counter()
    procs, conns = [], []
    try:
        for rank in range(n_procs):
            recv_end, send_end = mp.Pipe(duplex=False)
            own = tuple(rank_args[rank]) if rank_args is not None and rank < world_size else ()
            proc = mp.Process(target=_child_main, name=f"privml-{all_names[rank]}",
                              args=(send_end, fn, tuple(args) + own, rank, world_size, names, float(timeout),
                                    ttp, env, log_level,
                                    deal.for_party(rank, float(timeout)) if deal is not None else None))
            try:
                proc.start()
            except (pickle.PicklingError, AttributeError, TypeError) as exc:
                raise InvalidInput(f"fn and args must be picklable (a module-level function and plain "
                                   f"data) to reach a party process: {exc}") from exc
            send_end.close()  # the parent keeps only the reading end: EOF once the child is gone
            procs.append(proc)
            conns.append(recv_end)
        results, failures = _collect(procs, conns, timeout, None if deadline is None else start + deadline)
        _raise_unfinished(range(n_procs), results, failures, all_names, timeout, deadline, "run")
        _stop_all(procs, wait=_EXIT_GRACE_S)
    finally:
        _stop_all(procs)
        for conn in conns:
            conn.close()
    seconds = time.perf_counter() - start
    provider = "TTP" if ttp else "ENCLAVE" if deal is not None else "TFP"
    return RunResult([results[r] for r in range(world_size)], provider=provider,
                     world_size=world_size, roles=names, seconds=seconds)


def _collect(procs: list, conns: list, timeout: float, until: float | None = None,
             ranks: Any = None) -> tuple[dict[int, Any], dict[int, dict]]:
    """Read the reports of ``ranks`` (default: every party); stop listening shortly after the first
    failure, or at ``until`` (a ``time.perf_counter()`` instant). Ranks in neither dict never answered."""
    results: dict[int, Any] = {}
    failures: dict[int, dict] = {}
    pending = set(range(len(procs)) if ranks is None else ranks)
    first_failure = None
    grace = min(_MAX_GRACE_S, timeout)
    while pending:
        waitables = [conns[r] for r in pending] + [procs[r].sentinel for r in pending]
        multiprocessing.connection.wait(waitables, timeout=_POLL_S)
        for rank in sorted(pending):
            message = _read_report(procs[rank], conns[rank])
            if message is None:
                continue
            pending.discard(rank)
            kind, payload = message
            if kind == "ok":
                results[rank] = payload
            else:
                failures[rank] = payload
        if failures and first_failure is None:
            first_failure = time.monotonic()
        if first_failure is not None and time.monotonic() - first_failure > grace:
            break
        if until is not None and time.perf_counter() > until:
            break
    return results, failures


def _raise_unfinished(ranks: Any, results: dict[int, Any], failures: dict[int, dict], names: list[str],
                      timeout: float, deadline: float | None, what: str, after: str = "") -> None:
    """PartyFailure for what :func:`_collect` left undone: the parties' failures, or (none failed) the ranks
    that never answered within ``deadline``. Returns when every rank answered."""
    late = [r for r in ranks if r not in results and r not in failures]
    if failures:
        raise _failure_error(failures, late, names, timeout)
    if late:
        err = PartyFailure(f"privml: the MPC {what} did not finish within its deadline of {deadline:g} s: "
                           + ", ".join(f"party {r} ({names[r]})" for r in late) + " never answered" + after)
        err.rank, err.role, err.failures = late[0], names[late[0]], {}
        raise err


def _read_report(proc: Any, conn: Any) -> tuple[str, Any] | None:
    """One party's report if it has one (or has died), else None while it is still working."""
    if not conn.poll():
        if proc.is_alive():
            return None
        if not conn.poll():  # exited between the two checks without sending anything
            proc.join(1.0)
            return "error", {"kind": "died", "exit": _describe_exit(proc.exitcode)}
    try:
        data = conn.recv_bytes()
    except (EOFError, OSError):
        proc.join(1.0)
        return "error", {"kind": "died", "exit": _describe_exit(proc.exitcode)}
    try:
        kind, payload = pickle.loads(data)
    except Exception as exc:  # e.g. the result's class cannot be imported in the parent
        return "error", {"kind": "raised", "type": type(exc).__name__, "comm": False, "traceback": "",
                         "message": f"its result could not be unpickled in the parent: {exc}"}
    if kind == "ok":
        return "ok", payload
    return "error", {"kind": "raised", **payload}


def _stop_all(procs: list, wait: float = 0.0) -> None:
    """Give parties ``wait`` seconds to exit, then terminate (then kill) the rest and reap them all."""
    deadline = time.monotonic() + wait
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    deadline = time.monotonic() + 2.0
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join(1.0)


# ----------------------------------------------------------------------------- across machines


def _env_int(name: str, value: int | None) -> int:
    if value is not None:
        return value
    raw = os.environ.get(name)
    if raw is None:
        raise InvalidInput(f"{name} is not given: pass it as an argument or set the {name} variable")
    try:
        return int(raw)
    except ValueError:
        raise InvalidInput(f"{name}={raw!r} is not an integer") from None


def join_party(fn: Callable[..., Any], args: tuple = (), *, rank: int | None = None,
               world_size: int | None = None, master_addr: str | None = None,
               master_port: int | None = None, timeout: float = 120.0, roles: list[str] | None = None,
               ttp: bool = False, log_level: int = logging.WARNING, dealer: Any = None,
               deal_session: bytes | None = None) -> Any:
    """Be one party of a multi-machine run: initialise gloo + CrypTen here and run ``fn(ctx, *args)``.

    Arguments left as None come from ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
    ``MASTER_PORT``; without an address, ``RENDEZVOUS`` is used as the init-method URL
    (e.g. ``tcp://10.0.0.1:29500``). With ``ttp=True`` the process of rank ``world_size``
    is the dealer: it serves triples (waiting up to a day between requests) and returns None.
    Network failures raise :class:`PartyFailure`; errors raised by ``fn`` itself propagate
    unchanged. ``dealer`` (an :class:`~privml.parties.dealer.EnclaveDealer`) with ``deal_session``
    (from ``dealer.open_session(world_size).deal_session``, opened once for all parties): the attested
    enclave deals the triples; this party verifies it first and binds its slot with a fresh secret.
    """
    rank = _env_int("RANK", rank)
    world_size = _env_int("WORLD_SIZE", world_size)
    names = _check_common(world_size, timeout, roles)
    top = world_size if ttp else world_size - 1
    if not 0 <= rank <= top:
        raise InvalidInput(f"rank must be in 0..{top} for world_size {world_size} (ttp={ttp}), got {rank}")
    master_addr = master_addr if master_addr is not None else os.environ.get("MASTER_ADDR")
    port = master_port if master_port is not None else os.environ.get("MASTER_PORT")
    if master_addr is not None and port is not None:
        env = {"MASTER_ADDR": str(master_addr), "MASTER_PORT": str(port), "RENDEZVOUS": "env://"}
    elif os.environ.get("RENDEZVOUS"):
        env = {"RENDEZVOUS": os.environ["RENDEZVOUS"]}
    else:
        raise InvalidInput("no rendezvous: give master_addr and master_port (or MASTER_ADDR/MASTER_PORT), "
                           "or set RENDEZVOUS to an init-method URL such as tcp://host:port")
    _check_crypten_installed()
    enclave = None
    if dealer is not None:
        if ttp or not isinstance(deal_session, bytes):
            raise InvalidInput("dealer=... needs deal_session (the bytes of dealer.open_session(world_size)) "
                               "and cannot be combined with ttp=True")
        from privml.parties.dealer import EnclaveDealer

        d = EnclaveDealer.coerce(dealer)
        enclave = {"address": d.address, "deal_session": deal_session, "root_certificate": d.root_certificate,
                   "expected_pcrs": d.expected_pcrs, "allowed_regions": d.allowed_regions,
                   "timeout": d.timeout or float(timeout)}
    try:
        return _run_party(fn, tuple(args), rank=rank, world_size=world_size, roles=names,
                          timeout=float(timeout), ttp=ttp, env=env, log_level=log_level, spawned=False,
                          enclave=enclave)
    except PartyFailure:
        raise
    except Exception as exc:
        if _is_comm_error(exc):
            raise PartyFailure(f"party {rank}: lost contact with the other parties: "
                               f"{type(exc).__name__}: {exc}") from exc
        raise


# ----------------------------------------------------------------------------- consistency


def model_digest(model: Any, *input_shapes: tuple[int, ...]) -> bytes:
    """sha256 of a module's architecture, parameter names/shapes/dtypes and input shapes.

    Weights are not hashed: parties that hold different weights (or none) still agree on
    the computation they are about to run.
    """
    h = hashlib.sha256(repr(model).encode())
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
    for shape in input_shapes:
        h.update(f"input:{tuple(shape)};".encode())
    return h.digest()


def agree(ctx: PartyContext, obj_digest: bytes, what: str = "model/shape") -> None:
    """Check that every party holds the same ``obj_digest``; raise PartyFailure in all of them if not.

    Call it in every party at the start (e.g. with :func:`model_digest`). Parties in the
    minority (ties: those differing from the lowest rank) are named in the message.
    """
    if not isinstance(obj_digest, (bytes, bytearray)):
        raise InvalidInput(f"obj_digest must be bytes, got {type(obj_digest).__name__}")
    import torch

    crypten = import_crypten()
    mine = hashlib.sha256(bytes(obj_digest)).digest()  # fixed length for the all-gather
    gathered = crypten.comm.get().all_gather(torch.tensor(list(mine), dtype=torch.long))
    digests = [bytes(t.tolist()) for t in gathered]
    if len(set(digests)) == 1:
        return
    reference = max(digests, key=digests.count)  # first (lowest-rank) digest among the most common
    odd = [r for r, d in enumerate(digests) if d != reference]
    who = f"party {odd[0]} has" if len(odd) == 1 else f"parties {', '.join(map(str, odd))} have"
    seen = ", ".join(f"party {r} ({ctx.roles[r]}): {d.hex()[:12]}" for r, d in enumerate(digests))
    raise PartyFailure(f"{who} a different {what}: digests {seen}")
