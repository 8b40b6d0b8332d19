"""Sizes of CKKS objects from the parameters alone: key bytes, the public context, and a session's peak memory.

SEAL stores every polynomial in RNS form, one 64-bit word per coefficient and prime:

- a ciphertext at level l (l + 1 primes of the chain left) is 2 (l + 1) N words;
- a plaintext encoded at level l is (l + 1) N words;
- a key-switching key (each Galois key, the relinearization key) has one part per data prime (L of them),
  each 2 polynomials over the L data primes plus the special prime: 2 L (L + 1) N words; the public key is
  2 (L + 1) N words.

SEAL serializes with zstd; a word holding a b-bit residue compresses to about b/64 of its size plus ~12%
(measured on N=8192 and 16384 contexts: within 10% of the real size). The plan uses these to state the
public context's size and to choose how many Galois keys fit a byte budget, and the session to refuse (or
stream its encoded diagonals) when a plan needs more memory than ``memory_limit``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from privml.he.params import CKKSParams

WORD = 8  # bytes per RNS coefficient
ZSTD_OVERHEAD = 0.12  # serialized size over the residues' information (bits / 64), measured
ENCLAVE_BASE_BYTES = 780 << 20  # the enclave process with a key (privml, torch and SEAL): RSS 0.81 GB measured
PROCESS_BASE_BYTES = 600 << 20  # torch, SEAL and Python before any key exists (RSS measured at import: ~0.55 GB)


def _data_primes(params: CKKSParams) -> int:
    return len(params.coeff_mod_bit_sizes) - 1


def ciphertext_bytes(params: CKKSParams, level: int | None = None) -> int:
    """In-memory bytes of one ciphertext at ``level`` (default: the top)."""
    primes = _data_primes(params) if level is None else level + 1
    return 2 * primes * params.poly_modulus_degree * WORD


def plaintext_bytes(params: CKKSParams, level: int | None = None) -> int:
    """In-memory bytes of one encoded plaintext at ``level`` (default: the top)."""
    primes = _data_primes(params) if level is None else level + 1
    return primes * params.poly_modulus_degree * WORD


def key_switching_key_bytes(params: CKKSParams) -> int:
    """In-memory bytes of one Galois (or relinearization) key."""
    data = _data_primes(params)
    return 2 * data * (data + 1) * params.poly_modulus_degree * WORD


def _compression(params: CKKSParams) -> float:
    bits = params.coeff_mod_bit_sizes
    return min(1.0, sum(bits) / len(bits) / 64 + ZSTD_OVERHEAD)


def public_context_bytes(params: CKKSParams, galois_keys: int) -> int:
    """Predicted serialized size of the public context: public key, relinearization key, ``galois_keys`` keys."""
    data = _data_primes(params)
    public_key = 2 * (data + 1) * params.poly_modulus_degree * WORD
    raw = public_key + (1 + galois_keys) * key_switching_key_bytes(params)
    return int(raw * _compression(params))


def keys_within(params: CKKSParams, max_bytes: float) -> int:
    """Most Galois keys a public context of at most ``max_bytes`` can hold (may be < 0: not even the rest fits)."""
    per_key = key_switching_key_bytes(params) * _compression(params)
    return int((max_bytes - public_context_bytes(params, 0)) // per_key)


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak bytes of one session evaluating the plan (client keys included, as in one process)."""

    keys: int  # secret, public, relinearization and Galois keys
    plaintexts: int  # encoded weight diagonals and biases one forward pass caches
    ciphertexts: int  # ciphertexts alive at once per level (inputs, rotated copies, accumulators), summed
    base: int = PROCESS_BASE_BYTES

    @property
    def total(self) -> int:
        return self.keys + self.plaintexts + self.ciphertexts + self.base

    def to_dict(self) -> dict[str, float]:
        d = {k: round(v / 1e9, 4) for k, v in asdict(self).items()}
        d["total"] = round(self.total / 1e9, 4)
        return d


def key_bytes(params: CKKSParams, galois_keys: int) -> int:
    """In-memory bytes of one client's keys: secret, public, relinearization and ``galois_keys`` Galois keys."""
    return (1 + galois_keys) * key_switching_key_bytes(params) + 3 * ciphertext_bytes(params)


def enclave_bytes(params: CKKSParams) -> int:
    """An enclave process holding one provisioned key (secret, public and relinearization keys; no Galois keys)
    and the ciphertexts of a refresh batch in flight (RSS 0.81 GB at N=8192, MLP and LeNet-5 alike)."""
    return ENCLAVE_BASE_BYTES + key_bytes(params, 0)


def estimate(params: CKKSParams, galois_keys: int, plaintexts_by_level: dict[int, int],
             live_ciphertexts_by_level: dict[int, int]) -> MemoryEstimate:
    """Peak memory from counts the planner's dry run records (plaintexts and live ciphertexts per level)."""
    keys = key_bytes(params, galois_keys)
    pts = sum(n * plaintext_bytes(params, lvl) for lvl, n in plaintexts_by_level.items())
    # SEAL's memory pool keeps one free list per allocation size and never returns memory: the peak is the sum
    # over levels of the most ciphertexts alive at each (measured: a max over levels under-predicts 2-3x)
    cts = sum(n * ciphertext_bytes(params, lvl) for lvl, n in live_ciphertexts_by_level.items())
    return MemoryEstimate(keys, pts, cts)
