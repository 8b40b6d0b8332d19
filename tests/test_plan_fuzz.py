"""Slow fuzz of plan JSON: thousands of mutated plans see only a valid Plan or ``MalformedInput``, never a bare
Python exception, and every accepted plan still passes the schema check the client runs."""

from __future__ import annotations

import copy
import json
import random
import time

import pytest
import torch
import torch.nn as nn

import privml
from privml.errors import MalformedInput

_ODD_VALUES = [None, True, False, 0, -1, 1, 2**63, -(2**70), 1e308, -1e308, float("nan"), float("inf"), "", "x",
               "false", [], {}, [1, 2], {"a": 1}, [[[]]], 0.5, -0.0, "1024"]


def _plan_json(backend: str) -> str:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    extra = {"precision_bits": 11} if backend == "ckks" else {}
    return privml.compile(model, torch.randn(64, 6), backend=backend, **extra).plan.to_json()


def _paths(obj: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


def _mutate(doc: dict, rng: random.Random) -> str:
    doc = copy.deepcopy(doc)
    kind = rng.randrange(6)
    if kind == 5:  # text-level damage
        text = json.dumps(doc)
        i = rng.randrange(len(text))
        return rng.choice([text[:i], text[:i] + rng.choice("{}[]\",:0e-") + text[i + 1:], "[" * 5000, text * 2])
    path = rng.choice(_paths(doc)[1:])
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if kind == 0:  # replace a value
        parent[last] = rng.choice(_ODD_VALUES)
    elif kind == 1 and isinstance(parent, dict):  # delete a key
        del parent[last]
    elif kind == 2 and isinstance(parent[last], (int, float)) and not isinstance(parent[last], bool):
        parent[last] = parent[last] * rng.choice([-1, 0, 1e6, 1e-9, 2**40])  # scale a number
    elif kind == 3 and isinstance(parent[last], list):  # grow a list
        parent[last] = parent[last] * rng.choice([0, 2, 500])
    else:  # add an unknown field next to it
        (parent if isinstance(parent, dict) else doc)["unexpected_" + str(rng.randrange(9))] = rng.choice(_ODD_VALUES)
    return json.dumps(doc, allow_nan=True)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::privml.errors.FidelityWarning")  # a random-weight model: near-tied logits
@pytest.mark.parametrize("backend", ["ckks", "mpc"])
def test_plan_json_fuzz_sees_only_privml_errors(backend: str) -> None:
    base = json.loads(_plan_json(backend))
    rng = random.Random(7)
    accepted = refused = 0
    deadline = time.monotonic() + 60
    for _ in range(2500):
        text = _mutate(base, rng)
        try:
            plan = privml.Plan.from_json(text)
        except MalformedInput:
            refused += 1
            continue
        plan.check()  # what Session runs again: an accepted plan stays valid
        accepted += 1
        assert time.monotonic() < deadline, "plan fuzz took too long"
    assert refused > 1000 and accepted + refused == 2500
