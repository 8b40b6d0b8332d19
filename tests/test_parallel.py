"""privml.parallel: encrypted CKKS requests split over worker processes give the serial server's exact bytes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.nn as nn

import privml
from privml.backends.ckks import CKKSServer
from privml.errors import InvalidInput, MalformedInput, PartyFailure
from privml.parallel import ParallelServer, _digest, concat_responses, split_request, write_worker_files
from privml.parties.launcher import _free_port

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4  # decrypted logits vs torch in clear: CKKS at scale 2^40 on values of order 1 (measured ~1e-7)


class Square(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


class Refuse(nn.Module):
    """A model whose every evaluation raises a privml error (to see it cross the worker boundary)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise InvalidInput("privml: refused by the test model")


def _small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), Square(), nn.Flatten(), nn.Linear(144, 10)).eval()


@pytest.fixture(scope="module")
def setup(one_thread):
    model = _small_cnn()
    compiled = privml.compile(model, torch.rand(64, 1, 8, 8), backend="ckks")
    assert compiled.plan.params["layout"] == "latency"
    session = privml.Session(compiled.plan)
    ctx = session.backend.public_context()
    serial = CKKSServer(compiled.plan, ctx)
    x = torch.rand(4, 1, 8, 8)
    request = session.backend.dumps(session.encrypt(x))
    return {"model": model, "compiled": compiled, "session": session, "ctx": ctx, "serial": serial, "x": x,
            "request": request, "expected": serial.run(compiled, request)}


@pytest.fixture(scope="module")
def server(setup):
    with ParallelServer(setup["compiled"].plan, setup["ctx"], setup["compiled"], workers=2, timeout=60) as srv:
        yield srv


def _gone(pids: list[int]) -> bool:
    """No process of ``pids`` is left (not even a zombie) among this process's children."""
    children = {p.pid for p in psutil.Process().children(recursive=True)}
    return not children & set(pids)


def test_parallel_response_equals_serial_bytes(setup, server) -> None:
    response = server.run(setup["request"])
    assert response == setup["expected"]  # evaluation is deterministic: same ciphertexts, same bytes
    listening = [c.laddr.ip for c in psutil.Process().net_connections("tcp") if c.status == psutil.CONN_LISTEN]
    assert listening and all(ip == "127.0.0.1" for ip in listening)  # the default address stays on loopback
    s = setup["session"]
    got = s.decrypt(s.backend.loads(response))
    assert torch.equal(got, s.decrypt(s.backend.loads(setup["expected"])))
    with torch.no_grad():
        assert (got - setup["model"](setup["x"])).abs().max().item() < TOL


@pytest.mark.parametrize("batch", [1, 3])
def test_batch_of_one_and_uneven_batch(setup, server, batch: int) -> None:
    s = setup["session"]
    request = s.backend.dumps(s.encrypt(setup["x"][:batch]))
    response = server.run(request)
    assert response == setup["serial"].run(setup["compiled"], request)
    assert s.decrypt(s.backend.loads(response)).shape == (batch, 10)


def test_split_and_concat_keep_the_format(setup) -> None:
    runtime = setup["serial"].runtime
    parts = split_request(setup["request"], runtime, 3)
    assert len(parts) == 3  # 4 samples over 3 shards: 2, 1, 1
    assert concat_responses(parts, runtime) == setup["request"]
    assert split_request(setup["request"], runtime, 1) == [setup["request"]]
    # the throughput layout spreads the batch over slots: it stays one piece
    compiled = privml.compile(_small_cnn(), torch.rand(64, 1, 8, 8), backend="ckks", layout="throughput")
    s = privml.Session(compiled.plan)
    request = s.backend.dumps(s.encrypt(torch.rand(4, 1, 8, 8)))
    assert split_request(request, s.backend.runtime, 2) == [request]


