"""The op registry is the single truth: backends' op tables, the validator and the real backends agree with it.

Generated from ``privml.registry.REGISTRY`` and the example calls in tests/op_cases.py:
* structure: a backend has a handler for every entry point of each op it runs, and none for ops it
  refuses or leaves to the compiler's approximations;
* validation: ``privml.validate`` accepts a model calling an op exactly when the registry says the backend
  runs (or approximates) it;
* conformance: every accepted (op, backend) pair runs on real private tensors (real CKKS ciphertexts,
  real MPC party processes) and matches torch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import privml
from privml.backends.plain import PlainBackend, PlainTensor
from privml.errors import UnsupportedModule, UnsupportedOperation
from privml.registry import REGISTRY, OpSpec, register
from tests.op_cases import CASES, Case

BACKENDS = ("plain", "ckks", "mpc")


def _tensor_class(backend: str) -> type:
    if backend == "plain":
        return PlainTensor
    if backend == "ckks":
        from privml.backends.ckks import CKKSTensor

        return CKKSTensor
    from privml.backends.mpc import MPCTensor

    return MPCTensor


def _calib(shape: tuple[int, ...], n: int = 64) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(1))


def test_every_op_has_a_case() -> None:
    covered = {c[0] for c in CASES}
    missing = sorted(s.name for s in REGISTRY if s.name not in covered)
    assert not missing, f"registry ops without an example in tests/op_cases.py: {missing}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_table_matches_registry(backend: str) -> None:
    cls = _tensor_class(backend)
    missing, extra = [], []
    for spec in REGISTRY:
        for f in REGISTRY.functions(spec):
            if spec.needs_handler(backend) and not cls.handles(f):
                missing.append(f"{spec.name}: {f}")
            elif not spec.needs_handler(backend) and cls.handles(f):
                extra.append(f"{spec.name}: {f}")
    assert not missing, f"{backend} lacks handlers the registry promises: {missing}"
    assert not extra, f"{backend} handles ops the registry says it does not run: {extra}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,name,shape,fn", CASES, ids=[c[1] for c in CASES])
def test_validator_follows_registry(backend: str, op: str, name: str, shape: tuple, fn: object) -> None:
    spec = REGISTRY[op]
    problems = privml.validate(Case(fn).eval(), backend)
    blocking = [p for p in problems if p.severity == "error"]
    if spec.how(backend) is None:
        assert blocking, f"{name} on {backend}: the registry refuses it but validation passed"
        assert any(spec.refusal(backend)[:30] in p.message for p in blocking)
    else:
        assert not blocking, f"{name} on {backend}: {blocking}"


def test_refused_op_raises_on_a_private_tensor_with_the_registry_reason() -> None:
    import torch.nn.functional as F

    from privml.backends.ckks import CKKSTensor

    assert not CKKSTensor.handles(F.max_pool2d)
    x = PlainBackend().encrypt(torch.randn(2, 3))
    with pytest.raises(UnsupportedOperation, match="sort"):
        torch.sort(x)


# ---- conformance on real private tensors --------------------------------------------------------------------
def _runs(backend: str) -> list:
    return [c for c in CASES if REGISTRY[c[0]].how(backend) in ("exact", "identity")]


@pytest.mark.parametrize("op,name,shape,fn", _runs("plain"), ids=[c[1] for c in _runs("plain")])
def test_plain_conformance(op: str, name: str, shape: tuple, fn: object) -> None:
    x = _calib(shape, 3)
    b = PlainBackend()
    got = b.decrypt(fn(b.encrypt(x)))
    torch.testing.assert_close(got, fn(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("op,name,shape,fn", _runs("ckks"), ids=[c[1] for c in _runs("ckks")])
def test_ckks_conformance(op: str, name: str, shape: tuple, fn: object, one_thread: None) -> None:
    model = Case(fn).eval()
    x = _calib(shape, 2) * 0.5
    compiled = privml.compile(model, _calib(shape), backend="ckks")
    session = privml.Session(compiled.plan)
    got = session.decrypt(compiled(session.encrypt(x)))
    want = fn(x)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 2e-3 * max(1.0, float(want.abs().max())), name


@pytest.mark.parametrize("backend", ["ckks", "mpc"])
def test_approximated_ops_compile_and_match(backend: str) -> None:
    """Ops the registry leaves to the compiler: compile replaces them (plan says so) and stays close to torch."""
    cases = [c for c in CASES if REGISTRY[c[0]].how(backend) == "approx"]
    assert cases
    for _op, name, shape, fn in cases:
        compiled = privml.compile(Case(fn).eval(), _calib(shape), backend=backend)
        approximated = [lp for lp in compiled.plan.layers if lp.kind == "activation" and lp.approx != "exact"]
        assert approximated, f"{name}: the plan does not say it was approximated"
        stated = max(lp.est_error for lp in approximated)
        x = _calib(shape, 16)  # calibration samples: inside every calibrated interval
        clear = compiled(x)
        err = float((clear - fn(x)).abs().max())
        assert err <= 1.05 * stated + 1e-4, f"{name} on {backend}: {err:.3g} from torch, the plan states {stated:.3g}"
        if backend == "ckks":  # and the ciphertexts compute the approximated model
            session = privml.Session(compiled.plan)
            got = session.decrypt(compiled(session.encrypt(x[:2])))
            assert (got - clear[:2]).abs().max() <= 2e-3 * max(1.0, float(clear.abs().max())), name


def test_mpc_conformance_in_one_party_run() -> None:
    """Every op mpc runs, inside one launch of two real party processes (one output per case)."""
    cases = _runs("mpc")

    class All(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cases = nn.ModuleDict({name: Case(fn) for _, name, _, fn in cases if _ is not None})

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            outs = []
            for (_, name, shape, _fn) in cases:
                n = 1
                for s in shape:
                    n *= s
                outs.append(self.cases[name](x[:, :n].reshape(x.shape[0], *shape)).flatten(1))
            return torch.cat(outs, dim=1)

    width = max(int(torch.tensor(shape).prod()) for _, _, shape, _ in cases)
    model = All().eval()
    x = _calib((width,), 2) * 0.8
    compiled = privml.compile(model, _calib((width,)), backend="mpc")
    session = privml.Session(compiled.plan, parties=2)
    got = session.decrypt(compiled(session.encrypt(x)))
    want = model(x)
    assert got.shape == want.shape
    start = 0
    for _, name, shape, fn in cases:
        size = int(torch.tensor(fn(x[:, :int(torch.tensor(shape).prod())].reshape(2, *shape)).shape[1:]).prod())
        part_got, part_want = got[:, start:start + size], want[:, start:start + size]
        start += size
        err = float((part_got - part_want).abs().max())
        assert err <= 3e-2 * max(1.0, float(part_want.abs().max())), f"{name}: mpc differs from torch by {err:.3g}"


def double_it(x: torch.Tensor) -> torch.Tensor:
    """A user's function that private tensors can intercept (like privml.functional.polyval)."""
    if torch.overrides.has_torch_function_unary(x):
        return torch.overrides.handle_torch_function(double_it, (x,), x)
    return x * 2


