"""Model validation in the spirit of Opacus's ``ModuleValidator``: collect every problem, offer fixes.

``validate`` walks the modules *and* the traced graph (functional calls inside
``forward`` count) and returns all problems at once, each with the module's
qualified name. ``fix`` applies the safe fixes (fold BatchNorm into the
preceding conv/linear, drop ``inplace=True``, set eval mode) and, only when
asked, the lossy one (MaxPool -> AvgPool, with a warning), checking numerically
that the safe fixes did not change the function.
"""

from __future__ import annotations

import copy
import operator
import warnings

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from privml import functional as PF
from privml.compiler.capture import capture, node_label
from privml.config import BACKENDS  # the one declaration of the backends
from privml.errors import PrivmlError, Problem, UnsupportedModule

ACTIVATION_MODULES = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.ReLU6)
NEUTRAL_MODULES = (nn.Flatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Sequential, nn.ModuleList,
                   nn.ModuleDict)
LINEAR_MODULES = (nn.Linear, nn.Conv2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.BatchNorm1d, nn.BatchNorm2d)

# Functional calls and tensor methods a private tensor can take (per the shared op table).
SUPPORTED_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.neg, operator.matmul, operator.truediv, operator.getitem,
    torch.add, torch.sub, torch.mul, torch.neg, torch.matmul, torch.flatten, torch.reshape, torch.cat, torch.square,
    torch.sum, torch.mean, torch.relu, torch.sigmoid, torch.tanh, torch.softmax,
    F.linear, F.conv2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.max_pool2d, F.relu, F.leaky_relu, F.gelu, F.silu,
    F.sigmoid, F.tanh, F.softplus, F.softmax, F.dropout, F.batch_norm, getattr, operator.pow, torch.pow,
    PF.polyval,
}
SUPPORTED_METHODS = {
    "add", "sub", "mul", "neg", "matmul", "flatten", "view", "reshape", "size", "dim", "sum", "mean", "relu",
    "sigmoid", "tanh", "softmax", "square", "contiguous", "float", "pow", "__add__", "__mul__", "__sub__",
}
INPLACE_METHODS_HINT = "in-place writes into a private tensor are not supported"
NONPOLY_ACTIVATIONS = {torch.relu, F.relu, F.leaky_relu, F.gelu, F.silu, F.sigmoid, torch.sigmoid, torch.tanh,
                       F.tanh, F.softplus, "relu", "sigmoid", "tanh"}


def _module_problems(model: nn.Module, backend: str) -> list[Problem]:
    problems: list[Problem] = []
    if model.training:
        problems.append(Problem("", "training_mode", "the model is in training mode (dropout/BatchNorm statistics "
                                "would differ).", "call model.eval() (privml.compile does).", "fixable"))
    for name, mod in model.named_modules():
        if getattr(mod, "inplace", False):
            problems.append(Problem(name, "inplace", f"{type(mod).__name__}(inplace=True) writes into its input; "
                                    "private tensors are immutable.", "replace with inplace=False.", "fixable"))
        if isinstance(mod, nn.MaxPool2d) and backend in ("ckks", "hybrid"):
            problems.append(Problem(name, "maxpool", "MaxPool2d needs comparisons, which CKKS cannot compute "
                                    "exactly.", "compile(..., replace_maxpool=True) swaps it for AvgPool2d with the "
                                    "same window (changes the function: retrain or fine-tune).", "error"))
        elif isinstance(mod, ACTIVATION_MODULES) and backend in ("ckks", "hybrid"):
            problems.append(Problem(name, "approximated", f"{type(mod).__name__} is not a polynomial: it will be "
                                    "replaced by a polynomial fitted on its calibrated input range.", None, "info"))
        elif isinstance(mod, (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d)):
            problems.append(Problem(name, "unsupported", f"{type(mod).__name__} divides by a data-dependent standard "
                                    "deviation, which privml cannot compute on private values yet.",
                                    "use BatchNorm (folded at compile time) instead.", "error"))
        elif isinstance(mod, (nn.RNNBase, nn.Embedding, nn.EmbeddingBag, nn.MultiheadAttention, nn.Transformer,
                              nn.TransformerEncoderLayer, nn.Conv1d, nn.Conv3d, nn.ConvTranspose2d, nn.Upsample,
                              nn.LPPool2d, nn.AdaptiveMaxPool2d)):
            problems.append(Problem(name, "unsupported", f"{type(mod).__name__} is not supported by privml yet.",
                                    None, "error"))
        elif isinstance(mod, nn.Softmax) and backend != "plain":
            problems.append(Problem(name, "client_side", "Softmax is left to the client: the server returns logits "
                                    "and the client applies softmax/argmax after decryption.", None, "info"))
    return problems


