"""CKKS context on TenSEAL's raw SEAL bindings: keys, encoding and guarded evaluation.

Scale management.  Every level ``l`` (SEAL chain index, 0 = last) has one
canonical scale ``scale_at(l)``: ``S[0] = 2**scale_bits`` and
``S[l] = sqrt(S[l-1] * q_l)`` where ``q_l`` is the prime dropped by rescaling
from level ``l``.  Then a ct-ct product of two canonical ciphertexts at level
``l`` rescales to exactly ``S[l-1]`` (``S[l]**2 / q_l``), and a ct-pt product
whose plaintext is encoded at ``S[l-1] * q_l / ct.scale`` does too.  Every op
here returns canonical ciphertexts, so additions never meet mismatched scales;
when two operands sit at different levels, the higher one is brought down with
a multiplication by 1 at a chosen plaintext scale (one of its spare levels),
which lands it on the exact level and scale of the other.
"""

from __future__ import annotations

import atexit
import hashlib
import itertools
import json
import math
import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from typing import Any

import numpy as np

from privml.errors import (
    BackendUnavailable,
    BudgetError,
    DepthExhausted,
    InvalidInput,
    KeyMaterialError,
    MalformedInput,
    RangeViolation,
)
from privml.he.params import CKKSParams

try:
    import tenseal.sealapi as seal
except ImportError as exc:  # pragma: no cover - exercised only without TenSEAL
    raise BackendUnavailable("the CKKS backend needs TenSEAL: pip install tenseal==0.3.18") from exc

Ciphertext = seal.Ciphertext
Plaintext = seal.Plaintext

SCALE_RTOL = 1e-6  # scales closer than this (relative) are treated as equal
DEFAULT_CACHE_BYTES = 1 << 30  # plaintext cache budget per context

STAT_KEYS = ("rotations", "ct_ct_mults", "ct_pt_mults", "rescales", "encodes", "mod_switches", "additions")


# ---------------------------------------------------------------------------------------------
# SEAL objects <-> bytes (the bindings only save/load file paths: use a RAM-backed temp dir)

_TMPDIR: str | None = None
_TMPCOUNT = itertools.count()


def _tmp_path() -> str:
    global _TMPDIR
    if _TMPDIR is None or not os.path.isdir(_TMPDIR):
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        _TMPDIR = tempfile.mkdtemp(prefix="privml-he-", dir=base)
        atexit.register(shutil.rmtree, _TMPDIR, True)
    return os.path.join(_TMPDIR, f"{os.getpid()}-{next(_TMPCOUNT)}")


def seal_to_bytes(obj: Any) -> bytes:
    """SEAL's own serialization of ``obj`` (header + zstd payload)."""
    path = _tmp_path()
    try:
        obj.save(path)
        with open(path, "rb") as f:
            return f.read()
    finally:
        if os.path.exists(path):
            os.unlink(path)


def seal_from_bytes(obj: Any, seal_context: Any, data: bytes) -> Any:
    """Load SEAL bytes into ``obj`` (SEAL checks validity against the context); MalformedInput on failure.

    Only call this on bytes whose header and size were validated (see serialize.py).
    """
    path = _tmp_path()
    try:
        with open(path, "wb") as f:
            f.write(data)
        obj.load(seal_context, path)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise MalformedInput(f"SEAL rejected the {type(obj).__name__} bytes: {exc}") from exc
    finally:
        if os.path.exists(path):
            os.unlink(path)
    return obj


def fingerprint_of(params: CKKSParams, public_key_bytes: bytes) -> bytes:
    """32-byte identity of a key set: hash of the parameters and the public key."""
    h = hashlib.blake2b(digest_size=32, person=b"privml-ckks-fp")
    h.update(json.dumps(params.to_dict(), sort_keys=True).encode())
    h.update(public_key_bytes)
    return h.digest()


