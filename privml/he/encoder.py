"""CKKS encoding and decoding at exact per-level scales, with a bounded cache for constant plaintexts."""

from __future__ import annotations

import math
import threading
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


class PlaintextCache:
    """Encoded constant plaintexts by key within a byte budget. A plaintext depends on the CKKS parameters only,
    never on keys, so contexts of equal parameters may share one (a service's clients of one plan encode the
    model's diagonals once): :meth:`privml.he.context.CKKSContext.share_plaintexts`."""

    def __init__(self, budget: int = DEFAULT_CACHE_BYTES) -> None:
        self.budget = budget
        self.used = 0
        self.items: dict[Hashable, tuple[Any, int]] = {}
        self.lock = threading.Lock()  # threads of one service share it

    def get(self, key: Hashable) -> Any:
        hit = self.items.get(key)
        return None if hit is None else hit[0]

    def put(self, key: Hashable, pt: Any, size: int) -> None:
        with self.lock:
            if key not in self.items and self.used + size <= self.budget:
                self.items[key] = (pt, size)
                self.used += size

    def clear(self) -> None:
        with self.lock:
            self.items.clear()
            self.used = 0


class Encoder:
    """SEAL's CKKS encoder bound to a modulus chain; counts encodes in ``stats["encodes"]`` (a shared dict)."""

    def __init__(self, seal_context: Any, chain: ModulusChain, poly_modulus_degree: int, stats: dict[str, int]) -> None:
        self._encoder = seal.CKKSEncoder(seal_context)
        self._chain = chain
        self._poly_modulus_degree = poly_modulus_degree
        self._stats = stats
        self.slots = poly_modulus_degree // 2
        self.cache = PlaintextCache()

    @property
    def cache_bytes(self) -> int:
        return self.cache.budget

    @cache_bytes.setter
    def cache_bytes(self, value: int) -> None:
        self.cache.budget = value

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
            hit = self.cache.get(ckey)
            if hit is not None:
                return hit
        if callable(values):
            values = values()
        vals = values if np.ndim(values) == 0 else check_values(values, self.slots)
        pt = self.encode_raw(vals, level, scale)
        if key is not None:
            self.cache.put(ckey, pt, 8 * self._poly_modulus_degree * (level + 1))
        return pt

    def clear_cache(self) -> None:
        """Drop every cached plaintext."""
        self.cache.clear()

    def decode(self, pt: Any) -> np.ndarray:
        """All ``slots`` values of a plaintext."""
        return np.array(self._encoder.decode_double(pt))
