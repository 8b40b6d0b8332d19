"""``privml.compile``: validate, fix, calibrate and plan an ordinary PyTorch model for a backend."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from privml.compiler.approx import needs_approximation
from privml.compiler.calibrate import as_batches, calibrate
from privml.compiler.client import apply_client_ops, split_client_ops
from privml.compiler.norms import approximate_layer_norms
from privml.compiler.plan import Plan, build_plan
from privml.compiler.validate import fix, raise_if_errors, validate
from privml.config import CKKSConfig, CompileConfig, HybridConfig, MPCConfig, compile_config
from privml.errors import BudgetError, CalibrationError, FidelityWarning, InvalidInput
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
            return apply_client_ops(self.module(x), self.plan.params.get("client_ops", []))


def _probe(model: nn.Module, sample: torch.Tensor) -> None:
    """Run the model once in clear so shape mistakes surface as calibration errors, not deep torch tracebacks."""
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(sample.clone())  # a model writing into its input must not touch the user's data
    except (RuntimeError, ValueError, IndexError, TypeError) as err:
        first = str(err).splitlines()[0]
        raise CalibrationError(f"privml: the model cannot run on calibration samples of shape "
                               f"{tuple(sample.shape[1:])}: {first}. Pass inputs shaped like the model expects "
                               "(batch first).") from None
    finally:
        model.train(was_training)


def compile(model: nn.Module, calibration_data: Any, backend: str | None = None, *,
            config: CompileConfig | None = None, **options: Any) -> CompiledModel:
    """Turn ``model`` into a module the ``backend`` can run privately, with a ``.plan`` saying what was done.

    ``calibration_data`` is a batch of real inputs (a tensor, a DataLoader, or a list of batches / (x, y)
    pairs). All validation problems are reported at once (``UnsupportedModule.problems``).

    Options are typed: ``config=CKKSConfig(max_error=0.05)``, or the same as keywords
    (``backend="ckks", max_error=0.05``); an unknown name is refused with the closest valid one.
    Each option, its default and its meaning are declared once in :mod:`privml.config`
    (:class:`~privml.config.CompileConfig` for every backend, :class:`~privml.config.CKKSConfig` for
    CKKS layout and parameters). The plan records the whole config (``plan.options``, ``plan.config``).
    """
    cfg = compile_config(backend, config, **options)
    backend = cfg.backend
    if not isinstance(model, nn.Module):
        raise InvalidInput(f"privml: compile needs a torch.nn.Module, got {type(model).__name__}")
    batches = as_batches(calibration_data)
    input_shape = tuple(batches[0].shape[1:])
    problems = validate(model, backend)
    fixable_ok = [p for p in problems if not (p.kind == "maxpool" and cfg.replace_maxpool)]
    raise_if_errors(fixable_ok, model)
    _probe(model, batches[0][:2])
    reference = copy.deepcopy(model).eval()  # what accuracy and agreement are measured against: the user's model
    gm, applied = fix(model, batches[0][:64], replace_maxpool=cfg.replace_maxpool)
    raise_if_errors(validate(gm, backend), model)
    client_ops = split_client_ops(gm, backend)
    if client_ops:
        applied.append(f"{', '.join(op['op'] for op in client_ops)} moved to the client (applied after decryption)")
    applied += approximate_layer_norms(gm, batches, backend, margin=cfg.margin)
    stats = calibrate(gm, batches, input_shape)
    choice, names = None, {}
    if cfg.approximates or needs_approximation(gm, backend):
        from privml.compiler.choose import apply_choice, choose

        choice = choose(gm, stats, backend, torch.cat(batches)[:512], reference=reference, **cfg.choose_options())
        fixes, names = apply_choice(gm, choice, trainable=cfg.trainable)
        applied += fixes
        stats = calibrate(gm, batches, input_shape)
    plan = build_plan(gm, stats, backend, input_shape, fixes=applied, options=cfg.to_dict())
    if backend in ("ckks", "hybrid") or any(type(m).__module__.startswith("privml.nn") for m in gm.modules()):
        # where results depend on inputs staying in range (fitted polynomials, CKKS headroom), the client checks
        plan.params["input_range"] = input_range(batches, cfg.margin)
    if client_ops:
        plan.params["client_ops"] = client_ops
    if choice is not None:
        from privml.compiler.choose import annotate_plan, interval_notes

        annotate_plan(plan, choice, names)
        interval_notes(gm, plan)
    elif cfg.replace_maxpool:
        _check_fixes(gm, reference, torch.cat(batches)[:512], plan, cfg.agreement_target)
    if choice is not None and choice.warning:
        warnings.warn(choice.warning, FidelityWarning, stacklevel=2)
    if isinstance(cfg, MPCConfig):
        _plan_mpc(gm, stats, plan, cfg)
    if isinstance(cfg, CKKSConfig):
        _plan_ckks(gm, stats, plan, cfg, choice)
    if isinstance(cfg, HybridConfig):
        from privml.compiler.hybrid_plan import plan_hybrid

        plan_hybrid(gm, stats, plan, cfg)
    return CompiledModel(gm, plan)


def _check_fixes(gm: nn.Module, reference: nn.Module, x: torch.Tensor, plan: Plan, target: float) -> None:
    """Without an approximation pass, the agreement of the fixed model (MaxPool -> AvgPool) with the original."""
    from privml.compiler.choose import fixes_warning
    from privml.compiler.evaluate import agrees

    with torch.no_grad():
        agreement = float(agrees(gm(x), reference(x)).float().mean())
    plan.predicted.update({"agreement": agreement, "agreement_samples": float(x.shape[0])})
    if agreement < target:
        plan.notes.append(fixes_warning(agreement, target))
        warnings.warn(plan.notes[-1], FidelityWarning, stacklevel=3)


def input_range(batches: list[torch.Tensor], margin: float) -> list[float]:
    """Global [min, max] of the calibration inputs, widened by ``margin`` x its width on each side.

    ``Session.encrypt`` checks inputs against it: approximations hold only on calibration-like inputs. One global
    interval rather than one per feature: a pixel that is always 0 in calibration would otherwise refuse any ink.
    """
    lo = min(float(b.min()) for b in batches)
    hi = max(float(b.max()) for b in batches)
    pad = (hi - lo) * margin if hi > lo else max(abs(lo), 1.0) * max(margin, 1e-6)  # constant inputs: lo < hi
    return [lo - pad, hi + pad]


def _plan_mpc(gm: fx.GraphModule, stats: Any, plan: Plan, cfg: MPCConfig) -> None:
    """A 2-party request's rounds and bytes (batch 1) and its predicted seconds on typical links (and the given
    one): ``plan.params["mpc_cost"]``, and one line of the plan's notes."""
    from privml.compiler.costs import PLAN_LINKS, mpc_request_cost, mpc_seconds

    cost = mpc_request_cost(gm, stats, batch=1)
    links = list(PLAN_LINKS)
    if cfg.link_delay_ms is not None or cfg.link_mbit is not None:
        rate = f", {cfg.link_mbit:g} Mbit/s" if cfg.link_mbit else ""
        links.append((f"configured {cfg.link_delay_ms or 0:g} ms{rate}", cfg.link_delay_ms or 0.0, cfg.link_mbit))
    seconds = {name: round(mpc_seconds(cost["rounds"], cost["bytes"], d, r), 4) for name, d, r in links}
    plan.params["mpc_cost"] = {**cost, "batch": 1, "parties": 2, "predicted_seconds": seconds}
    plan.notes.append(f"MPC, 2 parties, one sample: {cost['rounds']} rounds, {cost['bytes'] / 1e3:.1f} kB; predicted "
                      + ", ".join(f"{v:.3g} s on {k}" for k, v in seconds.items()))


