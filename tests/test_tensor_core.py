"""The PrivateTensor base: tensor-ness, metadata pass-through, storage-free repr, op tables and errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from privml.backends.plain import PlainBackend, PlainTensor
from privml.errors import UnsupportedOperation
from privml.tensor import PrivateTensor, module_scope


def test_is_a_tensor_with_logical_metadata() -> None:
    x = PlainBackend().encrypt(torch.randn(3, 1, 8, 8))
    assert isinstance(x, torch.Tensor) and isinstance(x, PrivateTensor)
    assert x.shape == (3, 1, 8, 8) and x.dim() == 4 and x.size(0) == 3 and x.ndim == 4
    assert x.dtype == torch.float32 and x.numel() == 192 and len(x) == 3


def test_repr_never_touches_storage() -> None:
    x = PlainBackend().encrypt(torch.randn(2, 5))
    text = repr(x)
    assert text.startswith("PlainTensor(shape=[2, 5]") and "simulation=" in text
    assert f"{x}" == text and str(x) == text


def test_declared_fields_are_enforced() -> None:
    with pytest.raises(TypeError, match="simulation"):
        PlainTensor(torch.zeros(2), (2,))
    with pytest.raises(TypeError, match="unexpected"):
        PlainTensor(torch.zeros(2), (2,), simulation=None, level=3)


class _Toy(PrivateTensor):
    backend_name = "toy"
    metadata_fields = ("tag",)


@_Toy.implements(torch.nn.functional.relu)
def _toy_relu(func: object, types: tuple, args: tuple, kwargs: dict) -> _Toy:
    x = args[0]
    return _Toy(x.payload.clamp_min(0), x.shape, tag=x.tag + "+relu")


def test_op_tables_are_per_class() -> None:
    t = _Toy(torch.tensor([-1.0, 2.0]), (2,), tag="t")
    out = torch.nn.functional.relu(t)
    assert out.tag == "t+relu" and torch.equal(out.payload, torch.tensor([0.0, 2.0]))
    assert torch.nn.functional.relu not in PlainTensor._function_table or \
        PlainTensor._function_table[torch.nn.functional.relu] is not _toy_relu
    with pytest.raises(UnsupportedOperation, match=r"torch\.nn\.functional\.linear.*_Toy.*toy backend"):
        torch.nn.functional.linear(t, torch.ones(1, 2))


def test_unsupported_op_names_the_module() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Identity(), nn.Softmin(dim=-1)))
    x = PlainBackend().encrypt(torch.randn(2, 4))
    with module_scope(model), pytest.raises(UnsupportedOperation) as info:
        model(x)
    msg = str(info.value)
    assert "softmin" in msg and "in module '1.1'" in msg and "PlainTensor[2, 4]" in msg


def test_mixing_backends_is_refused() -> None:
    a = PlainBackend().encrypt(torch.randn(2))
    b = _Toy(torch.randn(2), (2,), tag="x")
    with pytest.raises(UnsupportedOperation, match="different backends"):
        a + b


def test_supported_ops_lists_names() -> None:
    names = PlainTensor.supported_ops()
    assert "linear" in names and "conv2d" in names and "layer_norm" in names
    assert "max_pool2d" in names
