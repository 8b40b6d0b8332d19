"""Typed configurations: every option declared once, unknown names refused, plans keep their config."""

from __future__ import annotations

import dataclasses

import lightning as L
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import privml
from privml.backends import load_backend
from privml.compiler.plan import Plan
from privml.config import CONFIGS, SESSION_CONFIGS, CKKSConfig, MPCSessionConfig, PlainConfig, PlainSessionConfig
from privml.errors import InvalidInput, PrivmlError
from privml.train import finetune


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


CALIB = torch.randn(64, 4)


@pytest.mark.parametrize(("backend", "typo", "meant"), [("ckks", "max_eror", "max_error"),
                                                        ("ckks", "layuot", "layout"),
                                                        ("mpc", "accuracy_tolerence", "accuracy_tolerance"),
                                                        ("plain", "replace_maxpol", "replace_maxpool")])
def test_unknown_compile_option_names_the_closest(backend: str, typo: str, meant: str) -> None:
    with pytest.raises(InvalidInput, match=f"unknown option '{typo}' for backend '{backend}'; did you mean '{meant}'"):
        privml.compile(_mlp(), CALIB, backend=backend, **{typo: 1})


def test_options_of_another_backend_are_refused() -> None:
    with pytest.raises(InvalidInput, match="unknown option 'layout' for backend 'plain'"):
        privml.compile(_mlp(), CALIB, backend="plain", layout="throughput")


def test_unknown_session_option_names_the_closest() -> None:
    plan = privml.compile(_mlp(), CALIB).plan
    with pytest.raises(InvalidInput, match="unknown option 'simulaton' for backend 'plain'; did you mean 'simulation'"):
        privml.Session(plan, simulaton="ckks")
    with pytest.raises(InvalidInput, match="did you mean 'range_slack'"):
        privml.Session(plan, range_slak=1.0)
    with pytest.raises(InvalidInput, match="unknown option 'parties' for backend 'plain'"):
        privml.Session(plan, parties=2)


@pytest.mark.parametrize("options", [{"layout": "fast"}, {"degree": True}, {"degree": 2.5}, {"degree": 0},
                                     {"margin": -0.1}, {"margin": float("inf")}, {"precision_bits": "20"},
                                     {"coeff_mod_bit_sizes": (60, 40.5, 60)}, {"composites": 1},
                                     {"percentile": (1.0,)}])
def test_bad_compile_values_are_refused(options: dict) -> None:
    name = next(iter(options))
    with pytest.raises(InvalidInput, match=f"privml: {name} must be"):
        CKKSConfig(**options)
    with pytest.raises(InvalidInput, match=f"privml: {name} must be"):
        privml.compile(_mlp(), CALIB, backend="ckks", **options)


def test_bad_session_values_are_refused() -> None:
    with pytest.raises(InvalidInput, match="simulation must be one of"):
        PlainSessionConfig(simulation="noisy")
    with pytest.raises(InvalidInput, match="parties must be >= 2"):
        MPCSessionConfig(parties=1)
    with pytest.raises(InvalidInput, match="weight_party must be a party rank"):
        MPCSessionConfig(parties=2, weight_party=2)
    with pytest.raises(InvalidInput, match="ttp must be True or False"):
        MPCSessionConfig(ttp="yes")


def test_defaults_are_the_dataclass_defaults_recorded_in_the_plan() -> None:
    defaults = {f.name: f.default for f in dataclasses.fields(CKKSConfig)}
    plan = privml.compile(_mlp(), CALIB, backend="ckks").plan
    assert plan.options["type"] == "CKKSConfig"
    assert {k: v for k, v in plan.options.items() if k != "type"} == defaults
    assert plan.config == CKKSConfig()
    assert plan.params["layout"] == defaults["layout"] == "latency"
    assert plan.params["approximation"]["targets"] == {"agreement": defaults["agreement_target"]}
    assert privml.compile(_mlp(), CALIB).plan.config == PlainConfig()


