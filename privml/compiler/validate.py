"""Model validation in the spirit of Opacus's ``ModuleValidator``: collect every problem, offer fixes.

``validate`` walks the modules *and* the traced graph (functional calls inside
``forward`` count) and returns all problems at once, each with the module's
qualified name. What each backend supports comes from :mod:`privml.registry`, the
table the backends' op handlers are registered from, so the two cannot disagree.
``fix`` applies the safe fixes (fold BatchNorm into the preceding conv/linear,
drop ``inplace=True``, set eval mode) and, only when asked, the lossy one
(MaxPool -> AvgPool, with a warning), checking numerically that the safe fixes did not change the function.
"""

from __future__ import annotations

import copy
import inspect
import warnings

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from privml.approx.activations import ACTIVATIONS
from privml.compiler.capture import capture, node_label, node_spec
from privml.compiler.client import CLIENT_OPS
from privml.config import BACKENDS  # the one declaration of the backends
from privml.errors import PrivmlError, Problem, UnsupportedModule
from privml.registry import REGISTRY, OpSpec
from privml.tensor import is_inplace

_APPROXIMABLE = frozenset(ACTIVATIONS) | {"layer_norm"}  # activations: compiler.approx; LayerNorm: compiler.norms
INPLACE_HINT = "in-place writes into a private tensor are not supported"
DATA_ACCESS = ("item", "tolist", "numpy", "__bool__")
_MAXPOOL_FIX = "compile(..., replace_maxpool=True) swaps it for AvgPool2d with the same window (changes the " \
    "function: retrain or fine-tune), or use the mpc backend."


def _module_problems(model: nn.Module, backend: str) -> list[Problem]:
    """What a module walk shows before tracing: training mode and in-place flags (both fixable)."""
    problems: list[Problem] = []
    if model.training:
        problems.append(Problem("", "training_mode", "the model is in training mode (dropout/BatchNorm statistics "
                                "would differ).", "call model.eval() (privml.compile does).", "fixable"))
    for name, mod in model.named_modules():
        if getattr(mod, "inplace", False):
            problems.append(Problem(name, "inplace", f"{type(mod).__name__}(inplace=True) writes into its input; "
                                    "private tensors are immutable.", "replace with inplace=False.", "fixable"))
    return problems


def _leaf_problems(model: nn.Module, backend: str) -> list[Problem]:
    """Support of each torch.nn leaf module, for models that cannot be traced (the graph walk covers the rest)."""
    problems = []
    for name, mod in model.named_modules():
        if mod is model or list(mod.children()) or not type(mod).__module__.startswith("torch.nn"):
            continue
        spec = REGISTRY.for_module(mod)
        problems += _support_problems(name, spec, type(mod).__name__, backend)
    return problems


def _support_problems(label: str, spec: OpSpec | None, what: str, backend: str, last: bool = True) -> list[Problem]:
    """The registry's verdict on running ``what`` (an op of ``spec``) on ``backend``."""
    if spec is None:
        return [Problem(label, "unsupported", f"{what} has no private implementation (it is not in privml's op "
                        "registry).", "use supported layers, or declare it with privml.registry.register and give "
                        "the backend a handler.", "error")]
    how = spec.how(backend)
    if how is None:
        kind = "maxpool" if spec.name == "max_pool2d" else "unsupported"
        return [Problem(label, kind, f"{what}: {spec.refusal(backend)}", _MAXPOOL_FIX if kind == "maxpool" else None,
                        "error")]
    if how == "approx" and spec.name not in _APPROXIMABLE:
        return [Problem(label, "unsupported", f"{what}: the registry says the compiler approximates {spec.name} on "
                        f"{backend}, but privml has no approximation for it.", "give the op a handler on this "
                        "backend (support 'exact') or add its function to privml.approx.activations.", "error")]
    if how == "client" and spec.name not in CLIENT_OPS:
        return [Problem(label, "unsupported", f"{what}: declared client-side on {backend}, but privml does not know "
                        "how to apply it on the client.", None, "error")]
    if how == "approx":
        return [Problem(label, "approximated", f"{what} has no exact protocol on {backend}: it will be replaced by a "
                        "polynomial fitted on its calibrated input range.", None, "info")]
    if how == "client" and not last:
        return [Problem(label, "client_side", f"{what}: {spec.refusal(backend)}", "move it after decryption (end "
                        "the model with it, or drop it and apply it on the client).", "error")]
    if how == "client":
        return [Problem(label, "client_side", f"{what} ends the model: the server returns its input and the client "
                        "applies it after decryption.", None, "info")]
    return []


