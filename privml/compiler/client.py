"""Ops the registry leaves to the client ("client" support, e.g. softmax on CKKS): cut from the end of the
graph at compile time, recorded in the plan, applied after decryption (and in clear runs of the compiled model).

The server then returns what the op's input was (logits), which the client may see anyway: it holds the key.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from privml.compiler.capture import node_spec
from privml.errors import MalformedInput

CLIENT_OPS = {"softmax"}


def _softmax_dim(node: fx.Node, modules: dict[str, torch.nn.Module]) -> int | None:
    if node.op == "call_module":
        return modules[str(node.target)].dim
    if "dim" in node.kwargs:
        return node.kwargs["dim"]
    return node.args[1] if len(node.args) > 1 else None


def split_client_ops(gm: fx.GraphModule, backend: str) -> list[dict[str, Any]]:
    """Remove the trailing ops that ``backend`` leaves to the client from ``gm``; returns them in order."""
    modules = dict(gm.named_modules())
    output = next(n for n in gm.graph.nodes if n.op == "output")
    ops: list[dict[str, Any]] = []
    while isinstance(output.args[0], fx.Node):
        last = output.args[0]
        spec = node_spec(last, modules)
        if spec is None or spec.how(backend) != "client" or len(last.users) != 1 or spec.name not in CLIENT_OPS:
            break
        ops.insert(0, {"op": spec.name, "dim": _softmax_dim(last, modules)})
        output.args = (last.args[0],)
        gm.graph.erase_node(last)
    if ops:
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
    return ops


def apply_client_ops(x: torch.Tensor, ops: list[dict[str, Any]]) -> torch.Tensor:
    """Apply what :func:`split_client_ops` cut off, in clear."""
    for op in ops:
        if not isinstance(op, dict) or op.get("op") not in CLIENT_OPS:
            raise MalformedInput(f"privml: the plan lists an unknown client-side op {op!r}")
        dim = op.get("dim")
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int)):
            raise MalformedInput(f"privml: client-side softmax has a bad dim {dim!r}")
        x = F.softmax(x, dim=dim)
    return x