def _plan_ckks(gm: nn.Module, stats: Any, plan: Plan, cfg: CKKSConfig, choice: Any) -> None:
    """CKKS parameters from the dry run, the depth budget check, and the optional noise-simulated accuracy."""
    from privml.compiler.he_plan import plan_ckks

    plan_ckks(gm, stats, plan, layout=cfg.layout, precision_bits=cfg.precision_bits,
              poly_modulus_degree=cfg.poly_modulus_degree, scale_bits=cfg.scale_bits,
              coeff_mod_bit_sizes=cfg.coeff_mod_bit_sizes, input_expansion=cfg.input_expansion,
              batch_size=cfg.batch_size, max_context_mb=cfg.max_context_mb, rotation_keys=cfg.rotation_keys,
              fusion=cfg.fusion, depth_budget=cfg.depth_budget, fold=cfg.fold)
    if choice is not None and choice.total_depth is not None and choice.total_depth != plan.params["depth"]:
        plan.notes.append(f"the approximation pass estimated depth {choice.total_depth}, the dry run found "
                          f"{plan.params['depth']} (the dry run is authoritative)")
    if cfg.depth_budget is not None and plan.params["depth"] > cfg.depth_budget:
        raise BudgetError(f"privml: the model needs depth {plan.params['depth']} > depth_budget {cfg.depth_budget}")
    if cfg.simulate_noise and choice is not None and cfg.validation is not None:
        from privml.compiler.choose import simulated_accuracy

        std = noise_std(plan, cfg.precision_bits)
        x, y = cfg.validation
        plan.predicted["accuracy_noise_sim"] = simulated_accuracy(gm, x, y, std)
        plan.params.setdefault("approximation", {})["noise_sim_std"] = std


def noise_std(plan: Plan, precision_bits: int) -> float:
    """CKKS noise per op: 2^(noise bits - scale bits) with the plan's parameters, else 2^-precision_bits."""
    ck = plan.params.get("ckks")
    if ck:
        from privml.he.params import noise_bits

        return 2.0 ** (noise_bits(int(ck["poly_modulus_degree"])) - int(ck["scale_bits"]))
    return 2.0 ** -precision_bits
