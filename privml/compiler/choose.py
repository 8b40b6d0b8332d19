"""Choose an approximation for every activation under one budget, by a per-backend cost model.

The user states one target and the pass picks, per activation, among the candidates of
:mod:`privml.compiler.candidates` (direct minimax polynomials, sign-based ReLUs, on MPC the
exact comparison), priced by :mod:`privml.compiler.costs`, moved by :mod:`privml.compiler.search`.

Targets (``choose`` arguments): ``max_error`` (max |approx - f| on each activation's
interval, arithmetic error of the backend included), ``accuracy_tolerance`` (drop of
accuracy against the original model on ``validation`` data, evaluated in clear) and
``depth_budget`` (total CKKS multiplicative depth). They combine: ``max_error`` sets the
starting point, ``depth_budget`` caps every step, ``accuracy_tolerance`` decides when to
stop raising. Alone, ``depth_budget`` spends the depth where it reduces the error most.
Without any of them (and without ``degree``), ``agreement_target`` (default 0.99, declared in
:class:`privml.config.CompileConfig`) decides: the approximated model's argmax must equal the
original model's on that fraction of the calibration samples (no labels needed), within the
backend's depth limit; ``result.warning`` says why and whom to blame when it cannot.
Accuracy and agreement are measured against ``reference``, the model the user passed in.

This module is the entry point: it checks the arguments, builds each activation's ladder and
runs the search; applying the result to a graph and a plan is :mod:`privml.compiler.annotate`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from privml.approx.fit import fit_activation
from privml.compiler.annotate import annotate_plan, apply_choice, interval_notes, simulated_accuracy
from privml.compiler.approx import ActivationSite, find_activations
from privml.compiler.calibrate import PERCENTILES, RangeStats
from privml.compiler.candidates import (
    BACKEND_COSTS,
    MAX_DIRECT_DEGREE,
    Candidate,
    candidates,
    cheapest_within,
    frontier,
    poly_candidate,
)
from privml.compiler.costs import MPC_RELU_ROUNDS, depth_cap, mpc_poly_cost, mpc_seconds, numeric_unit
from privml.compiler.evaluate import Evaluator
from privml.compiler.search import ChoiceResult, Search, SiteChoice
from privml.config import CompileConfig
from privml.errors import BudgetError, InvalidInput

AGREEMENT_TARGET: float = CompileConfig.__dataclass_fields__["agreement_target"].default

__all__ = [
    "Candidate", "ChoiceResult", "SiteChoice", "annotate_plan", "apply_choice", "candidates", "choose",
    "interval_notes", "simulated_accuracy",
    "MPC_RELU_ROUNDS", "mpc_poly_cost",  # re-exported for tests/test_mpc_cost_model.py
]


def _check_validation(validation: Any, input_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """``validation`` as (inputs, integer labels) matching the model's input shape, or InvalidInput."""
    if not isinstance(validation, (tuple, list)) or len(validation) != 2:
        raise InvalidInput("privml: validation must be a pair (x, y) of tensors: inputs and integer class labels")
    x, y = validation
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise InvalidInput("privml: validation must be a pair (x, y) of tensors: inputs and integer class labels")
    if x.dim() != len(input_shape) + 1 or tuple(x.shape[1:]) != tuple(input_shape) or x.shape[0] == 0:
        raise InvalidInput(f"privml: validation inputs have shape {tuple(x.shape)}; the model expects (batch, "
                           f"{', '.join(map(str, input_shape))}) with batch >= 1")
    if not x.is_floating_point() or not torch.isfinite(x).all():
        raise InvalidInput("privml: validation inputs must be finite floating-point values")
    if y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point():
        raise InvalidInput(f"privml: validation labels must be a 1-D integer tensor of {x.shape[0]} class indices, "
                           f"got shape {tuple(y.shape)} dtype {y.dtype}")
    return x, y


def _positive(name: str, value: Any, integer: bool = False) -> float:
    """``value`` as a finite non-negative float (an integral one with ``integer``), or InvalidInput."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"privml: {name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (integer and v != int(v)):
        raise InvalidInput(f"privml: {name} must be a finite non-negative {'integer' if integer else 'number'}, "
                           f"got {value!r}")
    return v


def _check_targets(backend: str, max_error: float | None, accuracy_tolerance: float | None, validation: Any,
                   depth_budget: int | None, degree: int | None) -> None:
    """InvalidInput for an unknown backend or targets that cannot be combined."""
    if backend not in BACKEND_COSTS:
        raise InvalidInput(f"privml: unknown backend {backend!r}; choose one of {BACKEND_COSTS}")
    if degree is not None and any(v is not None for v in (max_error, accuracy_tolerance, depth_budget)):
        raise InvalidInput("privml: degree= fixes every polynomial's degree; it cannot be combined with max_error, "
                           "accuracy_tolerance or depth_budget (drop degree= to let the pass choose)")
    if max_error is not None and _positive("max_error", max_error) == 0:
        raise InvalidInput("privml: max_error must be > 0 (no polynomial is exact on an interval)")
    if accuracy_tolerance is not None:
        _positive("accuracy_tolerance", accuracy_tolerance)
        if validation is None:
            raise InvalidInput("privml: accuracy_tolerance needs validation=(x, y): labelled inputs on which the "
                               "approximated model's accuracy is compared with the original's")
    if depth_budget is not None:
        _positive("depth_budget", depth_budget, integer=True)
        if backend == "mpc":
            raise InvalidInput("privml: depth_budget is a CKKS budget; for mpc use max_error or accuracy_tolerance")


def _site_seconds(s: ActivationSite, stats: dict[str, RangeStats], link: tuple[float, float | None]) -> Any:
    """A candidate's predicted seconds at site ``s`` (one sample) on ``link`` = (one-way delay ms, Mbit/s)."""
    st = stats.get(s.node.name)
    elems = math.prod(st.shape) if st is not None and st.shape else 1
    return lambda c: (mpc_seconds(c.rounds, c.nbytes * elems, link[0], link[1]),)


