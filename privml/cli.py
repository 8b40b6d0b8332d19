"""The ``privml`` command line: fit, validate, compile, eval and the built-in demo (the main job).

    privml fit --config configs/digits_cnn.yaml                     # Lightning training
    privml validate torchvision.models.resnet18 --init-args '{"num_classes": 10}' --input-shape 3,32,32
    privml compile --config configs/digits_cnn.yaml --backend ckks --out plan.json
    privml eval --config configs/digits_cnn.yaml --backend ckks --layout throughput --limit 200
    privml demo                                                     # train digits, evaluate privately
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

DEFAULT_CONFIG = "configs/digits_cnn.yaml"
ALLOW_HELP = ("also trust model classes from this module prefix in configs/checkpoints (repeatable; trusted by "
              "default: privml, models, torchvision.models)")


def _tensors(dataset: Any, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) tensors of a map-style dataset, first ``limit`` samples."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=1024, shuffle=False)
    xs, ys = zip(*loader, strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    return (x[:limit], y[:limit]) if limit else (x, y)


def _load_model(spec: str, init_args: str | None, allowed: list[str] | None = None) -> torch.nn.Module:
    """A model from a dotted class/function path (``torchvision.models.resnet18``) or a training config."""
    if spec.endswith((".yaml", ".yml")):
        from privml.train import train_or_load

        return train_or_load(spec, allowed=allowed or [])[0]
    module_name, _, attr = spec.rpartition(".")
    if not module_name:
        raise SystemExit(f"privml: give a dotted path like torchvision.models.resnet18 or a config file, not {spec!r}")
    factory = getattr(importlib.import_module(module_name), attr)
    return factory(**json.loads(init_args or "{}"))


def _arg_type(hint: Any) -> Callable[[str], Any]:
    """An argparse ``type`` for a config field's annotation: numbers, strings, comma lists, true/false."""
    from privml.config import alternatives

    kinds = [tp for tp in alternatives(hint) if tp is not type(None)]
    lists = [tp for tp in kinds if typing.get_origin(tp) is tuple]

    def parse(text: str) -> Any:
        if bool in kinds and text.lower() in ("true", "false"):
            return text.lower() == "true"
        if text.lower() == "none" and len(kinds) < len(alternatives(hint)):
            return None
        if lists:
            item = typing.get_args(lists[0])[0]
            return tuple(item(v) for v in text.split(","))
        for tp in (int, float):
            if tp in kinds:
                return tp(text)
        return text

    parse.__name__ = " or ".join(getattr(tp, "__name__", "list") for tp in kinds)  # argparse's error messages
    return parse


def add_config_flags(parser: argparse.ArgumentParser, classes: Any) -> None:
    """One flag per option of the config ``classes`` (``max_error`` -> ``--max-error``), from the dataclass fields:
    type, help and default as declared in :mod:`privml.config`. Unset flags stay out of the namespace (the config's
    default applies); ``none`` sets an optional one to None."""
    from privml.config import BACKENDS, cli_fields

    for f, hint, backends in cli_fields(classes):
        only = "" if set(backends) >= set(BACKENDS) or not set(backends) & set(BACKENDS) else \
            f" [{', '.join(backends)}]"
        text = f"{f.metadata['help']}{only}" + ("" if f.default is None else f" (default: {f.default})")
        flag = "--" + f.name.replace("_", "-")
        if hint is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=text)
        else:
            parser.add_argument(flag, dest=f.name, type=_arg_type(hint), default=argparse.SUPPRESS, help=text,
                                choices=f.metadata.get("choices"))


def _given(args: argparse.Namespace, classes: Any) -> dict[str, Any]:
    """The options of ``classes`` given on the command line."""
    from privml.config import cli_fields

    given = vars(args)
    return {f.name: given[f.name] for f, _, _ in cli_fields(classes) if f.name in given}


def _compile_options(args: argparse.Namespace) -> dict[str, Any]:
    from privml.config import CONFIGS

    return _given(args, CONFIGS.values())


def _session_options(args: argparse.Namespace) -> dict[str, Any]:
    from privml.config import SESSION_CONFIGS

    return _given(args, SESSION_CONFIGS.values())


