"""Saved bundles: what a model owner ships to its server and to its clients after ``privml.compile``.

``save(compiled, dir)`` writes two directories (the split of Concrete ML's FHEModelDev/Server/Client):

- ``dir/server``: the plan, the compiled module (weights included), a manifest with versions and SHA-256
  hashes. ``load_server`` gives back a :class:`~privml.CompiledModel` ready for ``CKKSServer.run`` /
  ``privml serve``: no calibration data, no recompilation.
- ``dir/client``: the plan and a manifest, no weights. The plan is all a client needs to generate keys,
  encode and check results (``privml.Session(load_client(dir))``).

Loading checks the format, the library versions (a SEAL or torch upgrade changes what the bytes mean), every
file's hash, that the plan is the one the manifest names and the weights are the ones it was saved with, and
for CKKS that the module still routes within the plan's depth. ``signing_key=`` (Ed25519, via
``cryptography``) signs the manifest; ``load_server(..., verify_key=)`` then refuses any bundle not signed by
it: hashes alone catch corruption and mixed-up files, a signature catches someone who rewrites them all.

The module is stored with ``torch.save`` (pickle: the model's classes must be importable where it loads) and
unpickled only after every hash (and the signature, when asked) verified.
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from privml.compiler.api import CompiledModel
from privml.compiler.plan import Plan
from privml.errors import BundleError, InvalidInput
from privml.manifest import sha256_bytes, sha256_file, tensors_sha256, versions

FORMAT = "privml-bundle"
FORMAT_VERSION = 1
MANIFEST, SIGNATURE, PLAN, MODULE = "manifest.json", "manifest.sig", "plan.json", "module.pt"
MAX_MANIFEST_BYTES = 1 << 20
# versions that change what a bundle's bytes mean: privml (plan schema, packing), torch (the pickled module),
# TenSEAL (SEAL's serialization of ciphertexts and keys)
PINNED = {"plain": ("privml", "torch"), "mpc": ("privml", "torch", "crypten"),
          "ckks": ("privml", "torch", "tenseal"), "hybrid": ("privml", "torch", "tenseal")}


@dataclass(frozen=True)
class BundlePaths:
    """Where :func:`save` wrote the two bundles."""

    server: Path
    client: Path


def save(compiled: CompiledModel, directory: str | Path, *, signing_key: Any = None,
         overwrite: bool = False) -> BundlePaths:
    """Write ``directory/server`` (plan, module, manifest) and ``directory/client`` (plan, manifest; no weights).

    ``signing_key``: an Ed25519 private key (``cryptography``); the manifests are signed with it.
    An existing bundle is refused unless ``overwrite``."""
    if not isinstance(compiled, CompiledModel):
        raise InvalidInput(f"privml.save needs a compiled model (privml.compile(...)), got {type(compiled).__name__}")
    root = Path(directory)
    paths = BundlePaths(root / "server", root / "client")
    for p in (paths.server, paths.client):
        if (p / MANIFEST).exists() and not overwrite:
            raise InvalidInput(f"privml: {p} already holds a bundle; pass overwrite=True to replace it")
    plan_bytes = compiled.plan.to_json().encode()
    buf = io.BytesIO()
    torch.save(compiled.module, buf)
    weights = tensors_sha256(compiled.module.state_dict())
    _write(paths.server, "server", compiled.plan, {PLAN: plan_bytes, MODULE: buf.getvalue()}, signing_key,
           {"weights_sha256": weights})
    _write(paths.client, "client", compiled.plan, {PLAN: plan_bytes}, signing_key, {})
    return paths


def _write(directory: Path, role: str, plan: Plan, files: dict[str, bytes], signing_key: Any,
           extra: dict[str, Any]) -> None:
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    have = versions()
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "role": role, "backend": plan.backend,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {name: have[name] for name in PINNED[plan.backend]},
        "plan_sha256": sha256_bytes(files[PLAN]),
        "files": {name: {"sha256": sha256_bytes(data), "bytes": len(data)} for name, data in files.items()},
        **extra,
    }
    body = json.dumps(manifest, indent=2, sort_keys=True).encode()
    (directory / MANIFEST).write_bytes(body)
    if signing_key is not None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        if not isinstance(signing_key, Ed25519PrivateKey):
            raise InvalidInput("privml: signing_key must be a cryptography Ed25519PrivateKey")
        (directory / SIGNATURE).write_bytes(signing_key.sign(body))


def _read_manifest(directory: str | Path, role: str, verify_key: Any) -> tuple[Path, dict[str, Any]]:
    """The checked manifest of the ``role`` bundle in ``directory`` (files, hashes, versions, signature)."""
    root = Path(directory)
    if not (root / MANIFEST).is_file() and (root / role / MANIFEST).is_file():
        root = root / role  # the directory given to save()
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(f"privml: no bundle at {directory} (no {MANIFEST}); write one with privml.save(compiled, "
                          "dir)")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"privml: {path} is too large to be a bundle manifest")
    body = path.read_bytes()
    if verify_key is not None:
        _verify_signature(root, body, verify_key)
    try:
        manifest = json.loads(body)
        ok = isinstance(manifest, dict) and manifest.get("format") == FORMAT
    except (ValueError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise BundleError(f"privml: {path} is not a privml bundle manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"privml: bundle format {manifest.get('format_version')!r}, this privml reads "
                          f"{FORMAT_VERSION}: save it again with this version")
    if manifest.get("role") != role:
        raise BundleError(f"privml: {root} is a {manifest.get('role')!r} bundle, not a {role} bundle")
    backend = manifest.get("backend")
    if backend not in PINNED or not isinstance(manifest.get("versions"), dict):
        raise BundleError(f"privml: the bundle names an unknown backend {backend!r}")
    have = versions()
    wrong = [f"{n} {manifest['versions'].get(n)!r} (here {have[n]!r})" for n in PINNED[backend]
             if manifest["versions"].get(n) != have[n]]
    if wrong:
        raise BundleError(f"privml: the bundle was saved with other versions: {', '.join(wrong)}. Compile and save "
                          "it again with the versions installed here.")
    files = manifest.get("files")
    if not isinstance(files, dict) or PLAN not in files:
        raise BundleError("privml: the bundle's manifest lists no plan")
    for name, entry in files.items():
        if name not in (PLAN, MODULE) or not isinstance(entry, dict):
            raise BundleError(f"privml: the bundle's manifest lists an unexpected file {name!r}")
        f = root / name
        if not f.is_file():
            raise BundleError(f"privml: the bundle lacks {name}")
        if f.stat().st_size != entry.get("bytes") or sha256_file(f) != entry.get("sha256"):
            raise BundleError(f"privml: {f} does not match the bundle's manifest (SHA-256 differs): the file was "
                              "changed or belongs to another bundle")
    if files[PLAN].get("sha256") != manifest.get("plan_sha256"):
        raise BundleError("privml: the bundle's plan is not the one its manifest was saved for")
    return root, manifest


def _verify_signature(root: Path, body: bytes, verify_key: Any) -> None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if not isinstance(verify_key, Ed25519PublicKey):
        raise InvalidInput("privml: verify_key must be a cryptography Ed25519PublicKey")
    sig = root / SIGNATURE
    if not sig.is_file():
        raise BundleError(f"privml: {root} is not signed ({SIGNATURE} missing) but a verify_key was given")
    try:
        verify_key.verify(sig.read_bytes(), body)
    except InvalidSignature:
        raise BundleError(f"privml: the signature of {root / MANIFEST} does not verify with the given key: the "
                          "manifest was changed or signed by someone else") from None


def _plan(root: Path) -> Plan:
    return Plan.from_json((root / PLAN).read_text())


def load_client(directory: str | Path, *, verify_key: Any = None) -> Plan:
    """The plan of a client bundle, checked (what ``privml.Session`` and ``privml.Client`` take)."""
    root, _ = _read_manifest(directory, "client", verify_key)
    return _plan(root)


def load_server(directory: str | Path, *, verify_key: Any = None) -> CompiledModel:
    """The compiled model of a server bundle, checked, ready to evaluate (no recompilation)."""
    root, manifest = _read_manifest(directory, "server", verify_key)
    if MODULE not in manifest["files"]:
        raise BundleError("privml: the server bundle's manifest lists no module")
    plan = _plan(root)
    if plan.backend != manifest["backend"]:
        raise BundleError(f"privml: the manifest says {manifest['backend']!r} but the plan is {plan.backend!r}")
    try:
        module = torch.load(root / MODULE, weights_only=False)  # hash-checked above
    except Exception as exc:  # noqa: BLE001 - whatever unpickling raises, the bundle is unusable
        raise BundleError(f"privml: cannot load the bundle's module: {type(exc).__name__}: {exc}") from None
    if not isinstance(module, torch.nn.Module):
        raise BundleError(f"privml: the bundle's module is a {type(module).__name__}, not a torch module")
    if tensors_sha256(module.state_dict()) != manifest.get("weights_sha256"):
        raise BundleError("privml: the bundle's weights are not the ones it was saved with")
    _check_depth(module, plan)
    return CompiledModel(module.eval(), plan)


def _check_depth(module: torch.nn.Module, plan: Plan) -> None:
    """CKKS: route the module without keys; refuse it if it needs more levels than the plan's parameters have."""
    if plan.backend != "ckks":
        return
    from privml.backends.ckks import _expansion_of, dry_run, names_of, split_before_of
    from privml.tensor import module_scope

    p = plan.params
    with module_scope(module):
        rt = dry_run(module, plan.input_shape, p["layout"], input_expansion=False, expansion=_expansion_of(plan),
                     slots=p["ckks"]["poly_modulus_degree"] // 2, lanes=p.get("lanes"),
                     key_mode=p.get("key_mode", "direct"), split_before=split_before_of(plan),
                     fold_bound=p.get("fold_bound"), no_fold=names_of(plan, "no_fold"))
    levels = len(p["ckks"]["coeff_mod_bit_sizes"]) - 2
    if rt.depth > levels:
        raise BundleError(f"privml: the bundle's module needs {rt.depth} levels but its plan's parameters have "
                          f"{levels}: module and plan come from different compilations")
