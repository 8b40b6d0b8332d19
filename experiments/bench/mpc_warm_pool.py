"""Benchmark: MPC latency per sample with parties that stay up (a started session) vs a launch per call.

    python experiments/bench/mpc_warm_pool.py              # digits CNN and breast-cancer MLP, 5 single samples
    python experiments/bench/mpc_warm_pool.py --samples 10

Side by side in one run, same compiled model, same samples, batch 1, 2 parties (CrypTen, exact ReLU), loopback:

- cold: ``privml.Session(plan)`` without ``start()``: every call spawns the party processes, imports torch and
  CrypTen in them and meets over gloo (what every MPC call cost before issue 13);
- warm: ``with privml.Session(plan) as s:``: the parties start once (their start-up is reported apart) and serve
  every call.

Reported: seconds per sample (median over the samples), the ratio, and the max difference to the clear model.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import privml
from privml.train import train_or_load

MODELS = {"digits CNN": "configs/digits_cnn.yaml", "breast-cancer MLP": "configs/breast_cancer_mlp.yaml"}


def _tensors(dataset: object, n: int) -> torch.Tensor:
    return next(iter(torch.utils.data.DataLoader(dataset, batch_size=n)))[0]


def _calls(session: privml.Session, compiled: privml.CompiledModel, x: torch.Tensor) -> tuple[list[float], float]:
    times, err = [], 0.0
    for i in range(x.shape[0]):
        t = time.perf_counter()
        y = session.decrypt(compiled(session.encrypt(x[i:i + 1])))
        times.append(time.perf_counter() - t)
        err = max(err, float((y - compiled(x[i:i + 1])).abs().max()))
    return times, err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=5)
    args = parser.parse_args()
    print(f"{'model':<18} | {'cold s/sample':>13} | {'warm s/sample':>13} | {'warm start-up':>13} | {'speedup':>7} | "
          f"max |err|")
    for name, config in MODELS.items():
        model, dm = train_or_load(config)
        x = _tensors(dm.test_set, args.samples)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = privml.compile(model, _tensors(dm.train_set, 256), backend="mpc")
        cold_session = privml.Session(compiled.plan, parties=2)
        cold, err_cold = _calls(cold_session, compiled, x)
        cold_session.close()
        t = time.perf_counter()
        with privml.Session(compiled.plan, parties=2) as s:
            startup = time.perf_counter() - t
            warm, err_warm = _calls(s, compiled, x)
        c, w = statistics.median(cold), statistics.median(warm)
        print(f"{name:<18} | {c:13.3f} | {w:13.3f} | {startup:13.2f} | {c / w:6.1f}x | {max(err_cold, err_warm):.2g}",
              flush=True)


if __name__ == "__main__":
    main()
