"""What the client checks itself: its own security level, the plan's schema and bounds, ranges per sample.

Red-team findings (issue 9): a received plan could turn the client's security off (``allow_insecure``), make it
generate thousands of Galois keys, or disable the decrypt check by widening/deleting ``output_range``; inputs
outside the calibrated range gave wrong predictions silently; one outlier made a whole batch raise.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn as nn

import privml
from privml.errors import KeyMaterialError, MalformedInput, RangeViolation
from privml.session import RangeWarning, SampleRangeViolation


def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from privml.data import load_digits_split

    train, test = load_digits_split(seed=0)
    return train.tensors[0].flatten(1), train.tensors[1], test.tensors[0].flatten(1), test.tensors[1]


@pytest.fixture(scope="module")
def digits_mlp():
    """A small MLP trained on the 8x8 digits (a second of training), with its train/test data."""
    torch.manual_seed(0)
    xtr, ytr, xte, yte = _digits()
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xtr), ytr).backward()
        opt.step()
    return model.eval(), xtr, xte, yte


@pytest.fixture(scope="module")
def ckks_plan(digits_mlp):
    model, xtr, _, _ = digits_mlp
    compiled = privml.compile(model, xtr, backend="ckks", layout="throughput", precision_bits=11)
    return compiled


def _plan_dict(compiled) -> dict:
    return json.loads(compiled.plan.to_json())


# ---- 1. the client decides its own security ----------------------------------------------------------------------
INSECURE = [
    {"poly_modulus_degree": 1024, "coeff_mod_bit_sizes": [60, 40, 40, 60, 40, 60], "scale_bits": 40},  # 300 bits
    {"poly_modulus_degree": 16384, "coeff_mod_bit_sizes": [60] * 11, "scale_bits": 40},  # 660 bits
]


@pytest.mark.parametrize("ckks", INSECURE, ids=["N1024-300bits", "N16384-660bits"])
def test_plan_cannot_allow_insecure_keys(ckks_plan, ckks) -> None:
    d = _plan_dict(ckks_plan)
    d["params"]["ckks"] = {**ckks, "allow_insecure": True}
    plan = privml.Plan.from_dict(d)
    assert plan.security_bits == 128  # the plan's claim, which the client does not believe
    with pytest.raises(KeyMaterialError, match="below 128-bit security.*asks for allow_insecure.*ignores"):
        privml.Session(plan)
    d["params"]["ckks"] = dict(ckks)  # no permission asked: refused all the same
    with pytest.raises(KeyMaterialError, match="below 128-bit security"):
        privml.Session(privml.Plan.from_dict(d))


def test_allow_insecure_string_is_malformed(ckks_plan) -> None:
    d = _plan_dict(ckks_plan)
    d["params"]["ckks"] = {**INSECURE[0], "allow_insecure": "false"}  # bool("false") is True
    with pytest.raises(MalformedInput, match="allow_insecure"):
        privml.Plan.from_dict(d)


def test_only_the_client_config_allows_insecure_keys(ckks_plan) -> None:
    d = _plan_dict(ckks_plan)
    d["params"]["ckks"] = dict(INSECURE[0])
    session = privml.Session(privml.Plan.from_dict(d), allow_insecure=True)
    assert session.security_bits == 0 and session.plan.params["security_bits"] == 0
    assert session.backend.ctx.params.poly_modulus_degree == 1024


def test_plan_permission_stripped_for_secure_params(ckks_plan) -> None:
    plan = privml.Plan.from_dict(_plan_dict(ckks_plan))
    plan.params["ckks"]["allow_insecure"] = True  # in-process plans are checked the same way
    session = privml.Session(plan)
    assert session.security_bits == 128 and session.backend.ctx.params.allow_insecure is False


# ---- 2. plan schema and bounds -----------------------------------------------------------------------------------
def _mutate(d: dict, path: str, value: object) -> dict:
    *head, last = path.split(".")
    target = d
    for key in head:
        target = target[int(key)] if isinstance(target, list) else target[key]
    if value is KeyError:
        del target[last]
    else:
        target[last] = value
    return d


BAD_PLANS = {
    "4000 rotation steps": ("params.rotation_steps", list(range(1, 4001))),
    "rotation step >= N/2": ("params.rotation_steps", [4096]),
    "rotation step not int": ("params.rotation_steps", [1.5]),
    "ring dimension": ("params.ckks.poly_modulus_degree", 3000),
    "prime too large": ("params.ckks.coeff_mod_bit_sizes", [61, 40, 61]),
    "chain not a list": ("params.ckks.coeff_mod_bit_sizes", "60,40,60"),
    "ckks not an object": ("params.ckks", 5),
    "output range deleted": ("params.output_range", KeyError),
    "output range reversed": ("params.output_range", [3.0, -3.0]),
    "output range NaN": ("params.output_range", [float("nan"), 1.0]),
    "output range inf": ("params.output_range", [float("-inf"), float("inf")]),
    "input range empty": ("params.input_range", [1.0, 1.0]),
    "input shape zero": ("input_shape", [0]),
    "input shape negative": ("input_shape", [-64]),
    "input shape huge": ("input_shape", [4096, 4096, 4096]),
    "input shape float": ("input_shape", [64.0]),
    "layers not a list": ("layers", "abc"),
    "layer without name": ("layers.0.name", KeyError),
    "layer unknown field": ("layers.0.evil", 1),
    "layer range text": ("layers.0.in_range", ["a", "b"]),
    "backend missing": ("backend", KeyError),
    "backend unknown": ("backend", "fhe"),
    "unknown field": ("evil", 1),
    "params not an object": ("params", []),
}


@pytest.mark.parametrize("name", list(BAD_PLANS))
def test_malformed_plans_are_refused(ckks_plan, name) -> None:
    path, value = BAD_PLANS[name]
    text = json.dumps(_mutate(_plan_dict(ckks_plan), path, value))
    with pytest.raises(MalformedInput):
        privml.Plan.from_json(text)


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"version": 1' + ', "a": [' * 50 + "]" * 50 + "}",
                                  '{"version": 1}', '{"version": 1, "backend": "ckks", "input_shape": 5}', "5", "",
                                  '{"version": 1, "backend": "ckks", "input_shape": [64], "layers": [[]]}'])
def test_crafted_json_gives_malformed_input(text) -> None:
    with pytest.raises(MalformedInput):
        privml.Plan.from_json(text)


def test_widened_output_range_cannot_disable_the_decrypt_check(ckks_plan) -> None:
    d = _plan_dict(ckks_plan)
    d["params"]["output_range"] = [-1e30, 1e30]
    with pytest.raises(MalformedInput, match="output range"):
        privml.Session(privml.Plan.from_dict(d))


def test_in_process_plan_is_checked_by_the_session(ckks_plan) -> None:
    plan = privml.Plan.from_dict(_plan_dict(ckks_plan))
    plan.params["rotation_steps"] = list(range(1, 4001))
    with pytest.raises(MalformedInput, match="rotation_steps"):
        privml.Session(plan)


def test_real_plans_round_trip(ckks_plan) -> None:
    plan = privml.Plan.from_json(ckks_plan.plan.to_json())
    assert plan.to_dict() == ckks_plan.plan.to_dict()
    lo, hi = plan.params["input_range"]
    assert lo < 0.0 and hi > 1.0  # [0, 1] pixels widened by the compile margin


# ---- 3. ranges per sample ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1.5, 2.0])
def test_inputs_outside_calibration_are_flagged_per_sample(digits_mlp, ckks_plan, scale) -> None:
    model, xtr, xte, _ = digits_mlp
    compiled = ckks_plan
    session = privml.Session(compiled.plan)
    x = xte[:12].clone()
    scaled = [1, 4, 9]
    x[scaled] *= scale
    hi = compiled.plan.params["input_range"][1]
    expected = [i for i in range(12) if float(x[i].max()) > hi]
    assert expected == scaled  # every scaled digit has ink above the widened calibrated maximum
    with pytest.raises(SampleRangeViolation) as info:
        session.encrypt(x)
    err = info.value
    assert isinstance(err, RangeViolation) and err.indices == scaled and session.last_out_of_range == scaled
    assert err.amounts == pytest.approx([float(x[i].max()) - hi for i in scaled], rel=1e-5)
    assert "sample 1 (by" in str(err) and err.valid_indices == [i for i in range(12) if i not in scaled]
    assert torch.equal(err.values, x[err.valid_indices])
    session.decrypt(compiled(session.encrypt(err.values)))  # the others go through

    warn = privml.Session(compiled.plan, out_of_range="warn")
    with pytest.warns(RangeWarning, match="3 of 12 samples"):
        warn.encrypt(x)
    assert warn.last_out_of_range == scaled


def test_exact_plans_do_not_restrict_inputs(digits_mlp) -> None:
    """Plain/MPC plans with nothing approximated compute exactly whatever the input: no input range to check."""
    model, xtr, xte, _ = digits_mlp
    for backend in ("plain", "mpc"):
        assert "input_range" not in privml.compile(model, xtr, backend=backend).plan.params


def test_ckks_at_scaled_inputs_is_never_silently_wrong(digits_mlp, ckks_plan) -> None:
    """At x1.5 and x2 every sample whose prediction would differ from the ReLU model's is flagged."""
    model, _, xte, _ = digits_mlp
    session = privml.Session(ckks_plan.plan, out_of_range="warn")
    for scale in (1.5, 2.0):
        x = xte[:40] * scale
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RangeWarning)
            session.encrypt(x)
        flagged = set(session.last_out_of_range)
        with torch.no_grad():
            differ = set((ckks_plan(x).argmax(1) != model(x).argmax(1)).nonzero().flatten().tolist())
        assert differ <= flagged, (scale, differ - flagged)
        assert len(flagged) >= 30


def test_decrypt_flags_outlier_samples_and_returns_the_rest(digits_mlp, ckks_plan) -> None:
    model, _, xte, _ = digits_mlp
    session = privml.Session(ckks_plan.plan, out_of_range="warn")
    x = xte[:8].clone()
    x[3] *= 30.0  # far outside: the polynomial ReLU blows up on this sample only
    with pytest.warns(RangeWarning):
        enc = session.encrypt(x)
    strict = privml.Session(ckks_plan.plan)
    strict.backend = session.backend  # same keys, default out_of_range="raise"
    with pytest.raises(SampleRangeViolation) as info:
        strict.decrypt(ckks_plan(enc))
    err = info.value
    assert err.indices == [3] and err.valid_indices == [0, 1, 2, 4, 5, 6, 7]
    assert (err.values - ckks_plan(x[err.valid_indices])).abs().max() < 0.05
    with pytest.warns(RangeWarning, match="1 of 8 samples"):
        y = session.decrypt(ckks_plan(enc))
    assert y.shape == (8, 10) and session.last_out_of_range == [3]
