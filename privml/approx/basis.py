"""Polynomial bases and the one depth rule every CKKS cost in privml uses."""

from __future__ import annotations


def poly_depth(degree: int) -> int:
    """CKKS levels of a degree-``degree`` polynomial in privml's schedule: ceil(log2(degree + 1)).

    The single source of this rule: the CKKS evaluator (``privml.he.kernels.eval_poly``) consumes
    exactly this many levels, and every planner, module and cost model asks this function.
    """
    degree = int(degree)
    if degree < 0:
        raise ValueError(f"polynomial degree must be >= 0, got {degree}")
    return degree.bit_length()
