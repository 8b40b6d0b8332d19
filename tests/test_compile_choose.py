"""The compiler's approximation choice: errors on dense grids, costs against the real backends, budgets, bad input.

Default tests use small models (random or trained here in a second); the trained reference
models (LeNet-5, SmallResNet, DigitsCNN) run in the slow tests, encrypted on real CKKS.
"""

from __future__ import annotations

import functools
import gc
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import privml
from models.digits import DigitsCNN
from models.resnet import SmallResNet
from privml.compiler.approx import ActivationSite
from privml.compiler.calibrate import calibrate
from privml.compiler.candidates import candidates, cheapest_within, frontier
from privml.compiler.choose import apply_choice, choose
from privml.compiler.costs import MPC_PRODUCT_BYTES, MPC_RELU_BYTES, MPC_RELU_ROUNDS, graph_cost, mpc_poly_cost
from privml.compiler.evaluate import exact_function
from privml.compiler.validate import fix
from privml.errors import BudgetError, CalibrationError, InvalidInput
from privml.nn import APPROX_MODULES

pytestmark = pytest.mark.usefixtures("one_thread")


ACTIVATIONS = [("relu", {}), ("leaky_relu", {"slope": 0.1}), ("gelu", {}), ("silu", {}), ("sigmoid", {}),
               ("tanh", {}), ("softplus", {})]


def dense_error(module: nn.Module, kind: str, params: dict, lo: float, hi: float, n: int = 200_001) -> float:
    """max |module(x) - f(x)| on n uniform points of [lo, hi] plus the Chebyshev-Lobatto points, in float64."""
    u = torch.linspace(lo, hi, n, dtype=torch.float64)
    c = (lo + hi) / 2 - (hi - lo) / 2 * torch.cos(torch.pi * torch.arange(n, dtype=torch.float64) / (n - 1))
    x = torch.cat([u, c])
    with torch.no_grad():
        return float((module.eval()(x) - exact_function(kind, params)(x)).abs().max())


def site(kind: str, params: dict, lo: float, hi: float) -> ActivationSite:
    return ActivationSite(None, kind, kind, params, lo, hi)


def prepared(model: nn.Module, x: torch.Tensor):
    gm, _ = fix(model.eval(), x[:64])
    return gm, calibrate(gm, [x])


class Functional(nn.Module):
    """Functional activations, a private square and cube, a residual add and a tensor-method activation."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.c = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.a(x))
        h = h + torch.tanh(self.b(h))
        h = F.gelu(h * h * 0.1) + torch.pow(self.b(h), 3) * 0.01
        return self.c(h.sigmoid())


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(2, 3, 3),
                         nn.SiLU(), nn.Flatten(), nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).eval()


@functools.lru_cache(maxsize=1)
def digits_mlp() -> tuple[nn.Module, tuple, tuple]:
    """A small ReLU MLP trained on scikit-learn's digits in well under a second (full-batch Adam)."""
    from privml.data import get_dataset

    train, test = get_dataset("digits", seed=0)
    (xtr, ytr), (xte, yte) = train.tensors, test.tensors
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(xtr), ytr).backward()
        opt.step()
    return model.eval(), (xtr, ytr), (xte, yte)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


# --------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kind,params", ACTIVATIONS, ids=[a[0] for a in ACTIVATIONS])
def test_cheapest_candidate_meets_the_error_it_states_on_a_dense_grid(kind: str, params: dict) -> None:
    lo, hi = -4.0, 6.0
    ladder = frontier(candidates(kind, lo, hi, params, "ckks"), "ckks")
    costs = [c.cost("ckks") for c in ladder]
    assert costs == sorted(costs) and all(a.total_err > b.total_err for a, b in zip(ladder, ladder[1:], strict=False))
    for target in (0.3, 0.05, 0.01):
        i = cheapest_within(ladder, target)
        if i is None:
            assert kind in ("relu", "leaky_relu") and min(c.total_err for c in ladder) > target
            continue
        cand = ladder[i]
        assert cand.total_err <= target
        assert all(c.total_err > target for c in ladder[:i])  # nothing cheaper reaches it
        err = dense_error(cand.module(site(kind, params, lo, hi)), kind, params, lo, hi)
        assert err <= cand.err * (1 + 1e-3) + 1e-9, (cand.label(), err, cand.err)