def test_config_object_and_keywords_are_the_same() -> None:
    by_keywords = privml.compile(_mlp(), CALIB, backend="ckks", layout="throughput", degree=3).plan
    by_config = privml.compile(_mlp(), CALIB, config=CKKSConfig(layout="throughput", degree=3)).plan
    assert by_config.backend == "ckks" and by_config.options == by_keywords.options
    assert by_config.params["layout"] == "throughput"
    overridden = privml.compile(_mlp(), CALIB, config=CKKSConfig(degree=3), layout="throughput").plan
    assert overridden.options == by_keywords.options
    with pytest.raises(InvalidInput, match="does not match"):
        privml.compile(_mlp(), CALIB, backend="mpc", config=CKKSConfig())
    with pytest.raises(InvalidInput, match="did you mean 'layout'"):
        privml.compile(_mlp(), CALIB, config=CKKSConfig(), layuot="throughput")


def test_session_config_object_and_keywords() -> None:
    plan = privml.compile(_mlp(), CALIB).plan
    x = torch.randn(5, 4)
    for session in (privml.Session(plan, simulation="ckks", range_slack=None),
                    privml.Session(plan, config=PlainSessionConfig(simulation="ckks", range_slack=None))):
        assert session.range_slack is None and session.backend.simulation.mode == "ckks"
        assert session.decrypt(session.encrypt(x)).shape == x.shape
    assert privml.Session(plan).config == PlainSessionConfig()
    with pytest.raises(InvalidInput, match="takes a PlainSessionConfig"):
        privml.Session(plan, config=MPCSessionConfig())


def test_plan_json_round_trip_keeps_the_config() -> None:
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    plan = privml.compile(_mlp(), CALIB, backend="ckks", max_error=0.1, percentile=(1.0, 99.0), layout="throughput",
                          validation=(x, y)).plan
    assert plan.options["validation"] == {"samples": 40}  # the data itself is not stored
    again = Plan.from_json(plan.to_json())
    assert again.options == plan.options
    assert again.config == plan.config == CKKSConfig(max_error=0.1, percentile=(1.0, 99.0), layout="throughput")
    assert again.config.validation is None
    bad = plan.to_dict()
    bad["options"]["layuot"] = "latency"
    with pytest.raises(PrivmlError, match="did you mean 'layout'"):
        Plan.from_dict(bad)


def test_the_backends_are_declared_once_and_unknown_ones_are_refused() -> None:
    from privml.compiler.validate import BACKENDS

    assert (tuple(CONFIGS) == tuple(SESSION_CONFIGS) == BACKENDS == privml.BACKENDS
            == ("plain", "ckks", "mpc", "hybrid"))
    with pytest.raises(InvalidInput, match="backend 'tee' is not available in this privml version"):
        privml.compile(_mlp(), CALIB, backend="tee")
    with pytest.raises(InvalidInput, match="did you mean 'ckks'"):
        privml.compile(_mlp(), CALIB, backend="ckk")
    with pytest.raises(InvalidInput, match="'fhe' is not available"):
        load_backend("fhe")
    assert load_backend("hybrid").HybridTensor.backend_name == "hybrid"


class _RowsModule(L.LightningDataModule):
    """A plain LightningDataModule: ``setup(stage)`` without a default and no ``train_set`` attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.stages: list[str] = []

    def setup(self, stage: str) -> None:
        self.stages.append(stage)
        torch.manual_seed(1)
        x = torch.randn(96, 4)
        self.rows = TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.rows, batch_size=32)


def test_finetune_takes_any_lightning_datamodule() -> None:
    compiled = privml.compile(_mlp(), CALIB, backend="ckks", degree=2, layout="throughput")
    dm = _RowsModule()
    tuned = finetune(compiled, dm, epochs=1)
    assert isinstance(tuned, privml.CompiledModel) and tuned.plan.backend == "ckks"
    assert tuned.plan.config.layout == "throughput"  # the compile options survive the recompile
    assert set(dm.stages) == {"fit"}
