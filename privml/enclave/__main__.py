"""``python -m privml.enclave``: run the simulated enclave process (see :mod:`privml.enclave.server`).

Prints one ``READY pid=<pid> socket=<path>`` line on stdout once it listens; logs (never values or
key bytes) go to stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path


def _die_with_parent(parent_pid: int | None) -> None:
    """Ask Linux to SIGKILL this process when its parent dies, so no enclave is orphaned."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            pr_set_pdeathsig = 1
            libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
        except OSError:
            pass
    if parent_pid is not None and os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m privml.enclave", description="privml simulated enclave")
    ap.add_argument("--socket", required=True, help="Unix socket path to listen on (created 0600)")
    ap.add_argument("--state-dir", required=True, help="sealed keys, audit log, device secret")
    ap.add_argument("--vendor-dir", default=None, help="device key and certificates (default STATE_DIR/vendor)")
    ap.add_argument("--region", default="eu-central-1")
    ap.add_argument("--budget-cap", type=int, default=None, help="largest decryption budget a key may have")
    ap.add_argument("--max-ciphertexts", type=int, default=None, help="ciphertexts per refresh request")
    ap.add_argument("--parent-pid", type=int, default=None)
    args = ap.parse_args(argv)
    _die_with_parent(args.parent_pid)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="enclave %(levelname)s %(message)s")

    from privml.enclave.attest import EnclaveConfig
    from privml.enclave.server import Enclave, serve

    kw = {}
    if args.budget_cap is not None:
        kw["budget_cap"] = args.budget_cap
    if args.max_ciphertexts is not None:
        kw["max_ciphertexts"] = args.max_ciphertexts
    config = EnclaveConfig(region=args.region, **kw)
    state = Path(args.state_dir)
    enclave = Enclave(state, Path(args.vendor_dir) if args.vendor_dir else state / "vendor", config)

    def ready() -> None:
        sys.stdout.write(f"READY pid={os.getpid()} socket={args.socket}\n")
        sys.stdout.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)  # nothing else goes to stdout (nobody reads the pipe after the ready line)

    serve(enclave, args.socket, ready)
    return 0


if __name__ == "__main__":
    sys.exit(main())
