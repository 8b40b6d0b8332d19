"""Provenance of an evaluation: versions, the command, and SHA-256 hashes of what it used.

Every hash names a file the run directory (or the user's tree) holds, so anyone can check it with
``sha256sum``: the training config, the checkpoint, the plan, the saved predictions, the attestation
document. Tensors (weights, the data split) are hashed in a fixed order over their raw bytes:
:func:`tensors_sha256` recomputes them.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

DEPENDENCIES = ("torch", "torchvision", "tenseal", "crypten", "lightning", "numpy", "cryptography", "cbor2", "pycose",
                "scikit-learn", "matplotlib", "psutil")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tensors_sha256(tensors: Mapping[str, torch.Tensor] | Iterable[torch.Tensor]) -> str:
    """SHA-256 over tensors in order (a mapping: sorted by name, each name hashed too): dtype, shape, bytes."""
    h = hashlib.sha256()
    items = sorted(tensors.items()) if isinstance(tensors, Mapping) else enumerate(tensors)
    for name, t in items:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def versions() -> dict[str, str]:
    """privml, Python and the dependency versions installed here ("not installed" where absent)."""
    out = {"privml": _version("privml"), "python": platform.python_version(), "platform": platform.platform()}
    for name in DEPENDENCIES:
        out[name] = _version(name)
    return out


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def command() -> str:
    """The command line that produced the run."""
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python"


def file_entry(path: str | Path) -> dict[str, Any]:
    """{"path", "sha256", "bytes"} of a file."""
    path = Path(path)
    return {"path": str(path), "sha256": sha256_file(path), "bytes": path.stat().st_size}


def verify(manifest: Mapping[str, Any], root: str | Path = ".") -> list[str]:
    """Every ``{"path", "sha256"}`` entry of ``manifest`` (nested anywhere) whose file is missing or differs.

    Relative paths are taken from ``root`` (the run directory for the files it holds). An empty list: all verify.
    """
    bad: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, Mapping):
            if isinstance(node.get("path"), str) and isinstance(node.get("sha256"), str):
                p = Path(node["path"])
                p = p if p.is_absolute() or not (Path(root) / p).exists() else Path(root) / p
                if not p.is_file() or sha256_file(p) != node["sha256"]:
                    bad.append(node["path"])
            for v in node.values():
                walk(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v)

    walk(manifest)
    return bad