def cmd_validate(args: argparse.Namespace) -> int:
    from privml.compiler.validate import errors, fix, validate

    model = _load_model(args.model, args.init_args, args.allow_module)
    problems = validate(model, args.backend)
    print(f"privml validate: {type(model).__name__} for backend {args.backend!r}: {len(problems)} finding(s)")
    for p in problems:
        print(f"  {p}")
    if args.fix:
        example = torch.randn(2, *map(int, args.input_shape.split(","))) if args.input_shape else None
        fixed, applied = fix(model, example, replace_maxpool=args.replace_maxpool)
        print(f"applied {len(applied)} fix(es):")
        for a in applied:
            print(f"  - {a}")
        remaining = errors(validate(fixed, args.backend))
        print("after fixes: " + ("no blocking problems" if not remaining else f"{len(remaining)} remain"))
        for p in remaining:
            print(f"  {p}")
        return 1 if remaining else 0
    return 1 if errors(problems) else 0


def _compile_from_config(args: argparse.Namespace) -> tuple[Any, torch.nn.Module, Any]:
    import privml
    from privml.train import train_or_load

    model, dm = train_or_load(args.config, allowed=args.allow_module)
    calib, _ = _tensors(dm.train_set, args.calib)
    options = _compile_options(args)
    if args.backend == "ckks" and options.get("layout") == "throughput" and getattr(args, "batch_size", None):
        options.setdefault("batch_size", args.batch_size)  # pack the ciphertexts for the batches eval will send
    if "accuracy_tolerance" in options or options.get("simulate_noise"):
        options["validation"] = _tensors(dm.val_set)
    compiled = privml.compile(model, calib, backend=args.backend, **options)
    return compiled, model, dm


def cmd_compile(args: argparse.Namespace) -> int:
    compiled, _, _ = _compile_from_config(args)
    print(compiled.plan)
    if args.out:
        compiled.plan.save(args.out)
        print(f"plan written to {args.out}")
    return 0


def _eval_config(args: argparse.Namespace) -> Any:
    """The EvalConfig of ``privml eval``: from --eval-config (flags override its fields) or from the flags alone."""
    from privml.config import CONFIGS, SESSION_CONFIGS, check_backend
    from privml.eval_config import EvalConfig, load_eval_config

    top = {"checkpoint": args.checkpoint, "dataset": args.dataset, "limit": args.limit, "calib": args.calib,
           "tolerance": args.tolerance, "confidence": args.confidence, "watts_per_core": args.watts_per_core,
           "simulate": args.simulate or None, "allow_module": tuple(args.allow_module) or None}
    compile_opts, session_opts = _compile_options(args), _session_options(args)
    if args.eval_config:
        if args.backend or compile_opts or session_opts or args.config:
            raise SystemExit("privml eval: with --eval-config, give backends and their options in that file "
                             "(--backend, --config and backend flags are refused so nothing is silently ignored)")
        return load_eval_config(args.eval_config, **top)
    names = args.backend or ["plain"]
    for b in names:
        check_backend(b)
    unused = [k for k in {**compile_opts, **session_opts} if not any(
        k in CONFIGS[b].option_names() or k in SESSION_CONFIGS[b].option_names() for b in names)]
    if unused:
        raise SystemExit(f"privml eval: option(s) {', '.join('--' + k.replace('_', '-') for k in unused)} apply to "
                         f"none of the backends {names}")
    runs = []
    for b in names:
        runs.append({"backend": b, "batch_size": args.batch_size,
                     "compile": {k: v for k, v in compile_opts.items() if k in CONFIGS[b].option_names()},
                     "session": {k: v for k, v in session_opts.items() if k in SESSION_CONFIGS[b].option_names()}})
    return EvalConfig(model=args.config or DEFAULT_CONFIG, backends=runs,
                      **{k: v for k, v in top.items() if v is not None})


