"""The budgeted search: move every activation along its candidate ladder until the targets hold.

It starts from the cheapest candidates (or the cheapest meeting ``max_error``). Greedy raises
take the activation whose next candidate lowers the model's error most (validation cross-entropy
with labels, else the change of the logits against the exact model) per level of depth it adds
(per round on MPC), as long as the result fits the depth limit; trimming then steps activations
back down, least logit effect first, while the accuracy target still holds. Deterministic given
the inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from privml.approx.basis import square_form
from privml.compiler.approx import ActivationSite
from privml.compiler.candidates import Candidate, next_index
from privml.compiler.costs import graph_cost, place_refreshes
from privml.compiler.evaluate import Evaluator
from privml.errors import BudgetError


@dataclass
class SiteChoice:
    """One activation: its frontier of candidates (``ladder``) and the index chosen."""

    site: ActivationSite
    ladder: list[Candidate]
    index: int = 0
    contribution: float | None = None

    @property
    def candidate(self) -> Candidate:
        return self.ladder[self.index]


@dataclass
class ChoiceResult:
    """What :func:`choose` decided, with the model-level costs and (if validation data was given) accuracy."""

    backend: str
    mode: str
    sites: list[SiteChoice]
    total_depth: int | None = None
    mpc_rounds: int | None = None
    refresh_points: list[str] = field(default_factory=list)
    levels: dict[str, int] = field(default_factory=dict)  # hybrid: running level per node, refreshes included
    accuracy: dict[str, float] = field(default_factory=dict)
    fidelity: dict[str, float] = field(default_factory=dict)  # agreement with the original model's argmax
    warning: str | None = None  # why the fidelity target (agreement with the original) is missed, if it is
    steps: int = 0
    targets: dict[str, Any] = field(default_factory=dict)

    @property
    def assignment(self) -> dict[str, Candidate]:
        return {s.site.node.name: s.candidate for s in self.sites}

    @property
    def total_mults(self) -> int:
        return sum(s.candidate.mults for s in self.sites)

    @property
    def total_bytes(self) -> int:
        return sum(s.candidate.nbytes for s in self.sites)

    def cost(self) -> tuple[int, ...]:
        """The plan's cost key for its backend (the cost model of :mod:`privml.compiler.costs`); smaller is cheaper."""
        c = [s.candidate for s in self.sites]
        if self.backend == "mpc":
            return (self.mpc_rounds or 0, sum(x.rounds for x in c), self.total_bytes)
        if self.backend == "hybrid":
            return (len(self.refresh_points), sum(x.depth for x in c), self.total_mults)
        return (self.total_depth or 0, sum(x.depth for x in c), self.total_mults)

    def summary(self) -> dict[str, Any]:
        """JSON-safe plan-level record of the choice."""
        out: dict[str, Any] = {"mode": self.mode, "targets": self.targets, "cost_key": list(self.cost()),
                               "activation_ct_mults": self.total_mults, "steps": self.steps}
        if self.total_depth is not None:
            out["estimated_depth"] = self.total_depth
        if self.mpc_rounds is not None:
            out["mpc_activation_rounds"] = self.mpc_rounds
            out["mpc_activation_bytes_per_element"] = self.total_bytes
        if self.backend == "hybrid":
            out["refresh_points"] = list(self.refresh_points)
        return out


