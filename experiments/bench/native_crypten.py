"""Baseline: private inference with CrypTen's own path (ONNX import), across real party processes.

Party 0 owns the model (``crypten.nn.from_pytorch`` then ``encrypt(src=0)``), party 1 owns
the input (``crypten.cryptensor(x, src=1)``); the output is opened to everyone. This is
the reference privml's MPC backend is compared against. Run it as

    python experiments/bench/native_crypten.py            # MLP and CNN, batch 1 and 64
    python experiments/bench/native_crypten.py --probe    # also try models CrypTen may reject

Latency covers sharing the input, the forward pass and opening the output (not the one-off
model import/encryption, reported as ``setup_s``). Bytes are whole-system bytes per
inference (sum over parties / 2, see privml.parties.costs), rounds are per party.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from privml.parties.compat import import_crypten  # noqa: E402
from privml.parties.costs import CostMeter, combine_summaries  # noqa: E402
from privml.parties.launcher import PartyContext, run_parties  # noqa: E402


@contextlib.contextmanager
def _legacy_onnx_export() -> Iterator[None]:
    """CrypTen's ONNX import needs the TorchScript exporter: default ``dynamo=False`` while inside."""
    original = torch.onnx.export

    def export(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("dynamo", False)
        return original(*args, **kwargs)

    torch.onnx.export = export
    try:
        yield
    finally:
        torch.onnx.export = original


def _party(ctx: PartyContext, model: nn.Module, x: torch.Tensor, reps: int) -> dict:
    crypten = import_crypten()
    data_owner = 1 if ctx.world_size > 1 else 0
    t0 = time.perf_counter()
    with _legacy_onnx_export(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript-exporter deprecation and numpy warnings
        private_model = crypten.nn.from_pytorch(model, torch.zeros_like(x))
    private_model.encrypt(src=0)
    private_model.eval()
    setup_s = time.perf_counter() - t0
    meter = CostMeter()
    times = []
    output = None
    with crypten.no_grad():
        for _ in range(reps):
            start = time.perf_counter()
            with meter.scope("inference"):
                x_enc = crypten.cryptensor(x, src=data_owner)
                output = private_model(x_enc).get_plain_text()
            times.append(time.perf_counter() - start)
    return {"output": output, "times": times, "setup_s": setup_s, "costs": meter.summary()}


def native_crypten_inference(model: nn.Module, x: torch.Tensor, world_size: int = 2, reps: int = 3,
                             timeout: float = 300.0, ttp: bool = False) -> dict:
    """Run ``model(x)`` with CrypTen's native ONNX path in ``world_size`` party processes.

    Returns output (opened), latency_s (median over ``reps`` of the slowest party),
    bytes and rounds per inference, setup_s, provider and the max abs error against
    plaintext ``model(x)``. ``ttp=True`` uses CrypTen's dealer process instead of letting
    party 0 make the Beaver triples (the dealer's own traffic is not in ``bytes``).
    """
    model = model.eval()
    results = run_parties(_party, world_size, (model, x, reps), timeout=timeout, ttp=ttp)
    per_rep = list(zip(*(r["times"] for r in results), strict=True))
    combined = combine_summaries([r["costs"] for r in results])
    inference = combined["scopes"]["inference"]
    with torch.no_grad():
        expected = model(x)
    output = results[0]["output"]
    return {
        "output": output,
        "latency_s": statistics.median(max(rep) for rep in per_rep),
        "bytes": inference["bytes"] // reps,
        "rounds": inference["rounds"] // reps,
        "setup_s": max(r["setup_s"] for r in results),
        "provider": results.provider,
        "world_size": world_size,
        "max_abs_err": float((output - expected).abs().max()),
    }


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 10))


class Square(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


def probe_models() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """Models that exercise CrypTen's ONNX import beyond the basics (some are expected to fail)."""
    return {
        "mlp_square(x*x)": (nn.Sequential(nn.Linear(64, 16), Square(), nn.Linear(16, 10)), (64,)),
        "cnn_maxpool": (nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Flatten(), nn.Linear(64, 10)), (1, 8, 8)),
        "cnn_batchnorm": (nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(64, 10)), (1, 8, 8)),
        "mlp_sigmoid": (nn.Sequential(nn.Linear(64, 16), nn.Sigmoid(), nn.Linear(16, 10)), (64,)),
        "mlp_gelu": (nn.Sequential(nn.Linear(64, 16), nn.GELU(), nn.Linear(16, 10)), (64,)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--probe", action="store_true", help="also try models CrypTen may not import")
    parser.add_argument("--ttp", action="store_true", help="use CrypTen's trusted third party dealer")
    opts = parser.parse_args()
    torch.manual_seed(0)
    cases = {"mlp": (mlp(), (64,)), "cnn": (cnn(), (1, 8, 8))}
    if opts.probe:
        cases.update(probe_models())
    header = (f"{'model':<18}{'batch':>6}{'latency ms':>12}{'setup s':>9}{'kB':>11}{'rounds':>8}"
              f"{'max err':>10}")
    print(f"CrypTen native path, {opts.world_size} parties, median of {opts.reps} reps")
    print(header)
    print("-" * len(header))
    provider = None
    for name, (model, shape) in cases.items():
        for batch in opts.batches:
            x = torch.randn(batch, *shape)
            try:
                r = native_crypten_inference(model, x, world_size=opts.world_size, reps=opts.reps,
                                             ttp=opts.ttp)
            except Exception as exc:  # report and go on: finding failures is part of the point
                reason = str(exc).splitlines()[0][:120]
                print(f"{name:<18}{batch:>6}  FAILED: {type(exc).__name__}: {reason}")
                continue
            provider = r["provider"]
            print(f"{name:<18}{batch:>6}{r['latency_s'] * 1e3:>12.1f}{r['setup_s']:>9.2f}"
                  f"{r['bytes'] / 1e3:>11.1f}{r['rounds']:>8}{r['max_abs_err']:>10.4f}")
    notes = {"TFP": "party 0 makes all Beaver triples: not a secure deployment",
             "TTP": "a separate dealer process makes the triples"}
    print(f"triple provider: {provider} ({notes.get(provider, 'no run succeeded')})")


if __name__ == "__main__":
    main()
