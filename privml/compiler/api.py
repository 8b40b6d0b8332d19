"""``privml.compile``: validate, fix, calibrate and plan an ordinary PyTorch model for a backend."""

from __future__ import annotations

import numbers
from typing import Any

import torch
import torch.nn as nn

from privml.compiler.calibrate import as_batches, calibrate
from privml.compiler.plan import Plan, build_plan
from privml.compiler.validate import BACKENDS, fix, raise_if_errors, validate
from privml.errors import BudgetError, CalibrationError, InvalidInput, PrivmlError
from privml.tensor import PrivateTensor, module_scope


def check_input(x: object, input_shape: tuple[int, ...], what: str = "input") -> torch.Tensor:
    """Reject unusable inputs with a clear error: non-tensors, non-float dtypes, NaN/inf, wrong sample shape."""
    if not isinstance(x, torch.Tensor):
        raise InvalidInput(f"privml: {what} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise InvalidInput(f"privml: {what} has dtype {x.dtype}; privml computes on real numbers: use x.float()")
    if tuple(x.shape[1:]) != tuple(input_shape) or x.dim() != len(input_shape) + 1:
        raise InvalidInput(f"privml: {what} has shape {tuple(x.shape)}; the model expects (batch, "
                           f"{', '.join(map(str, input_shape))})")
    if not isinstance(x, PrivateTensor) and not torch.isfinite(x).all():
        raise InvalidInput(f"privml: {what} contains NaN or inf values")
    return x


class CompiledModel(nn.Module):
    """The validated, fixed model plus its plan. Call it on private tensors (or on clear ones for reference)."""

    def __init__(self, module: nn.Module, plan: Plan) -> None:
        super().__init__()
        self.module = module
        self.plan = plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.plan.input_shape)
        if isinstance(x, PrivateTensor):
            if type(x).backend_name != self.plan.backend:
                raise InvalidInput(f"privml: got a {type(x).__name__} ({type(x).backend_name} backend) but this model "
                                   f"was compiled for the {self.plan.backend!r} backend")
            with module_scope(self.module):
                out = self.module(x)
            return out.finalize() if isinstance(out, PrivateTensor) else out
        with torch.no_grad():
            return self.module(x)


def _probe(model: nn.Module, sample: torch.Tensor) -> None:
    """Run the model once in clear so shape mistakes surface as calibration errors, not deep torch tracebacks."""
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(sample)
    except (RuntimeError, ValueError, IndexError, TypeError) as err:
        first = str(err).splitlines()[0]
        raise CalibrationError(f"privml: the model cannot run on calibration samples of shape "
                               f"{tuple(sample.shape[1:])}: {first}. Pass inputs shaped like the model expects "
                               "(batch first).") from None
    finally:
        model.train(was_training)