def test_composite_relu_meets_the_precision_it_claims() -> None:
    lo, hi = -3.0, 5.0
    ladder = frontier(candidates("relu", lo, hi, {}, "ckks"), "ckks")
    comps = [c for c in ladder if c.kind == "composite"]
    assert comps, "tight errors need the sign-composite construction"
    for cand in comps:
        sign = cand.approx.sign
        w = np.concatenate([np.geomspace(sign.eps, 1.0, 100_001), np.linspace(sign.eps, 1.0, 100_001)])
        sign_err = max(np.max(np.abs(sign(w) - 1.0)), np.max(np.abs(sign(-w) + 1.0)))
        assert sign_err <= sign.err * (1 + 1e-3) + 1e-12  # the sign composite's precision, as claimed
        err = dense_error(cand.module(site("relu", {}, lo, hi)), "relu", {}, lo, hi)
        assert err <= cand.err * (1 + 1e-3) + 1e-9
        assert cand.depth == sum(math.ceil(math.log2(d + 1)) for d in cand.degrees) + 1


def test_compiled_plan_rows_state_errors_that_hold() -> None:
    model = tiny_cnn()
    x = torch.rand(128, 1, 6, 6)
    compiled = privml.compile(model, x, backend="ckks", max_error=0.02, layout="throughput")
    modules = dict(compiled.module.named_modules())
    rows = [lp for lp in compiled.plan.layers if lp.spec is not None]
    assert {r.spec["source"] for r in rows} == {"relu", "silu", "tanh"}
    for row in rows:
        assert row.est_error <= 0.02 and row.cost["ckks_depth"] >= 2 and row.cost["ct_mults"] >= 1
        mod = modules[row.name]
        lo, hi = row.spec["interval"]
        assert dense_error(mod, row.spec["source"], {}, lo, hi) <= row.est_error * (1 + 1e-3) + 1e-9
        if row.spec["kind"] == "poly":
            assert row.coeffs == pytest.approx(mod.coefficient_list())
    # the plan round-trips through JSON with the new fields
    again = privml.Plan.from_json(compiled.plan.to_json())
    assert [r.spec for r in again.layers] == [r.spec for r in compiled.plan.layers]


# --------------------------------------------------------------------------------------------- costs


@pytest.mark.parametrize("which", ["resnet", "digits_cnn", "functional"])
def test_graph_cost_equals_the_ckks_dry_run(which: str) -> None:
    from privml.backends.ckks import dry_run
    from privml.tensor import module_scope

    torch.manual_seed(0)
    model, shape = {"resnet": (SmallResNet(), (1, 8, 8)), "digits_cnn": (DigitsCNN(), (1, 8, 8)),
                    "functional": (Functional(), (6,))}[which]
    x = torch.randn(64, *shape)
    for degree in (2, 4, 7):
        gm, stats = prepared(model, x)
        result = choose(gm, stats, "ckks", x, degree=degree)
        estimated = result.total_depth
        apply_choice(gm, result)
        with module_scope(gm):
            assert dry_run(gm, shape, "throughput").depth == estimated
    # a composite ReLU counts its stages plus the product with x
    gm, stats = prepared(model, x)
    result = choose(gm, stats, "ckks", x, degree=3)
    relu = next(s for s in result.sites if s.site.kind == "relu")
    relu.ladder = [next(c for c in candidates("relu", relu.site.lo, relu.site.hi, {}, "ckks")
                        if c.kind == "composite" and c.degrees == (7, 7, 13))]
    estimated = graph_cost(gm, {s.site.node.name: s.candidate.depth for s in result.sites})[0]
    apply_choice(gm, result)
    with module_scope(gm):
        assert dry_run(gm, shape, "throughput").depth == estimated


def test_plan_depth_equals_levels_consumed_on_ckks() -> None:
    model = tiny_cnn()
    calib = torch.rand(128, 1, 6, 6)
    compiled = privml.compile(model, calib, backend="ckks", max_error=0.05)
    plan = compiled.plan
    assert plan.params["approximation"]["estimated_depth"] == plan.params["depth"]
    session = privml.Session(plan)
    x = torch.rand(1, 1, 6, 6)
    out = compiled(session.encrypt(x))
    assert session.backend.levels_used(out) == plan.params["depth"]
    assert float((session.decrypt(out) - compiled(x)).abs().max()) < 1e-3


