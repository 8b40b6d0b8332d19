"""CKKS client/server over a local socket: two processes, bytes only between them.

The server owns the trained digits CNN and compiles it; it sends the client the
plan (CKKS parameters and the rotation steps it needs: public information). The
client generates keys, sends the *public* evaluation context and encrypted images,
the server evaluates without any secret key and returns encrypted logits, the
client decrypts.

    python experiments/ckks_client_server.py --images 4 --layout latency
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import struct
import time

import torch

HOST = "127.0.0.1"


def send(sock: socket.socket, data: bytes) -> None:
    sock.sendall(struct.pack("<Q", len(data)) + data)


def recv(sock: socket.socket, limit: int = 1 << 31) -> bytes:
    head = _exact(sock, 8)
    (n,) = struct.unpack("<Q", head)
    if n > limit:
        raise ValueError(f"message of {n} bytes exceeds the limit")
    return _exact(sock, n)


def _exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(1 << 20, n - len(buf)))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        buf += chunk
    return bytes(buf)


def load_compiled(config: str, layout: str):
    import privml
    from privml.cli import _tensors
    from privml.train import train_or_load

    model, dm = train_or_load(config)
    calib, _ = _tensors(dm.train_set, 512)
    return privml.compile(model, calib, backend="ckks", layout=layout), dm


def server(port_queue: mp.Queue, config: str, layout: str) -> None:
    from privml.backends.ckks import CKKSServer

    compiled, _ = load_compiled(config, layout)
    with socket.create_server((HOST, 0)) as srv:
        port_queue.put(srv.getsockname()[1])
        conn, _ = srv.accept()
        with conn:
            send(conn, compiled.plan.to_json().encode())
            public_context = recv(conn)
            request = recv(conn)
            ckks_server = CKKSServer(compiled.plan, public_context)  # refuses a context with a secret key
            assert not ckks_server.ctx.has_secret_key
            t = time.perf_counter()
            response = ckks_server.run(compiled, request)
            print(f"[server] evaluated on ciphertexts in {time.perf_counter() - t:.2f} s (no secret key held)")
            send(conn, response)


def client(port: int, images: torch.Tensor) -> torch.Tensor:
    import privml

    with socket.create_connection((HOST, port)) as sock:
        plan = privml.Plan.from_json(recv(sock).decode())
        session = privml.Session(plan)
        context = session.backend.public_context()
        request = session.backend.dumps(session.encrypt(images))
        print(f"[client] sending public context ({len(context) / 1e6:.1f} MB) and "
              f"{len(images)} encrypted images ({len(request) / 1e6:.1f} MB)")
        send(sock, context)
        send(sock, request)
        response = recv(sock)
        print(f"[client] received {len(response) / 1e6:.2f} MB of encrypted logits")
        return session.decrypt(session.backend.loads(response))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/digits_cnn.yaml")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--layout", default="latency", choices=("latency", "throughput"))
    args = parser.parse_args()

    compiled, dm = load_compiled(args.config, args.layout)  # client side only needs test images
    from privml.cli import _tensors

    x, y = _tensors(dm.test_set, args.images)
    ctx = mp.get_context("spawn")
    ports: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=server, args=(ports, args.config, args.layout))
    proc.start()
    try:
        logits = client(ports.get(timeout=300), x)
    finally:
        proc.join(timeout=600)
        if proc.is_alive():
            proc.terminate()
    clear = compiled(x)
    print(f"[client] predictions {logits.argmax(1).tolist()} | labels {y.tolist()} | "
          f"max |logit - clear approximated model| = {(logits - clear).abs().max():.2e}")


if __name__ == "__main__":
    main()