def build_seal_context(params: CKKSParams) -> Any:
    """A SEALContext for ``params`` (128-bit enforced unless ``allow_insecure``)."""
    params.check()
    parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(params.poly_modulus_degree)
    try:
        parms.set_coeff_modulus(seal.CoeffModulus.Create(params.poly_modulus_degree, list(params.coeff_mod_bit_sizes)))
    except (ValueError, RuntimeError) as exc:
        raise BudgetError(f"SEAL cannot find primes for {list(params.coeff_mod_bit_sizes)}: {exc}") from exc
    sec = seal.SEC_LEVEL_TYPE.NONE if params.allow_insecure else seal.SEC_LEVEL_TYPE.TC128
    ctx = seal.SEALContext(parms, True, sec)
    if not ctx.parameters_set():
        raise BudgetError(f"SEAL refuses parameters {params}: {ctx.parameters_error_message()}")
    return ctx


def galois_elt(step: int, poly_modulus_degree: int) -> int:
    """SEAL's Galois element for a left rotation by ``step`` slots."""
    slots = poly_modulus_degree // 2
    return pow(3, step % slots, 2 * poly_modulus_degree)


class CKKSContext:
    """Keys plus guarded CKKS evaluation; build with :meth:`generate` (or ``serialize.load_context``)."""

    def __init__(
        self,
        params: CKKSParams,
        seal_context: Any,
        public_key: Any,
        relin_keys: Any,
        galois_keys: Any,
        rotation_steps: Iterable[int],
        secret_key: Any = None,
        fingerprint: bytes | None = None,
    ) -> None:
        self._params = params
        self._seal = seal_context
        self._pk = public_key
        self._rk = relin_keys
        self._gk = galois_keys
        self._sk = secret_key
        self._steps = frozenset(int(s) % params.slots for s in rotation_steps) - {0}
        if fingerprint is None:
            fingerprint = fingerprint_of(params, seal_to_bytes(public_key))
        self._fingerprint = fingerprint
        self._encoder = seal.CKKSEncoder(seal_context)
        self._evaluator = seal.Evaluator(seal_context)
        self._encryptor = seal.Encryptor(seal_context, public_key)
        self._decryptor = seal.Decryptor(seal_context, secret_key) if secret_key is not None else None
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        self.cache_bytes = DEFAULT_CACHE_BYTES
        self._cache: OrderedDict[Hashable, Any] = OrderedDict()
        self._cache_used = 0

        # The modulus chain, indexed by SEAL chain index (0 = last level).
        self._parms_ids: list[list[int]] = []
        self._primes: list[int] = []
        self._level_bits: list[int] = []
        data = seal_context.first_context_data()
        top = data.chain_index()
        self._parms_ids = [None] * (top + 1)  # type: ignore[list-item]
        self._level_bits = [0] * (top + 1)
        while data is not None:
            idx = data.chain_index()
            self._parms_ids[idx] = list(data.parms_id())
            self._level_bits[idx] = data.total_coeff_modulus_bit_count()
            if idx == top:
                self._primes = [m.value() for m in data.parms().coeff_modulus()]
            data = data.next_context_data()
        self._level_of = {tuple(p): i for i, p in enumerate(self._parms_ids)}
        self._scales = [2.0**params.scale_bits]
        for lvl in range(1, top + 1):
            self._scales.append(math.sqrt(self._scales[-1] * self._primes[lvl]))

    # ----------------------------------------------------------------------------- construction

    @classmethod
    def generate(cls, params: CKKSParams, rotation_steps: Iterable[int] = ()) -> CKKSContext:
        """Fresh keys (secret key kept) with Galois keys for exactly ``rotation_steps``."""
        ctx = build_seal_context(params)
        steps = sorted({int(s) % params.slots for s in rotation_steps} - {0})
        keygen = seal.KeyGenerator(ctx)
        pk = seal.PublicKey()
        keygen.create_public_key(pk)
        rk = seal.RelinKeys()
        keygen.create_relin_keys(rk)
        gk = seal.GaloisKeys()
        if steps:
            # The binding's list[int] overload takes Galois elements, not steps.
            keygen.create_galois_keys([galois_elt(s, params.poly_modulus_degree) for s in steps], gk)
        return cls(params, ctx, pk, rk, gk, steps, secret_key=keygen.secret_key())

    def public(self) -> CKKSContext:
        """The same context without the secret key (what a server may hold)."""
        return CKKSContext(self._params, self._seal, self._pk, self._rk, self._gk, self._steps, None, self._fingerprint)

    # ----------------------------------------------------------------------------- properties

    @property
    def params(self) -> CKKSParams:
        return self._params

    @property
    def slots(self) -> int:
        return self._params.slots

    @property
    def scale(self) -> float:
        """Nominal scale 2**scale_bits (the exact scale of level 0)."""
        return 2.0**self._params.scale_bits

    @property
    def has_secret_key(self) -> bool:
        return self._sk is not None

    @property
    def rotation_steps(self) -> frozenset[int]:
        """Rotation steps with Galois keys, normalized to [1, slots) (step -1 appears as slots - 1)."""
        return self._steps

    def has_rotation_key(self, step: int) -> bool:
        """Whether :meth:`rotate` by ``step`` (any sign) has its Galois key (step 0 needs none)."""
        norm = int(step) % self.slots
        return norm == 0 or norm in self._steps

    @property
    def max_level(self) -> int:
        """Chain index of the first data level (where fresh ciphertexts live)."""
        return len(self._parms_ids) - 1

    @property
    def fingerprint(self) -> bytes:
        return self._fingerprint

    @property
    def seal_context(self) -> Any:
        return self._seal

    def scale_at(self, level: int) -> float:
        """Canonical scale of a ciphertext at ``level``."""
        return self._scales[level]

    def prime(self, level: int) -> int:
        """The prime a rescale from ``level`` divides by."""
        return self._primes[level]

    def parms_id(self, level: int) -> list[int]:
        self._check_level_index(level)
        return self._parms_ids[level]

    def level(self, ct: Any) -> int:
        """Levels left: SEAL chain index of ``ct`` (0 = last, cannot rescale further)."""
        try:
            return self._level_of[tuple(ct.parms_id())]
        except KeyError:
            raise KeyMaterialError("ciphertext does not belong to this context's modulus chain") from None
        except AttributeError:
            raise InvalidInput(f"expected a SEAL Ciphertext, got {type(ct).__name__}") from None

    def _check_level_index(self, level: int) -> None:
        if not 0 <= level <= self.max_level:
            raise InvalidInput(f"level must be in [0, {self.max_level}], got {level}")

    # ----------------------------------------------------------------------------- encoding

    def _values(self, values: Any, what: str = "values") -> np.ndarray:
        try:
            arr = np.asarray(values)
        except (ValueError, TypeError) as exc:
            raise InvalidInput(f"{what} must be a 1-D array of real numbers: {exc}") from exc
        if arr.dtype.kind not in "fiub":
            raise InvalidInput(f"{what} must be real numbers, got dtype {arr.dtype}")
        arr = np.asarray(arr, dtype=np.float64)
        if arr.ndim != 1:
            raise InvalidInput(f"{what} must be a 1-D array, got shape {arr.shape}")
        if arr.size > self.slots:
            raise InvalidInput(f"{what} has {arr.size} entries but a ciphertext holds {self.slots} slots")
        if not np.all(np.isfinite(arr)):
            raise InvalidInput(f"{what} contain NaN or inf")
        return arr

    def _encode_raw(self, values: Any, level: int, scale: float) -> Any:
        pt = seal.Plaintext()
        pid = self._parms_ids[level]
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
        self.stats["encodes"] += 1
        return pt

    def encode(self, values: Any, level: int, scale: float, key: Hashable | None = None) -> Any:
        """Plaintext of ``values`` (1-D array or scalar) at ``level`` and ``scale``.

        With ``key``, the result is cached under ``(key, level, scale)`` (LRU bounded by
        ``cache_bytes``) so kernels encode their constant diagonals once per level;
        ``values`` may then be a zero-argument callable, called only on a cache miss.
        """
        self._check_level_index(level)
        if not (scale > 0 and math.isfinite(scale)):
            raise InvalidInput(f"scale must be positive and finite, got {scale}")
        if key is not None:
            ckey = (key, level, float(scale))
            hit = self._cache.get(ckey)
            if hit is not None:
                self._cache.move_to_end(ckey)
                return hit[0]
        if callable(values):
            values = values()
        vals = values if np.ndim(values) == 0 else self._values(values)
        pt = self._encode_raw(vals, level, scale)
        if key is not None:
            size = 8 * self._params.poly_modulus_degree * (level + 1)
            self._cache[ckey] = (pt, size)
            self._cache_used += size
            while self._cache_used > self.cache_bytes and len(self._cache) > 1:
                _, (_, old_size) = self._cache.popitem(last=False)
                self._cache_used -= old_size
        return pt

    def clear_cache(self) -> None:
        self._cache.clear()
        self._cache_used = 0

    def reset_stats(self) -> None:
        for k in self.stats:
            self.stats[k] = 0

    # ----------------------------------------------------------------------------- client side

    def encrypt(self, values: Any) -> Any:
        """Encrypt a 1-D float array (zero-padded to ``slots``) at the top level."""
        arr = self._values(values)
        pt = self._encode_raw(arr, self.max_level, self._scales[self.max_level])
        ct = seal.Ciphertext()
        self._encryptor.encrypt(pt, ct)
        return ct

    def encrypt_zero(self, level: int) -> Any:
        """A fresh encryption of zero at ``level`` with its canonical scale (public key only)."""
        self._check_level_index(level)
        ct = seal.Ciphertext()
        self._encryptor.encrypt_zero(self._parms_ids[level], ct)
        ct.scale = self._scales[level]
        return ct

    def decrypt(self, ct: Any) -> np.ndarray:
        """Decrypt and decode all ``slots`` values (needs the secret key)."""
        if self._decryptor is None:
            raise KeyMaterialError(
                "this CKKS context holds no secret key (public evaluation context): only the key owner can decrypt"
            )
        self.level(ct)
        pt = seal.Plaintext()
        self._decryptor.decrypt(ct, pt)
        return np.array(self._encoder.decode_double(pt))

    # ----------------------------------------------------------------------------- guards/helpers

    def _copy(self, ct: Any) -> Any:
        out = seal.Ciphertext()
        self._evaluator.mod_switch_to(ct, ct.parms_id(), out)
        return out

    def _need_levels(self, ct: Any, n: int, what: str) -> int:
        lvl = self.level(ct)
        if lvl < n:
            raise DepthExhausted(
                f"{what} needs {n} more level(s) but the ciphertext is at level {lvl} "
                f"(parameters have depth {self._params.depth}); choose parameters with more depth "
                "or insert a refresh point"
            )
        return lvl

    def _check_product_scale(self, scale: float, level: int, what: str) -> None:
        if math.log2(scale) >= self._level_bits[level] - 1:
            raise DepthExhausted(
                f"{what}: scale 2^{math.log2(scale):.1f} would exceed the modulus at level {level} "
                f"({self._level_bits[level]} bits); rescale first or use parameters with more depth"
            )

    def _rescale_inplace(self, ct: Any) -> None:
        self._evaluator.rescale_to_next_inplace(ct)
        self.stats["rescales"] += 1

    def _mod_switch(self, ct: Any, level: int) -> Any:
        out = seal.Ciphertext()
        self._evaluator.mod_switch_to(ct, self._parms_ids[level], out)
        if level != self.level(ct):
            self.stats["mod_switches"] += 1
        return out

    def mul_scalar_to(self, ct: Any, value: float, level: int, scale: float) -> Any:
        """``value * ct`` landing exactly at ``level`` (< level(ct)) with ``scale``; uses one level of ct."""
        lvl = self.level(ct)
        if level >= lvl:
            raise DepthExhausted(f"cannot bring a level-{lvl} ciphertext to level {level} with a multiplication")
        src = self._mod_switch(ct, level + 1) if lvl > level + 1 else ct
        p = scale * self._primes[level + 1] / ct.scale
        pt = self._encode_raw(float(value), level + 1, p)
        out = self._mul_plain_raw(src, pt, seal.Ciphertext())
        if out is None:  # the scalar rounds to 0 at this scale
            return self._zero(level, scale)
        self._rescale_inplace(out)
        out.scale = scale
        return out

    def _same_scale(self, a: float, b: float) -> bool:
        return abs(a - b) <= SCALE_RTOL * max(abs(a), abs(b))

    def _align(self, a: Any, b: Any, what: str) -> tuple[Any, Any]:
        """Bring a and b to the same level and (exactly) the same scale."""
        la, lb = self.level(a), self.level(b)
        if la == lb:
            if a.scale == b.scale:
                return a, b
            if self._same_scale(a.scale, b.scale):
                b = self._copy(b)
                b.scale = a.scale
                return a, b
            raise BudgetError(
                f"{what}: operands at level {la} have scales 2^{math.log2(a.scale):.3f} and "
                f"2^{math.log2(b.scale):.3f}; they cannot be matched without a spare level (rescale the "
                "larger one first)"
            )
        hi, lo, swap = (a, b, False) if la > lb else (b, a, True)
        lhi, llo = max(la, lb), min(la, lb)
        if self._same_scale(hi.scale, lo.scale):
            hi = self._mod_switch(hi, llo)
            hi.scale = lo.scale
        else:
            p = lo.scale * self._primes[llo + 1] / hi.scale
            if p < 2.0**20:
                raise BudgetError(
                    f"{what}: scales 2^{math.log2(hi.scale):.2f} (level {lhi}) and 2^{math.log2(lo.scale):.2f} "
                    f"(level {llo}) are too far apart to match"
                )
            hi = self.mul_scalar_to(hi, 1.0, llo, lo.scale)
        return (lo, hi) if swap else (hi, lo)

    # ----------------------------------------------------------------------------- evaluation

    def add(self, a: Any, b: Any) -> Any:
        a, b = self._align(a, b, "add")
        out = seal.Ciphertext()
        try:
            self._evaluator.add(a, b, out)
        except RuntimeError as exc:  # a + (-a): SEAL refuses transparent results
            return self._zero_on_transparent(exc, a)
        self.stats["additions"] += 1
        return out

    def sub(self, a: Any, b: Any) -> Any:
        a, b = self._align(a, b, "sub")
        out = seal.Ciphertext()
        try:
            self._evaluator.sub(a, b, out)
        except RuntimeError as exc:  # a - a: SEAL refuses transparent results
            return self._zero_on_transparent(exc, a)
        self.stats["additions"] += 1
        return out

    def negate(self, ct: Any) -> Any:
        self.level(ct)
        out = seal.Ciphertext()
        self._evaluator.negate(ct, out)
        return out

    def add_plain(self, ct: Any, values: Any) -> Any:
        """ct + values (1-D array, zero-padded), encoded at the ciphertext's level and scale."""
        lvl = self.level(ct)
        pt = self._encode_raw(self._values(values), lvl, ct.scale)
        out = seal.Ciphertext()
        self._evaluator.add_plain(ct, pt, out)
        self.stats["additions"] += 1
        return out

    def add_scalar(self, ct: Any, value: float) -> Any:
        """ct + value in every slot."""
        lvl = self.level(ct)
        pt = self._encode_raw(float(value), lvl, ct.scale)
        out = seal.Ciphertext()
        self._evaluator.add_plain(ct, pt, out)
        self.stats["additions"] += 1
        return out

    def mul_plain(self, ct: Any, values: Any, rescale: bool = True) -> Any:
        """ct * values (scalar or 1-D array); with ``rescale`` the result is canonical one level down.

        Without ``rescale`` the plaintext is encoded at the canonical scale of the level, so
        products of canonical ciphertexts share one scale and can be summed before one
        :meth:`rescale` (lazy rescaling) that lands on the canonical scale of the next level.
        """
        lvl = self.level(ct)
        vals = float(values) if np.ndim(values) == 0 else self._values(values)
        out = seal.Ciphertext()
        if rescale:
            self._need_levels(ct, 1, "mul_plain with rescale")
            target = self._scales[lvl - 1]
            p = target * self._primes[lvl] / ct.scale
            if p < 2.0**20:  # the input was not rescaled: fall back to the nominal scale
                p, target = self._scales[lvl], None
            pt = self._encode_raw(vals, lvl, p)
            self._check_product_scale(ct.scale * p, lvl, "mul_plain")
            if self._mul_plain_raw(ct, pt, out) is None:  # multiplying by zero
                return self._zero(lvl - 1, target if target is not None else ct.scale * p / self._primes[lvl])
            self._rescale_inplace(out)
            if target is not None:
                out.scale = target
        else:
            p = self._scales[lvl]
            self._check_product_scale(ct.scale * p, lvl, "mul_plain")
            pt = self._encode_raw(vals, lvl, p)
            if self._mul_plain_raw(ct, pt, out) is None:
                return self._zero(lvl, ct.scale * p)
        return out

    def _mul_ready(self, a: Any, b: Any, what: str) -> tuple[Any, Any, int]:
        la, lb = self.level(a), self.level(b)
        if la != lb:
            # Bring the higher operand exactly onto the lower one's level and canonical scale.
            if la > lb:
                a = self._to_canonical(a, lb)
            else:
                b = self._to_canonical(b, la)
        lvl = self.level(a)
        self._need_levels(a, 1, what)
        self._check_product_scale(a.scale * b.scale, lvl, what)
        return a, b, lvl

    def _to_canonical(self, ct: Any, level: int) -> Any:
        if self._same_scale(ct.scale, self._scales[level]):
            out = self._mod_switch(ct, level)
            out.scale = self._scales[level]
            return out
        return self.mul_scalar_to(ct, 1.0, level, self._scales[level])

    def _finish_product(self, out: Any, lvl: int, scale: float) -> Any:
        self._evaluator.relinearize_inplace(out, self._rk)
        self._rescale_inplace(out)
        target = self._scales[lvl - 1]
        out.scale = target if self._same_scale(scale / self._primes[lvl], target) else scale / self._primes[lvl]
        return out

    def mul(self, a: Any, b: Any) -> Any:
        """a * b slot-wise: relinearize and rescale (levels aligned first)."""
        a, b, lvl = self._mul_ready(a, b, "mul")
        out = seal.Ciphertext()
        self._evaluator.multiply(a, b, out)
        self.stats["ct_ct_mults"] += 1
        return self._finish_product(out, lvl, a.scale * b.scale)

    def square(self, ct: Any) -> Any:
        lvl = self._need_levels(ct, 1, "square")
        self._check_product_scale(ct.scale * ct.scale, lvl, "square")
        out = seal.Ciphertext()
        self._evaluator.square(ct, out)
        self.stats["ct_ct_mults"] += 1
        return self._finish_product(out, lvl, ct.scale * ct.scale)

    def rotate(self, ct: Any, step: int) -> Any:
        """Cyclic left rotation: out[j] = ct[(j + step) mod slots]."""
        self.level(ct)
        norm = int(step) % self.slots
        if norm == 0:
            return self._copy(ct)
        if norm not in self._steps:
            raise KeyMaterialError(
                f"no Galois key for rotation step {step} (normalized {norm}); this context has keys for "
                f"{sorted(self._steps)}: generate the context with rotation_steps including it"
            )
        out = seal.Ciphertext()
        self._evaluator.rotate_vector(ct, norm, self._gk, out)
        self.stats["rotations"] += 1
        return out

    def rescale(self, ct: Any) -> Any:
        """Divide by the level's prime and drop it (for products left unrescaled)."""
        lvl = self._need_levels(ct, 1, "rescale")
        out = seal.Ciphertext()
        self._evaluator.rescale_to_next(ct, out)
        self.stats["rescales"] += 1
        new = ct.scale / self._primes[lvl]
        out.scale = self._scales[lvl - 1] if self._same_scale(new, self._scales[lvl - 1]) else new
        if math.log2(out.scale) < 1:
            raise DepthExhausted("rescale left a scale below 2: the ciphertext was not multiplied first")
        return out

    def mod_switch_to_level(self, ct: Any, level: int) -> Any:
        """Drop primes down to ``level`` without touching the scale."""
        lvl = self.level(ct)
        self._check_level_index(level)
        if level > lvl:
            raise DepthExhausted(f"cannot switch a level-{lvl} ciphertext up to level {level}")
        return self._mod_switch(ct, level)

    # ----------------------------------------------------------------------------- raw helpers for kernels

    def _mul_plain_raw(self, ct: Any, pt: Any, out: Any) -> Any:
        """ct * pt into ``out``; None when pt is zero (SEAL refuses the transparent result)."""
        try:
            self._evaluator.multiply_plain(ct, pt, out)
        except RuntimeError as exc:
            if "transparent" not in str(exc):
                raise
            return None
        self.stats["ct_pt_mults"] += 1
        return out

    def _zero(self, level: int, scale: float) -> Any:
        ct = self.encrypt_zero(level)
        ct.scale = scale
        return ct

    def _zero_on_transparent(self, exc: RuntimeError, like: Any) -> Any:
        if "transparent" not in str(exc):
            raise exc
        return self._zero(self.level(like), like.scale)

    def _add_inplace(self, acc: Any, other: Any) -> None:
        self._evaluator.add_inplace(acc, other)
        self.stats["additions"] += 1