def test_mpc_cost_model_matches_the_mpc_backend_schedule_and_crypten() -> None:
    from privml.backends.mpc import power_schedule

    for d in range(2, 32):
        rounds, nbytes = mpc_poly_cost(d)
        assert rounds == len(power_schedule(d)) == math.ceil(math.log2(d))
        products = sum(len(r) for r in power_schedule(d))
        assert MPC_PRODUCT_BYTES // 2 * products <= nbytes <= MPC_PRODUCT_BYTES * products
    # measured constants: one exact ReLU and one product between two real CrypTen parties
    from privml.parties.launcher import run_parties

    measured = run_parties(_measure_relu_and_product, 2, timeout=120)
    for costs in measured:
        assert costs["relu"] == (MPC_RELU_ROUNDS, MPC_RELU_BYTES * 10)
        assert costs["mul"] == (1, MPC_PRODUCT_BYTES * 10)


def _measure_relu_and_product(ctx: object) -> dict:
    from privml.parties.compat import import_crypten
    from privml.parties.costs import CostMeter

    crypten = import_crypten()
    x = crypten.cryptensor(torch.randn(10), src=0)
    meter = CostMeter()
    with meter.scope("relu"):
        x.relu()
    with meter.scope("mul"):
        x * x.add(1.0)
    return {k: (v["rounds"], v["bytes"]) for k, v in meter.summary()["scopes"].items()}


def test_mpc_choice_trades_rounds_for_exactness() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    calib = torch.randn(256, 4)
    loose = privml.compile(model, calib, backend="mpc", max_error=0.3)
    tight = privml.compile(model, calib, backend="mpc", max_error=1e-3)
    row = lambda c, src: next(lp for lp in c.plan.layers if lp.spec is not None and lp.spec["source"] == src)
    assert row(loose, "relu").spec["kind"] == "poly" and row(loose, "relu").cost["mpc_rounds"] == 1
    assert row(tight, "relu").spec["kind"] == "exact" and row(tight, "relu").cost["mpc_rounds"] == MPC_RELU_ROUNDS
    assert isinstance(dict(tight.module.named_modules())["1"], nn.ReLU)  # kept: CrypTen computes it exactly
    assert loose.plan.params["approximation"]["mpc_activation_rounds"] < tight.plan.params["approximation"][
        "mpc_activation_rounds"]


def test_hybrid_places_enclave_refreshes_to_fit_the_segment_depth() -> None:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(6, 6), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(6, 2))
    calib = torch.randn(128, 6)
    # polynomial ReLUs (enclave_activations=False); by default the enclave evaluates ReLU and no site is left
    gm, _ = fix(model, calib[:64])
    stats = calibrate(gm, [calib], (6,))
    assert choose(gm, stats, "hybrid", calib, degree=7, refresh_depth=8).sites == []
    poly = {"enclave_activations": False, "degree": 7}
    deep = choose(gm, stats, "hybrid", calib, refresh_depth=8, **poly)  # 4 x (1 + 3) + 1 levels
    assert len(deep.refresh_points) == 2
    assert max(deep.levels.values()) <= 8
    roomy = choose(gm, stats, "hybrid", calib, refresh_depth=17, **poly)
    assert roomy.refresh_points == []
    with pytest.raises(BudgetError, match="refresh"):
        choose(gm, stats, "hybrid", calib, refresh_depth=3, **poly)


# --------------------------------------------------------------------------------------------- budgets


def _cost(model: nn.Module, x: torch.Tensor, backend: str, max_error: float) -> tuple | None:
    gm, stats = prepared(model, x)
    try:
        return choose(gm, stats, backend, x, max_error=max_error).cost()
    except BudgetError:
        return None  # infinitely expensive


_BUDGET_MODEL = Functional()
_BUDGET_X = torch.randn(128, 6)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.floats(-3.0, -0.3), st.floats(0.05, 2.0), st.sampled_from(["ckks", "mpc"]))
def test_a_tighter_error_budget_never_yields_a_cheaper_plan(log_err: float, factor: float, backend: str) -> None:
    loose = 10.0 ** log_err
    tight = loose / (1.0 + factor)
    cost_loose = _cost(_BUDGET_MODEL, _BUDGET_X, backend, loose)
    cost_tight = _cost(_BUDGET_MODEL, _BUDGET_X, backend, tight)
    if cost_loose is None:
        assert cost_tight is None
    elif cost_tight is not None:
        assert cost_tight >= cost_loose


