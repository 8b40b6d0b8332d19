"""Lightning training: every shipped training config parses; one real short run; checkpoint reload."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch import nn

from models.digits import DigitsCNN
from privml.errors import InvalidInput, MalformedInput
from privml.train import (
    ClassifierModule,
    PrivmlDataModule,
    build_cli,
    checkpoint_path,
    cli_main,
    load_model_from_checkpoint,
    train_or_load,
)

REPO = Path(__file__).resolve().parents[1]


def training_configs() -> list[Path]:
    """YAML files in configs/ that are Lightning training configs (they have trainer and model sections)."""
    found = []
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text()) or {}
        if isinstance(cfg, dict) and "trainer" in cfg and "model" in cfg:
            found.append(path)
    return found


SHIPPED = {"digits_cnn", "breast_cancer_mlp", "mnist_tutorial_digits28", "lenet5_digits28", "resnet_digits"}


def test_shipped_training_configs_are_present() -> None:
    assert SHIPPED <= {p.stem for p in training_configs()}


@pytest.mark.parametrize("config", training_configs(), ids=lambda p: p.stem)
def test_training_config_parses_and_fits_its_data(config: Path) -> None:
    cli = build_cli(["--config", str(config)], run=False)
    cfg = yaml.safe_load(config.read_text())
    # The model is the configured class, recorded for checkpoints, and trains on CPU deterministically.
    spec = cli.model.model_spec
    assert spec["class_path"] == cfg["model"]["model"]["class_path"]
    assert type(cli.model.model).__name__ == spec["class_path"].rsplit(".", 1)[1]
    assert cli.trainer.accelerator.__class__.__name__ == "CPUAccelerator"
    assert cli.trainer.max_epochs == cfg["trainer"]["max_epochs"]
    # The checkpoint lands at a fixed, predictable path under artifacts/<config name>/.
    ckpt = checkpoint_path(cli.trainer)
    assert ckpt.name == "model.ckpt" and f"artifacts/{config.stem}/" in ckpt.as_posix()
    # The configured model accepts the configured data.
    dm = cli.datamodule
    dm.setup()
    x, _ = next(iter(dm.train_dataloader()))
    n_classes = int(dm.test_set.tensors[1].max()) + 1
    assert cli.model.model(x).shape == (len(x), n_classes)


def retarget(config: Path, root: Path, **trainer: object) -> Path:
    """A copy of ``config`` writing everything under ``root`` (no progress bar, given trainer overrides)."""
    cfg = yaml.safe_load(config.read_text())
    cfg["trainer"].update(default_root_dir=str(root), enable_progress_bar=False, enable_model_summary=False)
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(root)
    cfg["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(root / "checkpoints")
    cfg["trainer"].update(trainer)
    out = root / config.name
    root.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(cfg))
    return out


def accuracy(model: nn.Module, dm: PrivmlDataModule) -> float:
    x, y = dm.test_set.tensors
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_fit_cli_then_train_or_load_reloads_without_training(tmp_path: Path, monkeypatch) -> None:
    config = retarget(REPO / "configs" / "digits_cnn.yaml", tmp_path / "run", max_epochs=3)
    ckpt = tmp_path / "run" / "checkpoints" / "model.ckpt"
    threads = torch.get_num_threads()

    cli_main(["fit", "--config", str(config)])  # what `privml fit --config ...` runs
    assert ckpt.is_file()
    assert (tmp_path / "run" / "logs").is_dir()  # CSV metrics next to the checkpoint, nowhere else
    trained = load_model_from_checkpoint(ckpt)
    assert isinstance(trained, DigitsCNN) and not trained.training

    def no_training(*args, **kwargs):
        raise AssertionError("train_or_load retrained although the checkpoint exists")

    monkeypatch.setattr(L.Trainer, "fit", no_training)
    mtime = ckpt.stat().st_mtime_ns
    model, dm = train_or_load(config)
    assert ckpt.stat().st_mtime_ns == mtime
    assert isinstance(model, DigitsCNN) and not model.training
    assert torch.get_num_threads() == threads  # the config's num_threads does not leak
    assert dm.test_set is not None and len(dm.test_set) == 450
    x = dm.test_set.tensors[0]
    with torch.no_grad():
        assert torch.equal(model(x), trained(x))
    # 3 epochs already give far better than chance (0.1).
    assert accuracy(model, dm) > 0.6


def test_train_or_load_trains_when_missing_and_checkpoint_holds_final_weights(tmp_path: Path) -> None:
    config = retarget(REPO / "configs" / "breast_cancer_mlp.yaml", tmp_path / "bc", max_epochs=30)
    model, dm = train_or_load(config, overrides=["--trainer.max_epochs=5"])
    ckpt = tmp_path / "bc" / "checkpoints" / "model.ckpt"
    assert ckpt.is_file()
    assert torch.load(ckpt, weights_only=True)["epoch"] == 4  # the override took effect
    reloaded = load_model_from_checkpoint(ckpt)
    x = dm.test_set.tensors[0]
    with torch.no_grad():
        assert torch.equal(model(x), reloaded(x))
    assert accuracy(model, dm) > 0.85  # majority class is 0.63


def test_load_model_from_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="no checkpoint"):
        load_model_from_checkpoint(tmp_path / "missing.ckpt")
    state = {f"model.{k}": v for k, v in DigitsCNN().state_dict().items()}
    bare = tmp_path / "bare.ckpt"
    torch.save({"state_dict": state}, bare)  # written by hand: no record of the model's class
    with pytest.raises(InvalidInput, match="model="):
        load_model_from_checkpoint(bare)
    loaded = load_model_from_checkpoint(bare, model=DigitsCNN())
    assert torch.equal(loaded.fc2.weight, state["model.fc2.weight"])
    with pytest.raises(MalformedInput, match="does not fit"):
        load_model_from_checkpoint(bare, model=nn.Linear(2, 2))
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(MalformedInput):
        load_model_from_checkpoint(junk)


def test_bad_configs_and_arguments_raise_privml_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="not found"):
        train_or_load(tmp_path / "nope.yaml")
    cfg = yaml.safe_load((REPO / "configs" / "digits_cnn.yaml").read_text())
    cfg["model"]["lrr"] = 0.1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    with pytest.raises(InvalidInput, match="lrr"):
        train_or_load(bad)
    cfg = yaml.safe_load((REPO / "configs" / "digits_cnn.yaml").read_text())
    cfg["trainer"]["callbacks"][0]["init_args"]["filename"] = "{epoch}"
    templated = tmp_path / "templated.yaml"
    templated.write_text(yaml.safe_dump(cfg))
    with pytest.raises(InvalidInput, match="fixed dirpath and filename"):
        train_or_load(templated)
    with pytest.raises(InvalidInput, match="optimizer"):
        ClassifierModule(DigitsCNN(), optimizer="lbfgs")
    with pytest.raises(InvalidInput, match="scheduler"):
        ClassifierModule(DigitsCNN(), scheduler="step")
    with pytest.raises(InvalidInput, match="unknown dataset"):
        PrivmlDataModule(dataset="imagenet")
    with pytest.raises(InvalidInput, match="val_fraction"):
        PrivmlDataModule(val_fraction=1.0)


def test_datamodule_splits() -> None:
    dm = PrivmlDataModule("digits", batch_size=16)
    dm.setup()
    assert dm.val_set is dm.test_set and len(dm.train_set) == 1347
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (16, 1, 8, 8) and yb.dtype == torch.int64
    held = PrivmlDataModule("breast_cancer", val_fraction=0.2, seed=5)
    held.setup()
    assert len(held.val_set) == round(426 * 0.2) and len(held.train_set) + len(held.val_set) == 426
    again = PrivmlDataModule("breast_cancer", val_fraction=0.2, seed=5)
    again.setup()
    assert held.val_set.indices == again.val_set.indices
    assert len(held.test_set) == 143


def test_classifier_module_logs_accuracy() -> None:
    torch.manual_seed(0)
    module = ClassifierModule(nn.Linear(4, 3))
    x = torch.randn(6, 4)
    logits = module(x)
    y = logits.argmax(1)
    y[:2] = (y[:2] + 1) % 3  # two of six wrong
    loss, acc = module._loss_acc((x, y))
    assert acc.item() == pytest.approx(4 / 6)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, y))
