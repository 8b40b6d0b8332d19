"""``privml eval`` runs: several backends on the same model and data, in a run directory of their own.

A run directory (``<report dir>/<YYYYmmdd-HHMMSS>-<8 hex of the config>``, never reused) holds::

    config.json            the eval config (what --resume reads back)
    report.json/.md        every backend's report, the side-by-side table, the manifest
    comparison.png         accuracy vs latency, marked by trust assumption
    layers_<run>.png       time per layer
    plans/<run>.json       the compiled plans          predictions/<run>.json   labels and argmax per sample
    attestation/<run>.cose the enclave's attestation   requests/<run>/          finished requests (for resume)
    manifest.json          provenance: versions, command, hashes of every file above and of weights and data

``run_eval(resume=dir)`` finishes an interrupted run: finished requests are read back, not redone.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from privml.errors import InvalidInput
from privml.eval_config import BackendRun, EvalConfig
from privml.evaluate import evaluate
from privml.manifest import command, file_entry, sha256_bytes, tensors_sha256, versions
from privml.report import RunReport


def _tensors(dataset: Any, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=1024, shuffle=False)
    xs, ys = zip(*loader, strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    return (x[:limit], y[:limit]) if limit else (x, y)


def new_run_dir(report_dir: str | Path, cfg: EvalConfig) -> Path:
    """``<report_dir>/<YYYYmmdd-HHMMSS>-<8 hex>``: never an existing directory (no run overwrites another)."""
    base = Path(report_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    digest = sha256_bytes(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode())[:8]
    for i in range(1000):
        path = base / (f"{stamp}-{digest}" + (f"-{i}" if i else ""))
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise InvalidInput(f"privml: cannot create a new run directory under {base}")


def run_eval(cfg: EvalConfig | None = None, report_dir: str | Path = "artifacts/reports", *,
             resume: str | Path | None = None, progress: bool = True, stop_after: int | None = None) -> RunReport:
    """Evaluate ``cfg``'s backends side by side in a new run directory, or finish the run in ``resume``.

    ``stop_after``: interrupt (``KeyboardInterrupt``) after that many new requests, as a kill would. Returns the
    :class:`~privml.report.RunReport`; ``manifest["run_dir"]`` is where everything was written.
    """
    if resume is not None:
        run_dir = Path(resume)
        state = run_dir / "config.json"
        if not state.is_file():
            raise InvalidInput(f"privml: {run_dir} is not a privml eval run directory (no config.json to resume)")
        try:
            cfg = EvalConfig(**json.loads(state.read_text()))
        except (ValueError, TypeError) as exc:
            raise InvalidInput(f"privml: {state}: not a readable eval config ({exc})") from None
    elif cfg is None:
        raise InvalidInput("privml: run_eval needs an EvalConfig or resume=<run directory>")
    else:
        run_dir = new_run_dir(report_dir, cfg)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
    return _execute(cfg, run_dir, progress, stop_after)


class _Models:
    """Trained models by training config (each loaded once), with what the manifest needs about them."""

    def __init__(self, cfg: EvalConfig) -> None:
        self.cfg = cfg
        self.cache: dict[str, tuple[torch.nn.Module, Any, dict[str, Any]]] = {}

    def get(self, config: str, checkpoint: str | None = None) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
        key = f"{config}|{checkpoint}"
        if key not in self.cache:
            from privml.train import SPEC_KEY, load_model_from_checkpoint, train_or_load

            allowed = list(self.cfg.allow_module or ())
            model, dm = train_or_load(config, allowed=allowed)
            ckpt = Path(getattr(dm, "checkpoint_path", "") or "")
            if checkpoint is not None:  # must have been trained for the config's model
                expected = torch.load(ckpt, map_location="cpu", weights_only=True).get(SPEC_KEY) if ckpt.is_file() \
                    else None
                model = load_model_from_checkpoint(checkpoint, allowed=allowed, expected_spec=expected)
                ckpt = Path(checkpoint)
            spec = torch.load(ckpt, map_location="cpu", weights_only=True).get(SPEC_KEY, {})
            info = {"config": file_entry(config), "checkpoint": file_entry(ckpt),
                    "class": (spec or {}).get("class_path", type(model).__qualname__),
                    "init_args": json.dumps((spec or {}).get("init_args") or {}, sort_keys=True, default=str),
                    "weights_sha256": tensors_sha256(model.state_dict())}
            self.cache[key] = (model, dm, info)
        return self.cache[key]


def _test_data(cfg: EvalConfig, dm: Any) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The test split (the training config's data set, or ``cfg.dataset`` if it has the same sample shape)."""
    test = dm.test_set
    name = dm.dataset
    if cfg.dataset is not None and cfg.dataset != dm.dataset:
        from privml.data import get_dataset

        kw = {"root": dm.root} if cfg.dataset in ("mnist", "cifar10") else {"seed": dm.seed}
        _, test = get_dataset(cfg.dataset, **kw)
        want, got = tuple(dm.test_set[0][0].shape), tuple(test[0][0].shape)
        if want != got:
            raise InvalidInput(f"privml: dataset: {cfg.dataset!r} gives samples of shape {got}, but the model of "
                               f"{cfg.model} was trained on {dm.dataset!r} samples of shape {want}")
        name = cfg.dataset
    x, y = _tensors(test, cfg.limit)
    info = {"dataset": name, "split": "test", "seed": dm.seed, "samples": int(x.shape[0]),
            "shape": list(x.shape[1:]), "sha256": tensors_sha256([x, y])}
    return x, y, info


