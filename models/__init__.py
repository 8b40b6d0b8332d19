"""Plain PyTorch reference networks (nothing privml-specific inside) and a name registry."""

from __future__ import annotations

from torch import nn

from models.breast_cancer import BreastCancerLogReg, BreastCancerMLP
from models.digits import DigitsCNN
from models.lenet import LeNet5
from models.mnist_tutorial import Square, TutorialCNN
from models.resnet import BasicBlock, SmallResNet

MODELS: dict[str, type[nn.Module]] = {
    "digits_cnn": DigitsCNN,
    "breast_cancer_mlp": BreastCancerMLP,
    "breast_cancer_logreg": BreastCancerLogReg,
    "mnist_tutorial": TutorialCNN,
    "lenet5": LeNet5,
    "resnet_digits": SmallResNet,
}


def build_model(name: str, **kwargs) -> nn.Module:
    """Instantiate the registered model ``name`` with ``kwargs``; unknown names raise ``ValueError``."""
    try:
        cls = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}") from None
    return cls(**kwargs)


__all__ = [
    "MODELS",
    "BasicBlock",
    "BreastCancerLogReg",
    "BreastCancerMLP",
    "DigitsCNN",
    "LeNet5",
    "SmallResNet",
    "Square",
    "TutorialCNN",
    "build_model",
]