class Search:
    """One search over ``result.sites``: the graph that prices an assignment and the depth limit it must fit.

    ``cap`` is the most depth an assignment may take (None: no limit) and ``cap_why`` what sets it;
    ``segment`` (hybrid only) the most levels between two enclave refreshes. The search moves the
    sites' ``index`` and counts its steps in ``result.steps``.
    """

    def __init__(self, gm: fx.GraphModule, result: ChoiceResult, cap: int | None, cap_why: str,
                 segment: int | None) -> None:
        self.gm = gm
        self.result = result
        self.choices = result.sites
        self.backend = result.backend
        self.cap, self.cap_why, self.segment = cap, cap_why, segment

    def depths(self) -> dict[str, int]:
        """CKKS depth of every activation's current candidate, by node name."""
        return {c.site.node.name: c.candidate.depth for c in self.choices}

    def quadratic(self) -> set[str]:
        """Activations whose current candidate is a degree-2 polynomial the CKKS backend evaluates as one square."""
        return {c.site.node.name for c in self.choices if c.candidate.kind == "poly" and c.candidate.approx is not None
                and square_form(c.candidate.approx.power_coeffs()) is not None}

    def depth(self) -> int:
        """Total CKKS depth of the current assignment on the graph."""
        return graph_cost(self.gm, self.depths(), "depth", quadratic=self.quadratic())[0]

    def fits(self) -> bool:
        """Whether the current assignment fits: within ``cap``, or (hybrid) placeable with refreshes."""
        if self.backend == "hybrid":
            try:
                place_refreshes(self.gm, self.depths(), int(self.segment or 0))
            except BudgetError:
                return False
            return True
        return self.cap is None or self.depth() <= self.cap

    def raise_once(self, ev: Evaluator, within: bool) -> bool:
        """Raise the activation whose next level lowers the model's error most per level of depth it adds.

        Measured on the reference models, raising straight to the best candidate one level up and trimming
        afterwards ends at less depth than taking the free same-level raises first (``within``), which
        the depth-budget mode does since it keeps whatever fits. False when no raise fits."""
        now = ev.metric(self.result.assignment)
        depth_now = self.depth() if self.backend != "mpc" else 0
        best: tuple[float, int, int] | None = None
        for i, c in enumerate(self.choices):
            old, nxt = c.index, next_index(c.ladder, c.index, self.backend, within)
            if nxt is None:
                continue
            c.index = nxt
            if self.fits():
                if self.backend == "mpc":
                    added = c.ladder[nxt].rounds - c.ladder[old].rounds
                else:
                    added = self.depth() - depth_now
                score = (now - ev.metric(self.result.assignment)) / max(added, 1)
                if best is None or score > best[0]:
                    best = (score, i, nxt)
            c.index = old
        if best is None:
            return False
        self.choices[best[1]].index = best[2]
        self.result.steps += 1
        return True

    def trim(self, ev: Evaluator, ok: Callable[[], bool]) -> None:
        """Step every activation down its ladder (cheaper) while ``ok()`` still holds, least effect first."""
        for c in self.choices:
            c.contribution = ev.contribution(c.site.node.name, c.candidate)
        order = sorted(range(len(self.choices)), key=lambda i: (self.choices[i].contribution or 0.0, i))
        for i in order:
            c = self.choices[i]
            while c.index > 0:
                c.index -= 1
                if not ok():
                    c.index += 1
                    break
                self.result.steps += 1

    def meet_accuracy(self, ev: Evaluator, tolerance: float) -> None:
        """Raise until the accuracy drop is <= ``tolerance``, then trim back what is not needed.

        The starting indices (``max_error``'s choice, if given) are the floor. BudgetError when even
        the most accurate candidates that fit miss the tolerance. The baseline is the user's original model
        (before fixes such as MaxPool -> AvgPool), so a lossy fix counts against the tolerance."""
        base = ev.reference_accuracy()

        def met() -> bool:
            return base - ev.accuracy(self.result.assignment) <= float(tolerance)

        floor = [c.index for c in self.choices]
        while not met():
            if not self.raise_once(ev, within=False):
                acc = ev.accuracy(self.result.assignment)
                limit = f" within {self.cap_why} {self.cap}" if self.cap is not None else ""
                exact = ev.accuracy({})
                fixes = (f" (the model's fixes alone, e.g. MaxPool -> AvgPool, already give {exact:.4f})"
                         if base - exact > float(tolerance) else "")
                raise BudgetError(f"privml: the approximated model reaches accuracy {acc:.4f} against {base:.4f} for "
                                  f"the original (drop {base - acc:.4f} > accuracy_tolerance {tolerance}){fixes}"
                                  f" with the most accurate approximations available{limit}: raise "
                                  "accuracy_tolerance or depth_budget, recalibrate on tighter ranges (percentile=), "
                                  "fine-tune the compiled model (privml.train.finetune), or use backend='hybrid'")
        self.trim(ev, lambda: met() and all(c.index >= f for c, f in zip(self.choices, floor, strict=True)))

    def meet_agreement(self, ev: Evaluator, target: float) -> bool:
        """Raise until the argmax agrees with the original's on >= ``target`` of the samples, then trim back.

        When no assignment that fits reaches the target, keep the cheapest one reaching the best agreement
        seen (raising past it buys nothing). Returns whether the target is met."""
        def agreement() -> float:
            return ev.agreement(self.result.assignment)

        best, best_at = agreement(), [c.index for c in self.choices]
        while best < target and self.raise_once(ev, within=False):
            if agreement() > best:
                best, best_at = agreement(), [c.index for c in self.choices]
        for c, i in zip(self.choices, best_at, strict=True):
            c.index = i
        goal = min(best, float(target))
        self.trim(ev, lambda: agreement() >= goal)
        return agreement() >= target

    def spend_depth(self, ev: Evaluator) -> None:
        """Raise (same-level raises first) while anything still fits the depth limit."""
        while self.raise_once(ev, within=True):
            pass

    def finish(self, ev: Evaluator | None, labelled: Evaluator | None = None) -> ChoiceResult:
        """Record the final costs (depth or rounds, refresh points) and, with ``ev``, effects and agreement with
        the original model; accuracy with labels (on ``labelled``, default ``ev``)."""
        result = self.result
        if self.backend == "mpc":
            result.mpc_rounds = graph_cost(self.gm, {c.site.node.name: c.candidate.rounds for c in self.choices},
                                           "rounds")[0]
        else:
            result.total_depth = self.depth()
            if self.segment is not None:
                result.refresh_points = place_refreshes(self.gm, self.depths(), self.segment)
                result.levels = graph_cost(self.gm, self.depths(), "depth", set(result.refresh_points),
                                           self.quadratic())[1]
        if ev is not None:
            for c in self.choices:
                c.contribution = ev.contribution(c.site.node.name, c.candidate)
            result.fidelity = {"agreement": ev.agreement(result.assignment), "agreement_exact": ev.agreement({}),
                               "samples": float(ev.x.shape[0])}
        labelled = labelled or ev
        if labelled is not None and labelled.y is not None:
            base = labelled.reference_accuracy()
            acc = labelled.accuracy(result.assignment)
            result.accuracy = {"original": base, "approximated": acc, "drop": base - acc,
                               "samples": float(labelled.x.shape[0])}
        return result
