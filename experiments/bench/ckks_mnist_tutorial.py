"""Benchmark: TenSEAL's MNIST-tutorial CNN, plaintext vs hand-written TenSEAL vs privml (both CKKS layouts).

All methods run in ONE process on the SAME unmodified ``TutorialCNN`` and weights (trained by
``configs/mnist_tutorial_digits28.yaml``, reused if the checkpoint exists):

  (a) plaintext torch;
  (b) the hand-written TenSEAL baseline (``experiments/bench/tenseal_tutorial.py``: N=8192,
      [31, 26 x 6, 31], scale 2^26, all-steps Galois keys, im2col convolution);
  (c) ``privml.compile(..., backend="ckks", layout="latency")``: one image per ciphertext;
  (d) ``privml.compile(..., backend="ckks", layout="throughput")``: one image per slot;
  and, unless ``--matched-precision 0``, (c) and (d) again compiled with ``precision_bits=11``, which
  lets privml pick the tutorial's ring (N=8192) at a precision still above the tutorial's.

Run ``python experiments/bench/ckks_mnist_tutorial.py [--images R] [--batch B]``. Writes
``artifacts/bench/ckks_mnist_tutorial.md`` and ``.json``.

What is measured:
* latency: median over R single images of encrypt + server evaluation + decrypt (the server
  part alone is reported too); for the throughput layout, one batch (encrypt + eval + decrypt)
  divided by the batch size, and the batch latency itself;
* throughput (images/s): plaintext on the whole test split in one batch; TenSEAL and privml
  latency: 1 / median latency (images one after another in one process); privml throughput:
  batch size / batch latency;
* sizes: encrypted input bytes (serialized, per image / per batch) and the public evaluation
  context a client uploads (TenSEAL: ``ctx.serialize(save_secret_key=False)`` with all-steps
  Galois keys; privml: ``public_context()`` with only the plan's Galois keys);
* peak memory: the process's peak resident set (VmHWM in /proc/self/status, reset per method via
  /proc/self/clear_refs; falls back to ru_maxrss, which never resets) over key generation,
  encryption, evaluation and decryption, and its increase over the RSS when the method started
  (SEAL's global memory pool keeps what earlier methods freed, so later rows' increases are lower bounds);
* accuracy: argmax agreement with plaintext torch on the evaluated images, max |logit error|,
  and accuracy against the labels.
One-off costs (compilation, key generation) are reported apart from the latency.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import privml  # noqa: E402
from experiments.bench.tenseal_tutorial import TenSEALTutorialCNN  # noqa: E402
from privml.errors import InvalidInput  # noqa: E402
from privml.train import train_or_load  # noqa: E402

CONFIG = "configs/mnist_tutorial_digits28.yaml"
OUT_DIR = Path("artifacts/bench")
TARGET_LATENCY_RATIO = 0.1  # privml latency layout <= 0.1x the hand-written TenSEAL latency (issue 11)
TARGET_THROUGHPUT_RATIO = 100.0  # privml throughput layout >= 100x its images/s


# --------------------------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    """Hand freed heap pages back to the OS (glibc), so one method's RSS does not inflate the next one's."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak RSS of this process over a block (VmHWM, reset via /proc/self/clear_refs where allowed)."""

    def __enter__(self) -> PeakMemory:
        gc.collect()
        _malloc_trim()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "VmHWM, reset per method"
        except OSError:
            self.method = "ru_maxrss, process-wide (never reset)"
        self.start_kib = _status_kib("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def __exit__(self, *exc: object) -> None:
        hwm = _status_kib("VmHWM") if self.method.startswith("VmHWM") else None
        self.peak_kib = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def as_dict(self) -> dict[str, Any]:
        return {
            "peak_rss_mb": self.peak_kib / 1024,
            "start_rss_mb": self.start_kib / 1024,
            "delta_rss_mb": (self.peak_kib - self.start_kib) / 1024,
            "method": self.method,
        }


# --------------------------------------------------------------------------------------------- helpers
def _timed(fn: Any, *args: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def _quality(logits: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    return {
        "n": len(logits),
        "agreement": float((logits.argmax(1) == ref.argmax(1)).float().mean()),
        "max_abs_err": float((logits - ref).abs().max()),
        "accuracy": float((logits.argmax(1) == labels).float().mean()),
        "plain_accuracy": float((ref.argmax(1) == labels).float().mean()),
    }


def _per_image(rows: list[dict[str, float]]) -> dict[str, float]:
    out = {f"{k}_median_s": statistics.median(r[k] for r in rows) for k in rows[0]}
    out["first_total_s"] = rows[0]["total"]
    return out


def _privml_params(compiled: Any) -> dict[str, Any]:
    p = compiled.plan.params
    ck, steps = p["ckks"], p.get("rotation_steps", [])
    return {
        "N": ck["poly_modulus_degree"],
        "chain": ck["coeff_mod_bit_sizes"],
        "scale_bits": ck["scale_bits"],
        "galois_keys": f"{len(steps)} (the plan's steps only: {steps})",
        "depth": p.get("depth"),
        "security_bits": p.get("security_bits"),
    }


def _compile(
    model: torch.nn.Module, calib: torch.Tensor, layout: str, precision: int | None
) -> tuple[Any, float]:
    opts = {} if precision is None else {"precision_bits": precision}
    return _timed(lambda: privml.compile(model, calib, backend="ckks", layout=layout, **opts))


def _label(layout: str, precision: int | None) -> str:
    return f"privml CKKS {layout}" + ("" if precision is None else f" (precision_bits={precision})")


# --------------------------------------------------------------------------------------------- methods
def bench_plain(
    model: torch.nn.Module, xs: torch.Tensor, test_x: torch.Tensor, reps: int = 5
) -> dict[str, Any]:
    with PeakMemory() as mem, torch.no_grad():
        model(xs[:1])  # warm-up
        lat = [_timed(model, xs[i : i + 1])[1] for i in range(len(xs)) for _ in range(reps)]
        _, batch_s = _timed(model, test_x)
        logits = model(xs)
    return {
        "method": "plaintext torch",
        "latency_s": statistics.median(lat),
        "server_s": statistics.median(lat),
        "throughput_ips": len(test_x) / batch_s,
        "throughput_note": f"whole test split ({len(test_x)}) in one batch",
        "batch": len(test_x),
        "batch_latency_s": batch_s,
        "logits": logits,
        "memory": mem.as_dict(),
    }


def bench_tenseal(model: torch.nn.Module, xs: torch.Tensor) -> dict[str, Any]:
    with PeakMemory() as mem:
        enc_model = TenSEALTutorialCNN(model)
        ctx, keygen_s = _timed(TenSEALTutorialCNN.make_context)
        rows, outs = [], []
        for i in tqdm(range(len(xs)), desc="TenSEAL (hand-written)", leave=False):
            (enc, windows_nb), t_enc = _timed(enc_model.encrypt, ctx, xs[i])
            out, t_eval = _timed(enc_model.forward, enc, windows_nb)
            logits, t_dec = _timed(enc_model.decrypt, out)
            rows.append({"encrypt": t_enc, "eval": t_eval, "decrypt": t_dec, "total": t_enc + t_eval + t_dec})
            outs.append(logits)
    enc, _ = enc_model.encrypt(ctx, xs[0])
    t = _per_image(rows)
    return {
        "method": "TenSEAL tutorial (hand-written)",
        "latency_s": t["total_median_s"],
        "server_s": t["eval_median_s"],
        "timings": t,
        "throughput_ips": 1.0 / t["total_median_s"],
        "throughput_note": "1 / latency (one image per ciphertext, sequential)",
        "keygen_s": keygen_s,
        "input_bytes_per_image": len(enc.serialize()),
        "public_context_bytes": len(ctx.serialize(save_secret_key=False)),
        "params": {
            "N": 8192,
            "chain": [31, 26, 26, 26, 26, 26, 26, 31],
            "scale_bits": 26,
            "galois_keys": "all power-of-two steps, both directions (generate_galois_keys())",
        },
        "logits": torch.stack(outs),
        "memory": mem.as_dict(),
    }


def bench_privml_latency(
    model: torch.nn.Module, calib: torch.Tensor, xs: torch.Tensor, precision: int | None = None
) -> dict[str, Any]:
    with PeakMemory() as mem:
        compiled, compile_s = _compile(model, calib, "latency", precision)
        session, keygen_s = _timed(privml.Session, compiled.plan)
        stats = session.backend.ctx.stats
        rows, outs, ops = [], [], []
        for i in tqdm(range(len(xs)), desc=_label("latency", precision), leave=False):
            enc, t_enc = _timed(session.encrypt, xs[i : i + 1])
            before = dict(stats)
            out, t_eval = _timed(compiled, enc)
            ops.append({k: stats[k] - before[k] for k in stats})
            logits, t_dec = _timed(session.decrypt, out)
            rows.append({"encrypt": t_enc, "eval": t_eval, "decrypt": t_dec, "total": t_enc + t_eval + t_dec})
            outs.append(logits[0])
    t = _per_image(rows)
    return {
        "method": _label("latency", precision),
        "latency_s": t["total_median_s"],
        "server_s": t["eval_median_s"],
        "timings": t,
        "throughput_ips": 1.0 / t["total_median_s"],
        "throughput_note": "1 / latency (one image per ciphertext, sequential)",
        "compile_s": compile_s,
        "keygen_s": keygen_s,
        "input_bytes_per_image": len(session.backend.dumps(session.encrypt(xs[:1]))),
        "public_context_bytes": len(session.backend.public_context()),
        "params": _privml_params(compiled),
        "ops_first_image": ops[0],
        "ops_last_image": ops[-1],
        "plan": str(compiled.plan),
        "logits": torch.stack(outs),
        "memory": mem.as_dict(),
    }


def bench_privml_throughput(compiled: Any, compile_s: float, xb: torch.Tensor, label: str) -> dict[str, Any]:
    """``compiled`` comes from the caller, which needs the plan's slot count to build the batch ``xb``."""
    slots = compiled.plan.params["poly_modulus_degree"] // 2
    if len(xb) > slots:
        raise InvalidInput(f"a batch of {len(xb)} exceeds the {slots} slots of the throughput plan")
    with PeakMemory() as mem:
        session, keygen_s = _timed(privml.Session, compiled.plan)
        with tqdm(total=3, desc=f"{label} (batch {len(xb)})", leave=False) as bar:
            enc, t_enc = _timed(session.encrypt, xb)
            bar.update()
            out, t_eval = _timed(compiled, enc)
            bar.update()
            logits, t_dec = _timed(session.decrypt, out)
            bar.update()
    ops = dict(session.backend.ctx.stats)
    batch_s = t_enc + t_eval + t_dec
    del out
    input_bytes = len(session.backend.dumps(enc))
    return {
        "method": label,
        "latency_s": batch_s / len(xb),
        "server_s": t_eval / len(xb),
        "batch": len(xb),
        "slots": slots,
        "batch_latency_s": batch_s,
        "timings": {"encrypt_s": t_enc, "eval_s": t_eval, "decrypt_s": t_dec},
        "throughput_ips": len(xb) / batch_s,
        "throughput_note": f"batch of {len(xb)} / batch latency",
        "projected_full_batch_ips": slots / batch_s,
        "compile_s": compile_s,
        "keygen_s": keygen_s,
        "input_bytes_per_batch": input_bytes,
        "input_bytes_per_image": input_bytes / len(xb),
        "public_context_bytes": len(session.backend.public_context()),
        "params": _privml_params(compiled),
        "ops_per_batch": ops,
        "logits": logits,
        "memory": mem.as_dict(),
    }


# --------------------------------------------------------------------------------------------- report
def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB"


def _fmt_s(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def _row(r: dict[str, Any], base: dict[str, Any]) -> str:
    q, mem = r["quality"], r["memory"]
    if "input_bytes_per_batch" in r:
        enc = f"{_mb(r['input_bytes_per_batch'])} / batch ({_mb(r['input_bytes_per_image'])} / image)"
    else:
        enc = _mb(r.get("input_bytes_per_image")) + (" / image" if "input_bytes_per_image" in r else "")
    batch = f"{_fmt_s(r['batch_latency_s'])} ({r['batch']})" if "batch_latency_s" in r else "-"
    cells = [
        r["method"],
        f"{_fmt_s(r['latency_s'])} ({_fmt_s(r['server_s'])})",
        batch,
        f"{r['throughput_ips']:.3g}",
        enc,
        _mb(r.get("public_context_bytes")),
        f"{mem['peak_rss_mb']:.0f} MB ({mem['delta_rss_mb']:+.0f} MB)",
        f"{q['agreement'] * 100:.1f}% ({q['n']})",
        f"{q['max_abs_err']:.2g}",
        f"{q['accuracy'] * 100:.1f}%",
        f"{r['latency_s'] / base['latency_s']:.3g}x",
        f"{r['throughput_ips'] / base['throughput_ips']:.3g}x",
    ]
    return "| " + " | ".join(cells) + " |"


def _targets(results: list[dict[str, Any]]) -> list[str]:
    base = next(r for r in results if r["method"].startswith("TenSEAL"))
    lines = []
    for r in results:
        if r["method"].startswith("privml CKKS latency"):
            ratio = r["latency_s"] / base["latency_s"]
            ok = "met" if ratio <= TARGET_LATENCY_RATIO else "MISSED"
            lines.append(
                f"- {r['method']}: latency {ratio:.3g}x TenSEAL (target <= {TARGET_LATENCY_RATIO}x): "
                f"**{ok}** "
                f"(server only {r['server_s'] / base['server_s']:.3g}x; first image "
                f"{_fmt_s(r['timings']['first_total_s'])})"
            )
        elif r["method"].startswith("privml CKKS throughput"):
            ratio = r["throughput_ips"] / base["throughput_ips"]
            ok = "met" if ratio >= TARGET_THROUGHPUT_RATIO else "MISSED"
            full = r["projected_full_batch_ips"] / base["throughput_ips"]
            lines.append(
                f"- {r['method']}: {ratio:.3g}x TenSEAL images/s at batch {r['batch']} (target >= "
                f"{TARGET_THROUGHPUT_RATIO:.0f}x): **{ok}**"
                + (
                    ""
                    if r["batch"] == r["slots"]
                    else f"; a full batch of N/2 = {r['slots']} costs the same ciphertext work, so about "
                    f"{r['projected_full_batch_ips']:.3g} images/s = {full:.3g}x (projection, not measured)"
                )
            )
    return lines


def render(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    base = next(r for r in results if r["method"].startswith("TenSEAL"))
    lines = [
        "# CKKS benchmark: TenSEAL's MNIST-tutorial CNN",
        "",
        f"Model `models.mnist_tutorial.TutorialCNN` trained by `{meta['config']}` (sklearn digits "
        "upscaled to 28x28), the same weights for every row. Latency: median over "
        f"{meta['images']} test images of encrypt + server evaluation + decrypt (server part in "
        "brackets); throughput layout: one batch of "
        f"{meta['batch_note']}, latency = batch time / batch size. {meta['machine']}. Load average at start "
        f"{meta['load_start']}, at end {meta['load_end']}.",
        "",
        "| method | latency / image (server) | batch latency (size) | images/s | encrypted input "
        "| public context | peak RSS (Δ) | agree w/ plain | max abs logit err | accuracy "
        "| latency vs TenSEAL | images/s vs TenSEAL |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *[_row(r, base) for r in results],
        "",
        "Targets from the issue:",
        "",
        *_targets(results),
        "",
        "| method | parameters | Galois keys | one-off costs | op counts (privml counters) |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        p = r.get("params")
        if p is None:
            continue
        one_off = f"keygen {_fmt_s(r['keygen_s'])}"
        if "compile_s" in r:
            one_off += f", compile {_fmt_s(r['compile_s'])}"
        if "ops_last_image" in r:
            ops, what = r["ops_last_image"], f"image {meta['images']}: "
        else:
            ops, what = r.get("ops_per_batch"), "batch: "
        ops_txt = "-" if not ops else what + ", ".join(f"{k} {v}" for k, v in ops.items() if v)
        lines.append(
            f"| {r['method']} | N={p['N']}, chain {p['chain']}, scale 2^{p['scale_bits']} | "
            f"{p['galois_keys']} | {one_off} | {ops_txt} |"
        )
    lines += [
        "",
        f"Peak memory: {results[0]['memory']['method']}; Δ = peak minus the RSS when the method started. All "
        "methods share one process and SEAL's global memory pool keeps (and reuses) what earlier methods "
        "freed, so the absolute peaks grow down the table and the Δ of later CKKS rows is a lower bound. "
        "TenSEAL and privml-latency images/s = 1 / latency, one image at a time.",
    ]
    return "\n".join(lines) + "\n"


def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def _batch_of(test: tuple[torch.Tensor, ...], size: int) -> tuple[tuple[torch.Tensor, ...], str]:
    """The first ``size`` test samples, tiling the test split when it is smaller."""
    n = len(test[0])
    if size <= n:
        note = "the whole test split" if size == n else f"the first {size} test images"
        return tuple(t[:size] for t in test), note
    reps = -(-size // n)
    return tuple(t.repeat(reps, *[1] * (t.dim() - 1))[:size] for t in test), f"the test split ({n}) tiled"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5, help="R: single images timed for the latency rows")
    ap.add_argument(
        "--batch",
        type=int,
        default=None,
        help="throughput-layout batch (default: the whole test split, or N/2 if smaller); values above the "
        "test split tile it; values above N/2 are cut to N/2 (a full batch)",
    )
    ap.add_argument(
        "--matched-precision",
        type=int,
        default=11,
        help="precision_bits of the extra privml rows "
        "(11 lets privml use the tutorial's N=8192); 0 skips them",
    )
    ap.add_argument("--config", default=CONFIG)
    ap.add_argument("--calib", type=int, default=512, help="training images used for calibration")
    ap.add_argument("--out", default=str(OUT_DIR))
    args = ap.parse_args(argv)
    if args.images < 1 or (args.batch is not None and args.batch < 1) or args.calib < 1:
        raise InvalidInput("--images, --batch and --calib must be positive")

    load_start = _load()
    model, dm = train_or_load(args.config)
    test_x = torch.stack([dm.test_set[i][0] for i in range(len(dm.test_set))]).float()
    test_y = torch.tensor([int(dm.test_set[i][1]) for i in range(len(dm.test_set))])
    calib = torch.stack([dm.train_set[i][0] for i in range(min(args.calib, len(dm.train_set)))]).float()
    xs, ys = test_x[: args.images], test_y[: args.images]
    with torch.no_grad():
        ref_all = model(test_x)
    print(
        f"TutorialCNN: {len(dm.train_set)} train / {len(test_x)} test images; {len(xs)} timed single images",
        flush=True,
    )

    precisions = [None] + ([args.matched_precision] if args.matched_precision > 0 else [])
    results = [bench_plain(model, xs, test_x), bench_tenseal(model, xs)]
    for r in results:
        r["quality"] = _quality(r["logits"], ref_all[: len(xs)], ys)
    batch_notes = []
    for precision in precisions:
        r = bench_privml_latency(model, calib, xs, precision)
        r["quality"] = _quality(r["logits"], ref_all[: len(xs)], ys)
        results.append(r)
        gc.collect()
        compiled, compile_s = _compile(model, calib, "throughput", precision)
        slots = compiled.plan.params["poly_modulus_degree"] // 2
        size = min(args.batch if args.batch is not None else len(test_x), slots)
        (xb, yb, rb), note = _batch_of((test_x, test_y, ref_all), size)
        note += f", {size} images" + (" = N/2, a full batch" if size == slots else f" (N/2 = {slots})")
        batch_notes.append(f"{note} for {_label('throughput', precision)}")
        r = bench_privml_throughput(compiled, compile_s, xb, _label("throughput", precision))
        r["quality"] = _quality(r["logits"], rb, yb)
        results.append(r)
        del compiled
        gc.collect()

    meta = {
        "config": args.config,
        "images": len(xs),
        "batch_note": "; ".join(batch_notes),
        "machine": f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch "
        f"threads, Python {platform.python_version()}, torch {torch.__version__}",
        "load_start": load_start,
        "load_end": _load(),
    }
    table = render(results, meta)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ckks_mnist_tutorial.md").write_text(table)
    clean = [{k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in r.items()} for r in results]
    payload = {"meta": meta, "results": clean}
    (out / "ckks_mnist_tutorial.json").write_text(
        json.dumps(payload, indent=1, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
    )
    print(f"wrote {out / 'ckks_mnist_tutorial.md'} and {out / 'ckks_mnist_tutorial.json'}")
    return payload


if __name__ == "__main__":
    main()