def _ladder(s: ActivationSite, backend: str, degree: int | None, precision_bits: int, max_degree: int,
            composites: bool, cost: Any = None) -> list[Candidate]:
    """The candidates ``s`` may move along, cheapest first (by ``cost`` when given): one fixed-degree fit, or the
    cost/error frontier."""
    if degree is None:
        return frontier(candidates(s.kind, s.lo, s.hi, s.params, backend, precision_bits, max_degree, composites),
                        backend, cost)
    d = int(_positive("degree", degree, integer=True))
    if not 1 <= d <= 63:
        raise InvalidInput(f"privml: degree must be in [1, 63], got {degree}")
    p = fit_activation(s.kind, s.lo, s.hi, d, "remez", **s.params)
    return [poly_candidate(p, backend, numeric_unit(backend, precision_bits))]


def _start_within(choices: list[SiteChoice], max_error: float) -> None:
    """Put every activation on its cheapest candidate within ``max_error``, or BudgetError naming the first miss."""
    for c in choices:
        i = cheapest_within(c.ladder, float(max_error))
        if i is None:
            best = min(c.ladder, key=lambda k: k.total_err)
            raise BudgetError(f"privml: no approximation of {c.site.kind} at '{c.site.label}' on "
                              f"[{c.site.lo:.4g}, {c.site.hi:.4g}] reaches max_error={max_error:g} (best "
                              f"{best.total_err:.3g}, {best.label()}); loosen max_error, narrow the interval "
                              "(percentile=, smaller margin=) or raise precision_bits")
        c.index = i


def _depth_limit(backend: str, stats: dict[str, RangeStats], depth_budget: int | None, refresh_depth: int | None,
                 precision_bits: int, poly_modulus_degree: int | None) -> tuple[int | None, str, int | None]:
    """(cap, what sets it, hybrid segment depth): the most depth an assignment may take on ``backend``."""
    if backend == "hybrid":
        segment = int(refresh_depth if refresh_depth is not None else depth_budget if depth_budget is not None
                      else depth_cap(stats, precision_bits, 16384))
        return segment, "the depth between two enclave refreshes (refresh_depth)", segment
    if backend == "ckks":
        if depth_budget is not None:
            return int(depth_budget), "depth_budget", None
        why = "the deepest CKKS chain at 128-bit security" + (f" for N={poly_modulus_degree}"
                                                               if poly_modulus_degree else "")
        return depth_cap(stats, precision_bits, poly_modulus_degree), why, None
    return None, "", None


