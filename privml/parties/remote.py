"""Pooled MPC parties on other machines: a party host runs one pooled party per coordinator connection.

On each machine that holds a party:

    python -m privml.parties.remote --listen 0.0.0.0:7100 --authkey-file pool.key

and on the coordinator (``privml.parties.pool.PartyPool`` or an MPC session's ``remote=`` option):

    PartyPool(2, remote={1: "10.0.0.2:7100"}, authkey=Path("pool.key").read_bytes(), master_addr="10.0.0.1")

The coordinator connects with ``multiprocessing.connection`` (HMAC challenge-response on ``authkey``: only a
holder of the key can make a host run anything), sends the party's start parameters, then jobs and a final
stop, exactly as to a local pooled party. The host spawns the party as a child process and relays messages both
ways; when either side goes away, the host kills the child and waits for the next pool, and the coordinator
sees the party as dead (``PartyFailure``). The parties' own MPC traffic is gloo between the machines
(``MASTER_ADDR`` = ``master_addr``, ``GLOO_SOCKET_IFNAME`` from each host's environment).

The control channel is authenticated, not encrypted: jobs and results (shares, never another party's clear
data) cross it in clear, so run it on a network you trust or through a tunnel.
"""

from __future__ import annotations

import argparse
import multiprocessing
import multiprocessing.connection
import pickle
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from privml.parties.pool import _pool_party
from privml.parties.remote_link import MIN_AUTHKEY, _parse


def _relay(src: Any, dst: Any, done: threading.Event) -> None:
    try:
        while True:
            dst.send_bytes(src.recv_bytes())
    except (EOFError, OSError, TypeError):  # TypeError: the other relay closed this connection under us
        pass
    finally:
        done.set()


def handle(conn: Any) -> None:
    """Serve one coordinator connection: spawn the party, relay until either side ends, then kill the party."""
    try:
        kind, start = pickle.loads(conn.recv_bytes())
    except (EOFError, OSError, pickle.UnpicklingError, ValueError):
        conn.close()
        return
    if kind != "start":
        conn.close()
        return
    mp = multiprocessing.get_context("spawn")
    parent, child = mp.Pipe(duplex=True)
    proc = mp.Process(target=_pool_party, args=(child, *start), daemon=True, name="privml-remote-party")
    proc.start()
    child.close()
    done = threading.Event()
    def watch() -> None:  # the party's exit ends the relay even if its pipe end lingers elsewhere
        proc.join()
        done.set()

    threads = [threading.Thread(target=_relay, args=(conn, parent, done), daemon=True),
               threading.Thread(target=_relay, args=(parent, conn, done), daemon=True),
               threading.Thread(target=watch, daemon=True)]
    for t in threads:
        t.start()
    done.wait()
    try:  # a plain close would not end the relay still blocked reading it, nor tell the coordinator
        with socket.fromfd(conn.fileno(), socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    for c in (conn, parent):
        try:
            c.close()
        except OSError:
            pass
    proc.join(2.0)
    if proc.is_alive():
        proc.kill()
        proc.join(2.0)


def serve(listen: str, authkey: bytes, once: bool = False, ready: Any = None) -> None:
    """Accept coordinators at ``listen`` (host:port; port 0: any), one pool at a time, until interrupted."""
    host, port = _parse(listen)
    with multiprocessing.connection.Listener((host, port), authkey=authkey) as listener:
        bound = listener.address[1]
        print(f"privml party host listening on {host}:{bound}", flush=True)
        if ready is not None:
            ready(bound)
        while True:
            try:
                conn = listener.accept()
            except (multiprocessing.AuthenticationError, OSError, EOFError) as exc:
                print(f"privml party host: refused a connection: {type(exc).__name__}", flush=True)
                continue
            handle(conn)
            if once:
                return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m privml.parties.remote", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", required=True, help="host:port to accept the coordinator on (port 0: any)")
    parser.add_argument("--authkey-file", required=True, help="file of at least 16 random bytes, shared with the "
                        "coordinator")
    parser.add_argument("--once", action="store_true", help="serve one pool, then exit")
    args = parser.parse_args(argv)
    key = Path(args.authkey_file).read_bytes()
    if len(key) < MIN_AUTHKEY:
        print(f"error: the authkey file needs at least {MIN_AUTHKEY} random bytes", file=sys.stderr)
        return 2
    serve(args.listen, key, once=args.once)
    return 0


if __name__ == "__main__":
    sys.exit(main())
