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
        only = "" if set(backends) >= set(BACKENDS) else f" [{', '.join(backends)}]"
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


def cmd_eval(args: argparse.Namespace) -> int:
    from privml.evaluate import evaluate

    compiled, model, dm = _compile_from_config(args)
    x, y = _tensors(dm.test_set, args.limit)
    name = Path(args.config).stem
    report = evaluate(compiled, model, x, y, name=name, batch_size=args.batch_size, **_session_options(args))
    print(report.short())
    layout = compiled.plan.params.get("layout")
    js, md = report.write(args.report_dir, f"{name}_{args.backend}" + (f"_{layout}" if layout else ""))
    print(f"report: {js} and {md}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: train (or reuse) the digits model, then evaluate it privately with every backend.

    plain (clear reference) -> MPC with 2 real parties (exact ReLU) -> CKKS after approximation-aware
    fine-tuning (degree-2 polynomial activations), throughput layout on the whole test split and latency
    layout on a few single images.
    """
    import time

    import privml
    from privml.evaluate import evaluate
    from privml.train import train_or_load

    t0 = time.perf_counter()
    print(f"[1/5] training or loading the digits CNN ({args.config})", flush=True)
    model, dm = train_or_load(args.config, allowed=args.allow_module)
    x, y = _tensors(dm.test_set, args.limit)
    calib, _ = _tensors(dm.train_set, 512)
    print(f"      ready in {time.perf_counter() - t0:.1f} s; test split: {len(x)} images", flush=True)
    reports = []

    def run(step: str, compiled: Any, reference: torch.nn.Module, n: int, batch: int, stem: str,
            **session_options: Any) -> None:
        print(f"{step} private evaluation on {n} test images", flush=True)
        report = evaluate(compiled, reference, x[:n], y[:n], name="digits_cnn", batch_size=batch, **session_options)
        if compiled.plan.params.get("layout"):
            report.options["layout"] = compiled.plan.params["layout"]
        reports.append(report)
        report.write(args.report_dir, stem)

    print("[2/5] plain backend (clear reference, no protection)", flush=True)
    run("      ", privml.compile(model, calib, backend="plain"), model, len(x), 64, "demo_plain")
    if not args.quick:
        print("[3/5] MPC backend: 2 real party processes (CrypTen), exact ReLU", flush=True)
        run("      ", privml.compile(model, calib, backend="mpc"), model, len(x), len(x), "demo_mpc", parties=2)
        print(f"[4/5] CKKS backend after approximation-aware fine-tuning ({args.finetune_config})", flush=True)
        tuned, _ = train_or_load(args.finetune_config, allowed=args.allow_module)
        for layout, n, batch in (("throughput", len(x), len(x)), ("latency", min(len(x), args.latency_samples), 1)):
            # throughput: 14 fractional bits (N=16384), ciphertexts packed for the whole split (16 features each);
            # latency: 6 bits are enough for argmax over these logits (~0.2 logit error) and fit N=8192 (50 MB
            # public context, ~1 s per image; 14 bits need N=16384: ~2.5 s)
            options = {"precision_bits": 14, "batch_size": n} if layout == "throughput" else {"precision_bits": 6}
            compiled = privml.compile(tuned, calib, backend="ckks", layout=layout, **options)
            params = compiled.plan.params
            print(f"      {layout} layout: depth {params['depth']}, N={params['poly_modulus_degree']}, "
                  f"{params['security_bits']}-bit security", flush=True)
            run("      ", compiled, model, n, batch, f"demo_ckks_{layout}")
        print(f"[5/5] hybrid backend: LeNet-5 (ReLU, 28x28 digits) with an attested enclave refreshing ciphertexts "
              f"({args.hybrid_config})", flush=True)
        lenet, ldm = train_or_load(args.hybrid_config, allowed=args.allow_module)
        lx, ly = _tensors(ldm.test_set, args.latency_samples)
        lcalib, _ = _tensors(ldm.train_set, 256)
        compiled = privml.compile(lenet, lcalib, backend="hybrid")
        params = compiled.plan.params
        print(f"      N={params['poly_modulus_degree']} {params['ckks']['coeff_mod_bit_sizes']}, "
              f"{len(params['hybrid']['refreshes'])} enclave round trips per image, flooding sigma "
              f"{params['hybrid']['flood_sigma']:.3g}", flush=True)
        print(f"      private evaluation on {len(lx)} test images", flush=True)
        report = evaluate(compiled, lenet, lx, ly, name="lenet5", batch_size=1)
        report.options["layout"] = "latency"
        reports.append(report)
        report.write(args.report_dir, "demo_hybrid_lenet5")
    print("\n=== privml demo: digits CNN, LeNet-5 (clear accuracy is the original ReLU model's) ===")
    for r in reports:
        print(r.short())
    print(f"reports in {args.report_dir}/ (JSON + Markdown); total {time.perf_counter() - t0:.1f} s")
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
    from privml.config import BACKENDS, CONFIGS, SESSION_CONFIGS

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
                           ("eval", "evaluate a trained model privately and write a report")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--config", default=DEFAULT_CONFIG, help="training config (trains if no checkpoint yet)")
        p.add_argument("--backend", default="plain", choices=BACKENDS)
        p.add_argument("--calib", type=int, default=512, help="calibration samples from the training split")
        add_config_flags(p, CONFIGS.values())  # --max-error, --layout, --precision-bits, ... (privml.config)
        if name == "eval":
            add_config_flags(p, SESSION_CONFIGS.values())  # --parties, --simulation, --range-slack, ...
        if name == "compile":
            p.add_argument("--out", help="write the plan as JSON here")
        else:
            p.add_argument("--limit", type=int, help="evaluate only the first N test samples")
            p.add_argument("--batch-size", type=int, default=64)
            p.add_argument("--report-dir", default="artifacts/reports")
        p.add_argument("--allow-module", action="append", default=[], metavar="PREFIX", help=ALLOW_HELP)

    d = sub.add_parser("demo", help="the main job: train digits, compile, evaluate privately, print a report")
    d.add_argument("--config", default=DEFAULT_CONFIG)
    d.add_argument("--finetune-config", default="configs/finetune_digits_cnn.yaml",
                   help="approximation-aware fine-tuning config used for the CKKS runs")
    d.add_argument("--limit", type=int, help="use only the first N test images")
    d.add_argument("--latency-samples", type=int, default=4, help="images for the (slower) latency-layout run")
    d.add_argument("--hybrid-config", default="configs/lenet5_digits28.yaml", help="model of the hybrid run")
    d.add_argument("--quick", action="store_true", help="plain backend only (no MPC, no CKKS)")
    d.add_argument("--report-dir", default="artifacts/reports")
    d.add_argument("--allow-module", action="append", default=[], metavar="PREFIX", help=ALLOW_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["fit"]:
        return cmd_fit(argv[1:])
    args = build_parser().parse_args(argv)
    handlers = {"validate": cmd_validate, "compile": cmd_compile, "eval": cmd_eval, "demo": cmd_demo}
    from privml.errors import PrivmlError

    try:
        return handlers[args.command](args)
    except PrivmlError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
