"""Benchmark: enclave refreshes vs deep CKKS, side by side in one process, same weights.

    python experiments/bench/hybrid_vs_ckks.py                  # refresh latency, LeNet-5 + SmallResNet
    python experiments/bench/hybrid_vs_ckks.py --images 8 --ckks-images 1
    python experiments/bench/hybrid_vs_ckks.py --skip-ckks      # hybrid only (the ckks LeNet needs ~16 GB)

1. One refresh per ciphertext at N=8192 and N=16384 (hybrid parameters, real enclave process over its Unix
   socket): blinding, the round trip (serialization, socket, the enclave's decrypt + flood + re-encrypt,
   loading the answer) and unblinding; the enclave's own share is timed in-process with the same SEAL calls.
2. LeNet-5 (ReLU, digits upsampled to 28x28) and SmallResNet (8x8 digits) under ``hybrid`` (the planner's fusion
   choice, and with every pair of linear maps fused) and under ``ckks`` (polynomial ReLUs; LeNet-5 needs N=32768
   there): the maps applied apart, seconds per image, peak memory, accuracy against the
   labels and agreement with the clear model on the first ``--images`` test images.

Bootstrapping reference (no bootstrapping in SEAL/TenSEAL): Orion on Lattigo, LogN=16, measured on this
machine (DESIGN.md section 6): 25-30 s per bootstrap on one core, 88-98 s of key generation, 18 GB resident.
Weights: the checkpoints of ``privml fit --config configs/lenet5_digits28.yaml`` / ``resnet_digits.yaml`` when
present, else a short training run here (printed).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import psutil
import torch
import torch.nn as nn

import privml
from models.lenet import LeNet5
from models.resnet import SmallResNet
from privml.data import get_dataset
from privml.he.noise import secure_normal, secure_uniform

BOOTSTRAP_S = 25.0  # Orion/Lattigo LogN=16, one core, this machine (lower end of 25-30 s)


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def _train(model: nn.Module, dataset: str, epochs: int) -> nn.Module:
    torch.manual_seed(0)
    x, y = get_dataset(dataset)[0].tensors
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for i in range(0, len(x), 64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64]).backward()
            opt.step()
    return model.eval()


def _model(name: str) -> tuple[nn.Module, str]:
    ckpt = {"lenet5": "artifacts/lenet5_digits28/checkpoints/model.ckpt",
            "smallresnet": "artifacts/resnet_digits/checkpoints/model.ckpt"}[name]
    model, dataset = (LeNet5(), "digits28") if name == "lenet5" else (SmallResNet(), "digits")
    if Path(ckpt).exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
        print(f"{name}: weights from {ckpt}")
    else:
        print(f"{name}: no checkpoint at {ckpt}; training 3 epochs here")
        _train(model, dataset, 3)
    return model.eval(), dataset


def refresh_latency(reps: int) -> None:
    print("\n## One refresh per ciphertext (hybrid parameters, real enclave process)\n")
    print("| N | chain | blind ms | round trip ms | unblind ms | total ms | enclave share ms "
          "(decrypt+flood+encrypt) | vs 25 s bootstrap |")
    print("|---|---|---|---|---|---|---|---|")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(64, 16)
    for n in (8192, 16384):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = privml.compile(model, x, backend="hybrid", poly_modulus_degree=n)
        with privml.Session(compiled.plan, out_of_range="warn") as s:
            ctx, ref = s.backend.ctx, s.backend.runtime.refresher
            vals = np.linspace(-1, 1, ctx.slots)
            ct = ctx.encrypt_symmetric(vals)
            low = ctx.to_canonical(ct, s.backend.runtime.floor)
            blind, trip, unblind, inside = [], [], [], []
            for _ in range(reps):
                t0 = time.perf_counter()
                m = secure_uniform(ctx.slots, -ref.mask, ref.mask)
                b = ctx.add_plain(low, m)
                t1 = time.perf_counter()
                fresh = ref._call([b], "refresh")[0]
                t2 = time.perf_counter()
                ctx.add_plain(fresh, -m)
                t3 = time.perf_counter()
                v = ctx.decrypt(b)
                v = v + secure_normal(v.size, 1e-6)
                ctx.encrypt_symmetric(v)
                t4 = time.perf_counter()
                blind.append(t1 - t0)
                trip.append(t2 - t1)
                unblind.append(t3 - t2)
                inside.append(t4 - t3)
            med = [statistics.median(v) * 1e3 for v in (blind, trip, unblind, inside)]
            total = med[0] + med[1] + med[2]
            chain = compiled.plan.params["ckks"]["coeff_mod_bit_sizes"]
            print(f"| {n} | {chain} | {med[0]:.1f} | {med[1]:.1f} | {med[2]:.1f} | {total:.1f} | {med[3]:.1f} | "
                  f"{BOOTSTRAP_S * 1e3 / total:,.0f}x cheaper |")


def _run(compiled: nn.Module, model: nn.Module, xs: torch.Tensor, ys: torch.Tensor, backend: str) -> dict:
    enclave_rss = 0.0
    times, preds, errs = [], [], []
    t_keys = time.perf_counter()
    with privml.Session(compiled.plan, out_of_range="warn") as s:
        keys = time.perf_counter() - t_keys
        for i in range(len(xs)):
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                y = s.decrypt(compiled(s.encrypt(xs[i:i + 1])))
            times.append(time.perf_counter() - t0)
            ref = model(xs[i:i + 1])
            preds.append((int(y.argmax()), int(ref.argmax())))
            errs.append(float((y - compiled(xs[i:i + 1])).abs().max()))
        keys_used = getattr(s.backend, "keys_used", 1)
        if backend == "hybrid":
            pid = getattr(s.backend.enclave, "pid", None)
            if pid:
                enclave_rss = psutil.Process(pid).memory_info().rss / 1e9
    return {"s/img": statistics.median(times), "keys s": keys, "acc": np.mean([p == int(t) for (p, _), t in
                                                                              zip(preds, ys, strict=True)]),
            "agree": np.mean([a == b for a, b in preds]), "max |logit err|": max(errs), "enclave GB": enclave_rss,
            "keys": keys_used}


def models(names: list[str], images: int, ckks_images: int, skip_ckks: bool) -> None:
    print("\n## End to end, one image at a time (latency layout), same weights\n")
    print("| model | backend | maps apart | N | chain | refreshes/img | keys | s/img (median) | peak RSS GB "
          "(client+server) | enclave GB | acc | agree | max logit err | plan error bound | images |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        model, dataset = _model(name)
        train, test = get_dataset(dataset)
        calib = train.tensors[0][:256]
        xs, ys = test.tensors[0], test.tensors[1]
        # the planner's fusion choice, then every pair fused (the choice before the planner priced it)
        rows = [("hybrid", images, "auto"), ("hybrid", images, "always")]
        rows += [] if skip_ckks else [("ckks", ckks_images, "auto")]
        for backend, k, fusion in rows:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                compiled = privml.compile(model, calib, backend=backend, fusion=fusion)
            p = compiled.plan.params
            r = _run(compiled, model, xs[:k], ys[:k], backend)
            hy = p.get("hybrid", {})
            n_ref = sum(x["ciphertexts"] for x in hy.get("refreshes", []))
            apart = ", ".join(p.get("split_before", [])) or "-"
            print(f"| {name} | {backend} (fusion={fusion}) | {apart} | {p['poly_modulus_degree']} | "
                  f"{p['ckks']['coeff_mod_bit_sizes']} | "
                  f"{n_ref} | {r['keys']} | {r['s/img']:.2f} | {_peak_gb():.2f} | {r['enclave GB']:.2f} | "
                  f"{r['acc']:.2f} | {r['agree']:.2f} | {r['max |logit err|']:.3g} | "
                  f"{hy.get('output_error_bound', 0):.3g} | {k} |", flush=True)
            del compiled


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--images", type=int, default=4, help="test images per model under hybrid")
    ap.add_argument("--ckks-images", type=int, default=1, help="test images per model under ckks (slow)")
    ap.add_argument("--models", nargs="+", default=["lenet5", "smallresnet"])
    ap.add_argument("--skip-ckks", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    refresh_latency(args.reps)
    models(args.models, args.images, args.ckks_images, args.skip_ckks)


if __name__ == "__main__":
    main()
