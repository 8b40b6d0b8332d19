"""The compiler's per-activation choice against fixed choices used elsewhere: accuracy vs depth vs latency.

On LeNet-5 (digits upsampled to 28x28), SmallResNet and DigitsCNN (8x8 digits), all trained
with ReLU, each configuration replaces every ReLU and is measured the same way:

* ``pass: accuracy_tolerance=0.01``: privml.compile chooses per activation (degree / composite)
  so the predicted test accuracy stays within one point of the ReLU model, cheapest depth first;
* ``pass: depth_budget=D(x^2)``: the pass at the depth the square activation needs (same cost);
* ``x^2 everywhere``: the CryptoNets-style square activation (CryptoNets trains with it; swapped into
  a ReLU-trained model its values explode, which is the point of comparing);
* ``degree 4 everywhere``: one fixed minimax degree (privml's old default);
* ``sign {15,15,27} everywhere``: the published degree-27 composite (x (1 + s(x / B)) / 2, 13 bits).

Columns: accuracy of the approximated model in clear on the whole test split (what the CKKS
run computes up to its noise), total multiplicative depth (CKKS dry run), ring dimension N
at 128-bit security, and for configurations that fit, one encrypted image per configuration
in the latency layout (key generation excluded, each run in its own process): seconds,
ciphertext products, whether the decrypted logits agree with the clear run, and the peak
memory of that process. Run:

    python experiments/bench/approx_choices.py                    # all three models (slow: ~15-25 min)
    python experiments/bench/approx_choices.py --models digits_cnn --images 1
    python experiments/bench/approx_choices.py --no-encrypted     # accuracy and depth only (~1 min)

Writes ``artifacts/bench/approx_choices.md`` (and ``.json``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import privml  # noqa: E402
from privml.approx.fit import fit_activation  # noqa: E402
from privml.approx.sign import composite_sign  # noqa: E402
from privml.backends.ckks import dry_run  # noqa: E402
from privml.compiler.approx import find_activations, replace_activation  # noqa: E402
from privml.compiler.calibrate import calibrate  # noqa: E402
from privml.compiler.validate import fix  # noqa: E402
from privml.errors import DepthExhausted  # noqa: E402
from privml.he.params import HE_STANDARD_128, max_depth  # noqa: E402
from privml.nn import CompositeRelu, PolyActivation  # noqa: E402
from privml.tensor import module_scope  # noqa: E402
from privml.train import train_or_load  # noqa: E402

MODELS = {"lenet5": "configs/lenet5_digits28.yaml", "resnet": "configs/resnet_digits.yaml",
          "digits_cnn": "configs/digits_cnn.yaml"}
CALIB = 512


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def fixed_model(model: nn.Module, calib: torch.Tensor, kind: str) -> nn.Module:
    """``model`` with every activation replaced by the same construction (on its calibrated interval)."""
    gm, _ = fix(model, calib[:64])
    stats = calibrate(gm, [calib])
    sign = composite_sign(degrees=(15, 15, 27), eps=2.0**-9) if kind == "sign27" else None
    for site in find_activations(gm, stats, margin=0.1):
        if kind == "square":
            mod: nn.Module = PolyActivation(fit_activation("square", site.lo, site.hi, 2).power_coeffs(),
                                            (site.lo, site.hi), source="square")
        elif kind == "degree4":
            mod = PolyActivation(fit_activation(site.kind, site.lo, site.hi, 4).power_coeffs(), (site.lo, site.hi),
                                 source=site.kind)
        else:
            mod = CompositeRelu([p.power_coeffs() for p in sign.stages], (site.lo, site.hi), source=site.kind)
        replace_activation(gm, site, mod)
    return gm


def depth_of(module: nn.Module, shape: tuple[int, ...]) -> int:
    """Exact CKKS depth from the backend's keyless dry run (the throughput layout: same depth, no rotations)."""
    with module_scope(module):
        return dry_run(module, shape, "throughput").depth


def _encrypted_child(path: str, x: torch.Tensor, threads: int) -> dict[str, Any]:
    """In a fresh process: key generation, then one image at a time in the latency layout."""
    torch.set_num_threads(threads)
    compiled = torch.load(path, weights_only=False)
    t0 = time.perf_counter()
    session = privml.Session(compiled.plan)
    keygen = time.perf_counter() - t0
    seconds, agree, err, mults = [], 0, 0.0, []
    for i in range(len(x)):
        xi = x[i: i + 1]
        before = session.backend.ctx.stats["ct_ct_mults"]
        t0 = time.perf_counter()
        out = session.decrypt(compiled(session.encrypt(xi)))
        seconds.append(time.perf_counter() - t0)
        mults.append(session.backend.ctx.stats["ct_ct_mults"] - before)
        clear = compiled(xi)
        err = max(err, float((out - clear).abs().max()))
        agree += int(out.argmax() == clear.argmax())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return {"keygen_s": keygen, "latency_s": sum(seconds) / len(seconds), "ct_mults": sum(mults) / len(mults),
            "agree": f"{agree}/{len(x)}", "max_abs_err": err, "peak_rss_gb": peak}


