"""Trainable polynomial activations that ``privml.compile`` puts in place of ReLU, GELU, sigmoid..."""

from privml.nn.poly import PolyActivation

__all__ = ["PolyActivation"]
