"""CKKS deployment end to end: saved bundles, `privml serve`, `privml.Client`, bytes only between processes.

1. The model owner compiles the digits CNN once and saves it (`privml.save`): a server bundle (plan,
   weights, manifest) and a client bundle (plan only, no weights).
2. The server process is `privml serve BUNDLE/server`: it loads the bundle, checks its hashes and versions and
   serves; it never recompiles and never holds a secret key.
3. The client loads the client bundle, generates keys, uploads the public evaluation context once, sends
   encrypted images, checks and decrypts the answers; it can keep its keys sealed at rest (`--keys`).

    python experiments/ckks_client_server.py --images 4 --layout latency
    python experiments/ckks_client_server.py --keys /tmp/client.keys   # password from PRIVML_KEY_PASSWORD
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

import privml
from privml.serve import ServiceProcess


def owner(config: str, layout: str, out: Path) -> tuple[privml.CompiledModel, object, privml.bundle.BundlePaths]:
    """Train (or load) the model, compile it and save both bundles."""
    from privml.cli import _tensors
    from privml.train import train_or_load

    model, dm = train_or_load(config)
    calib, _ = _tensors(dm.train_set, 512)
    options = {"precision_bits": 6} if layout == "latency" else {"precision_bits": 14}
    compiled = privml.compile(model, calib, backend="ckks", layout=layout, **options)
    return compiled, dm, privml.save(compiled, out, overwrite=True)


def client_session(plan: privml.Plan, keys: str | None) -> privml.Session:
    """Fresh keys, or the sealed ones at ``keys`` (written on first use)."""
    if keys is None:
        return privml.Session(plan)
    password = os.environ.get("PRIVML_KEY_PASSWORD")
    if not password:
        raise SystemExit("set PRIVML_KEY_PASSWORD to seal/open the client keys")
    if Path(keys).exists():
        return privml.Session.from_keys(plan, keys, password=password)
    session = privml.Session(plan)
    session.save_keys(keys, password=password)
    return session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/finetune_digits_cnn.yaml")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--layout", default="latency", choices=("latency", "throughput"))
    parser.add_argument("--bundle", help="where to save the bundles (default: a temporary directory)")
    parser.add_argument("--keys", help="seal the client's keys here (reopened on the next run)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        compiled, dm, paths = owner(args.config, args.layout, Path(args.bundle or tmp) / "digits")
        print(f"[owner] saved {paths.server} (plan, weights) and {paths.client} (plan only)")
        from privml.cli import _tensors

        x, y = _tensors(dm.test_set, args.images)
        with ServiceProcess(paths.server) as server:
            print(f"[server] {server.url}: serving the bundle, no secret key, no recompilation")
            plan = privml.load_client(paths.client)
            client = privml.Client(server.url, plan, session=client_session(plan, args.keys))
            t = time.perf_counter()
            logits = torch.cat([client.infer(x[i:i + 1]) for i in range(len(x))]) if args.layout == "latency" \
                else client.infer(x)
            elapsed = time.perf_counter() - t
            print(f"[client] uploaded the evaluation keys once ({client.bytes_keys / 1e6:.1f} MB), then "
                  f"{client.bytes_requests / max(client.requests, 1) / 1e6:.2f} MB per request; "
                  f"{client.requests} requests in {elapsed:.2f} s")
            client.close()
    clear = compiled(x)
    print(f"[client] predictions {logits.argmax(1).tolist()} | labels {y.tolist()} | "
          f"max |logit - clear approximated model| = {(logits - clear).abs().max():.2e}")


if __name__ == "__main__":
    main()
