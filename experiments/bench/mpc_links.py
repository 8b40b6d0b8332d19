"""Benchmark: MPC inference with each party in its own network namespace, over shaped links, vs the prediction.

    python experiments/bench/mpc_links.py                   # needs root, ip and tc (see privml.parties.netlab)

Two parties (CrypTen, TFP, exact ReLU) run one request of the breast-cancer MLP (batch 64) and of the digits CNN
(batch 8) on veth links in separate namespaces (each row: the median of 3 requests):
unshaped, then 1 Gbit/s, 100 Mbit/s and 20 Mbit/s (tc tbf), and
one-way delays of 0.2, 10 and 50 ms where the kernel has sch_netem (else skipped with the reason). Measured: the
parties' seconds for the request (their compute and communication, process start-up excluded). Predicted: the
unshaped run's seconds plus a round trip per round plus each party's bytes over the bandwidth
(:func:`privml.parties.netlab.predict_seconds`, from that run's measured rounds and bytes). Plan: the compiler's
prediction before any run (:func:`privml.compiler.costs.mpc_seconds` of the plan's rounds and bytes). Each model
twice: exact ReLU (the default) and the planner's choice under ``max_error=0.1`` (polynomials where they meet it).
"""

from __future__ import annotations

import warnings

import torch

import privml
from privml.compiler.calibrate import calibrate
from privml.compiler.costs import mpc_request_cost, mpc_seconds
from privml.parties.netlab import Link, NetLab, capabilities, predict_seconds
from privml.train import train_or_load

MODELS = {"breast-cancer MLP": ("configs/breast_cancer_mlp.yaml", 64), "digits CNN": ("configs/digits_cnn.yaml", 8)}
VARIANTS = [("exact ReLU", {}), ("planner, max_error 0.1", {"max_error": 0.1})]
LINKS = [Link(rate_mbit=1000), Link(rate_mbit=100), Link(rate_mbit=20), Link(delay_ms=0.2, rate_mbit=1000),
         Link(delay_ms=10, rate_mbit=100), Link(delay_ms=50, rate_mbit=100)]


def _once(compiled: privml.CompiledModel, x: torch.Tensor, link: Link, repeats: int = 3) -> dict:
    """The request ``repeats`` times over ``link``: the median run's costs (single small requests vary)."""
    runs = []
    with NetLab(2, link) as lab:
        for _ in range(repeats):
            s = privml.Session(compiled.plan, parties=2)
            s.backend.pool = lab  # the session's calls run in the namespaces
            y = s.decrypt(compiled(s.encrypt(x)))
            runs.append((s.backend.costs(), float((y - compiled(x)).abs().max())))
    costs, error = sorted(runs, key=lambda r: r[0]["party_seconds"])[len(runs) // 2]
    return {"costs": costs, "error": error}


def main() -> None:
    caps = capabilities()
    if not caps["netns"]:
        raise SystemExit(f"mpc_links: {caps['reason']}")
    print(f"{'model':<30} | {'link':<20} | {'rounds':>6} | {'MB':>6} | {'measured s':>10} | {'from run s':>10} | "
          f"{'plan s':>8} | {'error':>7}")
    for name, (config, batch) in MODELS.items():
        model, dm = train_or_load(config)
        x = next(iter(torch.utils.data.DataLoader(dm.test_set, batch_size=batch)))[0]
        calib = next(iter(torch.utils.data.DataLoader(dm.train_set, batch_size=256)))[0]
        for variant, options in VARIANTS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                compiled = privml.compile(model, calib, backend="mpc", **options)
            stats = calibrate(compiled.module, [calib], tuple(calib.shape[1:]))
            plan_cost = mpc_request_cost(compiled.module, stats, batch=batch)
            label_m = f"{name}, {variant}"
            base = _once(compiled, x, Link())
            c = base["costs"]
            print(f"{label_m:<30} | {'unshaped veth':<20} | {c['rounds']:>6} | {c['bytes'] / 1e6:6.2f} | "
                  f"{c['party_seconds']:10.3f} | {'(base)':>10} | {_plan_s(plan_cost, Link()):8.3f} | "
                  f"{base['error']:.1e}", flush=True)
            for link in LINKS:
                label = (f"{link.delay_ms:g} ms, " if link.delay_ms else "") + f"{link.rate_mbit:g} Mbit/s"
                if (link.delay_ms and not caps["delay"]) or not caps["bandwidth"]:
                    print(f"{label_m:<30} | {label:<20} | skipped: {caps['reason']}; plan predicts "
                          f"{_plan_s(plan_cost, link):.3f} s", flush=True)
                    continue
                run = _once(compiled, x, link)
                m, p = run["costs"]["party_seconds"], predict_seconds(c, link)
                q = _plan_s(plan_cost, link)
                print(f"{label_m:<30} | {label:<20} | {run['costs']['rounds']:>6} | "
                      f"{run['costs']['bytes'] / 1e6:6.2f} | {m:10.3f} | {p:10.3f} | {q:8.3f} | "
                      f"{run['error']:.1e}  (run {100 * (p - m) / m:+.0f}%, plan {100 * (q - m) / m:+.0f}%)",
                      flush=True)


def _plan_s(cost: dict, link: Link) -> float:
    return mpc_seconds(cost["rounds"], cost["bytes"], link.delay_ms or 0.0, link.rate_mbit)


if __name__ == "__main__":
    main()
