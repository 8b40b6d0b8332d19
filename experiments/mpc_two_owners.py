"""Demo: who holds what in an MPC evaluation, with real party processes.

    python experiments/mpc_two_owners.py

(a) A clinic (party 0) owns patient rows, a vendor (party 1) owns a trained breast-cancer model.
    The clinic secret-shares its rows, the vendor its weights; only the clinic learns the predictions.
(b) Two hospitals (parties 0 and 1) each own half of the rows; the vendor (party 2) owns the model.
    The rows are evaluated together; each hospital learns the predictions for its own rows only.

Every source below runs inside its owner's process (the launching process holds neither the rows
nor the weights). Each party reports the plaintexts it held, and the demo checks the heap scans of
all parties: no process ever held another party's rows or weights.
"""

from __future__ import annotations

import functools
import sys
import tempfile
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.breast_cancer import BreastCancerMLP  # noqa: E402
from privml.backends.mpc import fingerprint  # noqa: E402
from privml.mpc.roles import Evaluation, Source, evaluate  # noqa: E402


def patient_rows(start: int, stop: int) -> torch.Tensor:
    """A hospital's private rows: a slice of the breast-cancer test split (standardized features)."""
    from privml.data import load_breast_cancer_split

    return load_breast_cancer_split()[1].tensors[0][start:stop]


def vendor_weights() -> dict[str, torch.Tensor]:
    """The vendor's private model: trained by privml's Lightning config (or loaded from its checkpoint)."""
    from privml.train import train_or_load

    model, _ = train_or_load("configs/breast_cancer_mlp.yaml")
    return model.state_dict()


def report(title: str, result: Evaluation, secrets: dict[str, set[str]]) -> None:
    print(f"\n=== {title} ===")
    print(result.who_held_what())
    print("heap scans (which parties ever held each secret in clear):")
    for name, fps in secrets.items():
        holders = [p["rank"] for p in result.parties if fps & p["fingerprints"]]
        print(f"  {name:<22} held by parties {holders}")
    total = result.costs["total"]
    print(f"costs: {total['bytes'] / 1e3:.1f} kB, {total['rounds']} rounds, {total['seconds']:.2f} s "
          f"(provider {result.provider}); per layer:")
    for layer, c in result.costs["scopes"].items():
        print(f"  {layer:<18} {c['bytes'] / 1e3:>9.1f} kB {c['rounds']:>4} rounds {c['seconds'] * 1e3:>8.1f} ms")


def main() -> None:
    weights = vendor_weights()  # only to recompute the expected answers and fingerprints for the checks
    model = BreastCancerMLP()
    model.load_state_dict(weights)
    model.eval()
    weight_fps = {fingerprint(v) for v in weights.values()}
    log = Path(tempfile.mkdtemp()) / "serves.log"

    rows = patient_rows(0, 6)
    a = evaluate(BreastCancerMLP,
                 data_sources={0: Source(functools.partial(patient_rows, 0, 6), "clinic records", str(log))},
                 weight_source=(1, Source(vendor_weights, "vendor model", str(log))), output_party=0,
                 roles=["clinic", "vendor"])
    report("(a) clinic data + vendor model, output to the clinic", a,
           {"clinic rows": {fingerprint(rows)}, "vendor weights": weight_fps, "predictions": {fingerprint(a.output)}})
    with torch.no_grad():
        print(f"max |MPC - plaintext| = {float((a.output - model(rows)).abs().max()):.2e}")
    print("source log (who was served what):")
    for line in log.read_text().splitlines():
        print("  " + line[:150])

    xa, xb = patient_rows(0, 4), patient_rows(4, 10)
    b = evaluate(BreastCancerMLP,
                 data_sources={0: functools.partial(patient_rows, 0, 4), 1: functools.partial(patient_rows, 4, 10)},
                 weight_source=(2, vendor_weights), output_party="owners", roles=["hospital A", "hospital B", "vendor"])
    report("(b) two hospitals' rows + vendor model, each hospital learns its own predictions", b,
           {"hospital A rows": {fingerprint(xa)}, "hospital B rows": {fingerprint(xb)},
            "vendor weights": weight_fps})
    with torch.no_grad():
        for rank, x in ((0, xa), (1, xb)):
            print(f"hospital {'AB'[rank]}: predictions {b.output[rank].argmax(1).tolist()}, "
                  f"max |MPC - plaintext| = {float((b.output[rank] - model(x)).abs().max()):.2e}")


if __name__ == "__main__":
    main()