torch.fx.wrap("double_it")


def test_user_registered_op_is_validated_and_dispatched() -> None:
    """A user's own function: declared once, it validates on plain and dispatches to the user's handler."""

    spec = register(OpSpec("test_double_it", "elementwise", functions=(double_it,), support={"plain": "exact"}))
    try:
        @PlainTensor.implements("test_double_it")
        def _double(func: object, types: tuple, args: tuple, kwargs: dict) -> PlainTensor:
            return args[0] * 2.0

        class M(nn.Module):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return double_it(x) + 1

        assert not [p for p in privml.validate(M(), "plain") if p.severity == "error"]
        assert [p for p in privml.validate(M(), "ckks") if p.severity == "error"]
        compiled = privml.compile(M(), torch.randn(8, 3), backend="plain")
        x = torch.randn(2, 3)
        s = privml.Session(compiled.plan)
        torch.testing.assert_close(s.decrypt(compiled(s.encrypt(x))), x * 2 + 1)
        with pytest.raises(UnsupportedModule):
            privml.compile(M(), torch.randn(8, 3), backend="ckks")
    finally:
        REGISTRY.unregister(spec.name)
        PlainTensor._function_table.pop(double_it, None)


def test_client_ops_move_to_the_client_on_ckks() -> None:
    """Softmax ending a CKKS model: the server returns logits, decrypt applies softmax; in the middle: refused."""
    import torch.nn.functional as F

    model = nn.Sequential(nn.Linear(6, 4), nn.Softmax(dim=1)).eval()
    calib = _calib((6,))
    compiled = privml.compile(model, calib, backend="ckks")
    assert compiled.plan.params["client_ops"] == [{"op": "softmax", "dim": 1}]
    session = privml.Session(compiled.plan)
    x = calib[:2]
    out = compiled(session.encrypt(x))
    got = session.decrypt(out)
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(compiled(x), want)
    assert (got - want).abs().max() < 1e-3
    middle = Case(lambda x: F.linear(F.softmax(x, dim=1), torch.eye(6)))
    with pytest.raises(UnsupportedModule, match="softmax"):
        privml.compile(middle.eval(), calib, backend="ckks")