def test_accuracy_tolerance_is_met_as_predicted_and_cheaper_than_a_fixed_degree() -> None:
    model, (xtr, _), (xte, yte) = digits_mlp()
    base = accuracy(model, xte, yte)
    assert base > 0.9
    compiled = privml.compile(model, xtr[:512], backend="ckks", accuracy_tolerance=0.01, validation=(xte, yte),
                              layout="throughput", simulate_noise=True)
    pred = compiled.plan.predicted
    assert abs(pred["accuracy_noise_sim"] - pred["accuracy_approx"]) <= 0.005  # CKKS noise leaves the argmax
    measured = accuracy(compiled, xte, yte)
    assert pred["accuracy_original"] == pytest.approx(base)
    assert pred["accuracy_approx"] == pytest.approx(measured)
    assert base - measured <= 0.01
    assert compiled.plan.params["approximation"]["mode"] == "accuracy_tolerance"
    # the greedy did not overpay: every activation is as cheap as the tolerance allows (trim step)
    fixed = privml.compile(model, xtr[:512], backend="ckks", degree=15, layout="throughput")
    assert compiled.plan.params["depth"] <= fixed.plan.params["depth"]
    # depth_budget alone spends the depth where it helps and never exceeds it
    budget = privml.compile(model, xtr[:512], backend="ckks", depth_budget=8, validation=(xte, yte),
                            layout="throughput")
    assert budget.plan.params["depth"] <= 8
    assert budget.plan.predicted["accuracy_approx"] == pytest.approx(accuracy(budget, xte, yte))


def test_budgets_that_cannot_be_met_say_what_to_change() -> None:
    model, (xtr, _), (xte, yte) = digits_mlp()
    with pytest.raises(BudgetError, match="loosen max_error"):
        privml.compile(model, xtr[:256], backend="ckks", max_error=1e-6)
    with pytest.raises(BudgetError, match="depth_budget is 3"):
        privml.compile(model, xtr[:256], backend="ckks", depth_budget=3)
    with pytest.raises(BudgetError, match="accuracy_tolerance"):
        privml.compile(model, xtr[:256], backend="ckks", accuracy_tolerance=0.0, depth_budget=7,
                       validation=(xte, yte))


def test_bad_options_and_calibration_give_clear_errors() -> None:
    model, (xtr, ytr), (xte, yte) = digits_mlp()
    calib = xtr[:128]
    with pytest.raises(InvalidInput, match="validation"):
        privml.compile(model, calib, backend="ckks", accuracy_tolerance=0.01)
    with pytest.raises(InvalidInput, match="validation inputs have shape"):
        privml.compile(model, calib, backend="ckks", accuracy_tolerance=0.01, validation=(xte[:, :, :4], yte))
    with pytest.raises(InvalidInput, match="labels"):
        privml.compile(model, calib, backend="ckks", accuracy_tolerance=0.01, validation=(xte, yte.float()))
    with pytest.raises(InvalidInput, match="cannot be combined"):
        privml.compile(model, calib, backend="ckks", degree=3, max_error=0.1)
    with pytest.raises(InvalidInput, match="percentile"):
        privml.compile(model, calib, backend="ckks", percentile=(99.0, 1.0))
    with pytest.raises(InvalidInput, match="depth_budget is a CKKS budget"):
        privml.compile(model, calib, backend="mpc", depth_budget=10)
    with pytest.raises(InvalidInput, match="max_error must be"):
        privml.compile(model, calib, backend="ckks", max_error=-1.0)
    # calibration batches of two different sample shapes
    with pytest.raises(CalibrationError, match="disagree|shape"):
        privml.compile(model, [xtr[:8], xtr[:8, :, :4]], backend="ckks")


