"""Backends, imported lazily (like einops): ``import privml`` loads neither TenSEAL nor CrypTen.

Each backend module defines ``make_backend(plan, **options)`` returning an object
with ``encrypt(x) -> PrivateTensor`` and ``decrypt(t) -> torch.Tensor``; ``options`` are its
session config's (:mod:`privml.config`). Backend ``name`` lives in ``privml.backends.<name>``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from privml.config import check_backend
from privml.errors import BackendUnavailable

INSTALL_HINTS = {
    "tenseal": "pip install tenseal==0.3.18",
    "crypten": "pip install --no-deps crypten==0.4.1 && pip install omegaconf onnx pyyaml",
}


def load_backend(name: str) -> ModuleType:
    """Import the module of backend ``name`` on first use, with a clear error if it cannot load."""
    module_name = f"privml.backends.{check_backend(name)}"
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        missing = err.name or ""
        if missing == module_name:
            raise BackendUnavailable(f"privml: the {name!r} backend is not part of this privml version yet.") from None
        lib = missing.split(".")[0]
        hint = INSTALL_HINTS.get(lib, f"pip install {lib}")
        raise BackendUnavailable(f"privml: the {name!r} backend needs {lib!r}, which is not installed: {hint}") from err