def private_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value depends on the model's input (metadata reads such as ``x.size(0)`` do not)."""
    private: set[fx.Node] = set()
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            private.add(node)
        elif node.op in ("call_function", "call_method", "call_module") and any(
                a in private for a in node.all_input_nodes):
            spec = node_spec(node, modules)
            if spec is None or spec.kind != "metadata" or (
                    spec.check and spec.check(tuple(node.args), dict(node.kwargs), private.__contains__, "plain")):
                private.add(node)  # a value read out of a private tensor (x.T: a private view), not its metadata
    return private


def _describe(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))).__name__
    if node.op == "call_method":
        return f"tensor method .{node.target}()"
    target = node.target
    return f"{getattr(target, '__module__', None) or ''}.{getattr(target, '__name__', str(target))}".lstrip(".")


def _is_inplace_call(node: fx.Node) -> bool:
    """An in-place form (``x.add_``, ``out += y``) or a call with ``inplace=True`` (``F.relu(x, inplace=True)``)."""
    if node.op == "call_function":
        if is_inplace(node.target) or getattr(node.target, "__name__", "").endswith("_"):
            return True
        try:
            bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
        except (TypeError, ValueError):
            return node.kwargs.get("inplace") is True
        return bound.arguments.get("inplace") is True
    if node.op == "call_method":
        name = str(node.target)
        return (name.endswith("_") and not name.startswith("__")) or name.startswith("__i")
    return False


def _aliases(value: fx.Node, modules: dict[str, nn.Module]) -> set[fx.Node]:
    """Every node that may share memory with ``value``: back through views to the tensor they view, then
    forward through every view of it (reshape, flatten, indexing, transposes, detach: torch returns views)."""

    def is_view(n: fx.Node) -> bool:
        spec = node_spec(n, modules)
        return spec is not None and spec.kind in ("shape", "identity") and spec.name != "cat"

    root = value
    while is_view(root) and root.args and isinstance(root.args[0], fx.Node):
        root = root.args[0]
    found, todo = {root}, [root]
    while todo:
        for user in todo.pop().users:
            if user not in found and is_view(user) and user.args and user.args[0] in found:
                found.add(user)
                todo.append(user)
    return found


