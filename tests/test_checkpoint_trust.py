"""Configs and checkpoints are trusted input: model specs resolve only inside an allow-list; bad files fail cleanly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from models.digits import DigitsCNN
from privml import cli
from privml.errors import InvalidInput, MalformedInput
from privml.train import check_model_spec, load_model_from_checkpoint, train_or_load

REPO = Path(__file__).resolve().parents[1]
STATE = {f"model.{k}": v for k, v in DigitsCNN().state_dict().items()}


def _ckpt(tmp_path: Path, spec: object, name: str = "m.ckpt", state: dict | None = None) -> Path:
    path = tmp_path / name
    torch.save({"state_dict": STATE if state is None else state, "privml_model_spec": spec}, path)
    return path


@pytest.mark.parametrize("spec", [
    {"class_path": "os.system", "init_args": {"command": "echo pwned"}},
    {"class_path": "torch.nn.Linear", "init_args": {"in_features": 40000, "out_features": 40000}},
    {"class_path": "Linear", "init_args": {}},
    {"class_path": "modelsx.evil.Net"},
    {"class_path": "models.digits.nn.Linear", "init_args": {"in_features": 2, "out_features": 2}},
    {"class_path": "models.digits.DigitsCNN", "init_args": {"in_channels": {"__reduce__": b"x"}}},
    "models.digits.DigitsCNN",
])
def test_crafted_checkpoint_specs_are_refused(tmp_path: Path, spec: object) -> None:
    with pytest.raises(InvalidInput) as info:
        load_model_from_checkpoint(_ckpt(tmp_path, spec))
    if isinstance(spec, dict) and spec["class_path"] in ("os.system", "torch.nn.Linear"):
        assert spec["class_path"] in str(info.value) and "--allow-module" in str(info.value)


def test_allowed_model_whose_spec_does_not_fit_its_weights_is_not_built(tmp_path: Path) -> None:
    # an allowed class with huge dimensions: the shapes are probed on the meta device, nothing allocated
    spec = {"class_path": "torchvision.models.ResNet",
            "init_args": {"block": "torchvision.models.resnet.BasicBlock", "layers": [2, 2, 2, 2],
                          "num_classes": 10**9}}
    with pytest.raises(MalformedInput, match="does not fit the stored weights"):
        load_model_from_checkpoint(_ckpt(tmp_path, spec))
    spec = {"class_path": "models.digits.DigitsCNN", "init_args": {"in_channels": 1, "num_classes": 10**8}}
    with pytest.raises(MalformedInput, match="does not fit the stored weights"):
        load_model_from_checkpoint(_ckpt(tmp_path, spec))


def test_trusted_and_explicitly_allowed_specs_load(tmp_path: Path) -> None:
    good = {"class_path": "models.digits.DigitsCNN", "init_args": {"in_channels": 1, "num_classes": 10}}
    model = load_model_from_checkpoint(_ckpt(tmp_path, good))
    assert torch.equal(model.fc2.weight, STATE["model.fc2.weight"])
    linear = torch.nn.Linear(3, 2)
    spec = {"class_path": "torch.nn.Linear", "init_args": {"in_features": 3, "out_features": 2}}
    state = {f"model.{k}": v for k, v in linear.state_dict().items()}
    path = _ckpt(tmp_path, spec, "lin.ckpt", state)
    with pytest.raises(InvalidInput, match="torch.nn.Linear"):
        load_model_from_checkpoint(path)
    assert torch.equal(load_model_from_checkpoint(path, allowed=("torch.nn",)).weight, linear.weight)
    assert check_model_spec({"class_path": "mypkg.sub.Net"}, allowed=("mypkg.",))
    with pytest.raises(InvalidInput):
        check_model_spec({"class_path": "mypkgx.Net"}, allowed=("mypkg",))


def test_config_with_untrusted_model_is_refused_before_import(tmp_path: Path) -> None:
    cfg = yaml.safe_load((REPO / "configs" / "digits_cnn.yaml").read_text())
    cfg["model"]["model"] = {"class_path": "never_imported_pkg.Net", "init_args": {}}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    with pytest.raises(InvalidInput, match="never_imported_pkg.Net.*--allow-module never_imported_pkg"):
        train_or_load(bad)
    # a command-line override goes through the post-parse check
    with pytest.raises(InvalidInput, match="torch.nn.modules.linear.Linear|torch.nn.Linear"):
        train_or_load(REPO / "configs" / "digits_cnn.yaml", overrides=["--model.model=torch.nn.Linear",
                      "--model.model.init_args.in_features=2", "--model.model.init_args.out_features=2"])


def test_corrupt_checkpoints_raise_malformed_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    good = _ckpt(tmp_path, {"class_path": "models.digits.DigitsCNN", "init_args": {}})
    data = good.read_bytes()
    for name, content in (("truncated.ckpt", data[: len(data) // 2]), ("flipped.ckpt", data[:40] + b"\0" * 200
                                                                      + data[240:]), ("empty.ckpt", b"")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(MalformedInput, match="cannot read checkpoint"):
            load_model_from_checkpoint(tmp_path / name)
    torch.save({"state_dict": ["not", "a", "dict"]}, tmp_path / "list.ckpt")
    with pytest.raises(MalformedInput):
        load_model_from_checkpoint(tmp_path / "list.ckpt")
    torch.save({"state_dict": {"model.x": 3}}, tmp_path / "scalar.ckpt")
    with pytest.raises(MalformedInput):
        load_model_from_checkpoint(tmp_path / "scalar.ckpt")
    # through the CLI: a config whose checkpoint file is truncated exits with a privml error, no traceback
    cfg = yaml.safe_load((REPO / "configs" / "breast_cancer_mlp.yaml").read_text())
    cfg["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(tmp_path / "ck")
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "logs")
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "model.ckpt").write_bytes(data[:100])
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    assert cli.main(["eval", "--config", str(config), "--limit", "4", "--report-dir", str(tmp_path)]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err
