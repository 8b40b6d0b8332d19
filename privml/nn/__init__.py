"""Polynomial activations that ``privml.compile`` puts in place of ReLU, GELU, sigmoid..., fixed or trainable,
and ``PolyLayerNorm`` (LayerNorm with a polynomial inverse square root, for CKKS)."""

from privml.nn.norm import PolyLayerNorm
from privml.nn.poly import (
    APPROX_MODULES,
    CompositeRelu,
    PolyActivation,
    out_of_range_counts,
    range_penalty,
    reset_range_counters,
    set_trainable,
)

__all__ = ["APPROX_MODULES", "CompositeRelu", "PolyActivation", "PolyLayerNorm", "out_of_range_counts", "range_penalty",
           "reset_range_counters", "set_trainable"]
