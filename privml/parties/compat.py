"""Import CrypTen 0.4.1 on a modern torch; the only place in privml that imports crypten.

CrypTen 0.4.1 (2022) does ``from torch.onnx._internal.registration import registry``.
Since torch 2.9 that module lives at ``torch.onnx._internal.torchscript_exporter.registration``,
so a plain ``import crypten`` fails. :func:`import_crypten` aliases the old name to the new
module in ``sys.modules`` (only when the old one is missing) and then imports crypten.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

from privml.errors import BackendUnavailable

OLD_REGISTRATION = "torch.onnx._internal.registration"
NEW_REGISTRATION = "torch.onnx._internal.torchscript_exporter.registration"

INSTALL_HINT = (
    "privml's MPC backend needs CrypTen 0.4.1. Install it with:\n"
    "    pip install --no-deps crypten==0.4.1\n"
    "    pip install omegaconf onnx pyyaml\n"
    "(--no-deps because CrypTen's metadata asks for the withdrawn 'sklearn' package.)"
)

# Modules whose absence means "CrypTen is not (fully) installed" rather than a bug.
_CRYPTEN_RUNTIME_DEPS = {"crypten", "omegaconf", "onnx", "yaml"}


def _module_exists(name: str) -> bool:
    """True if ``name`` is importable (or already imported), without raising."""
    if name in sys.modules:
        return True
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def apply_torch_onnx_shim() -> bool:
    """Alias the pre-2.9 ONNX registration module if it is missing; return True if aliased.

    Idempotent: a second call finds the alias in ``sys.modules`` and does nothing.
    """
    if _module_exists(OLD_REGISTRATION):
        return False
    if not _module_exists(NEW_REGISTRATION):
        # Neither layout: leave it to crypten's own import error.
        return False
    sys.modules[OLD_REGISTRATION] = importlib.import_module(NEW_REGISTRATION)
    return True


def import_crypten() -> ModuleType:
    """Return the ``crypten`` module, applying the torch>=2.9 shim first if needed.

    Raises :class:`~privml.errors.BackendUnavailable` with the install commands when CrypTen
    or one of its run-time dependencies is missing.
    """
    if "crypten" in sys.modules:
        return sys.modules["crypten"]
    apply_torch_onnx_shim()
    try:
        import crypten
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        if top in _CRYPTEN_RUNTIME_DEPS:
            raise BackendUnavailable(f"cannot import {exc.name!r}. {INSTALL_HINT}") from exc
        raise
    return crypten
