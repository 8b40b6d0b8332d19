"""CKKSContext: the guarded CKKS evaluator that backends and kernels use.

Every op checks levels and scales before it runs (DepthExhausted / BudgetError naming the
fix), counts itself in ``stats``, and returns ciphertexts at the canonical scale of their
level (:mod:`privml.he.chain`), so additions never meet mismatched scales.  When two
operands sit at different levels, the higher one is brought down with a multiplication by 1
at a chosen plaintext scale (one of its spare levels), which lands it on the exact level and
scale of the other.

The "building blocks" section is the interface of :mod:`privml.he.kernels`: ops on
already-encoded plaintexts whose callers track scales themselves.

Keys live in :mod:`privml.he.keys`, encoding in :mod:`privml.he.encoder`, SEAL I/O in
:mod:`privml.he.sealio`; the names other modules import from here are re-exported.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable
from typing import Any

import numpy as np

from privml.errors import BudgetError, DepthExhausted, InvalidInput, KeyMaterialError
from privml.he.chain import ModulusChain
from privml.he.encoder import Encoder, check_values
from privml.he.keys import KeySet, build_seal_context, fingerprint_of, galois_elt
from privml.he.params import CKKSParams
from privml.he.sealio import seal, seal_from_bytes, seal_to_bytes

__all__ = [
    "CKKSContext",
    "KeySet",
    "build_seal_context",
    "fingerprint_of",
    "galois_elt",
    "seal",
    "seal_from_bytes",
    "seal_to_bytes",
]

SCALE_RTOL = 1e-6  # scales closer than this (relative) are treated as equal

STAT_KEYS = ("rotations", "ct_ct_mults", "ct_pt_mults", "rescales", "encodes", "mod_switches", "additions")


class CKKSContext:
    """Keys plus guarded CKKS evaluation; build with :meth:`generate` (or ``serialize.load_context``)."""

    def __init__(self, keys: KeySet) -> None:
        self.keys = keys
        self.chain = ModulusChain(keys.seal_context, keys.params.scale_bits)
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        self._encoder = Encoder(keys.seal_context, self.chain, keys.params.poly_modulus_degree, self.stats)
        self._evaluator = seal.Evaluator(keys.seal_context)
        self._encryptor = seal.Encryptor(keys.seal_context, keys.public_key)
        sk = keys.secret_key
        self._decryptor = seal.Decryptor(keys.seal_context, sk) if sk is not None else None
        self._sym_encryptor = None
        self._compositions: dict[int, tuple[int, ...]] = {}  # rotation step -> keyed steps composing it

    @classmethod
    def generate(cls, params: CKKSParams, rotation_steps: Iterable[int] = ()) -> CKKSContext:
        """Fresh keys (secret key kept) with Galois keys for exactly ``rotation_steps``."""
        return cls(KeySet.generate(params, rotation_steps))

    def public(self) -> CKKSContext:
        """The same context without the secret key (what a server may hold)."""
        return CKKSContext(self.keys.public())

    # ----------------------------------------------------------------------------- properties

    @property
    def params(self) -> CKKSParams:
        return self.keys.params

    @property
    def slots(self) -> int:
        return self.keys.params.slots

    @property
    def scale(self) -> float:
        """Nominal scale 2**scale_bits (the exact scale of level 0)."""
        return 2.0**self.keys.params.scale_bits

    @property
    def has_secret_key(self) -> bool:
        return self.keys.has_secret_key

    @property
    def rotation_steps(self) -> frozenset[int]:
        """Rotation steps with Galois keys, normalized to [1, slots) (step -1 appears as slots - 1)."""
        return self.keys.rotation_steps

    def has_rotation_key(self, step: int) -> bool:
        """Whether :meth:`rotate` by ``step`` (any sign) has its Galois key (step 0 needs none)."""
        return self.keys.has_rotation_key(step)

    @property
    def max_level(self) -> int:
        """Chain index of the first data level (where fresh ciphertexts live)."""
        return self.chain.max_level

    @property
    def fingerprint(self) -> bytes:
        return self.keys.fingerprint

    @property
    def seal_context(self) -> Any:
        return self.keys.seal_context

    @property
    def cache_bytes(self) -> int:
        """Budget of the plaintext cache behind :meth:`encode` with a ``key``."""
        return self._encoder.cache_bytes

    @cache_bytes.setter
    def cache_bytes(self, value: int) -> None:
        self._encoder.cache_bytes = value

    def share_plaintexts(self, other: CKKSContext) -> None:
        """Use ``other``'s plaintext cache from now on (equal parameters required: a plaintext depends on them
        only, never on keys), so constant diagonals encoded for one client serve every client of the plan."""
        if other.keys.params != self.keys.params:
            raise InvalidInput("privml: plaintexts can be shared only between contexts of equal CKKS parameters")
        self._encoder.cache = other._encoder.cache

    def clear_cache(self, keep_caching: bool = True) -> None:
        """Free the plaintext cache (e.g. of keys rotated out, which only decrypt from now on)."""
        self._encoder.clear_cache()
        if not keep_caching:
            self._encoder.cache_bytes = 0

    def scale_at(self, level: int) -> float:
        """Canonical scale of a ciphertext at ``level``."""
        return self.chain.scale_at(level)

    def prime(self, level: int) -> int:
        """The prime a rescale from ``level`` divides by."""
        return self.chain.prime(level)

    def level(self, ct: Any) -> int:
        """Levels left: SEAL chain index of ``ct`` (0 = last, cannot rescale further)."""
        return self.chain.level_of(ct)

    # ----------------------------------------------------------------------------- encoding

    def encode(self, values: Any, level: int, scale: float, key: Hashable | None = None) -> Any:
        """Plaintext of ``values`` (1-D array or scalar) at ``level`` and ``scale``.

        With ``key``, the result is cached under ``(key, level, scale)`` (LRU bounded by
        ``cache_bytes``) so kernels encode their constant diagonals once per level;
        ``values`` may then be a zero-argument callable, called only on a cache miss.
        """
        return self._encoder.encode(values, level, scale, key)

    def reset_stats(self) -> None:
        for k in self.stats:
            self.stats[k] = 0

    # ----------------------------------------------------------------------------- client side

    def encrypt(self, values: Any) -> Any:
        """Encrypt a 1-D float array (zero-padded to ``slots``) at the top level."""
        arr = check_values(values, self.slots)
        pt = self._encoder.encode_raw(arr, self.max_level, self.chain.scale_at(self.max_level))
        ct = seal.Ciphertext()
        self._encryptor.encrypt(pt, ct)
        return ct

    def encrypt_symmetric(self, values: Any) -> Any:
        """Encrypt with the secret key at the top level: less noise (no public-key term) and faster than
        :meth:`encrypt`; what the enclave's refresh uses."""
        if self.keys.secret_key is None:
            raise KeyMaterialError("symmetric encryption needs the secret key; this context is public")
        if self._sym_encryptor is None:
            self._sym_encryptor = seal.Encryptor(self.keys.seal_context, self.keys.secret_key)
        arr = check_values(values, self.slots)
        pt = self._encoder.encode_raw(arr, self.max_level, self.chain.scale_at(self.max_level))
        ct = seal.Ciphertext()
        self._sym_encryptor.encrypt_symmetric(pt, ct)
        return ct

    def encrypt_zero(self, level: int) -> Any:
        """A fresh encryption of zero at ``level`` with its canonical scale (public key only)."""
        self.chain.check_level(level)
        ct = seal.Ciphertext()
        self._encryptor.encrypt_zero(self.chain.parms_id(level), ct)
        ct.scale = self.chain.scale_at(level)
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
        return self._encoder.decode(pt)

    # ----------------------------------------------------------------------------- guards

    def need_levels(self, ct: Any, n: int, what: str) -> int:
        """The level of ``ct``; DepthExhausted (naming ``what``) unless it has ``n`` levels left."""
        lvl = self.level(ct)
        if lvl < n:
            raise DepthExhausted(
                f"{what} needs {n} more level(s) but the ciphertext is at level {lvl} "
                f"(parameters have depth {self.params.depth}); choose parameters with more depth "
                "or insert a refresh point"
            )
        return lvl

    def check_product_scale(self, scale: float, level: int, what: str) -> None:
        """DepthExhausted unless a product of scale ``scale`` fits the modulus at ``level``."""
        if math.log2(scale) >= self.chain.bits(level) - 1:
            raise DepthExhausted(
                f"{what}: scale 2^{math.log2(scale):.1f} would exceed the modulus at level {level} "
                f"({self.chain.bits(level)} bits); rescale first or use parameters with more depth"
            )

    def _same_scale(self, a: float, b: float) -> bool:
        return abs(a - b) <= SCALE_RTOL * max(abs(a), abs(b))

    def _copy(self, ct: Any) -> Any:
        out = seal.Ciphertext()
        self._evaluator.mod_switch_to(ct, ct.parms_id(), out)
        return out

    def _mod_switch(self, ct: Any, level: int) -> Any:
        out = seal.Ciphertext()
        self._evaluator.mod_switch_to(ct, self.chain.parms_id(level), out)
        if level != self.level(ct):
            self.stats["mod_switches"] += 1
        return out

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
            p = lo.scale * self.chain.prime(llo + 1) / hi.scale
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

    def _zero_on_transparent(self, exc: RuntimeError, like: Any) -> Any:
        if "transparent" not in str(exc):
            raise exc
        return self.zero(self.level(like), like.scale)

    def negate(self, ct: Any) -> Any:
        self.level(ct)
        out = seal.Ciphertext()
        self._evaluator.negate(ct, out)
        return out

    def add_plain(self, ct: Any, values: Any) -> Any:
        """ct + values (1-D array, zero-padded), encoded at the ciphertext's level and scale."""
        lvl = self.level(ct)
        pt = self._encoder.encode_raw(check_values(values, self.slots), lvl, ct.scale)
        out = seal.Ciphertext()
        self._evaluator.add_plain(ct, pt, out)
        self.stats["additions"] += 1
        return out

    def add_scalar(self, ct: Any, value: float) -> Any:
        """ct + value in every slot."""
        lvl = self.level(ct)
        pt = self._encoder.encode_raw(float(value), lvl, ct.scale)
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
        vals = float(values) if np.ndim(values) == 0 else check_values(values, self.slots)
        out = seal.Ciphertext()
        if rescale:
            self.need_levels(ct, 1, "mul_plain with rescale")
            target = self.chain.scale_at(lvl - 1)
            p = target * self.chain.prime(lvl) / ct.scale
            if p < 2.0**20:  # the input was not rescaled: fall back to the nominal scale
                p, target = self.chain.scale_at(lvl), None
            pt = self._encoder.encode_raw(vals, lvl, p)
            self.check_product_scale(ct.scale * p, lvl, "mul_plain")
            if self.mul_encoded(ct, pt, out) is None:  # multiplying by zero
                return self.zero(lvl - 1, target if target is not None else ct.scale * p / self.chain.prime(lvl))
            self.rescale_inplace(out, target)
        else:
            p = self.chain.scale_at(lvl)
            self.check_product_scale(ct.scale * p, lvl, "mul_plain")
            pt = self._encoder.encode_raw(vals, lvl, p)
            if self.mul_encoded(ct, pt, out) is None:
                return self.zero(lvl, ct.scale * p)
        return out

    def mul_scalar_to(self, ct: Any, value: float, level: int, scale: float) -> Any:
        """``value * ct`` landing exactly at ``level`` (< level(ct)) with ``scale``; uses one level of ct."""
        lvl = self.level(ct)
        if level >= lvl:
            raise DepthExhausted(f"cannot bring a level-{lvl} ciphertext to level {level} with a multiplication")
        src = self._mod_switch(ct, level + 1) if lvl > level + 1 else ct
        p = scale * self.chain.prime(level + 1) / ct.scale
        pt = self._encoder.encode_raw(float(value), level + 1, p)
        out = self.mul_encoded(src, pt)
        if out is None:  # the scalar rounds to 0 at this scale
            return self.zero(level, scale)
        self.rescale_inplace(out, scale)
        return out

    def _mul_ready(self, a: Any, b: Any, what: str) -> tuple[Any, Any, int]:
        la, lb = self.level(a), self.level(b)
        if la != lb:
            # Bring the higher operand exactly onto the lower one's level and canonical scale.
            if la > lb:
                a = self.to_canonical(a, lb)
            else:
                b = self.to_canonical(b, la)
        lvl = self.level(a)
        self.need_levels(a, 1, what)
        self.check_product_scale(a.scale * b.scale, lvl, what)
        return a, b, lvl

    def _finish_product(self, out: Any, lvl: int, scale: float) -> Any:
        self._evaluator.relinearize_inplace(out, self.keys.relin_keys)
        target = self.chain.scale_at(lvl - 1)
        new = scale / self.chain.prime(lvl)
        self.rescale_inplace(out, target if self._same_scale(new, target) else new)
        return out

    def mul(self, a: Any, b: Any) -> Any:
        """a * b slot-wise: relinearize and rescale (levels aligned first)."""
        a, b, lvl = self._mul_ready(a, b, "mul")
        out = seal.Ciphertext()
        self._evaluator.multiply(a, b, out)
        self.stats["ct_ct_mults"] += 1
        return self._finish_product(out, lvl, a.scale * b.scale)

    def square(self, ct: Any) -> Any:
        lvl = self.need_levels(ct, 1, "square")
        self.check_product_scale(ct.scale * ct.scale, lvl, "square")
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
        if norm not in self.keys.rotation_steps:  # composed from the keys there are (privml.he.rotations)
            parts = self._compositions.get(norm)
            if parts is None:
                from privml.he.rotations import decompose

                try:
                    parts = self._compositions[norm] = decompose(norm, self.keys.rotation_steps, self.slots)
                except ValueError:
                    raise KeyMaterialError(
                        f"no Galois key for rotation step {step} (normalized {norm}) and no composition of it from "
                        f"this context's keys {sorted(self.keys.rotation_steps)}: generate the context with "
                        "rotation_steps including it") from None
            for part in parts:
                ct = self.rotate(ct, part)
            return ct
        out = seal.Ciphertext()
        self._evaluator.rotate_vector(ct, norm, self.keys.galois_keys, out)
        self.stats["rotations"] += 1
        return out

    def rescale(self, ct: Any) -> Any:
        """Divide by the level's prime and drop it (for products left unrescaled)."""
        lvl = self.need_levels(ct, 1, "rescale")
        out = seal.Ciphertext()
        self._evaluator.rescale_to_next(ct, out)
        self.stats["rescales"] += 1
        new = ct.scale / self.chain.prime(lvl)
        target = self.chain.scale_at(lvl - 1)
        out.scale = target if self._same_scale(new, target) else new
        if math.log2(out.scale) < 1:
            raise DepthExhausted("rescale left a scale below 2: the ciphertext was not multiplied first")
        return out

    def mod_switch_to_level(self, ct: Any, level: int) -> Any:
        """Drop primes down to ``level`` without touching the scale."""
        lvl = self.level(ct)
        self.chain.check_level(level)
        if level > lvl:
            raise DepthExhausted(f"cannot switch a level-{lvl} ciphertext up to level {level}")
        return self._mod_switch(ct, level)

    def to_canonical(self, ct: Any, level: int) -> Any:
        """``ct`` brought down to ``level`` (< level(ct)) at that level's canonical scale."""
        target = self.chain.scale_at(level)
        if self._same_scale(ct.scale, target):
            out = self._mod_switch(ct, level)
            out.scale = target
            return out
        return self.mul_scalar_to(ct, 1.0, level, target)

    # ----------------------------------------------------------------------------- building blocks (kernels)

    def zero(self, level: int, scale: float) -> Any:
        """A fresh encryption of zero at ``level`` carrying ``scale`` (what a product by zero yields)."""
        ct = self.encrypt_zero(level)
        ct.scale = scale
        return ct

    def mul_encoded(self, ct: Any, pt: Any, out: Any = None) -> Any:
        """ct * pt (a plaintext from :meth:`encode` at ct's level), unrescaled, into ``out`` (new if None).

        Returns None when pt is zero (SEAL refuses the transparent result).  The caller checks
        the product scale first (:meth:`check_product_scale`).
        """
        if out is None:
            out = seal.Ciphertext()
        try:
            self._evaluator.multiply_plain(ct, pt, out)
        except RuntimeError as exc:
            if "transparent" not in str(exc):
                raise
            return None
        self.stats["ct_pt_mults"] += 1
        return out

    def add_inplace(self, acc: Any, other: Any) -> None:
        """acc += other; both at the same level and scale (SEAL refuses a mismatch)."""
        self._evaluator.add_inplace(acc, other)
        self.stats["additions"] += 1

    def add_encoded_inplace(self, ct: Any, pt: Any) -> None:
        """ct += pt (a plaintext from :meth:`encode` at ct's level and scale; SEAL refuses a mismatch)."""
        self._evaluator.add_plain_inplace(ct, pt)
        self.stats["additions"] += 1

    def rescale_inplace(self, ct: Any, scale: float | None) -> None:
        """Rescale ``ct`` one level down in place and set its scale to ``scale``, the exact one the caller tracked.

        With ``scale=None`` the ciphertext keeps SEAL's own result, ``ct.scale / q``.
        """
        self.need_levels(ct, 1, "rescale")
        self._evaluator.rescale_to_next_inplace(ct)
        self.stats["rescales"] += 1
        if scale is not None:
            ct.scale = scale

    def mul_exact(self, a: Any, b: Any) -> Any:
        """a * b at the lower of their levels, relinearized and rescaled, at exactly a.scale * b.scale / q.

        Unlike :meth:`mul`, the higher operand is only mod-switched (its scale untouched) and the
        result's scale is not snapped to the canonical one: for schedules that track every scale
        (:func:`privml.he.kernels.eval_poly`).  ``mul_exact(x, x)`` squares.
        """
        la, lb = self.level(a), self.level(b)
        lvl = min(la, lb)
        self.need_levels(a if la == lvl else b, 1, "mul_exact")
        a = self._mod_switch(a, lvl) if la > lvl else a
        b = self._mod_switch(b, lvl) if lb > lvl else b
        out = seal.Ciphertext()
        if a is b:
            self._evaluator.square(a, out)
        else:
            self._evaluator.multiply(a, b, out)
        self.stats["ct_ct_mults"] += 1
        self._evaluator.relinearize_inplace(out, self.keys.relin_keys)
        self.rescale_inplace(out, a.scale * b.scale / self.chain.prime(lvl))
        return out
