"""``privml.compile``: validate, fix, calibrate and plan an ordinary PyTorch model for a backend."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from privml.compile.calibrate import as_batches, calibrate
from privml.compile.plan import Plan, build_plan
from privml.compile.validate import BACKENDS, fix, raise_if_errors, validate
from privml.errors import CalibrationError, InvalidInput, PrivmlError
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
    if backend in ("ckks", "hybrid"):
        from privml.compile.approx import approximate_activations

        applied += approximate_activations(gm, stats, degree=int(options.get("degree", 4)),
                                           margin=float(options.get("margin", 0.1)))
        stats = calibrate(gm, batches, input_shape)
    plan = build_plan(gm, stats, backend, input_shape, fixes=applied, options=dict(options))
    if backend == "ckks":
        from privml.compile.he_plan import plan_ckks

        plan_ckks(gm, stats, plan, layout=options.get("layout", "latency"),
                  precision_bits=int(options.get("precision_bits", 20)),
                  poly_modulus_degree=options.get("poly_modulus_degree"), scale_bits=options.get("scale_bits"),
                  coeff_mod_bit_sizes=options.get("coeff_mod_bit_sizes"))
    return CompiledModel(gm, plan)