def run_encrypted(compiled: Any, x: torch.Tensor, threads: int = 1) -> dict[str, Any]:
    """One encrypted run per child process: a CKKS session at N=32768 caches gigabytes of encoded diagonals
    (LeNet-5 well over 10 GB), released only when the process ends."""
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "compiled.pt")
        torch.save(compiled, path)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(_encrypted_child, path, x, threads).result()


def bench_model(name: str, images: int, encrypted: bool) -> list[dict[str, Any]]:
    model, dm = train_or_load(MODELS[name])
    (xtr, _), (xte, yte) = dm.train_set.tensors, dm.test_set.tensors
    calib, shape = xtr[:CALIB], tuple(xtr.shape[1:])
    base = accuracy(model, xte, yte)
    rows: list[dict[str, Any]] = [{"model": name, "config": "ReLU (clear reference)", "accuracy": base}]
    configs: list[tuple[str, Any]] = []
    square = fixed_model(model, calib, "square")
    square_depth = depth_of(square, shape)
    configs.append(("pass: accuracy_tolerance=0.01",
                    lambda: privml.compile(model, calib, backend="ckks", accuracy_tolerance=0.01,
                                           validation=(xte, yte))))
    configs.append((f"pass: depth_budget={square_depth} (= x^2)",
                    lambda: privml.compile(model, calib, backend="ckks", depth_budget=square_depth,
                                           validation=(xte, yte))))
    configs.append(("x^2 everywhere", lambda: square))
    configs.append(("degree 4 everywhere", lambda: fixed_model(model, calib, "degree4")))
    configs.append(("sign {15,15,27} everywhere", lambda: fixed_model(model, calib, "sign27")))
    for label, make in configs:
        t0 = time.perf_counter()
        try:
            built = make()
        except privml.errors.BudgetError as err:
            rows.append({"model": name, "config": label, "note": str(err).splitlines()[0][:120]})
            continue
        module = built.module if isinstance(built, privml.CompiledModel) else built
        row: dict[str, Any] = {"model": name, "config": label, "accuracy": accuracy(module.eval(), xte, yte)}
        row["drop"] = base - row["accuracy"]
        row["degrees"] = [getattr(m, "degrees", None) or m.degree for m in module.modules()
                          if isinstance(m, (PolyActivation, CompositeRelu))]
        row["depth"] = depth_of(module, shape)
        try:
            compiled = built if isinstance(built, privml.CompiledModel) else privml.compile(module, calib,
                                                                                             backend="ckks")
            row["N"] = compiled.plan.params["poly_modulus_degree"]
        except DepthExhausted:
            compiled = None
            peak = 2.0 * max(st.abs_max for st in calibrate(module, [calib]).values())  # compile's headroom
            reach = max(0, max_depth(20, peak, max(HE_STANDARD_128)))
            row["N"] = f"none: 128-bit chains reach depth {reach} (values up to {peak:.2g})"
        row["compile_s"] = time.perf_counter() - t0
        if compiled is not None and encrypted:
            row.update(run_encrypted(compiled, xte[:images], torch.get_num_threads()))
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def format_row(r: dict[str, Any]) -> str:
    def f(key: str, fmt: str) -> str:
        v = r.get(key)
        return "-" if v is None else (fmt.format(v) if not isinstance(v, str) else v)

    degs = r.get("degrees")
    degs_s = "-" if degs is None else ", ".join("{" + ",".join(map(str, d)) + "}" if isinstance(d, tuple) else str(d)
                                                for d in degs)
    return (f"| {r['model']} | {r['config']} | {degs_s} | {f('accuracy', '{:.4f}')} | {f('drop', '{:+.4f}')} | "
            f"{f('depth', '{}')} | {f('N', '{}')} | {f('latency_s', '{:.1f}')} | {f('ct_mults', '{:.0f}')} | "
            f"{f('agree', '{}')} | {f('max_abs_err', '{:.1e}')} | {f('peak_rss_gb', '{:.1f}')} |"
            + (f" {r['note']}" if r.get("note") else ""))


HEADER = ("| model | approximation | degrees per activation | test acc (clear) | drop vs ReLU | depth | N | "
          "latency s/img | ct x ct / img | enc argmax = clear | max abs err | peak RSS GB |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--images", type=int, default=1, help="encrypted images per configuration (latency layout)")
    p.add_argument("--no-encrypted", action="store_true", help="accuracy and depth only")
    p.add_argument("--out", default="artifacts/bench/approx_choices.md")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CKKS uses its own)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    print(HEADER, flush=True)
    for name in args.models:
        rows += bench_model(name, args.images, not args.no_encrypted)
    table = "\n".join([HEADER] + [format_row(r) for r in rows])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = (f"# Approximation choices: accuracy vs depth vs latency\n\nGenerated by "
            f"`python experiments/bench/approx_choices.py {' '.join(argv or sys.argv[1:])}`. Accuracy: clear run of "
            "the approximated model on the whole test split; depth: CKKS dry run; N: ring dimension at 128-bit "
            "security (precision 20 bits); latency: one image, CKKS latency layout, key generation excluded, "
            f"{args.threads} torch thread(s) on this machine.\n\n{table}\n")
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1, default=str))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