def test_degenerate_and_infinite_activation_intervals_are_calibration_errors() -> None:
    dead = nn.Sequential(nn.Linear(4, 1), nn.ReLU(), nn.Linear(1, 2))
    with torch.no_grad():
        dead[0].weight.zero_()  # the ReLU always sees the bias
    with pytest.raises(CalibrationError, match="degenerate.*more varied"):
        privml.compile(dead, torch.randn(32, 4), backend="ckks")

    class Blowup(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x * 1e39 * 1e39)

    with pytest.raises(CalibrationError, match="non-finite"):
        privml.compile(Blowup(), torch.randn(8, 4), backend="ckks")


def test_percentile_intervals_are_tighter_and_recorded() -> None:
    model, (xtr, _), _ = digits_mlp()
    full = privml.compile(model, xtr[:512], backend="ckks", degree=3, layout="throughput")
    pct = privml.compile(model, xtr[:512], backend="ckks", degree=3, percentile=(1.0, 99.0), layout="throughput")
    for a, b in zip([r for r in full.plan.layers if r.spec], [r for r in pct.plan.layers if r.spec], strict=True):
        assert b.spec["interval"][0] > a.spec["interval"][0] and b.spec["interval"][1] < a.spec["interval"][1]
    assert pct.plan.options["percentile"] == [1.0, 99.0]
    assert any("calibrated inputs span" in n for n in pct.plan.notes)  # the tails now fall outside


def test_every_activation_is_recorded_and_the_choice_is_deterministic() -> None:
    torch.manual_seed(0)
    model, x = Functional(), torch.randn(64, 6)
    compiled = privml.compile(model, x, backend="ckks", max_error=0.05, layout="throughput")
    assert sum(isinstance(m, APPROX_MODULES) for m in compiled.module.modules()) == 4
    assert len([r for r in compiled.plan.layers if r.spec]) == 4
    runs = []
    for _ in range(2):
        gm, stats = prepared(model, x)
        result = choose(gm, stats, "ckks", x, depth_budget=14)
        runs.append([(s.candidate.kind, s.candidate.degrees, s.candidate.eps) for s in result.sites])
    assert runs[0] == runs[1]


# --------------------------------------------------------------------------------------------- trained models (slow)


def _reference(config: str):
    from privml.train import train_or_load

    model, dm = train_or_load(config)
    return model, dm.train_set.tensors, dm.test_set.tensors


REFERENCE = {"lenet5": "configs/lenet5_digits28.yaml", "resnet": "configs/resnet_digits.yaml",
             "digits_cnn": "configs/digits_cnn.yaml"}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lenet5", "resnet"])
def test_relu_models_keep_accuracy_within_one_point_and_encrypted_agrees(name: str) -> None:
    torch.set_num_threads(1)
    model, (xtr, _), (xte, yte) = _reference(REFERENCE[name])
    base = accuracy(model, xte, yte)
    compiled = privml.compile(model, xtr[:512], backend="ckks", accuracy_tolerance=0.01, validation=(xte, yte))
    plan = compiled.plan
    clear = accuracy(compiled, xte, yte)
    assert base - clear <= 0.01
    assert plan.predicted["accuracy_approx"] == pytest.approx(clear)
    degrees = [r.degree for r in plan.layers if r.spec]
    print(f"{name}: original {base:.4f}, approximated {clear:.4f}, degrees {degrees}, depth {plan.params['depth']}")
    session = privml.Session(plan)
    x = xte[:1]
    out = compiled(session.encrypt(x))
    assert session.backend.levels_used(out) == plan.params["depth"]
    got = session.decrypt(out)
    assert float((got - compiled(x)).abs().max()) < 1e-2
    assert int(got.argmax()) == int(compiled(x).argmax())
    del session, out  # a LeNet-5 session at N=32768 holds ~15 GB of encoded diagonals: free it now
    gc.collect()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_graph_cost_equals_dry_run_on_trained_reference_models(name: str) -> None:
    from privml.backends.ckks import dry_run
    from privml.tensor import module_scope

    model, (xtr, _), _ = _reference(REFERENCE[name])
    for degree in (3, 5, 7):
        gm, stats = prepared(model, xtr[:256])
        result = choose(gm, stats, "ckks", xtr[:256], degree=degree)
        apply_choice(gm, result)
        with module_scope(gm):
            assert dry_run(gm, tuple(xtr.shape[1:]), "throughput").depth == result.total_depth