def _written_then_read(node: fx.Node, modules: dict[str, nn.Module], order: dict[fx.Node, int]) -> bool:
    """True if ``node`` writes in place into a tensor (or a view of it) that something after ``node`` reads."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    return any(order[u] > order[node] for a in _aliases(node.args[0], modules) for u in a.users if u is not node)


def _module_arguments(mod: nn.Module) -> tuple[tuple, dict]:
    """The arguments a leaf module passes to its functional op in eval mode, as far as the registry checks read."""
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        return (None, mod.running_mean), {"training": mod.running_mean is None}
    if isinstance(mod, nn.Softmax):
        return (None,), {"dim": mod.dim}
    if isinstance(mod, nn.MaxPool2d):
        return (None,), {"return_indices": mod.return_indices}
    if isinstance(mod, nn.AvgPool2d):
        return (None,), {"divisor_override": mod.divisor_override}
    return (None,), {"training": False}


def _graph_problems(gm: fx.GraphModule, backend: str) -> list[Problem]:
    problems: list[Problem] = []
    modules = dict(gm.named_modules())
    private = private_nodes(gm)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    output = next(n for n in gm.graph.nodes if n.op == "output")
    if not isinstance(output.args[0], fx.Node):
        problems.append(Problem("<output>", "output", f"the model returns {type(output.args[0]).__name__}; privml "
                                "models return one tensor.", "return a single tensor (torch.cat the outputs, or "
                                "compile each head separately).", "error"))
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module") or node not in private:
            continue
        label = node_label(node)
        if node.op == "call_method" and node.target in DATA_ACCESS:
            problems.append(Problem(label, "data_access", f".{node.target}() reads private values in clear.",
                                    "do this on the client after decryption.", "error"))
            continue
        if node.op == "call_module" and type(modules[node.target]).__module__.startswith("privml."):
            continue  # privml's own approximations are built from registry ops
        spec = node_spec(node, modules)
        last = list(node.users) == [output]
        problems += _support_problems(label, spec, _describe(node, gm), backend, last)
        if spec is not None and spec.check is not None and spec.how(backend) is not None:
            args, kwargs = (_module_arguments(modules[node.target]) if node.op == "call_module"
                            else (tuple(node.args), dict(node.kwargs)))
            reason = spec.check(args, kwargs, private.__contains__, backend)
            if reason:
                problems.append(Problem(label, "unsupported", f"{_describe(node, gm)}: {reason}", None, "error"))
        if _is_inplace_call(node) and _written_then_read(node, modules, order):
            problems.append(Problem(label, "inplace", f"{_describe(node, gm)} writes in place into a tensor that is "
                                    f"read again later; {INPLACE_HINT}.", "use the out-of-place form.", "error"))
        if node.op == "call_module" and isinstance(modules[node.target], (nn.BatchNorm1d, nn.BatchNorm2d)):
            problems.append(_batchnorm_problem(node, label, modules))
    return problems


def _batchnorm_problem(node: fx.Node, label: str, modules: dict[str, nn.Module]) -> Problem:
    mod, prev = modules[node.target], node.args[0]
    foldable = (isinstance(prev, fx.Node) and prev.op == "call_module" and len(prev.users) == 1
                and isinstance(modules[prev.target], (nn.Conv2d, nn.Linear)) and mod.running_mean is not None)
    if foldable:
        return Problem(label, "batchnorm", f"{type(mod).__name__} follows {prev.target}.",
                       f"fold it into {prev.target} (exact; privml.compile does).", "fixable")
    return Problem(label, "batchnorm", f"{type(mod).__name__} does not directly follow a conv/linear layer; it runs "
                   "as a per-channel affine map (one plaintext multiply).", None, "info")


def validate(model: nn.Module, backend: str = "ckks") -> list[Problem]:
    """Every problem that stops ``model`` from running privately on ``backend``, module walk and graph."""
    if backend not in BACKENDS:
        raise PrivmlError(f"privml: unknown backend {backend!r}; choose one of {BACKENDS}")
    problems = _module_problems(model, backend)
    try:
        gm = capture(model)
    except UnsupportedModule as err:
        return problems + err.problems + _leaf_problems(model, backend)
    seen = {(p.name, p.kind) for p in problems}
    problems += [p for p in _graph_problems(gm, backend) if (p.name, p.kind) not in seen]
    return problems


def errors(problems: list[Problem]) -> list[Problem]:
    """The problems that block compilation (severity 'error')."""
    return [p for p in problems if p.severity == "error"]


def raise_if_errors(problems: list[Problem], model: nn.Module) -> None:
    """Raise one ``UnsupportedModule`` listing every blocking problem, with fixes."""
    blocking = errors(problems)
    if blocking:
        lines = "\n".join(f"  - {p}" for p in blocking)
        raise UnsupportedModule(f"privml: {type(model).__name__} cannot be compiled as it is "
                                f"({len(blocking)} problem(s)):\n{lines}", blocking)


def _fold_batchnorm(gm: fx.GraphModule) -> list[str]:
    """Fold each BatchNorm that directly follows a conv/linear (sole user) into it; returns what was folded."""
    modules = dict(gm.named_modules())
    folded = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), (nn.BatchNorm1d, nn.BatchNorm2d)):
            continue
        prev = node.args[0]
        if not (isinstance(prev, fx.Node) and prev.op == "call_module" and len(prev.users) == 1):
            continue
        layer, bn = modules[prev.target], modules[node.target]
        if bn.running_mean is None:
            continue  # batch statistics: refused by validation, nothing to fold
        if isinstance(layer, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            fused = fuse_conv_bn_eval(layer, bn)
        elif isinstance(layer, nn.Linear) and isinstance(bn, nn.BatchNorm1d):
            fused = fuse_linear_bn_eval(layer, bn)
        else:
            continue
        parent_name, _, attr = str(prev.target).rpartition(".")
        setattr(gm.get_submodule(parent_name) if parent_name else gm, attr, fused)
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
        folded.append(f"folded {node.target} into {prev.target}")
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return folded


def avg_pool_like_max(input: torch.Tensor, kernel_size: object, stride: object = None, padding: object = 0,
                      dilation: object = 1, ceil_mode: bool = False, return_indices: bool = False) -> torch.Tensor:
    """``F.avg_pool2d`` with ``F.max_pool2d``'s signature (what the MaxPool -> AvgPool fix substitutes)."""
    if dilation not in (1, (1, 1)) or return_indices:
        raise PrivmlError("privml: cannot replace a dilated max_pool2d or one returning indices with avg_pool2d")
    return F.avg_pool2d(input, kernel_size, stride, padding, ceil_mode=ceil_mode)


