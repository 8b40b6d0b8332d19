"""Benchmark: MPC inference with each party in its own network namespace, over shaped links, vs the prediction.

    python experiments/bench/mpc_links.py                   # needs root, ip and tc (see privml.parties.netlab)

Two parties (CrypTen, TFP, exact ReLU) run one request of the breast-cancer MLP (batch 64) and of the digits CNN
(batch 8) on veth links in separate namespaces: unshaped, then 1 Gbit/s, 100 Mbit/s and 20 Mbit/s (tc tbf), and
one-way delays of 0.2, 10 and 50 ms where the kernel has sch_netem (else skipped with the reason). Measured: the
parties' seconds for the request (their compute and communication, process start-up excluded). Predicted: the
unshaped run's seconds plus a round trip per round plus each party's bytes over the bandwidth
(:func:`privml.parties.netlab.predict_seconds`, from that run's measured rounds and bytes).
"""

from __future__ import annotations

import warnings

import torch

import privml
from privml.parties.netlab import Link, NetLab, capabilities, predict_seconds
from privml.train import train_or_load

MODELS = {"breast-cancer MLP": ("configs/breast_cancer_mlp.yaml", 64), "digits CNN": ("configs/digits_cnn.yaml", 8)}
LINKS = [Link(rate_mbit=1000), Link(rate_mbit=100), Link(rate_mbit=20), Link(delay_ms=0.2, rate_mbit=1000),
         Link(delay_ms=10, rate_mbit=100), Link(delay_ms=50, rate_mbit=100)]


def _once(compiled: privml.CompiledModel, x: torch.Tensor, link: Link) -> dict:
    with NetLab(2, link) as lab:
        s = privml.Session(compiled.plan, parties=2)
        s.backend.pool = lab  # the session's calls run in the namespaces
        y = s.decrypt(compiled(s.encrypt(x)))
        costs = s.backend.costs()
    return {"costs": costs, "error": float((y - compiled(x)).abs().max())}


def main() -> None:
    caps = capabilities()
    if not caps["netns"]:
        raise SystemExit(f"mpc_links: {caps['reason']}")
    print(f"{'model':<18} | {'link':<26} | {'rounds':>6} | {'MB':>6} | {'measured s':>10} | {'predicted s':>11} | "
          f"{'error':>6}")
    for name, (config, batch) in MODELS.items():
        model, dm = train_or_load(config)
        x = next(iter(torch.utils.data.DataLoader(dm.test_set, batch_size=batch)))[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = privml.compile(model, next(iter(torch.utils.data.DataLoader(dm.train_set, batch_size=256)))[0],
                                      backend="mpc")
        base = _once(compiled, x, Link())
        c = base["costs"]
        print(f"{name:<18} | {'unshaped veth':<26} | {c['rounds']:>6} | {c['bytes'] / 1e6:6.2f} | "
              f"{c['party_seconds']:10.3f} | {'(baseline)':>11} | {base['error']:.1e}", flush=True)
        for link in LINKS:
            label = (f"{link.delay_ms:g} ms, " if link.delay_ms else "") + f"{link.rate_mbit:g} Mbit/s"
            if (link.delay_ms and not caps["delay"]) or not caps["bandwidth"]:
                print(f"{name:<18} | {label:<26} | skipped: {caps['reason']}", flush=True)
                continue
            run = _once(compiled, x, link)
            m, p = run["costs"]["party_seconds"], predict_seconds(c, link)
            print(f"{name:<18} | {label:<26} | {run['costs']['rounds']:>6} | {run['costs']['bytes'] / 1e6:6.2f} | "
                  f"{m:10.3f} | {p:11.3f} | {run['error']:.1e}  ({100 * (p - m) / m:+.0f}%)", flush=True)


if __name__ == "__main__":
    main()
