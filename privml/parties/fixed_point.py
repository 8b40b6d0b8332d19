"""CrypTen's fixed-point encoding and the one headroom bound every privml check uses.

CrypTen encodes a real ``v`` as the ring element ``round(v * 2^f)`` of Z_{2^64} (``f = 16`` fractional
bits), read as a signed integer in ``[-2^63, 2^63)``. A product of two encoded values carries scale
``2^(2 f)`` until it is truncated, so its value ``p`` must satisfy ``|p| * 2^(2 f) < 2^63``, i.e.
``|p| < 2^(63 - 2 f) = 2^31`` for ``f = 16``: beyond that the product wraps around silently.
Every value a private computation produces may be such a product (or feed one with a weight of
magnitude about 1), so privml checks each result against this one bound.
"""

from __future__ import annotations

FRAC_BITS = 16
"""CrypTen's default number of fractional bits."""

RING_BITS = 64
"""CrypTen's ring: Z_{2^64}, signed."""


def fixed_point_limit(frac_bits: int = FRAC_BITS, ring_bits: int = RING_BITS) -> float:
    """Largest |value| a product may reach before its double-scale encoding (value * 2^(2 f)) wraps the ring."""
    return 2.0 ** (ring_bits - 1 - 2 * frac_bits)