def choose(gm: fx.GraphModule, stats: dict[str, RangeStats], backend: str, calibration: torch.Tensor, *,
           max_error: float | None = None, accuracy_tolerance: float | None = None,
           validation: tuple[torch.Tensor, torch.Tensor] | None = None, depth_budget: int | None = None,
           degree: int | None = None, margin: float = 0.1, percentile: Any = None, precision_bits: int = 20,
           poly_modulus_degree: int | None = None, refresh_depth: int | None = None,
           max_degree: int = MAX_DIRECT_DEGREE, composites: bool = True, agreement_target: float | None = None,
           reference: nn.Module | None = None, enclave_activations: bool = True, link_delay_ms: float | None = None,
           link_mbit: float | None = None) -> ChoiceResult:
    """Pick an approximation for every activation of ``gm`` (see the module docstring); ``gm`` is not modified.

    ``calibration`` (a batch of inputs) measures each activation's effect when no validation
    data is given, and the agreement with ``reference`` (the user's original model, eval mode;
    default: ``gm`` with exact activations). ``percentile``: True for (0.1, 99.9), or (low, high) in percent.
    ``link_delay_ms`` / ``link_mbit`` (MPC): order each activation's candidates by their predicted seconds on
    that link (rounds x round trip + bytes over the bandwidth, for the activation's size), not by rounds first:
    on a fast link a wide activation may be cheaper exact than as a high-degree polynomial.
    ``refresh_depth`` (hybrid): most levels between two enclave refreshes; ``enclave_activations=False``
    (hybrid): approximate ReLU too instead of leaving it to the enclave.
    BudgetError when a target cannot be met, saying the best reached and what to change.
    """
    _check_targets(backend, max_error, accuracy_tolerance, validation, depth_budget, degree)
    val = _check_validation(validation, tuple(calibration.shape[1:])) if validation is not None else None
    budget = any(v is not None for v in (max_error, accuracy_tolerance, depth_budget))
    sites = find_activations(gm, stats, margin, percentile=PERCENTILES if percentile is True else percentile,
                             backend=backend, every=(backend == "mpc" and budget)
                             or (backend == "hybrid" and not enclave_activations))
    mode = ("fixed_degree" if degree is not None else "accuracy_tolerance" if accuracy_tolerance is not None
            else "max_error" if max_error is not None else "depth_budget" if depth_budget is not None
            else "agreement")
    target = float(AGREEMENT_TARGET if agreement_target is None else _positive("agreement_target", agreement_target))
    targets = {k: v for k, v in (("max_error", max_error), ("accuracy_tolerance", accuracy_tolerance),
                                 ("depth_budget", depth_budget), ("degree", degree),
                                 ("agreement", target if mode == "agreement" else None)) if v is not None}
    result = ChoiceResult(backend, mode, [], targets=targets)
    if not sites:
        return result

    link = None
    if backend == "mpc" and (link_delay_ms is not None or link_mbit is not None):
        link = (float(link_delay_ms or 0.0), link_mbit)
    result.sites = [SiteChoice(s, _ladder(s, backend, degree, precision_bits, max_degree, composites,
                                          _site_seconds(s, stats, link) if link else None)) for s in sites]
    if max_error is not None:
        _start_within(result.sites, max_error)
    cap, cap_why, segment = _depth_limit(backend, stats, depth_budget, refresh_depth, precision_bits,
                                         poly_modulus_degree)
    search = Search(gm, result, cap, cap_why, segment)
    if not search.fits():
        what = ("the approximations meeting max_error" if max_error is not None else
                f"degree-{degree} polynomials" if degree is not None else "even the cheapest approximations")
        hint = ("loosen max_error, " if max_error is not None else "lower degree=, " if degree is not None else "")
        raise BudgetError(f"privml: {what} need depth {search.depth()} but {cap_why} is {cap}: {hint}raise "
                          "depth_budget, use fewer activations, or use backend='hybrid' (enclave refreshes)")

    # the clear evaluation, against the original model: on the labelled data for the accuracy target (and for
    # depth_budget when given), on the calibration inputs otherwise (agreement needs no labels)
    on_val = val is not None and mode in ("accuracy_tolerance", "depth_budget")
    ev = Evaluator(gm, sites, val[0] if on_val else calibration[:512], val[1] if on_val else None, reference)
    labelled = Evaluator(gm, sites, val[0], val[1], reference) if val is not None and not on_val else None
    if accuracy_tolerance is not None:
        search.meet_accuracy(ev, accuracy_tolerance)
    elif mode == "depth_budget":
        search.spend_depth(ev)
    elif mode == "agreement" and not search.meet_agreement(ev, target):
        result.warning = _fidelity_warning(search, ev, target, cap, cap_why)
    result = search.finish(ev, labelled)
    if mode != "agreement" and result.fidelity["agreement_exact"] < target:
        result.warning = fixes_warning(result.fidelity["agreement_exact"], target)
    return result


_REMEDIES = ("fine-tune the compiled model with approximation-aware training (privml.train.finetune), give a budget "
             "(accuracy_tolerance= with validation=(x, y), max_error= or depth_budget=) to trade depth for accuracy, "
             "or use the hybrid backend (backend=\"hybrid\": enclave refreshes give more depth)")


def fixes_warning(agreement: float, target: float) -> str:
    """The message when the model's fixes alone (MaxPool -> AvgPool) change the predictions."""
    return (f"privml: the model's fixes alone (MaxPool -> AvgPool) change the predictions: with exact activations "
            f"it agrees with the original model on {agreement:.1%} of the calibration samples (target "
            f"{target:.0%}); retrain or fine-tune the model with average pooling (privml.train.finetune)")


def _fidelity_warning(search: Search, ev: Evaluator, target: float, cap: int | None, cap_why: str) -> str:
    """Why the agreement target is missed: the fixes, or the activations with the largest effect, and remedies."""
    assignment = search.result.assignment
    reached, exact = ev.agreement(assignment), ev.agreement({})
    if exact < target:
        return fixes_warning(exact, target)
    effect = sorted(search.choices, key=lambda c: -ev.contribution(c.site.node.name, c.candidate))
    blame = ", ".join(f"'{c.site.label}' ({c.site.kind} ~ {c.candidate.label()}, logit effect "
                      f"{ev.contribution(c.site.node.name, c.candidate):.3g})" for c in effect[:3])
    limit = f" within {cap_why} ({cap})" if cap is not None else ""
    return (f"privml: the approximated model agrees with the original model's argmax on only {reached:.1%} of "
            f"{ev.x.shape[0]} calibration samples (target {target:.0%}){limit}; most to blame: {blame}. "
            f"Remedies: {_REMEDIES}")