def compile(model: nn.Module, calibration_data: Any, backend: str = "plain", *, replace_maxpool: bool = False,
            **options: Any) -> CompiledModel:
    """Turn ``model`` into a module the ``backend`` can run privately, with a ``.plan`` saying what was done.

    ``calibration_data`` is a batch of real inputs (a tensor, a DataLoader, or a list of batches / (x, y)
    pairs). All validation problems are reported at once (``UnsupportedModule.problems``).

    Approximation options (ckks/hybrid; mpc when a budget is given), see :mod:`privml.compiler.choose`:
    ``max_error=`` (per activation, on its interval), ``accuracy_tolerance=`` with ``validation=(x, y)``
    (accuracy drop against the original, e.g. 0.01 = one point), ``depth_budget=`` (total CKKS depth),
    ``degree=`` (one fixed degree everywhere; the default, 4, when no budget is given), ``margin=``
    (interval widening, default 0.1), ``percentile=`` (True or (low, high): percentile ranges instead of
    min/max), ``refresh_depth=`` (hybrid: levels between enclave refreshes), ``trainable=True``
    (trainable coefficients, for :func:`privml.train.finetune`), ``simulate_noise=True`` (with validation:
    also predict accuracy under the plain backend's CKKS-noise simulation). Every choice is in ``plan``.
    """
    if backend not in BACKENDS:
        raise PrivmlError(f"privml: unknown backend {backend!r}; choose one of {BACKENDS}")
    if not isinstance(model, nn.Module):
        raise InvalidInput(f"privml: compile needs a torch.nn.Module, got {type(model).__name__}")
    batches = as_batches(calibration_data)
    input_shape = tuple(batches[0].shape[1:])
    problems = validate(model, backend)
    fixable_ok = [p for p in problems if not (p.kind == "maxpool" and replace_maxpool)]
    raise_if_errors(fixable_ok, model)
    _probe(model, batches[0][:2])
    gm, applied = fix(model, batches[0][:64], replace_maxpool=replace_maxpool)
    raise_if_errors(validate(gm, backend), model)
    stats = calibrate(gm, batches, input_shape)
    choice, names = None, {}
    if backend in ("ckks", "hybrid") or (backend == "mpc" and any(options.get(k) is not None for k in _BUDGETS)):
        from privml.compiler.choose import apply_choice, choose

        choice = choose(gm, stats, backend, torch.cat(batches)[:512], **_approx_options(options))
        fixes, names = apply_choice(gm, choice, trainable=bool(options.get("trainable", False)))
        applied += fixes
        stats = calibrate(gm, batches, input_shape)
    plan = build_plan(gm, stats, backend, input_shape, fixes=applied, options=_plan_options(options))
    if choice is not None:
        from privml.compiler.choose import annotate_plan, interval_notes

        annotate_plan(plan, choice, names)
        interval_notes(gm, plan)
    if backend == "ckks":
        from privml.compiler.he_plan import plan_ckks

        plan_ckks(gm, stats, plan, layout=options.get("layout", "latency"),
                  precision_bits=int(options.get("precision_bits", 20)),
                  poly_modulus_degree=options.get("poly_modulus_degree"), scale_bits=options.get("scale_bits"),
                  coeff_mod_bit_sizes=options.get("coeff_mod_bit_sizes"),
                  input_expansion=bool(options.get("input_expansion", True)))
        if choice is not None and choice.total_depth is not None and choice.total_depth != plan.params["depth"]:
            plan.notes.append(f"the approximation pass estimated depth {choice.total_depth}, the dry run found "
                              f"{plan.params['depth']} (the dry run is authoritative)")
        budget = options.get("depth_budget")
        if budget is not None and plan.params["depth"] > int(budget):
            raise BudgetError(f"privml: the model needs depth {plan.params['depth']} > depth_budget {budget}")
    if options.get("simulate_noise") and choice is not None and options.get("validation") is not None:
        from privml.compiler.choose import simulated_accuracy

        std = _noise_std(plan, int(options.get("precision_bits", 20)))
        x, y = options["validation"]
        plan.predicted["accuracy_noise_sim"] = simulated_accuracy(gm, x, y, std)
        plan.params.setdefault("approximation", {})["noise_sim_std"] = std
    return CompiledModel(gm, plan)


def _noise_std(plan: Plan, precision_bits: int) -> float:
    """CKKS noise per op: 2^(noise bits - scale bits) with the plan's parameters, else 2^-precision_bits."""
    ck = plan.params.get("ckks")
    if ck:
        from privml.he.params import noise_bits

        return 2.0 ** (noise_bits(int(ck["poly_modulus_degree"])) - int(ck["scale_bits"]))
    return 2.0 ** -precision_bits


_BUDGETS = ("max_error", "accuracy_tolerance", "depth_budget")
_APPROX_KEYS = ("max_error", "accuracy_tolerance", "validation", "depth_budget", "degree", "margin", "percentile",
                "precision_bits", "poly_modulus_degree", "refresh_depth", "max_degree", "composites")


def _approx_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options the approximation pass takes; without a budget, CKKS keeps the old fixed degree 4."""
    out = {k: options[k] for k in _APPROX_KEYS if options.get(k) is not None}
    if not any(k in out for k in (*_BUDGETS, "degree")):
        out["degree"] = 4
    for key in ("degree", "depth_budget", "precision_bits", "poly_modulus_degree", "refresh_depth", "max_degree"):
        if key in out and (isinstance(out[key], bool) or not isinstance(out[key], numbers.Integral)):
            raise InvalidInput(f"privml: {key} must be an integer, got {out[key]!r}")
        if key in out:
            out[key] = int(out[key])
    return out


def _plan_options(options: dict[str, Any]) -> dict[str, Any]:
    """Options as the plan stores them (JSON-safe: validation data is recorded by its size only)."""
    out = dict(options)
    if isinstance(out.get("validation"), (tuple, list)) and out["validation"]:
        x = out["validation"][0]
        out["validation"] = {"samples": int(x.shape[0])} if isinstance(x, torch.Tensor) else "given"
    if isinstance(out.get("percentile"), tuple):
        out["percentile"] = list(out["percentile"])
    return out
