"""Benchmark: one CKKS server process vs ``privml.parallel.ParallelServer`` workers on the same encrypted batch.

    python experiments/bench/parallel_ckks.py                     # 8 digits images, 2 workers
    python experiments/bench/parallel_ckks.py --images 16 --workers 2 --repeats 3

The digits CNN as the main job (``privml demo``) runs it under CKKS: fine-tuned with degree-2 polynomial
activations (``configs/finetune_digits_cnn.yaml``; checkpoint read back by ``privml.train.train_or_load``,
trained first if missing), compiled for ``ckks`` in the latency layout with ``precision_bits=14`` (N=16384;
the ReLU digits CNN of ``configs/digits_cnn.yaml`` needs N=32768 and a ~5 GB public context per process).
In the latency layout every sample has its own ciphertexts, so a batch splits over workers. The client
encrypts ``--images`` test images once; the serial ``CKKSServer.run`` and the parallel server evaluate the
same request bytes. Each server's first request encodes (and caches) the model's diagonals, so the first
("cold") and the best of the next ``--repeats`` ("warm") requests are reported apart. Every process uses
one intra-op thread. The parallel response must equal the serial one byte for byte.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy/torch load; spawned workers inherit it

import argparse  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

import privml  # noqa: E402
from privml.backends.ckks import CKKSServer  # noqa: E402
from privml.parallel import ParallelServer  # noqa: E402


def _tensors(dataset: object, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=limit, shuffle=False)
    return next(iter(loader))


def _timed(fn: object, request: bytes, repeats: int) -> tuple[bytes, float, float]:
    """(response, cold seconds, best warm seconds) of ``fn(request)``."""
    t = time.perf_counter()
    response = fn(request)
    cold = time.perf_counter() - t
    warm = []
    for _ in range(repeats):
        t = time.perf_counter()
        again = fn(request)
        warm.append(time.perf_counter() - t)
        assert again == response, "evaluation is not deterministic"
    return response, cold, min(warm) if warm else cold


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/finetune_digits_cnn.yaml")
    p.add_argument("--precision-bits", type=int, default=14, help="as privml demo (keeps N=16384)")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="warm requests per server after the first")
    args = p.parse_args()
    torch.set_num_threads(1)

    from privml.train import train_or_load

    model, dm = train_or_load(args.config)
    calib, _ = _tensors(dm.train_set, 512)
    x, y = _tensors(dm.test_set, args.images)
    t = time.perf_counter()
    compiled = privml.compile(model, calib, backend="ckks", layout="latency", precision_bits=args.precision_bits)
    ck = compiled.plan.params["ckks"]
    print(f"compiled {args.config} in {time.perf_counter() - t:.1f} s: N={ck['poly_modulus_degree']}, "
          f"chain {ck['coeff_mod_bit_sizes']}, depth {compiled.plan.params['depth']}")
    session = privml.Session(compiled.plan)
    ctx = session.backend.public_context()
    request = session.backend.dumps(session.encrypt(x))
    print(f"public context {len(ctx) / 1e6:.0f} MB, request {len(request) / 1e6:.1f} MB for {args.images} images, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")

    serial_server = CKKSServer(compiled.plan, ctx)
    serial, s_cold, s_warm = _timed(lambda r: serial_server.run(compiled, r), request, args.repeats)
    serial_server = None  # free its plaintext cache before the workers build theirs

    t = time.perf_counter()
    with ParallelServer(compiled.plan, ctx, compiled, workers=args.workers, timeout=3600) as server:
        start = time.perf_counter() - t
        parallel, p_cold, p_warm = _timed(server.run, request, args.repeats)
    assert parallel == serial, "parallel response differs from the serial one"

    got = session.decrypt(session.backend.loads(parallel))
    with torch.no_grad():
        clear = model(x)
    n = args.images
    print(f"\nparallel server start-up (spawn {args.workers} workers, load the context): {start:.1f} s; "
          "responses identical byte for byte")
    print(f"decrypted vs clear model: max |logit error| {(got - clear).abs().max().item():.2e}, "
          f"argmax agreement {(got.argmax(1) == clear.argmax(1)).float().mean().item():.2f}, "
          f"accuracy {(got.argmax(1) == y).float().mean().item():.2f}\n")
    print(f"| request | serial s/image | {args.workers} workers s/image | speedup |")
    print("|---|---|---|---|")
    print(f"| first (cold caches) | {s_cold / n:.3f} | {p_cold / n:.3f} | {s_cold / p_cold:.2f}x |")
    print(f"| best of {args.repeats} warm | {s_warm / n:.3f} | {p_warm / n:.3f} | {s_warm / p_warm:.2f}x |")


if __name__ == "__main__":
    main()
