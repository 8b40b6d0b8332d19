"""TenSEAL's raw SEAL bindings, imported once, and SEAL objects <-> bytes.

The bindings only save and load file paths, so bytes go through a private temp dir
(RAM-backed ``/dev/shm`` where writable), removed at exit.
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import tempfile
from typing import Any

from privml.errors import BackendUnavailable, MalformedInput

try:
    import tenseal.sealapi as seal
except ImportError as exc:  # pragma: no cover - exercised only without TenSEAL
    raise BackendUnavailable("the CKKS backend needs TenSEAL: pip install tenseal==0.3.18") from exc

__all__ = ["seal", "seal_from_bytes", "seal_to_bytes"]

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
