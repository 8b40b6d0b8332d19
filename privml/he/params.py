"""CKKS parameter choice and validation.

A parameter set is a ring dimension N, a chain of prime bit sizes
``[first, middle * depth, special]`` and a scale ``2**scale_bits``.  The first
prime carries the final result (scale plus integer headroom), each middle prime
is consumed by one rescale, and the special prime is only used for key
switching.  ``choose_params`` picks the smallest N whose 128-bit budget
(HomomorphicEncryption.org standard, special prime included) holds the chain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from privml.errors import BudgetError, DepthExhausted, InvalidInput

# Max log2(Q*P) for 128-bit classical security with a ternary secret (special prime included).
HE_STANDARD_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}

MAX_PRIME_BITS = 60  # SEAL's limit on a single coefficient-modulus prime
MIN_SCALE_BITS = 20
MAX_SCALE_BITS = 40  # beyond this, double-precision encoding stops paying back
MARGIN_BITS = 2  # extra headroom in the first prime: values up to 4x max_abs_value still decode


def noise_bits(poly_modulus_degree: int) -> int:
    """Bits of the scale eaten by CKKS noise (max over all slots, a few ops deep).

    Measured on SEAL via TenSEAL: the max slot error after encrypt + one square is
    about 2**13.8 / scale at N=8192 and 2**15 / scale at N=16384; two bits of slack
    cover sums of a few hundred products.
    """
    return math.ceil(math.log2(poly_modulus_degree) / 2) + 9


def integer_bits(max_abs_value: float) -> int:
    """Bits needed left of the binary point for values of magnitude ``max_abs_value``."""
    if not math.isfinite(max_abs_value) or max_abs_value <= 0:
        raise InvalidInput(f"max_abs_value must be a positive finite number, got {max_abs_value!r}")
    return max(0, math.ceil(math.log2(max_abs_value)))


def headroom_bits(max_abs_value: float) -> int:
    """First prime bits above the scale: integer bits, sign bit and a safety margin."""
    return integer_bits(max_abs_value) + 1 + MARGIN_BITS


@dataclass(frozen=True)
class CKKSParams:
    """One CKKS parameter set; ``check()`` validates it (called by ``choose_params``)."""

    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int
    allow_insecure: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "coeff_mod_bit_sizes", tuple(int(b) for b in self.coeff_mod_bit_sizes))

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def depth(self) -> int:
        """Number of rescales available (the middle primes)."""
        return len(self.coeff_mod_bit_sizes) - 2

    @property
    def total_bits(self) -> int:
        return sum(self.coeff_mod_bit_sizes)

    @property
    def security_bits(self) -> int:
        """128 when within the HE standard table, else 0 (no claim)."""
        limit = HE_STANDARD_128.get(self.poly_modulus_degree)
        return 128 if limit is not None and self.total_bits <= limit else 0

    @property
    def max_value(self) -> float:
        """Largest magnitude that still decodes at the last level (first prime minus scale and sign)."""
        return 2.0 ** (self.coeff_mod_bit_sizes[0] - self.scale_bits - 1)

    def to_dict(self) -> dict:
        return {
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
            "scale_bits": self.scale_bits,
            "allow_insecure": self.allow_insecure,
        }

    @classmethod
    def from_dict(cls, d: dict) -> CKKSParams:
        try:
            params = cls(
                poly_modulus_degree=int(d["poly_modulus_degree"]),
                coeff_mod_bit_sizes=tuple(int(b) for b in d["coeff_mod_bit_sizes"]),
                scale_bits=int(d["scale_bits"]),
                allow_insecure=bool(d.get("allow_insecure", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"not a CKKSParams dict: {exc}") from exc
        params.check()
        return params

    def check(self) -> CKKSParams:
        """Raise BudgetError (or DepthExhausted) if the parameters are unusable or insecure."""
        n, chain, sb = self.poly_modulus_degree, self.coeff_mod_bit_sizes, self.scale_bits
        if n not in HE_STANDARD_128:
            raise BudgetError(f"poly_modulus_degree must be one of {sorted(HE_STANDARD_128)}, got {n}")
        if len(chain) < 2:
            raise DepthExhausted(f"coefficient modulus {list(chain)} needs at least a first and a special prime")
        bad = [b for b in chain if not 2 <= b <= MAX_PRIME_BITS]
        if bad:
            raise BudgetError(f"prime bit sizes must lie in [2, {MAX_PRIME_BITS}]; got {bad} in {list(chain)}")
        if not MIN_SCALE_BITS <= sb <= MAX_PRIME_BITS:
            raise BudgetError(f"scale_bits must lie in [{MIN_SCALE_BITS}, {MAX_PRIME_BITS}], got {sb}")
        middle = chain[1:-1]
        if middle and sb > min(middle):
            raise BudgetError(
                f"scale 2^{sb} is larger than the smallest middle prime (2^{min(middle)}): "
                "each rescale would lose precision; use middle primes of scale_bits bits"
            )
        if chain[0] < sb + 1:
            raise BudgetError(
                f"first prime ({chain[0]} bits) leaves no room above the scale (2^{sb}): "
                f"use at least {sb + 1 + MARGIN_BITS} bits (scale + sign + margin) plus the integer bits"
            )
        if chain[-1] < max(chain[:-1]):
            raise BudgetError(
                f"special prime ({chain[-1]} bits) must be at least the largest data prime "
                f"({max(chain[:-1])} bits) to keep key-switching noise small"
            )
        limit = HE_STANDARD_128[n]
        if self.total_bits > limit and not self.allow_insecure:
            raise BudgetError(
                f"coefficient modulus {list(chain)} has {self.total_bits} bits, over the 128-bit HE standard "
                f"limit of {limit} bits for N={n}: use a larger N or fewer/smaller primes "
                "(or allow_insecure=True for experiments only)"
            )
        return self


def _fit_scale(n: int, depth: int, head: int, s_min: int) -> int | None:
    """Largest scale (<= MAX_SCALE_BITS) whose chain fits N's 128-bit budget, or None."""
    budget = HE_STANDARD_128[n]
    s = min(MAX_SCALE_BITS, MAX_PRIME_BITS - head, (budget - 2 * head) // (depth + 2))
    return s if s >= s_min else None


def _min_scale(precision_bits: int, n: int) -> int:
    return max(MIN_SCALE_BITS, precision_bits + noise_bits(n))


def max_depth(precision_bits: int = 20, max_abs_value: float = 1.0, poly_modulus_degree: int = 32768) -> int:
    """Deepest chain that fits N's 128-bit budget at the smallest scale giving ``precision_bits``."""
    head = headroom_bits(max_abs_value)
    s = _min_scale(precision_bits, poly_modulus_degree)
    if s + head > MAX_PRIME_BITS:
        return -1
    return (HE_STANDARD_128[poly_modulus_degree] - 2 * (s + head)) // s


def choose_params(
    depth: int,
    max_abs_value: float = 1.0,
    precision_bits: int = 20,
    min_slots: int = 1,
    poly_modulus_degree: int | None = None,
    scale_bits: int | None = None,
    coeff_mod_bit_sizes: tuple | None = None,
    depth_breakdown: list[tuple[str, int]] | None = None,
    allow_insecure: bool = False,
) -> CKKSParams:
    """Pick the smallest N (then the largest scale) giving ``depth`` rescales at 128-bit security.

    First prime = scale + integer bits of ``max_abs_value`` + sign + margin; ``depth``
    middle primes of scale bits; special prime = first prime.  Overrides of N, scale or
    the whole chain are validated with the same checks.
    """
    if int(depth) != depth or depth < 0:
        raise InvalidInput(f"depth must be a non-negative integer, got {depth!r}")
    if precision_bits < 1:
        raise InvalidInput(f"precision_bits must be positive, got {precision_bits}")
    if min_slots < 1:
        raise InvalidInput(f"min_slots must be positive, got {min_slots}")
    depth = int(depth)
    head = headroom_bits(max_abs_value)
    sizes = sorted(HE_STANDARD_128)
    if poly_modulus_degree is not None:
        if poly_modulus_degree not in HE_STANDARD_128:
            raise BudgetError(f"poly_modulus_degree must be one of {sizes}, got {poly_modulus_degree}")
        if poly_modulus_degree // 2 < min_slots:
            raise BudgetError(f"N={poly_modulus_degree} gives {poly_modulus_degree // 2} slots < {min_slots}")
        sizes = [poly_modulus_degree]
    sizes = [n for n in sizes if n // 2 >= min_slots]
    if not sizes:
        raise BudgetError(f"no ring dimension gives {min_slots} slots (max {max(HE_STANDARD_128) // 2})")

    if coeff_mod_bit_sizes is not None:
        chain = tuple(int(b) for b in coeff_mod_bit_sizes)
        sb = int(scale_bits) if scale_bits is not None else (chain[1] if len(chain) > 2 else chain[0] - head)
        if len(chain) - 2 < depth:
            raise DepthExhausted(
                _depth_message(depth, depth_breakdown, precision_bits, max_abs_value, scale_bits, poly_modulus_degree)
                + f"; the given chain {list(chain)} has only {max(len(chain) - 2, 0)} middle primes"
            )
        candidates = [n for n in sizes if sum(chain) <= HE_STANDARD_128[n]] or (sizes[-1:] if allow_insecure else [])
        if not candidates:
            raise BudgetError(
                f"chain {list(chain)} ({sum(chain)} bits) exceeds the 128-bit limit of every allowed N "
                f"({', '.join(f'{n}: {HE_STANDARD_128[n]}' for n in sizes)})"
            )
        params = CKKSParams(candidates[0], chain, sb, allow_insecure).check()
        if chain[0] < sb + head:
            raise BudgetError(
                f"first prime ({chain[0]} bits) lacks headroom for |values| <= {max_abs_value}: "
                f"need scale {sb} + {head} bits = {sb + head} bits"
            )
        return params

    for n in sizes:
        s_min = _min_scale(precision_bits, n)
        if scale_bits is not None:
            s = int(scale_bits)
            fits = depth * s + 2 * (s + head) <= HE_STANDARD_128[n] and s + head <= MAX_PRIME_BITS
            if not fits:
                continue
        else:
            s = _fit_scale(n, depth, head, s_min)
            if s is None:
                continue
        first = s + head
        return CKKSParams(n, (first,) + (s,) * depth + (first,), s, allow_insecure).check()

    if allow_insecure and scale_bits is not None:
        s = int(scale_bits)
        first = s + head
        return CKKSParams(sizes[-1], (first,) + (s,) * depth + (first,), s, True).check()
    raise DepthExhausted(
        _depth_message(depth, depth_breakdown, precision_bits, max_abs_value, scale_bits, poly_modulus_degree)
    )


def _depth_message(
    depth: int,
    breakdown: list[tuple[str, int]] | None,
    precision_bits: int,
    max_abs_value: float,
    scale_bits: int | None = None,
    n: int | None = None,
) -> str:
    n = n if n is not None else max(HE_STANDARD_128)
    head = headroom_bits(max_abs_value)
    s = int(scale_bits) if scale_bits is not None else _min_scale(precision_bits, n)
    reach = (HE_STANDARD_128[n] - 2 * (s + head)) // s if s + head <= MAX_PRIME_BITS else -1
    msg = f"the computation needs multiplicative depth {depth}"
    if breakdown:
        parts = ", ".join(f"{name}: {d}" for name, d in breakdown)
        msg += f" ({parts})"
    msg += (
        f", but at 128-bit security the deepest chain is {max(reach, 0)} levels (N={n}, "
        f"{HE_STANDARD_128[n]} bits, scale 2^{s} for {precision_bits} bits of precision, "
        f"|values| <= {max_abs_value}). Lower the polynomial degrees or the number of layers, "
        "accept less precision, or use refresh points / hybrid mode (CKKS has no bootstrapping here)"
    )
    return msg
