"""Real network links between MPC parties on one machine: one network namespace per party, shaped veth links.

Each party runs in its own namespace (``ip netns``) with a veth pair to a bridge; its egress is shaped with
``tc``: ``tbf`` for bandwidth, ``netem`` for one-way delay and jitter. Parties meet over gloo on those links
exactly as on separate machines (``join_party`` with the first party's address). Needs root and ``ip``/``tc``;
:func:`capabilities` says what this machine allows (the kernel may lack ``sch_netem``), so tests can skip with
the reason.

    with NetLab(2, Link(rate_mbit=100)) as lab:
        results = lab.run_parties(fn, args)            # fn(ctx, *args) in each namespace, results per rank
"""

from __future__ import annotations

import contextlib
import os
import pickle
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privml.errors import InvalidInput, PartyFailure

_SUBNET = "10.231.{net}.{host}"


@dataclass(frozen=True)
class Link:
    """How each party's link to the others is shaped (its egress): one-way delay, jitter, bandwidth."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    rate_mbit: float | None = None

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or self.jitter_ms < 0 or (self.rate_mbit is not None and self.rate_mbit <= 0):
            raise InvalidInput(f"privml: a link needs delay/jitter >= 0 and rate > 0, got {self}")


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check)


def capabilities() -> dict[str, str | bool]:
    """{"netns": bool, "bandwidth": bool, "delay": bool, "reason": why something is missing}."""
    out: dict[str, str | bool] = {"netns": False, "bandwidth": False, "delay": False, "reason": ""}
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
        out["reason"] = "network namespaces need root and the ip/tc tools"
        return out
    name = f"pmcap{secrets.token_hex(3)}"
    try:
        if _sh("ip", "netns", "add", name, check=False).returncode != 0:
            out["reason"] = "this machine refuses `ip netns add`"
            return out
        out["netns"] = True
        _sh("ip", "-n", name, "link", "add", "d0", "type", "veth", "peer", "name", "d1", check=False)
        tbf = _sh("ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "d0", "root", "tbf", "rate", "100mbit",
                  "burst", "64kb", "latency", "100ms", check=False)
        out["bandwidth"] = tbf.returncode == 0
        _sh("ip", "netns", "exec", name, "tc", "qdisc", "del", "dev", "d0", "root", check=False)
        netem = _sh("ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "d0", "root", "netem", "delay", "1ms",
                    check=False)
        out["delay"] = netem.returncode == 0
        reasons = []
        if not out["bandwidth"]:
            reasons.append(f"tc tbf: {tbf.stderr.strip()}")
        if not out["delay"]:
            reasons.append(f"tc netem (delay): {netem.stderr.strip() or 'refused'}; the kernel lacks sch_netem")
        out["reason"] = "; ".join(reasons)
    finally:
        _sh("ip", "netns", "del", name, check=False)
    return out


class NetLab:
    """``parties`` network namespaces joined by a bridge, each party's egress shaped by ``link``."""

    def __init__(self, parties: int, link: Link = Link()) -> None:
        if parties < 2:
            raise InvalidInput("privml: a NetLab needs at least 2 parties")
        self.parties, self.link = parties, link
        self.tag = secrets.token_hex(2)
        self.net = 1 + secrets.randbelow(250)
        self.names = [f"pm{self.tag}p{i}" for i in range(parties)]
        self.bridge = f"pm{self.tag}br"
        self.up = False

    def address(self, rank: int) -> str:
        return _SUBNET.format(net=self.net, host=rank + 1)

    def __enter__(self) -> NetLab:
        caps = capabilities()
        if not caps["netns"]:
            raise InvalidInput(f"privml: NetLab: {caps['reason']}")
        if self.link.rate_mbit is not None and not caps["bandwidth"]:
            raise InvalidInput(f"privml: NetLab: bandwidth shaping unavailable ({caps['reason']})")
        if (self.link.delay_ms or self.link.jitter_ms) and not caps["delay"]:
            raise InvalidInput(f"privml: NetLab: delay emulation unavailable ({caps['reason']})")
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        self.up = True
        _sh("ip", "link", "add", self.bridge, "type", "bridge")
        _sh("ip", "link", "set", self.bridge, "up")
        for rank, ns in enumerate(self.names):
            host, inner = f"pm{self.tag}h{rank}", f"pm{self.tag}i{rank}"
            _sh("ip", "netns", "add", ns)
            _sh("ip", "link", "add", host, "type", "veth", "peer", "name", inner)
            _sh("ip", "link", "set", inner, "netns", ns)
            _sh("ip", "-n", ns, "link", "set", inner, "name", "eth0")
            _sh("ip", "-n", ns, "addr", "add", f"{self.address(rank)}/24", "dev", "eth0")
            _sh("ip", "-n", ns, "link", "set", "eth0", "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            _sh("ip", "link", "set", host, "master", self.bridge)
            _sh("ip", "link", "set", host, "up")
            self._shape(ns)

    def _shape(self, ns: str) -> None:
        link = self.link
        tc = ("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0")
        if link.delay_ms or link.jitter_ms:
            delay = ["delay", f"{link.delay_ms}ms"] + ([f"{link.jitter_ms}ms"] if link.jitter_ms else [])
            rate = ["rate", f"{link.rate_mbit}mbit"] if link.rate_mbit else []
            _sh(*tc, "root", "netem", *delay, *rate, "limit", "100000")
        elif link.rate_mbit:
            # a small bucket (16 KiB or 1 ms worth): a real link makes every byte wait, a large bucket would let
            # each round's messages through at full speed
            burst = max(16 * 1024, int(link.rate_mbit * 1e6 / 8 / 1000))
            _sh(*tc, "root", "tbf", "rate", f"{link.rate_mbit}mbit", "burst", str(burst), "latency", "400ms")

    def run(self, fn: Any, args: tuple = (), *, rank_args: list[tuple] | None = None,
            timeout: float = 120.0, roles: list[str] | None = None) -> Any:
        """Like :meth:`PartyPool.run <privml.parties.pool.PartyPool.run>` (a fresh process per party each call), so
        an MPC session can run over these links: ``session.backend.pool = lab``."""
        from privml.parties.launcher import RunResult

        t0 = time.perf_counter()
        names = roles or [f"party{r}" for r in range(self.parties)]
        results = self.run_parties(fn, args, rank_args=rank_args, timeout=timeout, roles=names)
        return RunResult(results, provider="TFP", world_size=self.parties, roles=names,
                         seconds=time.perf_counter() - t0)

    def run_parties(self, fn: Any, args: tuple = (), *, rank_args: list[tuple] | None = None,
                    timeout: float = 120.0, roles: list[str] | None = None) -> list[Any]:
        """``fn(ctx, *args, *rank_args[r])`` in one process per namespace (``join_party``); results by rank."""
        if not self.up:
            raise InvalidInput("privml: use the NetLab as a context manager first")
        port = 29000 + secrets.randbelow(2000)
        with tempfile.TemporaryDirectory(prefix="privml-netlab-") as tmp:
            procs = []
            for rank, ns in enumerate(self.names):
                job = Path(tmp) / f"job{rank}.pkl"  # each party's file holds only its own arguments
                own = tuple(rank_args[rank]) if rank_args is not None else ()
                job.write_bytes(pickle.dumps({"fn": fn, "args": tuple(args) + own, "world_size": self.parties,
                                              "master_addr": self.address(0), "master_port": port,
                                              "timeout": timeout, "roles": roles}))
                env = {**os.environ, "GLOO_SOCKET_IFNAME": "eth0", "PYTHONPATH": os.pathsep.join(sys.path)}
                procs.append(subprocess.Popen(
                    ["ip", "netns", "exec", ns, sys.executable, "-m", "privml.parties.netlab", str(job), str(rank),
                     str(Path(tmp) / f"result{rank}.pkl")], env=env, stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE, text=True))
            end = time.monotonic() + timeout + 60
            errors = {}
            for rank, proc in enumerate(procs):
                try:
                    _, err = proc.communicate(timeout=max(1.0, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    for p in procs:
                        p.kill()
                    raise PartyFailure(f"privml: NetLab party {rank} did not finish within "
                                       f"{timeout + 60:g} s") from None
                if proc.returncode != 0:
                    errors[rank] = err.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
            if errors:
                rank = min(errors)
                raise PartyFailure(f"privml: NetLab party {rank} failed: {errors[rank][0]}")
            return [pickle.loads((Path(tmp) / f"result{r}.pkl").read_bytes()) for r in range(self.parties)]

    def close(self) -> None:
        if not self.up:
            return
        for ns in self.names:
            _sh("ip", "netns", "del", ns, check=False)
        _sh("ip", "link", "del", self.bridge, check=False)
        for rank in range(self.parties):
            _sh("ip", "link", "del", f"pm{self.tag}h{rank}", check=False)
        self.up = False

    def __exit__(self, *exc: object) -> None:
        self.close()


def predict_seconds(costs: dict[str, Any], link: Link, parties: int = 2) -> float:
    """A party's seconds over ``link``, from a run's costs measured on an unshaped link (``costs()`` of an MPC
    session: ``party_seconds``, whole-system ``bytes`` and per-party ``rounds``): the measured time plus one
    round trip (2 x one-way delay) per round plus each party's share of the bytes over the bandwidth."""
    own_bytes = float(costs["bytes"]) / parties  # whole-system bytes split over the senders (each egress is shaped)
    wire = own_bytes * 8 / (link.rate_mbit * 1e6) if link.rate_mbit else 0.0
    return float(costs["party_seconds"]) + float(costs["rounds"]) * 2 * link.delay_ms / 1e3 + wire


def _party_main(job_path: str, rank: int, out_path: str) -> None:
    """One party inside its namespace: ``join_party`` the job, pickle the result."""
    from privml.parties.launcher import join_party

    job = pickle.loads(Path(job_path).read_bytes())
    result = join_party(job["fn"], job["args"], rank=rank, world_size=job["world_size"],
                        master_addr=job["master_addr"], master_port=job["master_port"], timeout=job["timeout"],
                        roles=job.get("roles"))
    Path(out_path).write_bytes(pickle.dumps(result))


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        _party_main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
