"""Reference models: output shapes, exact parameter counts, tutorial layer shapes, registry errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import models
from models import MODELS, build_model
from models.breast_cancer import BreastCancerLogReg, BreastCancerMLP
from models.digits import DigitsCNN
from models.lenet import LeNet5
from models.mnist_tutorial import Square, TutorialCNN
from models.resnet import BasicBlock, SmallResNet


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def lin(i: int, o: int) -> int:
    return i * o + o


def conv(i: int, o: int, k: int, bias: bool = True) -> int:
    return i * o * k * k + (o if bias else 0)


# (factory, input shape, output classes, parameter count worked out by hand from the layer list)
CASES = {
    "digits_cnn": (DigitsCNN, (5, 1, 8, 8), 10, conv(1, 8, 3) + conv(8, 16, 3) + lin(64, 32) + lin(32, 10)),
    "breast_cancer_mlp": (BreastCancerMLP, (5, 30), 2, lin(30, 16) + lin(16, 2)),
    "breast_cancer_logreg": (BreastCancerLogReg, (5, 30), 2, lin(30, 2)),
    "mnist_tutorial": (TutorialCNN, (5, 1, 28, 28), 10, conv(1, 4, 7) + lin(256, 64) + lin(64, 10)),
    "lenet5": (
        LeNet5,
        (5, 1, 28, 28),
        10,
        conv(1, 6, 5) + conv(6, 16, 5) + lin(400, 120) + lin(120, 84) + lin(84, 10),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_shape_and_exact_parameter_count(name: str) -> None:
    factory, shape, classes, expected = CASES[name]
    torch.manual_seed(0)
    model = factory()
    out = model(torch.randn(shape))
    assert out.shape == (shape[0], classes)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert n_params(model) == expected


def test_registry_covers_every_model_and_builds_with_kwargs() -> None:
    assert set(MODELS) == set(CASES) | {"resnet_digits"}
    assert isinstance(build_model("digits_cnn"), DigitsCNN)
    mlp = build_model("breast_cancer_mlp", hidden=8)
    assert mlp.fc1.out_features == 8 and mlp(torch.randn(3, 30)).shape == (3, 2)


def test_build_model_unknown_name_lists_known_names() -> None:
    with pytest.raises(ValueError, match="digits_cnn") as info:
        build_model("nope")
    assert "nope" in str(info.value)


def test_models_package_imports_nothing_from_privml() -> None:
    import inspect
    import re
    from pathlib import Path

    for path in Path(inspect.getfile(models)).parent.glob("*.py"):
        assert not re.search(r"^\s*(from|import)\s+privml", path.read_text(), re.M), path


def test_tutorial_cnn_layer_shapes_match_tenseal_tutorial() -> None:
    model = TutorialCNN()
    conv1 = model.conv1
    assert (conv1.in_channels, conv1.out_channels, conv1.kernel_size, conv1.stride, conv1.padding) == (
        1,
        4,
        (7, 7),
        (3, 3),
        (0, 0),
    )
    assert (model.fc1.in_features, model.fc1.out_features) == (256, 64)
    assert (model.fc2.in_features, model.fc2.out_features) == (64, 10)
    x = torch.randn(2, 1, 28, 28)
    feats = model.conv1(x)
    assert feats.shape == (2, 4, 8, 8)  # 4 * 8 * 8 = 256 features
    # The forward is exactly conv -> square -> flatten -> fc1 -> square -> fc2.
    by_hand = model.fc2(model.fc1((feats * feats).flatten(1)) ** 2)
    torch.testing.assert_close(model(x), by_hand)


def test_square_is_x_times_x() -> None:
    x = torch.tensor([-3.0, -0.5, 0.0, 2.0])
    torch.testing.assert_close(Square()(x), torch.tensor([9.0, 0.25, 0.0, 4.0]))


def test_lenet5_activation_and_input_size() -> None:
    relu = LeNet5()
    assert sum(isinstance(m, nn.ReLU) for m in relu.modules()) == 4
    square = LeNet5(act=Square)
    assert sum(isinstance(m, Square) for m in square.modules()) == 4
    assert not any(isinstance(m, nn.ReLU) for m in square.modules())
    assert not any(isinstance(m, nn.MaxPool2d) for m in relu.modules())
    cifar = LeNet5(in_channels=3, in_size=32)
    assert cifar.fc1.in_features == 16 * 6 * 6
    assert cifar(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="in_size"):
        LeNet5(in_size=8)


def test_small_resnet_structure_and_shapes() -> None:
    torch.manual_seed(0)
    model = SmallResNet()
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 1 + 2 + 3
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 2
    assert isinstance(blocks[0].shortcut, nn.Identity)  # same shape: identity shortcut
    assert isinstance(blocks[1].shortcut[0], nn.Conv2d)  # channels/stride change: 1x1 conv shortcut
    assert blocks[1].shortcut[0].kernel_size == (1, 1)
    assert isinstance(model.pool, nn.AdaptiveAvgPool2d)
    assert n_params(model) < 10_000
    model.eval()
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 10)
    assert SmallResNet(in_channels=3, width=4)(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_basic_block_adds_shortcut_before_final_relu() -> None:
    torch.manual_seed(0)
    block = BasicBlock(4, 4).eval()
    x = torch.randn(2, 4, 8, 8)
    residual = block.bn2(block.conv2(block.act1(block.bn1(block.conv1(x)))))
    torch.testing.assert_close(block(x), torch.relu(residual + x))
