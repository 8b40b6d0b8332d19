"""Saved bundles and sealed client keys: round trips on real CKKS ciphertexts, and every refusal.

A server bundle must evaluate exactly like the compiled model it was saved from (no recompilation); a client
bundle must carry no weights; tampered, mixed-up, re-versioned or wrongly signed bundles are refused before
anything is unpickled; sealed keys open only with their password or key file.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import torch.nn as nn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import privml
from privml import keystore
from privml.backends.ckks import CKKSServer
from privml.errors import BundleError, InvalidInput, KeyMaterialError, MalformedInput
from privml.manifest import sha256_file

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-3  # 40-bit CKKS scale: errors are ~1e-7 on these logits


def _cnn(seed: int = 0, hidden: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                         nn.Linear(36, hidden)).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    x = torch.rand(64, 1, 8, 8)
    compiled = privml.compile(_cnn(), x, backend="ckks")
    root = tmp_path_factory.mktemp("bundle")
    paths = privml.save(compiled, root / "b")
    return compiled, x, paths


def _copy(paths, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(paths.server.parent, dst)
    return dst


def _run(plan, server_model, x, session=None):
    session = session or privml.Session(plan)
    request = session.backend.dumps(session.encrypt(x))
    response = CKKSServer(server_model.plan, session.backend.public_context()).run(server_model, request)
    return session.decrypt(session.backend.loads(response)), session


def test_round_trip_evaluates_like_the_compiled_model(saved):
    compiled, x, paths = saved
    server_model = privml.load_server(paths.server)
    plan = privml.load_client(paths.client)
    assert plan.sha256() == compiled.plan.sha256() == server_model.plan.sha256()
    assert torch.equal(server_model(x[:4]), compiled(x[:4]))  # same weights, same approximations
    got, _ = _run(plan, server_model, x[:3])
    assert (got - compiled(x[:3])).abs().max() < TOL


def test_client_bundle_holds_no_weights(saved):
    compiled, _, paths = saved
    assert sorted(p.name for p in paths.client.iterdir()) == ["manifest.json", "plan.json"]
    weight = compiled.module.state_dict()
    big = max(weight.values(), key=lambda t: t.numel())
    needle = big.detach().contiguous().numpy().tobytes()[:64]
    for f in paths.client.iterdir():
        assert needle not in f.read_bytes()
    assert needle in (paths.server / "module.pt").read_bytes()  # the needle is findable where weights are


def test_the_directory_given_to_save_loads_by_role(saved):
    _, _, paths = saved
    root = paths.server.parent
    assert privml.load_client(root).sha256() == privml.load_server(root).plan.sha256()
    with pytest.raises(BundleError, match="server.*not a client"):
        privml.load_client(paths.server)
    with pytest.raises(BundleError, match="no bundle"):
        privml.load_server(root / "nowhere")


def test_refuses_to_overwrite_unless_asked(saved, tmp_path):
    compiled, _, _ = saved
    privml.save(compiled, tmp_path / "b")
    with pytest.raises(InvalidInput, match="overwrite"):
        privml.save(compiled, tmp_path / "b")
    privml.save(compiled, tmp_path / "b", overwrite=True)


@pytest.mark.parametrize("name", ["plan.json", "module.pt", "manifest.json"])
def test_tampered_files_are_refused(saved, tmp_path, name):
    _, _, paths = saved
    root = _copy(paths, tmp_path)
    f = root / "server" / name
    data = bytearray(f.read_bytes())
    if name == "manifest.json":
        manifest = json.loads(data)
        manifest["files"]["module.pt"]["sha256"] = "0" * 64
        data = json.dumps(manifest).encode()
    else:
        data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="SHA-256|manifest"):
        privml.load_server(root)


def test_files_of_another_compilation_are_refused(saved, tmp_path):
    """A plan and manifest from one bundle with the module of another: the weights hash differs."""
    _, x, paths = saved
    other = privml.save(privml.compile(_cnn(seed=1), x, backend="ckks"), tmp_path / "other")
    shutil.copy(paths.server / "module.pt", other.server / "module.pt")
    manifest = json.loads((other.server / "manifest.json").read_text())
    manifest["files"]["module.pt"] = {"sha256": sha256_file(other.server / "module.pt"),
                                      "bytes": (other.server / "module.pt").stat().st_size}
    (other.server / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="weights are not the ones"):
        privml.load_server(other.server)


def test_a_module_deeper_than_its_plan_is_refused(saved, tmp_path):
    """Consistent hashes, but the module needs more levels than the plan's CKKS parameters have."""
    compiled, x, _ = saved
    deep = nn.Sequential(_cnn(), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 10)).eval()
    deep_compiled = privml.compile(deep, x, backend="ckks")
    assert deep_compiled.plan.params["depth"] > compiled.plan.params["depth"]
    forged = privml.CompiledModel(deep_compiled.module, compiled.plan)
    paths = privml.save(forged, tmp_path / "forged")
    with pytest.raises(BundleError, match="levels"):
        privml.load_server(paths.server)


