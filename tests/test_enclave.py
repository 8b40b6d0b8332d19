"""The simulated enclave end to end: real processes, Unix sockets and SEAL ciphertexts.

Attestation verifies against the pinned root and this install's measurement; provisioning then a
refresh returns top-level ciphertexts within the flooding bound (pure refresh and exact ReLU); the
budget counts down; the audit log verifies; sealed keys (and the budget spent) survive a crash and
restart, and an enclave with another configuration (PCR1) cannot unseal them.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from privml.enclave import (
    EnclaveClient,
    Policy,
    attest_and_provision,
    expected_measurement,
    launch,
    verify_attestation,
    verify_audit_log,
)
from privml.errors import KeyMaterialError
from privml.he.context import CKKSContext
from privml.he.params import CKKSParams
from privml.he.serialize import dump_ciphertexts, dump_context, load_ciphertexts

SIGMA = 1e-5
BOUND = 6 * SIGMA + 1e-6
REGION = "eu-central-1"


@pytest.fixture(scope="module")
def ctx() -> CKKSContext:
    return CKKSContext.generate(CKKSParams(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40, 40, 60),
                                           scale_bits=40))


@pytest.fixture(scope="module")
def enclave(tmp_path_factory):
    proc = launch(tmp_path_factory.mktemp("enclave"), region=REGION)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(enclave):
    with EnclaveClient(enclave.address, timeout=30) as c:
        yield c


def provision(client, enclave, ctx, **policy_kw):
    policy = Policy(**{"decryption_budget": 1000, "flood_sigma": SIGMA, "allowed_regions": (REGION,), **policy_kw})
    return attest_and_provision(client, root_certificate=enclave.root_certificate, region_allowed=[REGION],
                                secret_context=dump_context(ctx, include_secret=True), policy=policy,
                                config=enclave.config)


@pytest.fixture(scope="module")
def key(client, enclave, ctx):
    return provision(client, enclave, ctx)


def low_level(ctx, values):
    """An encryption of ``values`` brought down two levels (as a computation would)."""
    ct = ctx.mul_plain(ctx.mul_plain(ctx.encrypt(values), 1.0), 1.0)
    assert ctx.level(ct) < ctx.max_level
    return ct


def test_attestation_verifies(client, enclave):
    nonce = os.urandom(32)
    doc = client.attest(nonce)
    att = verify_attestation(doc, root_certificate=enclave.root_certificate,
                             expected_pcrs=expected_measurement(enclave.config), nonce=nonce,
                             allowed_regions=[REGION])
    assert att.region == REGION
    assert len(att.public_key) == 32
    assert att.pcrs == expected_measurement(enclave.config)
    assert set(att.pcrs) == {0, 1, 2} and all(len(v) == 48 for v in att.pcrs.values())
    # each attestation carries a fresh ephemeral key
    att2 = verify_attestation(client.attest(nonce), root_certificate=enclave.root_certificate,
                              expected_pcrs=expected_measurement(), nonce=nonce, allowed_regions=None)
    assert att2.public_key != att.public_key


@pytest.mark.parametrize("mode", ["refresh", "relu"])
def test_refresh_round_trip(client, key, ctx, mode):
    _, receipt = key
    rng = np.random.default_rng(1)
    xs = [rng.uniform(-2, 2, ctx.slots), np.linspace(-1, 1, ctx.slots)]
    cts = [low_level(ctx, x) for x in xs]
    before = client.status()["keys"][receipt.key_id]["budget_left"]
    data, left = client.refresh(receipt.key_id, receipt.server_token, mode, dump_ciphertexts(ctx, cts), len(cts))
    assert left == before - len(cts)
    out = load_ciphertexts(ctx, data)
    assert len(out) == len(cts)
    for x, ct in zip(xs, out, strict=True):
        assert ctx.level(ct) == ctx.max_level
        want = x if mode == "refresh" else np.maximum(x, 0)
        err = np.abs(ctx.decrypt(ct) - want).max()
        assert err <= BOUND, err
        assert err > 0  # flooded: not the exact value
    # the refreshed ciphertext computes on: two more levels are available again
    again = ctx.mul_plain(ctx.mul_plain(out[0], 1.0), 1.0)
    assert np.abs(ctx.decrypt(again) - (xs[0] if mode == "refresh" else np.maximum(xs[0], 0))).max() <= BOUND


def test_audit_log_verifies_and_lists_operations(client, key, ctx):
    att, receipt = key
    data, _ = client.refresh(receipt.key_id, receipt.server_token, "refresh",
                             dump_ciphertexts(ctx, [low_level(ctx, [0.5])]), 1)
    nonce = os.urandom(16)
    entries, signed = client.audit(nonce)
    head = verify_audit_log(entries, signed, attestation=att, nonce=nonce)
    assert len(head) == 32
    ops = [e["op"] for e in entries]
    assert ops[0] == "start" and "attest" in ops and "provision" in ops and ops[-1] == "audit"
    refreshes = [e for e in entries if e["op"] == "refresh" and e["key_id"] == receipt.key_id]
    assert refreshes and refreshes[-1]["count"] == 1 and refreshes[-1]["mode"] == "refresh"
    assert refreshes[-1]["actor"].startswith("server:") and len(refreshes[-1]["actor"]) == len("server:") + 8
    left = [e["budget_left"] for e in refreshes]
    assert left == sorted(left, reverse=True)
    # the leaf certificate (DER) works as the key too
    verify_audit_log(entries, signed, leaf_public_key=att.certificate, nonce=nonce)


def test_state_survives_a_crash_and_other_configurations_cannot_unseal(tmp_path, ctx):
    state = tmp_path / "state"
    proc = launch(state, region=REGION)
    try:
        with EnclaveClient(proc.address) as c:
            att, receipt = provision(c, proc, ctx, decryption_budget=10)
            ct = dump_ciphertexts(ctx, [low_level(ctx, [1.0, -1.0]), low_level(ctx, [0.25])])
            _, left = c.refresh(receipt.key_id, receipt.server_token, "refresh", ct, 2)
            assert left == 8
        sealed = state / "sealed" / f"{receipt.key_id}.bin"
        assert sealed.exists() and (sealed.stat().st_mode & 0o777) == 0o600
        assert (state / "sealed" / f"{receipt.key_id}.ctr").exists()
        proc.kill()
        assert not proc.alive()
        proc.restart()
        with EnclaveClient(proc.address) as c:
            assert c.status()["keys"][receipt.key_id]["budget_left"] == 8  # from the sealed counter
        proc.kill()
        # a host deleting (or rolling back) the counter does not refill the budget: the audit log witnesses it
        (state / "sealed" / f"{receipt.key_id}.ctr").unlink()
        proc.restart()
        with EnclaveClient(proc.address) as c:
            assert c.status()["keys"][receipt.key_id]["budget_left"] == 8  # budget used persisted
            data, left = c.refresh(receipt.key_id, receipt.server_token, "relu",
                                   dump_ciphertexts(ctx, [low_level(ctx, [1.0, -1.0])]), 1)
            assert left == 7
            got = ctx.decrypt(load_ciphertexts(ctx, data)[0])[:2]
            assert np.abs(got - [1.0, 0.0]).max() <= BOUND
            nonce = os.urandom(16)
            entries, signed = c.audit(nonce)
            verify_audit_log(entries, signed, attestation=att, nonce=nonce)  # one chain across the restart
            assert [e["op"] for e in entries].count("start") == 3
    finally:
        proc.stop()

    # the same state under another region: PCR1 differs, so the sealing key differs
    copy = tmp_path / "copy"
    shutil.copytree(state, copy, ignore=shutil.ignore_patterns("*.sock"))
    other = launch(copy, region="us-east-1")
    try:
        with EnclaveClient(other.address) as c:
            st = c.status()
            assert receipt.key_id in st["unavailable"] and receipt.key_id not in st["keys"]
            with pytest.raises(KeyMaterialError, match="unavailable"):
                c.refresh(receipt.key_id, receipt.server_token, "refresh",
                          dump_ciphertexts(ctx, [low_level(ctx, [1.0])]), 1)
    finally:
        other.stop()
    assert (copy / "sealed" / f"{receipt.key_id}.bin").exists()  # never deleted, only unusable


def test_concurrent_clients(enclave, key, ctx):
    import threading

    _, receipt = key
    data = dump_ciphertexts(ctx, [low_level(ctx, [0.75, -0.75])])
    with EnclaveClient(enclave.address) as c:
        before = c.status()["keys"][receipt.key_id]["budget_left"]
    results, errors = [], []

    def worker():
        try:
            with EnclaveClient(enclave.address) as c:
                for _ in range(2):
                    out, _ = c.refresh(receipt.key_id, receipt.server_token, "relu", data, 1)
                    results.append(ctx.decrypt(load_ciphertexts(ctx, out)[0])[:2])
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 6
    assert all(np.abs(r - [0.75, 0.0]).max() <= BOUND for r in results)
    with EnclaveClient(enclave.address) as c:
        assert c.status()["keys"][receipt.key_id]["budget_left"] == before - 6
