"""The activations privml approximates, as numpy functions, with their name lookup and parity detection."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.special import erf, expit

from privml.approx.basis import _values
from privml.errors import InvalidInput


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def leaky_relu(x: np.ndarray, slope: float = 0.01) -> np.ndarray:
    return np.where(x >= 0, x, slope * np.asarray(x, dtype=float))


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact GELU, 0.5 x (1 + erf(x / sqrt 2)) (torch's default, approximate='none')."""
    return 0.5 * x * (1.0 + erf(np.asarray(x, dtype=float) / math.sqrt(2.0)))


def silu(x: np.ndarray) -> np.ndarray:
    return x * expit(x)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return expit(x)


def tanh(x: np.ndarray) -> np.ndarray:
    return np.tanh(x)


def softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


def elu(x: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    return np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0.0)))


def hardtanh(x: np.ndarray, lo: float = -1.0, hi: float = 1.0) -> np.ndarray:
    return np.clip(x, lo, hi)


def hardswish(x: np.ndarray) -> np.ndarray:
    return x * np.clip(np.asarray(x, dtype=float) + 3.0, 0.0, 6.0) / 6.0


def hardsigmoid(x: np.ndarray) -> np.ndarray:
    return np.clip(np.asarray(x, dtype=float) / 6.0 + 0.5, 0.0, 1.0)


def inv_sqrt(x: np.ndarray) -> np.ndarray:
    """1 / sqrt(x) for x > 0 (LayerNorm's normaliser on its calibrated variance range)."""
    return 1.0 / np.sqrt(np.asarray(x, dtype=float))


def square(x: np.ndarray) -> np.ndarray:
    return np.square(x)


def abs_(x: np.ndarray) -> np.ndarray:
    return np.abs(x)


ACTIVATIONS: dict[str, Callable[..., np.ndarray]] = {
    "relu": relu, "leaky_relu": leaky_relu, "gelu": gelu, "silu": silu, "sigmoid": sigmoid, "tanh": tanh,
    "softplus": softplus, "square": square, "abs": abs_, "elu": elu, "hardtanh": hardtanh, "hardswish": hardswish,
    "hardsigmoid": hardsigmoid, "inv_sqrt": inv_sqrt,
}
POSITIVE_DOMAIN = {"inv_sqrt"}
"""Functions defined only for x > 0 (fitted on positive intervals only)."""
PARAMS: dict[str, set[str]] = {"leaky_relu": {"slope"}, "elu": {"alpha"}, "hardtanh": {"lo", "hi"}}
"""The parameters each activation takes (the rest take none)."""


def lookup(name: str, params: dict[str, Any]) -> Callable[[np.ndarray], np.ndarray]:
    """The activation ``name`` with ``params`` bound (see ``PARAMS``); InvalidInput if unknown."""
    if name not in ACTIVATIONS:
        raise InvalidInput(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
    extra = set(params) - PARAMS.get(name, set())
    if extra:
        raise InvalidInput(f"activation {name!r} takes {sorted(PARAMS.get(name, set())) or 'no parameters'}, "
                           f"got {sorted(extra)}")
    fn = ACTIVATIONS[name]
    return (lambda x: fn(x, **params)) if params else fn


def detect_parity(f: Callable, a: float, b: float) -> str | None:
    """'odd'/'even' if f has that parity on the symmetric interval [a, b] = [-B, B], else None."""
    if a != -b:
        return None
    h = np.linspace(0.0, b, 1001)
    fp, fm = _values(f, h), _values(f, -h)
    scale = 1e-12 * (1.0 + np.max(np.abs(fp)))
    if np.max(np.abs(fp + fm)) <= scale:
        return "odd"
    if np.max(np.abs(fp - fm)) <= scale:
        return "even"
    return None
