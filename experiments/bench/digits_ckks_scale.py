"""Benchmark: the main job's digits CNN under CKKS, latency and throughput layouts, before and after issue 11's packing.

    python experiments/bench/digits_ckks_scale.py                 # everything (~4 min on 2 cores)
    python experiments/bench/digits_ckks_scale.py --skip-baseline # only the new configurations

The model is the one ``privml demo`` evaluates under CKKS: the digits CNN fine-tuned with degree-2 polynomial
activations (``configs/finetune_digits_cnn.yaml``, trained first if its checkpoint is missing). Side by side,
in one run, on the same weights and images:

- latency layout, one image per request: the baseline plan (``precision_bits=14``: N=16384, one Galois key per
  rotation step, as the demo compiled it before) and the demo's plan now (``precision_bits=6``: N=8192, the key
  set of fewest key switches plus keys), and the demo's plan with every position-mixing pair of linear maps
  applied apart (``fusion="never"``) next to the planner's choice. Reported: warm seconds per image (first image
  apart: it encodes the weight diagonals) next to the plan's predicted linear work, the public context's bytes
  (real, and as the plan predicts them), key switches, logit error against the clear compiled model, and the
  plan's fusion decisions.
- throughput layout on the whole 450-image test split in one batch: one feature per ciphertext (the baseline)
  vs ``batch_size=450`` (lanes of 512 slots: 16 features per ciphertext at N=16384). Reported: seconds for the
  batch and per image, accuracy, and the plan's predicted peak memory next to the measured peak RSS.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import psutil  # noqa: E402
import torch  # noqa: E402

import privml  # noqa: E402
from privml.train import train_or_load  # noqa: E402


def _tensors(dataset: object, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=limit or len(dataset), shuffle=False)
    return next(iter(loader))


def _rss() -> float:
    return psutil.Process().memory_info().rss / 1e9


def latency(tuned: torch.nn.Module, calib: torch.Tensor, x: torch.Tensor, label: str, images: int,
            **options: object) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = privml.compile(tuned, calib, backend="ckks", layout="latency", **options)
    p = compiled.plan.params
    times, err = [], 0.0
    with privml.Session(compiled.plan, out_of_range="warn") as s:
        ctx_mb = len(s.backend.public_context()) / 1e6
        for i in range(images):
            t = time.perf_counter()
            y = s.decrypt(compiled(s.encrypt(x[i:i + 1])))
            times.append(time.perf_counter() - t)
            err = max(err, float((y - compiled(x[i:i + 1])).abs().max()))
    warm = sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0]
    print(f"latency  {label:<34} N={p['poly_modulus_degree']:<5} depth {p['depth']:<2} keys "
          f"{len(p['rotation_steps']):<3} ({p['key_mode']}) key switches {p['key_switches']:<4} context "
          f"{ctx_mb:7.1f} MB (plan {p['public_context_mb']:.1f}) | first {times[0]:.2f} s, warm median "
          f"{warm:.3f} s/image (plan: linear work {p['predicted_seconds']:.3f} s) | max logit err {err:.3g}",
          flush=True)
    print(f"         folded products: {', '.join(p.get('folded') or []) or 'none'}", flush=True)
    for row in p["fusion"]:  # the planner's decision where two position-mixing maps meet
        print(f"         fusion at {row['op']} after {row['pending']}: {row['chosen']} ({row['why']})", flush=True)


def throughput(tuned: torch.nn.Module, calib: torch.Tensor, x: torch.Tensor, y: torch.Tensor, label: str,
               **options: object) -> None:
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = privml.compile(tuned, calib, backend="ckks", layout="throughput", precision_bits=14, **options)
    p = compiled.plan.params
    peak = _rss()
    with privml.Session(compiled.plan, out_of_range="warn") as s:
        t = time.perf_counter()
        enc = s.encrypt(x)
        out = compiled(enc)
        peak = max(peak, _rss())
        logits = s.decrypt(out)
        seconds = time.perf_counter() - t
        peak = max(peak, _rss())
    acc = float((logits.argmax(1) == y).float().mean())
    print(f"throughput {label:<32} N={p['poly_modulus_degree']:<5} lanes {p['lanes'] or 'all':<5} input cts "
          f"{len(enc.payload):<3} | {seconds:6.1f} s for {len(x)} images = {1e3 * seconds / len(x):6.1f} ms/image | "
          f"accuracy {acc:.4f} | memory plan {p['memory_gb']['total']:.2f} GB, peak RSS {peak:.2f} GB", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/finetune_digits_cnn.yaml")
    ap.add_argument("--images", type=int, default=5, help="latency-layout images per plan (the first is cold)")
    ap.add_argument("--skip-baseline", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tuned, dm = train_or_load(args.config)
    x, y = _tensors(dm.test_set)
    calib, _ = _tensors(dm.train_set, 512)
    if not args.skip_baseline:
        latency(tuned, calib, x, "baseline: precision 14, a key a step", args.images, precision_bits=14,
                rotation_keys="direct")
    latency(tuned, calib, x, "demo: precision 6", args.images, precision_bits=6)
    latency(tuned, calib, x, "demo, fold=False (no rotate-and-add)", args.images, precision_bits=6, fold=False)
    latency(tuned, calib, x, "demo, fusion='never' (maps apart)", args.images, precision_bits=6, fusion="never")
    latency(tuned, calib, x, "precision 14 (N=16384)", args.images, precision_bits=14)
    if not args.skip_baseline:
        throughput(tuned, calib, x, y, "baseline: one feature per ct")
    throughput(tuned, calib, x, y, f"batch_size={len(x)}", batch_size=len(x))


if __name__ == "__main__":
    main()
