"""The modulus chain of a SEAL context: per-level parms ids, primes, bit counts and canonical scales.

Scale management.  Every level ``l`` (SEAL chain index, 0 = last) has one canonical
scale ``scale_at(l)``: ``S[0] = 2**scale_bits`` and ``S[l] = sqrt(S[l-1] * q_l)`` where
``q_l`` is the prime dropped by rescaling from level ``l``.  Then a ct-ct product of two
canonical ciphertexts at level ``l`` rescales to exactly ``S[l-1]`` (``S[l]**2 / q_l``),
and a ct-pt product whose plaintext is encoded at ``S[l-1] * q_l / ct.scale`` does too.
"""

from __future__ import annotations

import math
from typing import Any

from privml.errors import InvalidInput, KeyMaterialError


class ModulusChain:
    """Levels of one SEAL context, indexed by chain index (0 = last level, ``max_level`` = fresh ciphertexts)."""

    def __init__(self, seal_context: Any, scale_bits: int) -> None:
        data = seal_context.first_context_data()
        top = data.chain_index()
        self._parms_ids: list[list[int]] = [None] * (top + 1)  # type: ignore[list-item]
        self._bits = [0] * (top + 1)
        self._primes: list[int] = []
        while data is not None:
            idx = data.chain_index()
            self._parms_ids[idx] = list(data.parms_id())
            self._bits[idx] = data.total_coeff_modulus_bit_count()
            if idx == top:
                self._primes = [m.value() for m in data.parms().coeff_modulus()]
            data = data.next_context_data()
        self._level_of = {tuple(p): i for i, p in enumerate(self._parms_ids)}
        self._scales = [2.0**scale_bits]
        for lvl in range(1, top + 1):
            self._scales.append(math.sqrt(self._scales[-1] * self._primes[lvl]))

    @property
    def max_level(self) -> int:
        """Chain index of the first data level (where fresh ciphertexts live)."""
        return len(self._parms_ids) - 1

    def check_level(self, level: int) -> None:
        """InvalidInput unless ``level`` is a chain index of this context."""
        if not 0 <= level <= self.max_level:
            raise InvalidInput(f"level must be in [0, {self.max_level}], got {level}")

    def parms_id(self, level: int) -> list[int]:
        """SEAL parms id of ``level`` (unchecked: call :meth:`check_level` first on untrusted input)."""
        return self._parms_ids[level]

    def prime(self, level: int) -> int:
        """The prime a rescale from ``level`` divides by."""
        return self._primes[level]

    def bits(self, level: int) -> int:
        """Bits of the coefficient modulus at ``level``: a scale must stay below 2**(bits - 1)."""
        return self._bits[level]

    def scale_at(self, level: int) -> float:
        """Canonical scale of a ciphertext at ``level``."""
        return self._scales[level]

    def level_of(self, ct: Any) -> int:
        """Chain index of ``ct``; KeyMaterialError for a ciphertext of another chain."""
        try:
            return self._level_of[tuple(ct.parms_id())]
        except KeyError:
            raise KeyMaterialError("ciphertext does not belong to this context's modulus chain") from None
        except AttributeError:
            raise InvalidInput(f"expected a SEAL Ciphertext, got {type(ct).__name__}") from None