def _graph_problems(gm: fx.GraphModule, backend: str) -> list[Problem]:
    problems: list[Problem] = []
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        label = node_label(node)
        if node.op == "call_function":
            target = node.target
            tname = getattr(target, "__name__", str(target))
            if target in (operator.setitem, operator.iadd, operator.imul, operator.isub) or tname.endswith("_"):
                problems.append(Problem(label, "inplace", f"{tname} writes in place into a tensor; "
                                        f"{INPLACE_METHODS_HINT}.", "use the out-of-place form.", "error"))
            elif target is operator.truediv and isinstance(node.args[1], fx.Node):
                problems.append(Problem(label, "unsupported", "division by a (possibly private) tensor is not "
                                        "available; divide by a public constant.", None, "error"))
            elif target not in SUPPORTED_FUNCTIONS:
                problems.append(Problem(label, "unsupported", f"function {getattr(target, '__module__', '')}."
                                        f"{tname} has no private implementation.", None, "error"))
            elif target is F.max_pool2d and backend in ("ckks", "hybrid"):
                problems.append(Problem(label, "maxpool", "max_pool2d needs comparisons, which CKKS cannot compute "
                                        "exactly.", "compile(..., replace_maxpool=True) uses avg_pool2d.", "error"))
        elif node.op == "call_method":
            if node.target in ("item", "tolist", "numpy", "__bool__"):
                problems.append(Problem(label, "data_access", f".{node.target}() reads private values in clear.",
                                        "do this on the client after decryption.", "error"))
            elif node.target.endswith("_") and not node.target.startswith("__"):
                problems.append(Problem(label, "inplace", f".{node.target}() writes in place; "
                                        f"{INPLACE_METHODS_HINT}.", "use the out-of-place method.", "error"))
            elif node.target not in SUPPORTED_METHODS:
                problems.append(Problem(label, "unsupported", f"tensor method .{node.target}() has no private "
                                        "implementation.", None, "error"))
        elif node.op == "call_module":
            mod = modules[node.target]
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                prev = node.args[0]
                foldable = (isinstance(prev, fx.Node) and prev.op == "call_module" and len(prev.users) == 1
                            and isinstance(modules[prev.target], (nn.Conv2d, nn.Linear)))
                if foldable:
                    problems.append(Problem(label, "batchnorm", f"{type(mod).__name__} follows {prev.target}.",
                                            f"fold it into {prev.target} (exact; privml.compile does).", "fixable"))
                else:
                    problems.append(Problem(label, "batchnorm", f"{type(mod).__name__} does not directly follow a "
                                            "conv/linear layer; it runs as a per-channel affine map (one plaintext "
                                            "multiply).", None, "info"))
            known = isinstance(mod, ACTIVATION_MODULES + NEUTRAL_MODULES + LINEAR_MODULES + (nn.MaxPool2d, nn.Softmax))
            custom_leaf = type(mod).__module__.startswith("privml.")
            flagged = isinstance(mod, (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.RNNBase,
                                       nn.Embedding, nn.EmbeddingBag, nn.MultiheadAttention, nn.Transformer,
                                       nn.TransformerEncoderLayer, nn.Conv1d, nn.Conv3d, nn.ConvTranspose2d,
                                       nn.Upsample, nn.LPPool2d, nn.AdaptiveMaxPool2d))
            if not (known or custom_leaf or flagged):
                problems.append(Problem(label, "unsupported", f"module type {type(mod).__name__} has no private "
                                        "implementation.", None, "error"))
    return problems


def validate(model: nn.Module, backend: str = "ckks") -> list[Problem]:
    """Every problem that stops ``model`` from running privately on ``backend``, module walk and graph."""
    if backend not in BACKENDS:
        raise PrivmlError(f"privml: unknown backend {backend!r}; choose one of {BACKENDS}")
    problems = _module_problems(model, backend)
    try:
        gm = capture(model)
    except UnsupportedModule as err:
        return problems + err.problems
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
            ref, got = original(example_input), gm(example_input)
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