def test_bad_request_bytes_are_malformed_input(setup, server) -> None:
    with pytest.raises(MalformedInput):
        server.run(b"not a request")
    tampered = bytearray(setup["request"])
    tampered[len(tampered) // 2] ^= 1
    with pytest.raises(MalformedInput, match="checksum"):
        server.run(bytes(tampered))
    assert server.run(setup["request"]) == setup["expected"]  # still usable


def test_bad_arguments_are_invalid_input(setup) -> None:
    plan, ctx, model = setup["compiled"].plan, setup["ctx"], setup["compiled"]
    with pytest.raises(InvalidInput, match="at least one worker"):
        ParallelServer(plan, ctx, model, workers=0)
    with pytest.raises(InvalidInput, match="init_method"):
        ParallelServer(plan, ctx, model, workers=1, remote=1)
    with pytest.raises(InvalidInput, match="tcp://HOST:PORT"):
        ParallelServer(plan, ctx, model, init_method="env://")


def test_dead_worker_is_party_failure_and_nothing_is_left(setup) -> None:
    srv = ParallelServer(setup["compiled"].plan, setup["ctx"], setup["compiled"], workers=2, timeout=60)
    pids = srv.pids
    try:
        os.kill(pids[1], signal.SIGKILL)
        end = time.monotonic() + 10  # until the kernel has closed its sockets (a zombie), or a send may still succeed
        while time.monotonic() < end and psutil.Process(pids[1]).status() != psutil.STATUS_ZOMBIE:
            time.sleep(0.01)
        start = time.monotonic()
        with pytest.raises(PartyFailure, match="worker 2 was killed by SIGKILL"):
            srv.run(setup["request"])
        assert time.monotonic() - start < 10  # noticed at once, not after the 60 s timeout
        assert _gone(pids)
        with pytest.raises(PartyFailure, match="closed"):
            srv.run(setup["request"])
    finally:
        srv.close()
    assert _gone(pids)


@pytest.mark.slow  # ~14 s; test_dead_worker_is_party_failure_and_nothing_is_left covers a failing worker by default
def test_worker_error_is_reraised_and_a_silent_worker_times_out(setup) -> None:
    srv = ParallelServer(setup["compiled"].plan, setup["ctx"], Refuse(), workers=2, timeout=3)
    pids = srv.pids
    try:
        for _ in range(2):  # a privml error inside a worker leaves the server usable
            with pytest.raises(InvalidInput, match="refused by the test model"):
                srv.run(setup["request"])
        os.kill(pids[0], signal.SIGSTOP)  # alive but silent
        start = time.monotonic()
        with pytest.raises(PartyFailure, match="worker 1 did not answer within 3 s"):
            srv.run(setup["request"])
        assert time.monotonic() - start < 10
    finally:
        srv.close()
    assert _gone(pids)


def test_remote_worker_joins_from_the_command_line(setup, tmp_path: Path) -> None:
    plan, ctx, model = setup["compiled"].plan, setup["ctx"], setup["compiled"]
    files = write_worker_files(tmp_path, plan, ctx, model)
    loaded = torch.load(files["model"], weights_only=False)
    assert _digest(privml.Plan.load(files["plan"]), files["context"].read_bytes(), loaded) == _digest(plan, ctx, model)
    with torch.no_grad():
        next(loaded.parameters()).add_(1.0)
    assert _digest(plan, ctx, loaded) != _digest(plan, ctx, model)  # other weights: refused at start-up

    init = f"tcp://127.0.0.1:{_free_port()}"
    worker = subprocess.Popen([sys.executable, "-m", "privml.parallel", "--init-method", init, "--rank", "2",
                               "--world-size", "3", "--plan", str(files["plan"]), "--context", str(files["context"]),
                               "--model", str(files["model"]), "--start-timeout", "60"], cwd=ROOT)
    try:
        with ParallelServer(plan, ctx, model, workers=1, remote=1, init_method=init, timeout=60) as srv:
            assert srv.workers == 2
            assert srv.run(setup["request"]) == setup["expected"]
        assert worker.wait(timeout=30) == 0  # stopped by close()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def test_missing_remote_worker_fails_start_up(setup) -> None:
    init = f"tcp://127.0.0.1:{_free_port()}"
    start = time.monotonic()
    with pytest.raises(PartyFailure, match=r"workers \[1\] did not join"):
        ParallelServer(setup["compiled"].plan, setup["ctx"], setup["compiled"], workers=0, remote=1,
                       init_method=init, start_timeout=1.5)
    assert time.monotonic() - start < 10
