"""One error hierarchy for everything privml raises on purpose.

Users catch ``PrivmlError``; each subclass names a kind of problem so callers
(and tests) can react to it without parsing messages.
"""

from __future__ import annotations

from dataclasses import dataclass


class PrivmlError(Exception):
    """Base class of every error privml raises deliberately."""


class InvalidInput(PrivmlError, ValueError):
    """Input data is unusable: wrong shape, non-float dtype, NaN/inf values."""


class UnsupportedOperation(PrivmlError, NotImplementedError):
    """A private tensor met an op its backend has no implementation for."""


@dataclass(frozen=True)
class Problem:
    """One thing standing between a model and private execution.

    ``severity``: "error" (cannot run as is), "fixable" (``fix`` repairs it without
    changing the function), "warning" (runs, but with a caveat) or "info".
    """

    name: str
    kind: str
    message: str
    fix: str | None = None
    severity: str = "error"

    def __str__(self) -> str:
        where = self.name or "<root>"
        text = f"[{self.severity}] {where}: {self.message}"
        return text + (f" Fix: {self.fix}" if self.fix else "")


class UnsupportedModule(PrivmlError):
    """A model cannot be compiled as it is; ``problems`` lists every issue found.

    Each problem is a :class:`Problem` with the module's
    qualified name and, where one exists, a fix.
    """

    def __init__(self, message: str, problems: list | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems or [])


class CalibrationError(PrivmlError, ValueError):
    """Calibration data is empty, of the wrong shape, or gives degenerate ranges."""


class BudgetError(PrivmlError):
    """The requested error/depth/accuracy budget cannot be met."""


class MemoryLimitExceeded(BudgetError):
    """A session's plan is predicted to need more memory than its ``memory_limit``."""


class DepthExhausted(BudgetError):
    """A computation needs more multiplicative depth than the parameters allow."""


class RangeViolation(PrivmlError):
    """A value left the interval an approximation or encoder was calibrated for."""


class KeyMaterialError(PrivmlError):
    """Keys are missing, wrong for the data, or a secret key is where it must not be."""


class AttestationError(PrivmlError):
    """An enclave's attestation could not be verified."""


class DecryptionBudgetExhausted(BudgetError):
    """An enclave refused to decrypt: the key's decryption budget is spent (or its rate limit hit)."""


class PartyFailure(PrivmlError):
    """An MPC party died, stopped answering, or disagreed about the computation."""


class MalformedInput(PrivmlError, ValueError):
    """Serialized bytes are truncated, tampered with, or of an unknown version."""


class BundleError(MalformedInput):
    """A saved bundle is incomplete, tampered with, signed by another key or made for other versions or plans."""


class AuditLogError(MalformedInput):
    """An enclave audit log fails verification: an entry was edited, dropped, reordered or forged."""


class ServiceError(PrivmlError):
    """The inference service refused or failed a request; ``status`` is its HTTP status (0: unreachable)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class BackendUnavailable(PrivmlError, ImportError):
    """An optional backend library is not installed; the message says how to install it."""


class FidelityWarning(UserWarning):
    """The compiled model's predictions differ from the original's more than the fidelity target allows.

    Raised as a warning (``warnings.warn``) by ``privml.compile`` when no budget is given and the
    approximated model's argmax agrees with the original's on fewer calibration samples than
    ``agreement_target``; the message names the layers to blame and the remedies.
    """