def _compile(run: BackendRun, model: torch.nn.Module, calib: torch.Tensor, n: int) -> Any:
    from privml.compiler.api import compile as private_compile

    options = dict(run.compile)
    if run.backend == "ckks" and options.get("layout") == "throughput":
        options.setdefault("batch_size", run.batch_size or n)  # pack the ciphertexts for the requests eval sends
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*calibrat.*")
        return private_compile(model, calib, backend=run.backend, **options)


def _execute(cfg: EvalConfig, run_dir: Path, progress: bool, stop_after: int | None) -> RunReport:
    from privml.plots import comparison_plot, layer_plot

    models = _Models(cfg)
    base, dm, base_info = models.get(cfg.model, cfg.checkpoint)
    x, y, data_info = _test_data(cfg, dm)
    reports, backends = [], {}
    for d in ("plans", "predictions", "requests"):
        (run_dir / d).mkdir(exist_ok=True)
    for run in cfg.backends:
        model, mdm, info = models.get(run.model) if run.model else (base, dm, base_info)
        xr, yr = x[:run.limit], y[:run.limit]
        calib, _ = _tensors(mdm.train_set, cfg.calib)
        if tuple(calib.shape[1:]) != tuple(xr.shape[1:]):
            raise InvalidInput(f"privml: backends[{run.name}].model: {run.model} takes samples of shape "
                               f"{tuple(calib.shape[1:])}, the test data has {tuple(xr.shape[1:])}")
        compiled = _compile(run, model, calib, int(xr.shape[0]))
        plan_path = run_dir / "plans" / f"{run.name}.json"
        compiled.plan.save(plan_path)
        report = evaluate(compiled, base, xr, yr, name=Path(run.model or cfg.model).stem, label=run.name,
                          batch_size=run.batch_size, store=run_dir / "requests" / run.name, progress=progress,
                          tolerance=cfg.tolerance, confidence=cfg.confidence, watts_per_core=cfg.watts_per_core,
                          simulate=cfg.simulate, stop_after=stop_after, **run.session)
        if stop_after is not None:  # counts new requests over the whole run
            stop_after -= report.latency["requests"] - report.resumed_requests
        pred_path = run_dir / "predictions" / f"{run.name}.json"
        pred_path.write_text(json.dumps(report.predictions))
        entry: dict[str, Any] = {"model": info if run.model else "the eval's model (manifest.model)",
                                 "plan": _rel(file_entry(plan_path), run_dir),
                                 "predictions": _rel(file_entry(pred_path), run_dir),
                                 "parameters": _parameters(compiled.plan)}
        prov = report.provenance
        if prov.get("attestation_document"):
            (run_dir / "attestation").mkdir(exist_ok=True)
            att = run_dir / "attestation" / f"{run.name}.cose"
            att.write_bytes(bytes.fromhex(prov.pop("attestation_document")))
            prov["attestation_document"] = _rel(file_entry(att), run_dir)
            entry["enclave"] = prov
        backends[run.name] = entry
        reports.append(report)
    plots = [comparison_plot(reports, run_dir / "comparison.png").name]
    for r in reports:
        p = layer_plot(r, run_dir / f"layers_{r.label}.png")
        if p is not None:
            plots.append(p.name)
    manifest = {"run_id": run_dir.name, "run_dir": str(run_dir), "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "command": command(), "versions": versions(),
                "eval_config": _rel(file_entry(run_dir / "config.json"), run_dir),
                "model": base_info, "data": data_info, "backends": backends}
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    result = RunReport(reports, manifest, plots)
    result.write(run_dir)
    return result


def _rel(entry: dict[str, Any], root: Path) -> dict[str, Any]:
    """A file entry with its path relative to the run directory (the directory can move)."""
    return {**entry, "path": str(Path(entry["path"]).relative_to(root))}


def _parameters(plan: Any) -> dict[str, Any]:
    """The cryptographic parameters and security level of a plan, as the manifest states them."""
    p = plan.params
    if plan.backend in ("ckks", "hybrid"):
        ck = p.get("ckks") or p
        return {"ring_dimension": ck.get("poly_modulus_degree", p.get("poly_modulus_degree")),
                "modulus_chain_bits": json.dumps(ck.get("coeff_mod_bit_sizes", p.get("coeff_mod_bit_sizes"))),
                "scale_bits": ck.get("scale_bits", p.get("scale_bits")),
                "security": f"{plan.security_bits}-bit classical (HE standard, ternary secret)",
                "layout": p.get("layout", "latency")}
    if plan.backend == "mpc":
        from privml.parties.fixed_point import FRAC_BITS

        return {"scheme": "CrypTen additive secret sharing over Z_2^64", "fixed_point_fractional_bits": FRAC_BITS,
                "security": "information-theoretic against semi-honest, non-colluding parties"}
    return {"scheme": "none (clear reference)", "security": "none"}
