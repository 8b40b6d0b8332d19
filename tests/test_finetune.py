"""Approximation-aware fine-tuning recovers the accuracy a low-degree polynomial approximation loses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

import privml
from models.digits import DigitsCNN
from privml.errors import InvalidInput
from privml.nn import APPROX_MODULES, PolyActivation
from privml.train import ApproximatedModel, PrivmlDataModule, cli_main, finetune, load_model_from_checkpoint

REPO = Path(__file__).resolve().parents[1]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def trained_cnn(dm: PrivmlDataModule) -> nn.Module:
    """The DigitsCNN (three ReLUs) on the 8x8 digits, trained full-batch in about a second (~95%)."""
    x, y = dm.train_set.tensors
    torch.manual_seed(0)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits() -> PrivmlDataModule:
    dm = PrivmlDataModule("digits", batch_size=32, seed=0)
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def cnn(digits: PrivmlDataModule) -> nn.Module:
    return trained_cnn(digits)  # compile and finetune copy it: shared safely


def test_finetuning_recovers_accuracy_lost_by_degree_2_activations(digits: PrivmlDataModule, cnn: nn.Module) -> None:
    model = cnn
    (xtr, _), (xte, yte) = digits.train_set.tensors, digits.test_set.tensors
    base = accuracy(model, xte, yte)
    compiled = privml.compile(model, xtr[:512], backend="ckks", degree=2, layout="throughput")
    lossy = accuracy(compiled, xte, yte)
    assert base - lossy > 0.15  # degree 2 on the calibrated intervals hurts

    tuned = finetune(compiled, digits, epochs=3, lr=2e-3)
    recovered = accuracy(tuned, xte, yte)
    print(f"original {base:.4f}, degree 2 {lossy:.4f}, fine-tuned {recovered:.4f}")
    assert recovered - lossy >= 0.6 * (base - lossy)  # most of the loss is back
    # still the same polynomials (same degrees and intervals), recompiled with a fresh plan for CKKS
    polys = [m for m in tuned.module.modules() if isinstance(m, PolyActivation)]
    old = [m for m in compiled.module.modules() if isinstance(m, PolyActivation)]
    assert [(p.degree, p.interval) for p in polys] == [(p.degree, p.interval) for p in old]
    assert tuned.plan.backend == "ckks" and tuned.plan.params["depth"] == compiled.plan.params["depth"]
    assert tuned.plan.params["layout"] == "throughput"
    # the input model was left alone
    assert accuracy(compiled, xte, yte) == lossy


def test_trainable_coefficients_move_and_range_penalty_is_applied(digits: PrivmlDataModule, cnn: nn.Module) -> None:
    model = cnn
    xtr = digits.train_set.tensors[0]
    compiled = privml.compile(model, xtr[:512], backend="ckks", degree=2, layout="throughput")
    before = [m.coefficient_list() for m in compiled.module.modules() if isinstance(m, PolyActivation)]
    tuned = finetune(compiled.module, digits, epochs=1, lr=2e-3, train_coefficients=True, range_weight=10.0)
    after = [m.coefficient_list() for m in tuned.modules() if isinstance(m, PolyActivation)]
    assert after != before
    assert not tuned.training and all(not m.clamp for m in tuned.modules() if isinstance(m, APPROX_MODULES))
    assert list(tuned.parameters()) and not any(isinstance(p, nn.Parameter) and p.requires_grad and p.dim() == 1
                                                and p.numel() == 3 for p in tuned.parameters())


def test_finetune_needs_polynomial_activations(digits: PrivmlDataModule, cnn: nn.Module) -> None:
    with pytest.raises(InvalidInput, match="compile it first"):
        finetune(cnn, digits, epochs=1)


def test_privml_fit_config_fine_tunes_an_approximated_model(tmp_path: Path) -> None:
    cfg = yaml.safe_load((REPO / "configs" / "finetune_digits_cnn.yaml").read_text())
    root = tmp_path / "ft"
    cfg["trainer"].update(default_root_dir=str(root), enable_progress_bar=False, enable_model_summary=False,
                          max_epochs=1)
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(root)
    cfg["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(root / "checkpoints")
    config = tmp_path / "finetune.yaml"
    config.write_text(yaml.safe_dump(cfg))

    cli_main(["fit", "--config", str(config)])  # what `privml fit --config ...` runs
    model = load_model_from_checkpoint(root / "checkpoints" / "model.ckpt")
    assert isinstance(model, ApproximatedModel)
    polys = [m for m in model.modules() if isinstance(m, PolyActivation)]
    assert len(polys) == 3 and all(p.degree == cfg["model"]["model"]["init_args"]["degree"] for p in polys)
    dm = PrivmlDataModule("digits", seed=0)
    dm.setup()
    (xtr, _), (xte, yte) = dm.train_set.tensors, dm.test_set.tensors
    assert accuracy(model, xte, yte) > 0.8
    # compiling the fine-tuned model keeps its polynomials (nothing left to approximate)
    compiled = privml.compile(model, xtr[:256], backend="ckks", layout="throughput")
    assert [r.degree for r in compiled.plan.layers if r.kind == "activation"] == [p.degree for p in polys]
    assert accuracy(compiled, xte, yte) == pytest.approx(accuracy(model, xte, yte))


@pytest.mark.slow
def test_lenet5_degree_2_fine_tuning_recovers_accuracy() -> None:
    from privml.train import train_or_load

    torch.set_num_threads(1)
    model, dm = train_or_load("configs/lenet5_digits28.yaml")
    (xtr, _), (xte, yte) = dm.train_set.tensors, dm.test_set.tensors
    base = accuracy(model, xte, yte)
    compiled = privml.compile(model, xtr[:512], backend="ckks", degree=2, layout="throughput")
    lossy = accuracy(compiled, xte, yte)
    tuned = finetune(compiled, dm, epochs=3, lr=1e-3)
    recovered = accuracy(tuned, xte, yte)
    print(f"LeNet5: original {base:.4f}, degree 2 {lossy:.4f}, fine-tuned {recovered:.4f}")
    assert base - lossy > 0.1
    assert recovered >= base - 0.03
