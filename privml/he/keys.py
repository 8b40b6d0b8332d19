"""CKKS key material: the SEAL context for a parameter set, key generation, and the keys one party holds."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from privml.errors import BudgetError
from privml.he.params import CKKSParams
from privml.he.sealio import seal, seal_to_bytes


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


class KeySet:
    """One party's keys under one SEAL context; ``secret_key`` is None in a public (server) copy.

    ``rotation_steps`` are normalized to [1, slots) (step -1 appears as slots - 1); the
    fingerprint is computed from the parameters and public key unless given.
    """

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
        self.params = params
        self.seal_context = seal_context
        self.public_key = public_key
        self.relin_keys = relin_keys
        self.galois_keys = galois_keys
        self.secret_key = secret_key
        self.rotation_steps = frozenset(int(s) % params.slots for s in rotation_steps) - {0}
        self.fingerprint = fingerprint if fingerprint is not None else fingerprint_of(params, seal_to_bytes(public_key))

    @classmethod
    def generate(cls, params: CKKSParams, rotation_steps: Iterable[int] = ()) -> KeySet:
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

    def public(self) -> KeySet:
        """The same keys without the secret key."""
        return KeySet(
            self.params, self.seal_context, self.public_key, self.relin_keys, self.galois_keys,
            self.rotation_steps, None, self.fingerprint,
        )

    @property
    def has_secret_key(self) -> bool:
        return self.secret_key is not None

    def has_rotation_key(self, step: int) -> bool:
        """Whether a rotation by ``step`` (any sign) has its Galois key (step 0 needs none)."""
        norm = int(step) % self.params.slots
        return norm == 0 or norm in self.rotation_steps
