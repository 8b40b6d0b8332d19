"""Benchmark: the digits CNN behind `privml serve`, 1 and 4 concurrent clients, vs the same model in process.

    python experiments/bench/serve_digits.py                    # ~3 min on 2 cores
    python experiments/bench/serve_digits.py --requests 8 --workers 2

The model is the one ``privml demo`` runs in the CKKS latency layout (``configs/finetune_digits_cnn.yaml``,
``precision_bits=6``: N=8192), saved with ``privml.save`` and served from its bundle. Side by side in one run:

- baseline: one in-process ``privml.Session`` calling the compiled model (no HTTP, no serialization);
- the service with 1 client, then with 4 clients sending at once, one image per request: requests/s, p50 and
  p95 latency seen by the clients (encrypt + upload + evaluate + download + decrypt); once with 2 worker
  processes (the clients' keys spread over them), once with 2 threads in the service process;
- the bytes a client uploads once (public evaluation context) and per request (ciphertexts), and the time the
  key upload takes (it includes the server's warm-up pass; only a process's first client encodes the weights,
  later ones share them).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import privml  # noqa: E402
from privml.serve import ServiceProcess  # noqa: E402
from privml.train import train_or_load  # noqa: E402


def _tensors(dataset: object, limit: int) -> torch.Tensor:
    return next(iter(torch.utils.data.DataLoader(dataset, batch_size=limit, shuffle=False)))[0]


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[max(0, math.ceil(q * len(s)) - 1)]  # nearest rank


def in_process(compiled: privml.CompiledModel, x: torch.Tensor) -> list[float]:
    times = []
    with privml.Session(compiled.plan, out_of_range="warn") as s:
        s.decrypt(compiled(s.encrypt(x[:1])))  # warm: encodes the weights
        for i in range(len(x)):
            t = time.perf_counter()
            s.decrypt(compiled(s.encrypt(x[i:i + 1])))
            times.append(time.perf_counter() - t)
    return times


def clients_run(url: str, client_dir: Path, x: torch.Tensor, n_clients: int, requests: int) -> dict:
    clients = [privml.Client(url, client_dir, out_of_range="warn") for _ in range(n_clients)]
    uploads = []
    for c in clients:
        t = time.perf_counter()
        c.upload_keys()
        uploads.append(time.perf_counter() - t)

    def work(k: int) -> list[float]:
        out = []
        for i in range(requests):
            j = (k * requests + i) % len(x)
            t = time.perf_counter()
            clients[k].infer(x[j:j + 1])
            out.append(time.perf_counter() - t)
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(n_clients) as pool:
        lat = [t for ts in pool.map(work, range(n_clients)) for t in ts]
    wall = time.perf_counter() - t0
    c = clients[0]
    row = {"clients": n_clients, "requests": len(lat), "rps": len(lat) / wall, "p50": _pct(lat, 0.5),
           "p95": _pct(lat, 0.95), "upload_s": statistics.median(uploads), "uploads": uploads,
           "keys_mb": c.bytes_keys / 1e6,
           "request_mb": c.bytes_requests / c.requests / 1e6, "response_mb": c.bytes_responses / c.requests / 1e6}
    for cl in clients:
        cl.close()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=6, help="requests per client")
    parser.add_argument("--workers", type=int, default=2, help="the service's evaluation processes")
    args = parser.parse_args()

    model, dm = train_or_load("configs/finetune_digits_cnn.yaml")
    calib = _tensors(dm.train_set, 512)
    x = _tensors(dm.test_set, 4 * args.requests)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = privml.compile(model, calib, backend="ckks", layout="latency", precision_bits=6)
    base = in_process(compiled, x[:args.requests])
    print(f"digits CNN, CKKS latency layout, N={compiled.plan.params['poly_modulus_degree']}, "
          f"{args.requests} requests per client")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = privml.save(compiled, Path(tmp) / "digits")
        for label, flags in ((f"{args.workers} worker processes", ("--workers", str(args.workers))),
                             ("2 threads (workers=0)", ("--concurrency", "2"))):
            with ServiceProcess(paths.server, *flags) as svc:
                for n in (1, 4):
                    rows.append({**clients_run(svc.url, paths.client, x, n, args.requests), "label": label})
    print(f"{'':46s} {'req/s':>7s} {'p50 s':>7s} {'p95 s':>7s}")
    print(f"{'in process, one session (no HTTP)':46s} {1 / statistics.mean(base):7.2f} {_pct(base, 0.5):7.3f} "
          f"{_pct(base, 0.95):7.3f}")
    for r in rows:
        label = f"service, {r['label']}, {r['clients']} client{'s' if r['clients'] > 1 else ''}"
        print(f"{label:46s} {r['rps']:7.2f} {r['p50']:7.3f} {r['p95']:7.3f}")
    r = rows[0]
    print(f"bytes per client: {r['keys_mb']:.1f} MB uploaded once (evaluation keys; upload + warm-up "
          f"{r['upload_s']:.1f} s), then {r['request_mb']:.2f} MB up and {r['response_mb']:.2f} MB down per request")
    for r in rows[1:]:
        if r["clients"] > 1:  # later clients of a process share the first one's encoded weights (no warm-up work)
            print(f"key uploads (incl. warm-up), {r['label']}, after one earlier client: "
                  + ", ".join(f"{u:.1f} s" for u in r["uploads"]))


if __name__ == "__main__":
    main()