def fix(model: nn.Module, example_input: torch.Tensor | None = None, replace_maxpool: bool = False,
        atol: float = 1e-4) -> tuple[fx.GraphModule, list[str]]:
    """A fixed copy of ``model`` (as a GraphModule) and the list of fixes applied.

    Safe fixes are checked numerically on ``example_input`` (the fixed model must match
    the original within ``atol`` relative to the output scale); the MaxPool swap is applied
    after that check because it changes the function on purpose.
    """
    original = copy.deepcopy(model).eval()
    work = copy.deepcopy(model).eval()
    applied: list[str] = []
    if model.training:
        applied.append("set eval mode")
    for name, mod in work.named_modules():
        if getattr(mod, "inplace", False):
            mod.inplace = False
            applied.append(f"{name}: inplace=False")
    gm = capture(work)
    applied += _fold_batchnorm(gm)
    if example_input is not None:
        with torch.no_grad():
            ref, got = original(example_input.clone()), gm(example_input.clone())
        err = float((ref - got).abs().max())
        scale = max(1.0, float(ref.abs().max()))
        if err > atol * scale:
            raise PrivmlError(f"privml: fixing the model changed its outputs by {err:.3g} (tolerance "
                              f"{atol * scale:.3g}); fixes applied: {applied}. Please report this model.")
    if replace_maxpool:
        for name, mod in list(gm.named_modules()):
            if isinstance(mod, nn.MaxPool2d):
                parent_name, _, attr = name.rpartition(".")
                avg = nn.AvgPool2d(mod.kernel_size, mod.stride, mod.padding, ceil_mode=mod.ceil_mode)
                setattr(gm.get_submodule(parent_name) if parent_name else gm, attr, avg)
                applied.append(f"{name}: MaxPool2d -> AvgPool2d")
                warnings.warn(f"privml: replaced MaxPool2d '{name}' with AvgPool2d: the model computes a different "
                              "function; check accuracy (fine-tune if needed).", stacklevel=2)
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is F.max_pool2d:
                node.target = avg_pool_like_max
                applied.append(f"{node.name}: max_pool2d -> avg_pool2d")
        gm.recompile()
    return gm, applied
