"""Benchmark: a CIFAR-shaped ResNet-20 (3x32x32, 16/32/64 channels, BatchNorm, ReLU) end to end under ``hybrid``.

    python experiments/bench/resnet20_hybrid.py                 # train briefly, compile, 1 encrypted image
    python experiments/bench/resnet20_hybrid.py --images 3 --epochs 2

Weights: ResNet-20 trained here for ``--epochs`` on scikit-learn's digits upscaled to 3x32x32 (no CIFAR download
on this machine; the network, input size and every layer shape are CIFAR-10's). The encrypted logits are compared
with the clear compiled model (the same model: under ``hybrid`` ReLU is exact, evaluated by the enclave on
masked values) and the peak memory of this process (client + server) and of the enclave process is reported.

Published CPU figures for the same network (their hardware, their numbers; pure FHE with bootstrapping, no
enclave, so a different trust model):

* OpenFHE CKKS, polynomial ReLU: 1,145 s per image (83.8% accuracy) - "Activate Me!: Designing Efficient
  Activation Functions for Privacy-Preserving Machine Learning with FHE", arXiv:2508.11575 (2025).
* FHEON (OpenFHE, configurable CNN layers): 403 s per image, 20.4 GB - Njungle, Jahns, Kinsy, "FHEON: A
  Configurable Framework for Developing Privacy-Preserving Neural Networks Using Homomorphic Encryption",
  arXiv:2510.03996 (2025).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
import warnings

import psutil
import torch
import torch.nn as nn

import privml
from models.resnet import ResNet20
from privml.data import load_digits_split

PUBLISHED = [("OpenFHE, polynomial ReLU (arXiv:2508.11575)", 1145.0),
             ("FHEON (arXiv:2510.03996)", 403.0)]


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def digits32() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits upscaled to 3x32x32 (train x, y, test x, y)."""
    train, test = load_digits_split(size=32)
    (xtr, ytr), (xte, yte) = train.tensors, test.tensors
    return xtr.expand(-1, 3, -1, -1).contiguous(), ytr, xte.expand(-1, 3, -1, -1).contiguous(), yte


def train(epochs: int) -> tuple[nn.Module, float, tuple]:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    xtr, ytr, xte, yte = digits32()
    model = ResNet20()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr))
        for i in range(0, len(xtr), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(xte).argmax(1) == yte).float().mean())
    print(f"trained ResNet-20 for {epochs} epoch(s) on digits upscaled to 3x32x32 in {time.perf_counter() - t0:.0f} s:"
          f" clear test accuracy {acc:.3f} ({len(xte)} images)")
    return model, acc, (xtr, ytr, xte, yte)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--ring", type=int, default=None, choices=(8192, 16384), help="force N (default: planner)")
    args = ap.parse_args()

    model, _, (xtr, _, xte, yte) = train(args.epochs)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        options = {"poly_modulus_degree": args.ring} if args.ring else {}
        compiled = privml.compile(model, xtr[:256], backend="hybrid", **options)
    compile_s = time.perf_counter() - t0
    p = compiled.plan.params
    hy = p["hybrid"]
    refreshes = sum(r["ciphertexts"] for r in hy["refreshes"])
    print(f"compiled in {compile_s:.0f} s: N={p['poly_modulus_degree']}, chain {p['ckks']['coeff_mod_bit_sizes']}, "
          f"{len(p['rotation_steps'])} rotation keys, {refreshes} enclave decryptions per image, predicted output "
          f"error bound {hy['output_error_bound']:.3g}")
    memory = p.get("memory")
    if memory:
        print("predicted memory: " + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in memory.items()))

    times, errs, agree = [], [], []
    t0 = time.perf_counter()
    with privml.Session(compiled.plan, out_of_range="warn") as s:
        keys_s = time.perf_counter() - t0
        for i in range(args.images):
            x = xte[i:i + 1]
            t1 = time.perf_counter()
            y = s.decrypt(compiled(s.encrypt(x)))
            times.append(time.perf_counter() - t1)
            with torch.no_grad():
                ref = compiled(x)
            errs.append(float((y - ref).abs().max()))
            agree.append(int(y.argmax()) == int(ref.argmax()))
            print(f"image {i}: {times[-1]:.1f} s, max |encrypted - clear logit| {errs[-1]:.2e}, "
                  f"label {int(yte[i])}, encrypted argmax {int(y.argmax())}", flush=True)
        enclave_gb = 0.0
        pid = getattr(s.backend.enclave, "pid", None)
        if pid:
            enclave_gb = psutil.Process(pid).memory_info().rss / 1e9
        stats = s.backend.runtime.refresher.stats
        print(f"enclave: {stats.requests} requests, {stats.ciphertexts} ciphertexts, {stats.seconds:.1f} s in "
              f"refreshes, {stats.bytes_sent / 1e6:.0f} MB sent")
    first, later = times[0], statistics.median(times[1:]) if len(times) > 1 else times[0]
    print("\n## CIFAR-shaped ResNet-20, one image, this machine (2 cores)\n")
    print("| system | s / image | peak memory GB | max logit error | agree |")
    print("|---|---|---|---|---|")
    print(f"| privml hybrid (first image, incl. encoding the weights) | {first:.1f} | {_peak_gb():.2f} "
          f"(+{enclave_gb:.2f} "
          f"enclave) | {max(errs):.2e} | {sum(agree)}/{len(agree)} |")
    if len(times) > 1:
        print(f"| privml hybrid (later images, median) | {later:.1f} | | | |")
    for name, sec in PUBLISHED:
        print(f"| {name}, their hardware | {sec:,.0f} | | | |")
    print(f"\nkey generation + attestation + provisioning: {keys_s:.1f} s; compile: {compile_s:.0f} s")


if __name__ == "__main__":
    main()
