"""Capture a model as a torch.fx graph so functional calls inside ``forward`` are visible."""

from __future__ import annotations

import torch
import torch.fx as fx

from privml.errors import Problem, UnsupportedModule
from privml.registry import REGISTRY, OpSpec


class _Tracer(fx.Tracer):
    """fx tracer that keeps privml's own modules (polynomial activations) as single leaf nodes."""

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return type(m).__module__.startswith("privml.") or super().is_leaf_module(m, module_qualified_name)


def capture(model: torch.nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model``; data-dependent Python control flow becomes a clear privml error."""
    if isinstance(model, fx.GraphModule):
        return model
    try:
        graph = _Tracer().trace(model)
        return fx.GraphModule(model, graph, type(model).__name__)
    except Exception as err:  # fx raises TraceError, TypeError, RuntimeError... depending on the construct
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "item assignment" in text:
            problem = Problem(
                name="<forward>", kind="inplace",
                message=f"forward writes into a tensor in place ({text}); private tensors are immutable.",
                fix="build a new tensor instead (e.g. multiply by a 0/1 mask or use torch.cat).",
            )
        elif "control flow" in text or "iteration" in text or "bool" in text:
            problem = Problem(
                name="<forward>", kind="control_flow",
                message=f"the model's forward branches on tensor values ({text}). Python control flow that "
                "depends on the input's values would reveal private data and cannot run on encrypted inputs.",
                fix="make the control flow independent of the data, or move that part to the client after "
                "decryption.",
            )
        else:
            problem = Problem(
                name="<forward>", kind="untraceable",
                message=f"the model's forward cannot be captured as a graph ({text}).",
                fix="avoid reading tensor values (.item(), .tolist()) or calling non-torch code on tensors "
                "inside forward.",
            )
        raise UnsupportedModule(f"privml: cannot capture {type(model).__name__}:\n  {problem}", [problem]) from None


def node_module_name(node: fx.Node) -> str:
    """The qualified name of the module a graph node belongs to ('' for the top level)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        return list(stack.keys())[-1] if isinstance(stack, dict) else str(stack[-1])
    return ""


def node_label(node: fx.Node) -> str:
    """A readable identifier for a node: the module's qualified name, or module/function for functional calls."""
    name = node_module_name(node)
    if node.op == "call_module":
        return name
    return f"{name}:{node.name}" if name else node.name


def node_spec(node: fx.Node, modules: dict[str, torch.nn.Module]) -> OpSpec | None:
    """The registry's declaration of the op a graph node calls (None: not a registered op)."""
    if node.op == "call_module":
        return REGISTRY.for_module(modules[str(node.target)])
    if node.op == "call_function":
        return REGISTRY.for_function(node.target)
    if node.op == "call_method":
        return REGISTRY.for_method(str(node.target))
    return None
