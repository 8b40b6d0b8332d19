"""MPC parties that stay up (``privml.parties.pool``): reuse, failures within a deadline, no orphans, main guard.

Real party processes over gloo on loopback, real CrypTen shares.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest
import torch

import privml
from models.breast_cancer import BreastCancerMLP
from privml.errors import InvalidInput, PartyFailure
from privml.parties.pool import PartyPool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rank_times_ten(ctx, base: int) -> int:
    return base + 10 * ctx.rank


def _sleep_in(ctx, ranks: tuple[int, ...], seconds: float) -> int:
    if ctx.rank in ranks:
        time.sleep(seconds)
    return ctx.rank


def _gone(pids: list[int], within: float = 10.0) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.1)
    return False


def test_a_started_session_keeps_its_parties_for_every_call() -> None:
    torch.manual_seed(0)
    model = BreastCancerMLP().eval()
    x = torch.randn(6, 30)
    compiled = privml.compile(model, x, backend="mpc")
    with privml.Session(compiled.plan, parties=2) as s:
        pool = s.backend.pool
        pids = pool.pids()
        assert len(pids) == 2 and all(psutil.pid_exists(p) for p in pids)
        for i in range(3):
            y = s.decrypt(compiled(s.encrypt(x[2 * i:2 * i + 2])))
            assert torch.allclose(y, model(x[2 * i:2 * i + 2]), atol=5e-3)
        assert pool.pids() == pids and pool.starts == 1 and pool.jobs == 3  # one launch, three calls
        assert s.backend.costs()["runs"] == 3
    assert _gone(pids)  # closing the session stops the parties


def test_a_party_killed_mid_job_is_a_party_failure_and_the_next_call_starts_afresh() -> None:
    with PartyPool(2, timeout=20) as pool:
        assert list(pool.run(_rank_times_ten, (1,))) == [1, 11]
        victim = pool.pids()[1]
        threading.Timer(1.0, os.kill, (victim, signal.SIGKILL)).start()
        t0 = time.monotonic()
        with pytest.raises(PartyFailure, match="party 1 .*died"):
            pool.run(_sleep_in, ((1,), 30.0))
        assert time.monotonic() - t0 < 10
        assert pool.procs == []  # torn down
        assert list(pool.run(_rank_times_ten, (2,))) == [2, 12]  # a fresh pool
        assert victim not in pool.pids() and pool.starts == 2


def test_every_party_hanging_is_caught_by_the_deadline(tmp_path) -> None:
    pool = PartyPool(2, timeout=60, deadline=3.0)
    try:
        pids = pool.start().pids()
        t0 = time.monotonic()
        with pytest.raises(PartyFailure, match="deadline of 3 s"):
            pool.run(_sleep_in, ((0, 1), 60.0))  # both stuck in local work: no gloo timeout would fire
        assert time.monotonic() - t0 < 8
        assert _gone(pids)
    finally:
        pool.close()


def test_a_killed_launcher_leaves_no_party_behind(tmp_path) -> None:
    script = tmp_path / "launcher.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        from privml.parties.pool import PartyPool

        if __name__ == "__main__":
            pool = PartyPool(2).start()
            print(" ".join(map(str, pool.pids())), flush=True)
            time.sleep(120)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2
        proc.kill()
        proc.wait(10)
        assert _gone(pids, within=10)
    finally:
        proc.kill()


def test_a_script_without_a_main_guard_is_told_what_to_add(tmp_path) -> None:
    script = tmp_path / "unguarded.py"
    script.write_text("from privml.parties.launcher import run_parties\nrun_parties(len, 2)\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode != 0
    assert "InvalidInput" in out.stderr and 'if __name__ == "__main__":' in out.stderr


def test_pool_arguments_are_checked() -> None:
    with pytest.raises(InvalidInput, match="deadline"):
        PartyPool(2, deadline=0)
    with pytest.raises(InvalidInput, match="rank_args"):
        PartyPool(2).run(_rank_times_ten, (1,), rank_args=[(1,)])


def test_run_parties_has_an_overall_deadline() -> None:
    from privml.parties.launcher import run_parties

    t0 = time.monotonic()
    with pytest.raises(PartyFailure, match="deadline of 10 s"):
        run_parties(_sleep_in, 2, ((0, 1), 120.0), timeout=5, deadline=10)  # every party stuck in local work
    assert time.monotonic() - t0 < 25


def _is_party(c: psutil.Process) -> bool:
    """A spawned party (not multiprocessing's resource tracker); a child that just exited is none."""
    try:
        return "resource_tracker" not in " ".join(c.cmdline())
    except (psutil.ZombieProcess, psutil.NoSuchProcess):
        return False


def test_a_launcher_killed_while_its_parties_start_leaves_none_behind(tmp_path) -> None:
    script = tmp_path / "early.py"
    script.write_text("from privml.parties.pool import PartyPool\n\nif __name__ == '__main__':\n"
                      "    PartyPool(2).start()\n")
    proc = subprocess.Popen([sys.executable, str(script)], cwd=ROOT)
    try:
        children: list[int] = []
        end = time.monotonic() + 60
        while len(children) < 2 and time.monotonic() < end:  # the parties are spawned, still importing torch
            time.sleep(0.05)
            children = [c.pid for c in psutil.Process(proc.pid).children(recursive=True) if _is_party(c)]
        assert len(children) >= 2
        proc.kill()
        proc.wait(10)
        assert _gone(children, within=40)
    finally:
        proc.kill()