def cmd_eval(args: argparse.Namespace) -> int:
    from privml.runs import run_eval

    if args.resume:
        result = run_eval(resume=args.resume, progress=not args.no_progress)
    else:
        result = run_eval(_eval_config(args), args.report_dir, progress=not args.no_progress)
    for r in result.reports:
        print(r.short())
    print(result.comparison_markdown())
    run_dir = result.manifest["run_dir"]
    print(f"report: {run_dir}/report.md (JSON: report.json; plots: {', '.join(result.plots)})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: train (or reuse) the digits model, then evaluate it privately with every backend, side by side.

    ``configs/eval/digits_compare.yaml``: plain (clear reference) -> MPC with 2 real parties (exact ReLU) -> CKKS
    after approximation-aware fine-tuning (degree-2 polynomial activations), throughput layout on the whole test
    split and latency layout on a few single images -> hybrid (an attested enclave, exact ReLU) on a few images.
    Then LeNet-5 under hybrid (``configs/eval/lenet5_hybrid.yaml``).
    """
    import dataclasses
    import time

    from privml.eval_config import load_eval_config
    from privml.runs import run_eval

    t0 = time.perf_counter()
    results = []
    steps = [args.eval_config] if args.quick else [args.eval_config, args.hybrid_eval_config]
    for i, path in enumerate(steps, 1):
        cfg = load_eval_config(path, limit=args.limit, allow_module=tuple(args.allow_module) or None)
        runs = [r for r in cfg.backends if r.backend == "plain"] if args.quick else list(cfg.backends)
        runs = [dataclasses.replace(r, limit=args.latency_samples) if r.limit is not None else r for r in runs]
        cfg = dataclasses.replace(cfg, backends=tuple(runs))
        print(f"[{i}/{len(steps)}] {path}: " + ", ".join(f"{r.name}" + (f" ({r.limit} samples)" if r.limit else "")
                                                         for r in runs), flush=True)
        results.append(run_eval(cfg, args.report_dir))
    print("\n=== privml demo (clear accuracy is the original ReLU model's) ===")
    for result in results:
        print(result.comparison_markdown())
        print(f"report: {result.manifest['run_dir']}/report.md\n")
    print(f"total {time.perf_counter() - t0:.1f} s")
    return 0


def _eval_flags(p: argparse.ArgumentParser) -> None:
    from privml.config import BACKENDS, SESSION_CONFIGS
    from privml.eval_config import DEFAULT_WATTS_PER_CORE

    p.add_argument("--config", help=f"training config of the model (default: {DEFAULT_CONFIG})")
    p.add_argument("--backend", nargs="+", metavar="BACKEND",
                   help=f"one or more of {', '.join(BACKENDS)}: several run side by side (default: plain)")
    p.add_argument("--eval-config", help="an eval config YAML (configs/eval/): model, data and backends with options")
    p.add_argument("--checkpoint", help="checkpoint to evaluate (refused unless trained for the config's model)")
    p.add_argument("--dataset", help="test data set (default: the training config's; must have its sample shape)")
    p.add_argument("--calib", type=int, help="calibration samples from the training split (default 512)")
    add_config_flags(p, SESSION_CONFIGS.values())  # --parties, --simulation, --range-slack, ...
    p.add_argument("--limit", type=int, help="evaluate only the first N test samples")
    p.add_argument("--batch-size", type=int, help="samples per request (default: what the backend packs best: the "
                   "whole split for plain, mpc and the throughput layout, 1 for the latency layout)")
    p.add_argument("--tolerance", type=float, help="allowed accuracy drop private vs clear, for the verdict (0.01)")
    p.add_argument("--confidence", type=float, help="confidence of the accuracy intervals (0.95)")
    p.add_argument("--watts-per-core", type=float, help=f"energy estimate: W per busy core ({DEFAULT_WATTS_PER_CORE})")
    p.add_argument("--simulate", action="store_true", help="also predict each encrypted result in clear with the "
                   "noise model and report how far it was from the encrypted run")
    p.add_argument("--resume", metavar="RUN_DIR", help="finish an interrupted run (its finished requests are reused)")
    p.add_argument("--report-dir", default="artifacts/reports", help="each run writes a new directory in here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_serve(args: argparse.Namespace) -> int:
    from privml.bundle import load_server
    from privml.config import ServeConfig
    from privml.serve import serve

    verify_key = None
    if args.verify_key:
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        verify_key = load_pem_public_key(Path(args.verify_key).read_bytes())
    compiled = load_server(args.bundle, verify_key=verify_key)
    serve(compiled, ServeConfig.from_options(**_given(args, [ServeConfig])))
    return 0


def cmd_fit(argv: list[str]) -> int:
    from privml.train import cli_main

    allowed, rest = [], []
    it = iter(argv)
    for arg in it:  # --allow-module is privml's, not LightningCLI's
        if arg == "--allow-module":
            allowed.append(next(it, ""))
        elif arg.startswith("--allow-module="):
            allowed.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    cli_main(["fit", *rest], allowed=allowed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from privml.config import BACKENDS, CONFIGS

    parser = argparse.ArgumentParser(prog="privml", description="Run unmodified PyTorch models privately.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("fit", help="train with a Lightning config (all LightningCLI arguments pass through)")

    v = sub.add_parser("validate", help="list every problem stopping a model from running privately")
    v.add_argument("model", help="dotted path (torchvision.models.resnet18) or a training config .yaml")
    v.add_argument("--init-args", help="JSON keyword arguments for the model factory")
    v.add_argument("--backend", default="ckks", choices=BACKENDS)
    v.add_argument("--fix", action="store_true", help="apply the fixes and validate again")
    v.add_argument("--replace-maxpool", action="store_true", help="with --fix: MaxPool2d -> AvgPool2d (lossy)")
    v.add_argument("--input-shape", help="per-sample input shape for the numerical check of fixes, e.g. 3,32,32")
    v.add_argument("--allow-module", action="append", default=[], metavar="PREFIX", help=ALLOW_HELP)

    for name, helptext in (("compile", "compile a trained model and print/write its plan"),
                           ("eval", "evaluate a trained model privately on one or more backends; write a report")):
        p = sub.add_parser(name, help=helptext)
        if name == "compile":
            p.add_argument("--config", default=DEFAULT_CONFIG, help="training config (trains if no checkpoint yet)")
            p.add_argument("--backend", default="plain", choices=BACKENDS)
            p.add_argument("--calib", type=int, default=512, help="calibration samples from the training split")
        add_config_flags(p, CONFIGS.values())  # --max-error, --layout, --precision-bits, ... (privml.config)
        if name == "compile":
            p.add_argument("--out", help="write the plan as JSON here")
        else:
            _eval_flags(p)
        p.add_argument("--allow-module", action="append", default=[], metavar="PREFIX", help=ALLOW_HELP)

    sv = sub.add_parser("serve", help="serve a saved CKKS/hybrid server bundle over HTTP(S) (privml.save)")
    sv.add_argument("bundle", help="the server bundle directory (or the directory given to privml.save)")
    from privml.config import ServeConfig

    add_config_flags(sv, [ServeConfig])
    sv.add_argument("--verify-key", help="PEM Ed25519 public key the bundle's manifest must be signed with")

    d = sub.add_parser("demo", help="the main job: train digits, compile, evaluate privately, print a report")
    d.add_argument("--eval-config", default="configs/eval/digits_compare.yaml",
                   help="the comparison the demo runs (model, backends and their options)")
    d.add_argument("--hybrid-eval-config", default="configs/eval/lenet5_hybrid.yaml",
                   help="the second run: LeNet-5 under hybrid")
    d.add_argument("--limit", type=int, help="use only the first N test images")
    d.add_argument("--latency-samples", type=int, default=4,
                   help="images for the slower runs (those with a limit in the eval config)")
    d.add_argument("--quick", action="store_true", help="plain backend only (no MPC, no CKKS, no hybrid)")
    d.add_argument("--report-dir", default="artifacts/reports")
    d.add_argument("--allow-module", action="append", default=[], metavar="PREFIX", help=ALLOW_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["fit"]:
        return cmd_fit(argv[1:])
    args = build_parser().parse_args(argv)
    handlers = {"validate": cmd_validate, "compile": cmd_compile, "eval": cmd_eval, "demo": cmd_demo,
                "serve": cmd_serve}
    from privml.errors import PrivmlError

    try:
        return handlers[args.command](args)
    except PrivmlError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
