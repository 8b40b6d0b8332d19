"""CKKS at scale: batches packed several features per ciphertext, the public context's size and its budget, and
sessions bounded by ``memory_limit`` (refused before key generation, or streaming their encoded diagonals)."""

from __future__ import annotations

import json
import struct
import warnings

import pytest
import torch
import torch.nn as nn

import privml
from privml.backends.ckks import _TENSOR_MAGIC, _TENSOR_VERSION, _digest
from privml.errors import BudgetError, InvalidInput, MalformedInput, MemoryLimitExceeded
from privml.he import memory
from privml.he.params import CKKSParams


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                         nn.Linear(64, 10)).eval()


def _compile(layout: str, **kw: object):
    torch.manual_seed(0)
    calib = torch.rand(64, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return privml.compile(_model(), calib, backend="ckks", layout=layout, degree=2,
                              poly_modulus_degree=8192, **kw), calib


def test_partial_batch_packs_features_together_and_matches_one_feature_per_ciphertext() -> None:
    packed, calib = _compile("throughput", batch_size=40)
    single, _ = _compile("throughput")
    assert packed.plan.params["lanes"] == 64 and single.plan.params["lanes"] is None
    x = calib[:40]
    with privml.Session(packed.plan) as s:
        enc = s.encrypt(x)
        assert len(enc.payload) == 1  # 64 input features x 64 lanes fill one ciphertext of 4096 slots
        y = s.decrypt(packed(enc))
        with pytest.raises(InvalidInput, match="batch_size"):
            s.encrypt(calib[:41].repeat(2, 1, 1, 1)[:65])
    with privml.Session(single.plan) as s:
        enc = s.encrypt(x)
        assert len(enc.payload) == 64
        y1 = s.decrypt(single(enc))
    ref = packed(x)
    assert torch.allclose(y, ref, atol=1e-3) and torch.allclose(y1, ref, atol=1e-3)


def test_lanes_on_maps_larger_than_a_ciphertext_use_polyphase_planes_and_match_torch() -> None:
    """256 lanes leave 16 features per ciphertext: the 8x8 maps go into 2x2 polyphase planes of 4x4, the
    first pooling becomes ciphertext additions inside the next convolution, and the result equals torch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(4, 4, 3, padding=1),
                          nn.Flatten(), nn.Linear(64, 10)).eval()
    calib = torch.rand(256, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = privml.compile(model, calib, backend="ckks", layout="throughput", degree=2, batch_size=200,
                           poly_modulus_degree=8192)
    assert c.plan.params["lanes"] == 256
    x = calib[:200]
    with privml.Session(c.plan) as s:
        enc = s.encrypt(x)
        assert enc.packing.kind == "phase" and enc.packing.grid[3] == 2 and len(enc.payload) == 4
        s.backend.ctx.reset_stats()
        y = s.decrypt(c(enc))
        mults = s.backend.ctx.stats["ct_pt_mults"]
    # conv1: 16 planes x 9 taps; pool+conv2+linear: 4 channels x 16 diagonals (not x 4 pooled cells)
    assert mults <= 16 * 9 + 4 * 16
    ref = c(x)
    assert torch.allclose(y, ref, atol=1e-3 * float(ref.abs().max()) + 1e-3), (y - ref).abs().max()


def test_a_request_packed_for_other_lanes_is_refused() -> None:
    packed, calib = _compile("throughput", batch_size=40)
    with privml.Session(packed.plan) as s:
        data = s.backend.dumps(s.encrypt(calib[:8]))
        hlen = struct.unpack("<HI", data[8:14])[1]
        header = json.loads(data[14:14 + hlen])
        header["packing"]["width"], header["packing"]["per_ct"] = 128, 32  # a packing the plan's keys do not fit
        raw = json.dumps(header).encode()
        forged = _TENSOR_MAGIC + struct.pack("<HI", _TENSOR_VERSION, len(raw)) + raw + data[14 + hlen:-32]
        forged += _digest(forged)
        with pytest.raises(MalformedInput, match="packing"):
            s.backend.loads(forged)


@pytest.mark.parametrize("steps", [[1, 2, 4], list(range(1, 30))])
def test_public_context_size_is_predicted_within_15_percent(steps: list[int]) -> None:
    from privml.he.context import CKKSContext
    from privml.he.serialize import dump_context

    params = CKKSParams(8192, (40, 30, 30, 30, 40), 30)
    actual = len(dump_context(CKKSContext.generate(params, steps).public()))
    predicted = memory.public_context_bytes(params, len(steps))
    assert abs(predicted - actual) <= 0.15 * actual, (predicted, actual)


def test_fewer_keys_cost_more_key_switches_and_every_step_still_composes() -> None:
    from privml.he.rotations import choose_keys, decompose

    slots = 4096
    uses = {s: 1 + s % 3 for s in range(1, 200, 7)} | {-s: 2 for s in range(16, 400, 16)}
    last_keys, last_switches = None, 0
    for budget in (64, 40, 30, 24, 20):  # the powers of two the steps need (19 here) are the floor
        keys, switches = choose_keys(uses, slots, budget)
        assert len(keys) <= budget and switches >= last_switches
        assert last_keys is None or len(keys) <= last_keys
        assert all(decompose(s, keys, slots) for s in uses)
        last_keys, last_switches = len(keys), switches
    assert last_switches > sum(uses.values())  # compositions: more than one key switch per rotation


def test_context_budget_is_met_or_refused_and_the_plan_runs() -> None:
    free, calib = _compile("latency")
    p = free.plan.params
    assert p["key_mode"] in ("direct", "few") and p["public_context_mb"] > 0
    capped, _ = _compile("latency", max_context_mb=p["public_context_mb"] + 0.5)
    pc = capped.plan.params
    assert pc["public_context_mb"] <= p["public_context_mb"] + 0.5
    with privml.Session(capped.plan) as s:
        assert len(s.backend.public_context()) <= 1.1 * pc["public_context_mb"] * 1e6
        y = s.decrypt(capped(s.encrypt(calib[:2])))
    assert torch.allclose(y, capped(calib[:2]), atol=1e-3)
    with pytest.raises(BudgetError, match="max_context_mb"):
        _compile("latency", max_context_mb=1)


def test_memory_limit_refuses_before_key_generation_and_streams_diagonals_when_only_they_are_over() -> None:
    compiled, calib = _compile("latency")
    mem = compiled.plan.params["memory_gb"]
    assert set(mem) == {"keys", "plaintexts", "ciphertexts", "base", "total"} and mem["plaintexts"] > 0
    with pytest.raises(MemoryLimitExceeded, match="memory_limit=0.1 GB"):
        privml.Session(compiled.plan, memory_limit=0.1)
    fixed = mem["keys"] + mem["ciphertexts"] + mem["base"]
    limit = fixed + 0.5 * mem["plaintexts"]
    with pytest.warns(UserWarning, match="re-encoded"):
        session = privml.Session(compiled.plan, memory_limit=limit)
    with session as s:
        assert s.backend.ctx.cache_bytes < mem["plaintexts"] * 1e9
        y = s.decrypt(compiled(s.encrypt(calib[:2])))
    assert torch.allclose(y, compiled(calib[:2]), atol=1e-3)


def test_a_forged_memory_prediction_is_refused() -> None:
    import dataclasses

    compiled, _ = _compile("latency")
    for bad in ({"ciphertexts": "lots", "plaintexts": 0}, {"ciphertexts": -1.0, "plaintexts": 0}):
        plan = dataclasses.replace(compiled.plan, params={**compiled.plan.params, "memory_gb": bad})
        with pytest.raises(MalformedInput, match="memory"):
            privml.Session(plan, memory_limit=8)
