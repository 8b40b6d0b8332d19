"""The untrusted host's side of the enclave: manufacture once, launch, watch, stop and restart it.

``launch`` plays the cloud provider: on first use it "manufactures" the device (vendor root CA and
a certified device key under ``vendor_dir``), then starts ``python -m privml.enclave`` and waits
for its ready line.  The child is tied to this process (PDEATHSIG), so it never outlives it.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from privml.enclave.attest import EnclaveConfig, manufacture
from privml.errors import PartyFailure

MAX_SOCKET_PATH = 100  # AF_UNIX paths are limited to 108 bytes


class EnclaveProcess:
    """A running (or stopped) enclave process and where to reach it."""

    def __init__(self, state_dir: str | Path, *, region: str = "eu-central-1", timeout: float = 30.0,
                 vendor_dir: str | Path | None = None, socket_path: str | Path | None = None,
                 budget_cap: int | None = None, max_ciphertexts: int | None = None) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.vendor_dir = Path(vendor_dir).resolve() if vendor_dir is not None else self.state_dir / "vendor"
        self.region = region
        self.timeout = timeout
        kw = {}
        if budget_cap is not None:
            kw["budget_cap"] = budget_cap
        if max_ciphertexts is not None:
            kw["max_ciphertexts"] = max_ciphertexts
        self.config = EnclaveConfig(region=region, **kw)
        if socket_path is None:
            socket_path = self.state_dir / "enclave.sock"
            if len(str(socket_path)) > MAX_SOCKET_PATH:
                socket_path = Path(tempfile.mkdtemp(prefix="privml-enclave-")) / "enclave.sock"
        self.address = str(socket_path)
        self.root_certificate = manufacture(self.vendor_dir)
        self._proc: subprocess.Popen | None = None
        self.pid: int | None = None

    # ------------------------------------------------------------------------- lifecycle

    def start(self) -> EnclaveProcess:
        if self.alive():
            return self
        cmd = [sys.executable, "-m", "privml.enclave", "--socket", self.address, "--state-dir", str(self.state_dir),
               "--vendor-dir", str(self.vendor_dir), "--region", self.region,
               "--budget-cap", str(self.config.budget_cap), "--max-ciphertexts", str(self.config.max_ciphertexts),
               "--parent-pid", str(os.getpid())]
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        log = open(self.state_dir / "enclave.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                                          env=env, close_fds=True)
        finally:
            log.close()
        self.pid = self._proc.pid
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        deadline = time.monotonic() + self.timeout
        buf = b""
        sel = selectors.DefaultSelector()
        sel.register(self._proc.stdout, selectors.EVENT_READ)
        try:
            while b"\n" not in buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.kill()
                    raise PartyFailure(f"enclave (pid {self.pid}) did not become ready within {self.timeout} s"
                                       + self._log_tail())
                if sel.select(min(left, 0.5)):
                    chunk = os.read(self._proc.stdout.fileno(), 4096)
                    if not chunk:
                        self._proc.wait(5)
                        raise PartyFailure(f"enclave (pid {self.pid}) exited with code {self._proc.returncode} "
                                           "before it was ready" + self._log_tail())
                    buf += chunk
        finally:
            sel.close()
            self._proc.stdout.close()
        if not buf.startswith(b"READY "):
            self.kill()
            raise PartyFailure(f"enclave (pid {self.pid}) printed an unexpected first line" + self._log_tail())

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            tail = (self.state_dir / "enclave.log").read_bytes()[-2000:].decode(errors="replace")
            return f"; its log ends with:\n{tail}"
        return ""

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit within ``timeout``."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGCONT)
                self._proc.terminate()
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._proc.wait()

    def kill(self) -> None:
        """SIGKILL (for tests: a crash)."""
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            self._proc.wait()

    def restart(self) -> EnclaveProcess:
        """Stop (if running) and start again on the same state directory."""
        self.stop()
        self._proc = None
        return self.start()

    def __enter__(self) -> EnclaveProcess:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EnclaveProcess(pid={self.pid}, region={self.region!r}, address={self.address!r}, alive={self.alive()})"


def launch(state_dir: str | Path, *, region: str = "eu-central-1", timeout: float = 30.0,
           vendor_dir: str | Path | None = None, socket_path: str | Path | None = None,
           budget_cap: int | None = None, max_ciphertexts: int | None = None) -> EnclaveProcess:
    """Start an enclave on ``state_dir`` (manufacturing its device on first use); PartyFailure if not ready in time."""
    return EnclaveProcess(state_dir, region=region, timeout=timeout, vendor_dir=vendor_dir, socket_path=socket_path,
                          budget_cap=budget_cap, max_ciphertexts=max_ciphertexts).start()
