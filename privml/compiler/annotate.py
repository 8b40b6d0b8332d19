"""Applying a choice: swap the chosen modules into the graph, record them in the plan, check them in clear."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from privml.compiler.approx import replace_activation
from privml.compiler.costs import MPC_RELU_ROUNDS
from privml.compiler.search import ChoiceResult


def apply_choice(gm: fx.GraphModule, result: ChoiceResult, trainable: bool = False) -> tuple[list[str], dict[str, str]]:
    """Swap the chosen modules into ``gm``. Returns (descriptions for the plan's fixes, site node -> new node)."""
    done, names = [], {}
    for c in result.sites:
        cand, site = c.candidate, c.site
        mod = cand.module(site, trainable=trainable)
        if mod is None:
            names[site.node.name] = site.node.name
            done.append(f"{site.label}: {site.kind} kept exact on MPC ({MPC_RELU_ROUNDS} rounds)")
            continue
        names[site.node.name] = replace_activation(gm, site, mod)
        done.append(f"{site.label}: {site.kind} -> {cand.label()} on [{site.lo:.3g}, {site.hi:.3g}] "
                    f"(max err {cand.total_err:.3g}, depth {cand.depth})")
    return done, names


def annotate_plan(plan: Any, result: ChoiceResult, names: dict[str, str]) -> None:
    """Record every choice in its plan row (approx, degree, coefficients, error, cost) and the plan-level summary."""
    by_node = {lp.node: lp for lp in plan.layers}
    for c in result.sites:
        row = by_node.get(names.get(c.site.node.name, c.site.node.name))
        if row is None:
            continue
        cand, site = c.candidate, c.site
        row.approx = f"{site.kind} ~ {cand.label()} on [{site.lo:.3g}, {site.hi:.3g}]"
        row.degree = cand.degree
        row.coeffs = [float(v) for v in cand.approx.power_coeffs()] if cand.kind == "poly" else None
        row.est_error = cand.total_err
        if result.backend != "mpc":
            row.depth = cand.depth
        row.cost = {"ckks_depth": cand.depth, "ct_mults": cand.mults, "mpc_rounds": cand.rounds,
                    "mpc_bytes_per_element": cand.nbytes, "logit_effect": c.contribution,
                    "refresh_after": site.node.name in result.refresh_points}
        row.spec = {**cand.spec(), "interval": [site.lo, site.hi], "source": site.kind}
    if not result.sites:
        return  # nothing was approximated (e.g. a model compiled again after fine-tuning)
    plan.params["approximation"] = result.summary()
    if result.backend == "hybrid":
        old_name = {new: old for old, new in names.items()}
        for row in plan.layers:
            level = result.levels.get(old_name.get(row.node, row.node))
            if level is not None:
                row.level = level
        refreshed = {names.get(n, n) for n in result.refresh_points}
        plan.params["refresh_points"] = [row.name for row in plan.layers if row.node in refreshed]
        plan.params["segment_depth"] = max((row.level or 0 for row in plan.layers), default=0)
        plan.params["approximation"]["refresh_points"] = plan.params["refresh_points"]
    if result.fidelity:
        plan.predicted.update({"agreement": result.fidelity["agreement"],
                               "agreement_samples": result.fidelity["samples"]})
    if result.warning:
        plan.notes.append(result.warning)
    if result.accuracy:
        plan.predicted.update({"accuracy_original": result.accuracy["original"],
                               "accuracy_approx": result.accuracy["approximated"],
                               "accuracy_drop": result.accuracy["drop"]})


def interval_notes(gm: fx.GraphModule, plan: Any) -> None:
    """Add a plan note for every polynomial activation whose calibrated input leaves its fitted interval.

    Happens with models fine-tuned after approximation, or with percentile intervals: outside
    the interval the polynomial is not an approximation any more.
    """
    from privml.nn import APPROX_MODULES

    modules = dict(gm.named_modules())
    for row in plan.layers:
        node = next((n for n in gm.graph.nodes if n.name == row.node), None)
        mod = modules.get(node.target) if node is not None and node.op == "call_module" else None
        if not isinstance(mod, APPROX_MODULES) or row.in_range is None:
            continue
        (lo, hi), (a, b) = row.in_range, mod.interval
        if lo < a or hi > b:
            plan.notes.append(f"{row.name}: calibrated inputs span [{lo:.4g}, {hi:.4g}] but its polynomial holds on "
                              f"[{a:.4g}, {b:.4g}]; recompile from the original model or fine-tune with a range "
                              "penalty (privml.train.finetune)")


def simulated_accuracy(gm: fx.GraphModule, x: torch.Tensor, y: torch.Tensor, noise_std: float,
                       seed: int = 0) -> float:
    """Accuracy of the approximated model on the plain backend with its CKKS-noise simulation (Gaussian noise
    of ``noise_std`` after every arithmetic op); a cheap check that the planned precision leaves the argmax alone."""
    from privml.backends.plain import PlainBackend, Simulation
    from privml.tensor import PrivateTensor, module_scope

    backend = PlainBackend(Simulation("ckks", ckks_noise_std=float(noise_std), seed=seed))
    with module_scope(gm), torch.no_grad():
        out = gm(backend.encrypt(x))
    logits = backend.decrypt(out.finalize() if isinstance(out, PrivateTensor) else out)
    return float((logits.argmax(dim=1) == y).float().mean())