def test_other_versions_are_refused(saved, tmp_path):
    _, _, paths = saved
    root = _copy(paths, tmp_path)
    f = root / "server" / "manifest.json"
    manifest = json.loads(f.read_text())
    manifest["versions"]["tenseal"] = "0.0.1"
    f.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="tenseal '0.0.1'"):
        privml.load_server(root)


def test_signed_bundles_verify_only_with_their_key(saved, tmp_path):
    compiled, _, _ = saved
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    paths = privml.save(compiled, tmp_path / "signed", signing_key=key)
    privml.load_server(paths.server, verify_key=key.public_key())
    privml.load_client(paths.client, verify_key=key.public_key())
    with pytest.raises(BundleError, match="does not verify"):
        privml.load_server(paths.server, verify_key=other.public_key())
    # rewriting the manifest consistently (new hashes) still breaks the signature
    f = paths.server / "manifest.json"
    manifest = json.loads(f.read_text())
    manifest["created"] = "2000-01-01T00:00:00+00:00"
    f.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    privml.load_server(paths.server)  # hashes alone cannot tell
    with pytest.raises(BundleError, match="does not verify"):
        privml.load_server(paths.server, verify_key=key.public_key())
    unsigned = privml.save(compiled, tmp_path / "unsigned")
    with pytest.raises(BundleError, match="not signed"):
        privml.load_server(unsigned.server, verify_key=key.public_key())


def test_plain_bundles_round_trip(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(32, 1, 8, 8)
    compiled = privml.compile(_cnn(), x, backend="plain")
    paths = privml.save(compiled, tmp_path / "plain")
    assert torch.equal(privml.load_server(paths.server)(x), compiled(x))


# ---- sealed client keys


def test_sealed_keys_reopen_and_decrypt_results(saved, tmp_path):
    compiled, x, paths = saved
    plan = privml.load_client(paths.client)
    server_model = privml.load_server(paths.server)
    first, session = _run(plan, server_model, x[:2])
    path = session.save_keys(tmp_path / "keys.sealed", password="correct horse battery")
    assert os.stat(path).st_mode & 0o777 == 0o600
    from privml.he.sealio import seal_to_bytes

    secret = seal_to_bytes(session.backend.ctx.keys.secret_key)
    assert secret[-4096:] not in path.read_bytes()  # never written in clear
    again = privml.Session.from_keys(plan, path, password="correct horse battery")
    assert again.backend.ctx.fingerprint == session.backend.ctx.fingerprint
    # a result computed for the first session decrypts in the reopened one (same keys)
    request = session.backend.dumps(session.encrypt(x[2:4]))
    response = CKKSServer(plan, session.backend.public_context()).run(server_model, request)
    again.backend.sent_batches.add(2)
    got = again.decrypt(again.backend.loads(response))
    assert (got - compiled(x[2:4])).abs().max() < TOL
    assert (first - compiled(x[:2])).abs().max() < TOL


def test_sealed_keys_refuse_wrong_secrets_and_changed_bytes(saved, tmp_path):
    _, _, paths = saved
    plan = privml.load_client(paths.client)
    session = privml.Session(plan)
    path = session.save_keys(tmp_path / "k", password="correct horse battery")
    with pytest.raises(KeyMaterialError, match="wrong password"):
        privml.Session.from_keys(plan, path, password="correct horse batterY")
    blob = bytearray(path.read_bytes())
    blob[-100] ^= 0x40
    (tmp_path / "flipped").write_bytes(bytes(blob))
    with pytest.raises(KeyMaterialError, match="changed"):
        privml.Session.from_keys(plan, tmp_path / "flipped", password="correct horse battery")
    with pytest.raises(KeyMaterialError, match="sealed with a password"):
        privml.Session.from_keys(plan, path, key_file=tmp_path / "nope")
    (tmp_path / "junk").write_bytes(b"not a key file at all")
    with pytest.raises(MalformedInput, match="not a privml sealed key"):
        privml.Session.from_keys(plan, tmp_path / "junk", password="correct horse battery")
    with pytest.raises(InvalidInput, match="8 characters"):
        session.save_keys(tmp_path / "weak", password="short")


def test_key_file_sealing_and_keys_of_another_plan(saved, tmp_path):
    _, x, paths = saved
    plan = privml.load_client(paths.client)
    session = privml.Session(plan)
    kf = keystore.new_key_file(tmp_path / "client.key")
    assert os.stat(kf).st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        keystore.new_key_file(kf)
    path = session.save_keys(tmp_path / "k", key_file=kf)
    assert privml.Session.from_keys(plan, path, key_file=kf).backend.ctx.fingerprint == session.backend.ctx.fingerprint
    (tmp_path / "short.key").write_bytes(b"x" * 16)
    with pytest.raises(KeyMaterialError, match="32 random bytes"):
        privml.Session.from_keys(plan, path, key_file=tmp_path / "short.key")
    other = privml.compile(_cnn(), x, backend="ckks", poly_modulus_degree=16384)
    assert other.plan.params["ckks"]["poly_modulus_degree"] != plan.params["ckks"]["poly_modulus_degree"]
    with pytest.raises(KeyMaterialError, match="another plan"):
        privml.Session.from_keys(other.plan, path, key_file=kf)
