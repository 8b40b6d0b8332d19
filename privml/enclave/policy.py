"""Per-key decryption policy: budget, rate limit, flooding and where the key may live.

The client fixes the policy when it provisions a key (it travels as authenticated data next to the
encrypted key, so the server cannot change it) and the enclave enforces it on every refresh:
IND-CPA-D attacks need many decryptions, so each one is counted, rate-limited and flooded.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from privml.enclave import protocol
from privml.errors import AttestationError, DecryptionBudgetExhausted, MalformedInput

MODES = ("refresh", "relu")
MIN_FLOOD_SECURITY_BITS = 30


class PolicyRefused(AttestationError):
    """The enclave refused an operation its key policy (or its own configuration) does not allow."""

    wire_code = "policy"


@dataclass(frozen=True)
class Policy:
    """What the enclave may do with one provisioned key.

    ``decryption_budget``: ciphertexts it may ever decrypt; ``rate_limit``: ciphertexts per second
    (token bucket holding at most one second's worth, at least one); ``flood_sigma``: standard
    deviation of the Gaussian noise added to every decrypted slot (value units) before
    re-encryption, sized by the client for ``flood_security_bits`` of statistical security (>= 30;
    see DESIGN.md section 5); ``modes``: the refresh modes allowed; ``allowed_regions``: regions
    whose enclaves may hold the key (provisioning elsewhere is refused).
    """

    decryption_budget: int = 10_000
    rate_limit: float = 1_000.0
    flood_sigma: float = 1e-5
    flood_security_bits: int = 40
    modes: tuple[str, ...] = MODES
    allowed_regions: tuple[str, ...] = ("eu-central-1",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "modes", tuple(self.modes))
        object.__setattr__(self, "allowed_regions", tuple(self.allowed_regions))
        self.check()

    def check(self) -> None:
        """MalformedInput unless every field is well typed and in range."""
        def bad(msg: str) -> MalformedInput:
            return MalformedInput(f"invalid policy: {msg}")

        if not isinstance(self.decryption_budget, int) or isinstance(self.decryption_budget, bool) \
                or not 0 <= self.decryption_budget < 2**62:
            raise bad("decryption_budget must be a non-negative integer")
        if not isinstance(self.rate_limit, (int, float)) or isinstance(self.rate_limit, bool) \
                or not (math.isfinite(self.rate_limit) and self.rate_limit > 0):
            raise bad("rate_limit must be a positive number of ciphertexts per second")
        if not isinstance(self.flood_sigma, (int, float)) or isinstance(self.flood_sigma, bool) \
                or not (math.isfinite(self.flood_sigma) and self.flood_sigma > 0):
            raise bad("flood_sigma must be a positive finite number")
        if not isinstance(self.flood_security_bits, int) or isinstance(self.flood_security_bits, bool) \
                or not MIN_FLOOD_SECURITY_BITS <= self.flood_security_bits <= 256:
            raise bad(f"flood_security_bits must be an integer in [{MIN_FLOOD_SECURITY_BITS}, 256]")
        if not self.modes or any(m not in MODES for m in self.modes) or len(set(self.modes)) != len(self.modes):
            raise bad(f"modes must be a non-empty subset of {MODES}")
        if not self.allowed_regions or any(not isinstance(r, str) or not 0 < len(r) <= 64
                                           for r in self.allowed_regions):
            raise bad("allowed_regions must be a non-empty list of region names")

    def to_dict(self) -> dict[str, Any]:
        return {"decryption_budget": self.decryption_budget, "rate_limit": float(self.rate_limit),
                "flood_sigma": float(self.flood_sigma), "flood_security_bits": self.flood_security_bits,
                "modes": list(self.modes), "allowed_regions": list(self.allowed_regions)}

    @classmethod
    def from_dict(cls, data: Any) -> Policy:
        if not isinstance(data, Mapping) or set(data) != set(cls.__dataclass_fields__):
            raise MalformedInput("invalid policy: fields must be exactly " + ", ".join(cls.__dataclass_fields__))
        try:
            return cls(decryption_budget=data["decryption_budget"], rate_limit=data["rate_limit"],
                       flood_sigma=data["flood_sigma"], flood_security_bits=data["flood_security_bits"],
                       modes=tuple(data["modes"]), allowed_regions=tuple(data["allowed_regions"]))
        except TypeError as exc:
            raise MalformedInput(f"invalid policy: {exc}") from exc

    def to_cbor(self) -> bytes:
        return protocol.dumps(self.to_dict())

    @classmethod
    def from_cbor(cls, data: bytes) -> Policy:
        return cls.from_dict(protocol.loads(data))


@dataclass
class TokenBucket:
    """Rate limiter: ``rate`` tokens per second, holding at most ``capacity`` (thread-safe)."""

    rate: float
    capacity: float
    tokens: float = -1.0
    stamp: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if self.tokens < 0:
            self.tokens = self.capacity

    @classmethod
    def for_policy(cls, policy: Policy) -> TokenBucket:
        return cls(rate=float(policy.rate_limit), capacity=max(float(policy.rate_limit), 1.0))

    def take(self, n: int) -> None:
        """Spend ``n`` tokens or raise DecryptionBudgetExhausted (spending none)."""
        with self._lock:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if n > self.tokens:
                wait = (n - self.tokens) / self.rate
                raise DecryptionBudgetExhausted(
                    f"rate limit: {n} ciphertext(s) requested but the key allows {self.rate:g}/s "
                    f"(burst {self.capacity:g}); retry in {wait:.2f} s"
                    + (" or send fewer per request" if n > self.capacity else "")
                )
            self.tokens -= n
