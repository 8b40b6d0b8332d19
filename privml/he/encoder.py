"""CKKS encoding and decoding at exact per-level scales, with a bounded cache for constant plaintexts."""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Any

import numpy as np

from privml.errors import InvalidInput, RangeViolation
from privml.he.chain import ModulusChain
from privml.he.sealio import seal

DEFAULT_CACHE_BYTES = 1 << 30  # plaintext cache budget per context


def check_values(values: Any, slots: int, what: str = "values") -> np.ndarray:
    """``values`` as a float64 1-D array of at most ``slots`` finite reals; InvalidInput otherwise."""
    try:
        arr = np.asarray(values)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"{what} must be a 1-D array of real numbers: {exc}") from exc
    if arr.dtype.kind not in "fiub":
        raise InvalidInput(f"{what} must be real numbers, got dtype {arr.dtype}")
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim != 1:
        raise InvalidInput(f"{what} must be a 1-D array, got shape {arr.shape}")
    if arr.size > slots:
        raise InvalidInput(f"{what} has {arr.size} entries but a ciphertext holds {slots} slots")
    if not np.all(np.isfinite(arr)):
        raise InvalidInput(f"{what} contain NaN or inf")
    return arr


class Encoder:
    """SEAL's CKKS encoder bound to a modulus chain; counts encodes in ``stats["encodes"]`` (a shared dict)."""

    def __init__(self, seal_context: Any, chain: ModulusChain, poly_modulus_degree: int, stats: dict[str, int]) -> None:
        self._encoder = seal.CKKSEncoder(seal_context)
        self._chain = chain
        self._poly_modulus_degree = poly_modulus_degree
        self._stats = stats
        self.slots = poly_modulus_degree // 2
        self.cache_bytes = DEFAULT_CACHE_BYTES
        self._cache: dict[Hashable, Any] = {}
        self._cache_used = 0

    def encode_raw(self, values: Any, level: int, scale: float) -> Any:
        """Plaintext of a checked array or a scalar at ``level`` and ``scale``; RangeViolation if it does not fit."""
        pt = seal.Plaintext()
        pid = self._chain.parms_id(level)
        try:
            if np.ndim(values) == 0:
                v = float(values)
                if not math.isfinite(v):
                    raise InvalidInput(f"scalar {values!r} is not finite")
                self._encoder.encode(v, pid, scale, pt)
            else:
                self._encoder.encode(values.tolist(), pid, scale, pt)
        except ValueError as exc:
            if isinstance(exc, InvalidInput):
                raise
            raise RangeViolation(
                f"cannot encode at level {level} with scale 2^{math.log2(scale):.1f}: {exc} "
                "(values too large for the remaining modulus)"
            ) from exc
        self._stats["encodes"] += 1
        return pt

    def encode(self, values: Any, level: int, scale: float, key: Hashable | None = None) -> Any:
        """Plaintext of ``values`` (1-D array or scalar) at ``level`` and ``scale``, all checked.

        With ``key``, the result is cached under ``(key, level, scale)`` while the cache stays within
        ``cache_bytes``; once full, new plaintexts are encoded but not kept (no eviction: a forward pass uses
        its plaintexts in the same order every time, so an LRU smaller than one pass would evict each one just
        before its next use and never hit). ``values`` may be a zero-argument callable, called only on a miss.
        """
        self._chain.check_level(level)
        if not (scale > 0 and math.isfinite(scale)):
            raise InvalidInput(f"scale must be positive and finite, got {scale}")
        if key is not None:
            ckey = (key, level, float(scale))
            hit = self._cache.get(ckey)
            if hit is not None:
                return hit[0]
        if callable(values):
            values = values()
        vals = values if np.ndim(values) == 0 else check_values(values, self.slots)
        pt = self.encode_raw(vals, level, scale)
        if key is not None:
            size = 8 * self._poly_modulus_degree * (level + 1)
            if self._cache_used + size <= self.cache_bytes:
                self._cache[ckey] = (pt, size)
                self._cache_used += size
        return pt

    def clear_cache(self) -> None:
        """Drop every cached plaintext (and cache nothing more until ``cache_bytes`` is raised again)."""
        self._cache.clear()
        self._cache_used = 0

    def decode(self, pt: Any) -> np.ndarray:
        """All ``slots`` values of a plaintext."""
        return np.array(self._encoder.decode_double(pt))
