"""CKKS noise bounds and noise flooding (IND-CPA-D), in value units (slot error = canonical noise / scale).

Bounds are the high-probability canonical-embedding bounds of Cheon, Kim, Kim, Song (ASIACRYPT 2017,
Lemmas 1-3), evaluated for SEAL's error distribution (sigma = 3.2) and a ternary secret of Hamming weight
``h = N`` (the most a ternary secret can have): they hold for *any* input within the plan's bounds, not an
average over measured runs (flooding sized from average-case estimates is attackable: Guo et al., USENIX
Security 2024). They are propagated through the plan's operations with worst-case operator norms
(``||W||_inf``, the largest row sum of |weights|), so they bound every slot of every ciphertext.

Flooding (Li, Micciancio, Schultz, Sorrell, CRYPTO 2022): before a decryption result is revealed or
re-encrypted, add Gaussian noise of standard deviation ``sqrt(24 n alpha) 2^(s/2) B`` for ``alpha``
revealed decryptions of ``n`` coefficients at statistical security ``s`` (>= 30) and noise bound ``B``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from privml.errors import InvalidInput

ERROR_STD = 3.2  # SEAL's noise standard deviation
MIN_SECURITY_BITS = 30
TAIL = 6.0  # a Gaussian exceeds 6 standard deviations with probability ~2e-9 per value


def fresh_symmetric(n: int) -> float:
    """Canonical noise of a secret-key encryption: ||e||_can <= 6 sigma sqrt(N)."""
    return TAIL * ERROR_STD * math.sqrt(n)


def fresh_public(n: int) -> float:
    """Canonical noise of a public-key encryption: 8 sqrt(2) sigma N + 6 sigma sqrt(N) + 16 sigma sqrt(h N)."""
    return 8 * math.sqrt(2) * ERROR_STD * n + TAIL * ERROR_STD * math.sqrt(n) + 16 * ERROR_STD * math.sqrt(n * n)


def rescale(n: int) -> float:
    """Rounding noise of a rescale: sqrt(N/3) (3 + 8 sqrt(h))."""
    return math.sqrt(n / 3) * (3 + 8 * math.sqrt(n))


def key_switch(n: int, primes: int = 1) -> float:
    """Noise a rotation or relinearization adds after the special-prime division: 8 sigma N / sqrt(3) per
    RNS digit (SEAL decomposes over the ``primes`` data primes at the level; each q_i is at most the special prime)."""
    return 8 * ERROR_STD * n / math.sqrt(3) * max(1, primes)


@dataclass(frozen=True)
class NoiseModel:
    """Per-op noise increments in value units for one ring dimension and scale."""

    n: int
    scale_bits: float
    primes: int = 1  # data primes at the deepest level a key switch runs (conservative: the top)

    @property
    def unit(self) -> float:
        return 2.0 ** -self.scale_bits

    @property
    def fresh(self) -> float:
        return fresh_symmetric(self.n) * self.unit

    @property
    def fresh_public(self) -> float:
        return fresh_public(self.n) * self.unit

    @property
    def rs(self) -> float:
        return rescale(self.n) * self.unit

    @property
    def ks(self) -> float:
        return key_switch(self.n, self.primes) * self.unit

    @property
    def enc(self) -> float:
        """Rounding error of an encoded plaintext, relative to its values (coefficients rounded to integers)."""
        return TAIL * math.sqrt(self.n / 12) * self.unit

    def affine(self, noise: float, norm: float, babies: int = 0, giants: int = 0, terms: int = 0,
               bound: float = 0.0) -> float:
        """A baby-step giant-step diagonal product: each term comes from at most ``babies`` chained rotations
        (weighted by |w|, summing to at most ``norm``), then ``giants`` rotations of partial sums, one rescale;
        each of the ``terms`` encoded weights per output adds its rounding times |x| <= ``bound``."""
        return norm * (noise + babies * self.ks) + giants * self.ks + self.rs + terms * bound * self.enc

    def product(self, na: float, nb: float, bound: float) -> float:
        """a * b for |a|, |b| <= bound: cross terms, relinearization, rescale."""
        return bound * (na + nb) + na * nb + self.ks + self.rs

    def scalar(self, noise: float, factor: float, bound: float = 0.0) -> float:
        """Multiplication by plaintext values of magnitude <= factor (one rescale; their rounding times |x|)."""
        return factor * noise + self.rs + bound * factor * self.enc


def flood_factor(n: int, alpha: int, security_bits: int = MIN_SECURITY_BITS) -> float:
    """sqrt(24 n alpha) 2^(s/2): the flooding standard deviation per unit of noise bound."""
    if security_bits < MIN_SECURITY_BITS:
        raise InvalidInput(f"privml: flooding needs statistical security >= {MIN_SECURITY_BITS} bits, "
                           f"got {security_bits}")
    if alpha < 1 or n < 1:
        raise InvalidInput(f"privml: flooding needs alpha >= 1 decryptions and n >= 1, got {alpha}, {n}")
    return math.sqrt(24.0 * n * alpha) * 2.0 ** (security_bits / 2)


def flood_sigma(noise_bound: float, n: int, alpha: int, security_bits: int = MIN_SECURITY_BITS) -> float:
    """Standard deviation (value units) of the Gaussian added to decrypted values with noise <= noise_bound."""
    if not math.isfinite(noise_bound) or noise_bound <= 0:
        raise InvalidInput(f"privml: the noise bound must be positive and finite, got {noise_bound!r}")
    return flood_factor(n, alpha, security_bits) * noise_bound


def precision_cost_bits(n: int, alpha: int, security_bits: int = MIN_SECURITY_BITS) -> float:
    """Bits of precision flooding spends: log2 of the flood factor."""
    return math.log2(flood_factor(n, alpha, security_bits))


# --------------------------------------------------------------------------------------------- randomness
def secure_uniform(n: int, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    """``n`` uniforms in [low, high) from the OS CSPRNG (53 random bits each): masks must not be predictable
    from earlier ones, which a seeded PRNG such as PCG cannot promise once its outputs are seen."""
    raw = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
    return low + (high - low) * (raw.astype(np.float64) * 2.0**-53)


def secure_normal(n: int, sigma: float) -> np.ndarray:
    """``n`` Gaussians of standard deviation ``sigma`` from CSPRNG uniforms (Box-Muller)."""
    m = (n + 1) // 2
    u1 = 1.0 - secure_uniform(m)  # (0, 1]: log is finite
    u2 = secure_uniform(m)
    r = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([r * np.cos(2 * math.pi * u2), r * np.sin(2 * math.pi * u2)])[:n]
    return sigma * z
