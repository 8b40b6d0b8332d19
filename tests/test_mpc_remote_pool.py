"""Pooled parties on other machines (``privml.parties.remote``): party hosts are separate process trees, reached
over TCP with an authkey, exactly as on another machine; the parties' own traffic is gloo.

Results equal a local pool's; a host serves the next pool after one ends; a wrong authkey and a party killed
during a job end in ``PartyFailure`` within the timeout, with no party process left behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import psutil
import pytest
import torch

from privml.errors import InvalidInput, PartyFailure
from privml.parties.pool import PartyPool


def _square(ctx, x):
    import crypten

    shared = crypten.cryptensor(x, src=0)
    return (shared * shared).get_plain_text()


def _sleep(ctx, seconds):
    time.sleep(seconds)
    return ctx.rank


class Host:
    """``python -m privml.parties.remote`` as its own process (what another machine would run)."""

    def __init__(self, keyfile) -> None:
        here = os.path.dirname(os.path.abspath(__file__))  # the jobs below must be importable on the "machine"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.path.dirname(here)])}
        self.proc = subprocess.Popen([sys.executable, "-m", "privml.parties.remote", "--listen", "127.0.0.1:0",
                                      "--authkey-file", str(keyfile)], stdout=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        ready = threading.Event()

        def read() -> None:
            for line in self.proc.stdout:
                self.lines.append(line.strip())
                ready.set()

        threading.Thread(target=read, daemon=True).start()
        assert ready.wait(60), "the party host did not start"
        self.address = self.lines[0].rsplit(" ", 1)[1]

    def parties(self) -> list[psutil.Process]:
        """The host's live party processes (not its resource tracker, not zombies being reaped)."""
        out = []
        for p in psutil.Process(self.proc.pid).children():
            try:
                if p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(p.cmdline()):
                    out.append(p)
            except psutil.Error:
                continue
        return out

    def stop(self) -> None:
        for p in self.parties():
            p.kill()
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    key = os.urandom(32)
    keyfile = tmp_path_factory.mktemp("hosts") / "pool.key"
    keyfile.write_bytes(key)
    made = [Host(keyfile), Host(keyfile)]
    yield key, made
    for h in made:
        h.stop()


def _wait_no_parties(host: Host, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while host.parties() and time.monotonic() < end:
        time.sleep(0.1)
    assert not host.parties(), "a remote party outlived its pool"


@pytest.mark.slow  # ~13 s; test_an_mpc_session_with_a_party_on_another_machine covers remote parties by default
def test_remote_parties_give_the_local_pools_results_and_serve_the_next_pool(hosts):
    key, (h0, h1) = hosts
    x = torch.randn(4, 3)
    with PartyPool(2) as local:
        expected = local.run(_square, (x,))
    with PartyPool(2, remote={0: h0.address, 1: h1.address}, authkey=key) as pool:
        first = pool.run(_square, (x,))
        second = pool.run(_square, (x,))
        assert pool.starts == 1 and pool.jobs == 2
    for got in (first, second):
        assert torch.allclose(got[0], expected[0], atol=1e-3) and torch.allclose(got[1], x * x, atol=1e-3)
    _wait_no_parties(h0)
    _wait_no_parties(h1)
    # mixed: party 0 on this machine, party 1 on the host; the host serves this second pool
    with PartyPool(2, remote={1: h1.address}, authkey=key) as pool:
        assert torch.allclose(pool.run(_square, (x,))[1], x * x, atol=1e-3)
    _wait_no_parties(h1)


def test_wrong_authkey_and_bad_addresses_are_refused(hosts):
    _, (h0, _) = hosts
    with pytest.raises(PartyFailure, match="refused the authkey"):
        PartyPool(2, remote={1: h0.address}, authkey=os.urandom(32)).start()
    with pytest.raises(InvalidInput, match="authkey of at least 16"):
        PartyPool(2, remote={1: h0.address}, authkey=b"short").start()
    with pytest.raises(InvalidInput, match="host:port"):
        PartyPool(2, remote={1: "nowhere"}, authkey=os.urandom(32)).start()
    with pytest.raises(InvalidInput, match="remote ranks"):
        PartyPool(2, remote={5: h0.address}, authkey=os.urandom(32))
    assert "refused a connection" in " ".join(h0.lines) or len(h0.lines) >= 1


@pytest.mark.slow  # ~14 s; a local party killed mid-job runs in test_mpc_pool
def test_a_remote_party_killed_during_a_job_is_a_party_failure(hosts):
    key, (h0, h1) = hosts
    pool = PartyPool(2, remote={0: h0.address, 1: h1.address}, authkey=key, timeout=10.0)
    pool.start()
    try:
        killer = threading.Timer(1.0, lambda: [p.kill() for p in h1.parties()])
        killer.start()
        t0 = time.monotonic()
        with pytest.raises(PartyFailure, match="party 1"):
            pool.run(_sleep, (30,))
        assert time.monotonic() - t0 < 25
    finally:
        pool.close()
    _wait_no_parties(h0)
    _wait_no_parties(h1)
    with PartyPool(2, remote={0: h0.address, 1: h1.address}, authkey=key) as again:  # fresh pool works
        assert list(again.run(_sleep, (0,))) == [0, 1]


def test_an_mpc_session_with_a_party_on_another_machine(hosts):
    import torch.nn as nn

    import privml

    key, (_, h1) = hosts
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(32, 6)
    compiled = privml.compile(model, x, backend="mpc")
    with privml.Session(compiled.plan, parties=2, remote={1: h1.address}, authkey=key) as s:
        got = s.decrypt(compiled(s.encrypt(x[:4])))  # party 1 (the weights) runs on the host
        again = s.decrypt(compiled(s.encrypt(x[4:8])))
    with torch.no_grad():
        assert (got - model(x[:4])).abs().max() < 5e-2 and (again - model(x[4:8])).abs().max() < 5e-2
    _wait_no_parties(h1)
    unstarted = privml.Session(compiled.plan, parties=2, remote={1: h1.address}, authkey=key)
    with pytest.raises(InvalidInput, match="started sessions only"):
        compiled(unstarted.encrypt(x[:1]))
