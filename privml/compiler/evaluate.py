"""Running a model in clear with some activations approximated: how much a choice moves logits or accuracy."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from privml.compiler.approx import ActivationSite, replace_activation
from privml.compiler.candidates import Candidate
from privml.errors import InvalidInput

_EXACT: dict[str, Callable[..., torch.Tensor]] = {
    "relu": F.relu, "gelu": F.gelu, "silu": F.silu, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
    "softplus": F.softplus, "hardswish": F.hardswish, "hardsigmoid": F.hardsigmoid,
}


def exact_function(kind: str, params: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation ``kind`` in torch (what the approximations are measured against)."""
    if kind == "leaky_relu":
        slope = float(params.get("slope", 0.01))
        return lambda x: F.leaky_relu(x, slope)
    if kind == "elu":
        alpha = float(params.get("alpha", 1.0))
        return lambda x: F.elu(x, alpha)
    if kind == "hardtanh":
        lo, hi = float(params.get("lo", -1.0)), float(params.get("hi", 1.0))
        return lambda x: F.hardtanh(x, lo, hi)
    if kind not in _EXACT:
        raise InvalidInput(f"privml: no approximation for activation {kind!r}")
    return _EXACT[kind]


class _Slot(nn.Module):
    """Stand-in used while choosing: the exact activation, or the candidate under trial."""

    def __init__(self, exact: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.exact = exact
        self.approx: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.exact(x) if self.approx is None else self.approx(x)


def agrees(logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per sample, whether ``logits`` predict what ``reference`` does: the argmax over dim 1 (at every position
    beyond it), a tie in ``reference`` counting for any of its maxima; one output column is a binary logit (sign)."""
    n = logits.shape[0]
    if logits.dim() < 2 or logits.shape[1] < 2:
        return ((logits > 0) == (reference > 0)).reshape(n, -1).all(dim=1)
    top = reference.amax(dim=1, keepdim=True)
    picked = reference.gather(1, logits.argmax(dim=1, keepdim=True))
    return (picked >= top - 1e-6 * (1.0 + top.abs())).reshape(n, -1).all(dim=1)


class Evaluator:
    """A copy of the graph with switchable activations, run in clear on fixed data (results cached).

    ``reference`` is the model the user passed in (before fixes such as MaxPool -> AvgPool): accuracy and
    agreement are measured against it; without one, against ``gm`` with exact activations.
    """

    def __init__(self, gm: fx.GraphModule, sites: list[ActivationSite], x: torch.Tensor,
                 y: torch.Tensor | None, reference: nn.Module | None = None) -> None:
        self.work = copy.deepcopy(gm).eval()
        nodes = {n.name: n for n in self.work.graph.nodes}  # deepcopy keeps node names
        self.slots: dict[str, _Slot] = {}
        for s in sites:
            slot = _Slot(exact_function(s.kind, s.params))
            replace_activation(self.work, dataclasses.replace(s, node=nodes[s.node.name]), slot)
            self.slots[s.node.name] = slot
        self.x, self.y = x, y
        self._modules: dict[tuple, nn.Module] = {}
        self._contrib: dict[tuple, float] = {}
        self._metric: dict[tuple, float] = {}
        self.sites = {s.node.name: s for s in sites}
        self.exact_logits = self.run({})
        with torch.no_grad():
            ref = self.exact_logits if reference is None else reference(x)
        self.reference_logits = ref if isinstance(ref, torch.Tensor) and ref.shape == self.exact_logits.shape \
            else self.exact_logits  # an output the graph changed (e.g. a client-side op) falls back to the graph's
        self._agreement: dict[tuple, float] = {}

    def module(self, name: str, cand: Candidate) -> nn.Module:
        """The module computing ``cand`` at activation ``name`` (built once)."""
        key = (name, cand.kind, cand.degrees, cand.eps)
        if key not in self._modules:
            self._modules[key] = cand.module(self.sites[name]) or _Slot(self.slots[name].exact)
        return self._modules[key]

    def run(self, assignment: dict[str, Candidate]) -> torch.Tensor:
        """Logits with the activations named in ``assignment`` approximated, the others exact."""
        for name, slot in self.slots.items():
            cand = assignment.get(name)
            slot.approx = None if cand is None else self.module(name, cand)
        with torch.no_grad():
            out = self.work(self.x)
        for slot in self.slots.values():
            slot.approx = None
        return out

    def contribution(self, name: str, cand: Candidate) -> float:
        """Mean over samples of max |logit change| when only activation ``name`` is approximated by ``cand``."""
        key = (name, cand.kind, cand.degrees, cand.eps)
        if key not in self._contrib:
            diff = (self.run({name: cand}) - self.exact_logits).abs()
            self._contrib[key] = float(diff.reshape(diff.shape[0], -1).max(dim=1).values.mean())
        return self._contrib[key]

    def metric(self, assignment: dict[str, Candidate]) -> float:
        """How far the approximated model is from the goal: validation cross-entropy with labels, else the
        mean over samples of max |logit change| against the exact model."""
        key = tuple(sorted((n, c.kind, c.degrees, c.eps) for n, c in assignment.items()))
        if key not in self._metric:
            logits = self.run(assignment)
            if self.y is not None:
                self._metric[key] = float(F.cross_entropy(logits, self.y))
            else:
                diff = (logits - self.exact_logits).abs()
                self._metric[key] = float(diff.reshape(diff.shape[0], -1).max(dim=1).values.mean())
        return self._metric[key]

    def agreement(self, assignment: dict[str, Candidate]) -> float:
        """Fraction of samples whose prediction with ``assignment`` equals the reference model's (no labels)."""
        key = tuple(sorted((n, c.kind, c.degrees, c.eps) for n, c in assignment.items()))
        if key not in self._agreement:
            self._agreement[key] = float(agrees(self.run(assignment), self.reference_logits).float().mean())
        return self._agreement[key]

    def reference_accuracy(self) -> float:
        """Top-1 accuracy of the reference (the user's original model) on the validation labels."""
        if self.y is None:
            raise InvalidInput("privml: accuracy needs labels: pass validation=(x, y)")
        return float((self.reference_logits.argmax(dim=1) == self.y).float().mean())

    def accuracy(self, assignment: dict[str, Candidate]) -> float:
        """Top-1 accuracy on the validation labels with ``assignment``'s activations approximated."""
        if self.y is None:
            raise InvalidInput("privml: accuracy needs labels: pass validation=(x, y)")
        logits = self.run(assignment)
        return float((logits.argmax(dim=1) == self.y).float().mean())
