"""CrypTen's fixed-point encoding and the one headroom bound every privml check uses.

CrypTen encodes a real ``v`` as the ring element ``round(v * 2^f)`` of Z_{2^64} (``f = 16`` fractional
bits), read as a signed integer in ``[-2^63, 2^63)``. A product of two encoded values carries scale
``2^(2 f)`` until it is truncated, so its value ``p`` must satisfy ``|p| * 2^(2 f) < 2^63``, i.e.
``|p| < 2^(63 - 2 f) = 2^31`` for ``f = 16``: beyond that the product wraps around silently.
Every value a private computation produces may be such a product (or feed one with a weight of
magnitude about 1), so privml checks each result against this one bound.
"""

from __future__ import annotations

from typing import Any

import torch

FRAC_BITS = 16
"""CrypTen's default number of fractional bits."""

RING_BITS = 64
"""CrypTen's ring: Z_{2^64}, signed."""


def fixed_point_limit(frac_bits: int = FRAC_BITS, ring_bits: int = RING_BITS) -> float:
    """Largest |value| a product may reach before its double-scale encoding (value * 2^(2 f)) wraps the ring."""
    return 2.0 ** (ring_bits - 1 - 2 * frac_bits)


def decode(ring: torch.Tensor, scale: int = 2**FRAC_BITS) -> torch.Tensor:
    """The real values (float32) of signed ring elements ``ring`` (int64) at fixed-point ``scale``.

    CrypTen 0.4.1's ``FixedPointEncoder.decode`` floor-divides a negative element by ``scale - 1``
    instead of ``scale``: for ``t = -m * scale + r`` with ``0 < r < m`` it returns ``-m - 1 + r / scale``,
    1.0 too low (about 0.8% of values in [-1000, 0)). Here ``t = q * scale + r`` with ``q = floor(t / scale)``
    and ``0 <= r < scale``, both exact in float64, and the sum is rounded once to float32.
    """
    if ring.dtype != torch.int64:
        raise TypeError(f"ring elements must be int64, got {ring.dtype}")
    q = ring.div(scale, rounding_mode="floor")
    r = ring - q * scale
    return (q.double() + r.double() / scale).float()


def open_plain(payload: Any, dst: int | None = None) -> torch.Tensor | None:
    """Open a CrypTen tensor (to party ``dst``, None: everyone) and decode it with :func:`decode`.

    Replaces ``payload.get_plain_text(dst)``, which goes through CrypTen's faulty decoder.
    Parties other than ``dst`` get None.
    """
    if payload.nelement() < 1:
        return torch.empty(tuple(payload.size()))
    ring = payload.reveal(dst=dst)
    return None if ring is None else decode(ring, int(payload.encoder.scale))
