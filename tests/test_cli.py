"""The privml command line: validate, compile, eval (the demo's building blocks) on shipped configs."""

from __future__ import annotations

import json

import pytest

from privml.cli import main


def test_validate_resnet18_lists_problems_and_passes_after_fixes(capsys: pytest.CaptureFixture) -> None:
    rc = main(["validate", "torchvision.models.resnet18", "--init-args", '{"num_classes": 10}'])
    out = capsys.readouterr().out
    assert rc == 1 and "layer4.1.bn2" in out and "maxpool" in out
    rc = main(["validate", "torchvision.models.resnet18", "--init-args", '{"num_classes": 10}', "--fix",
               "--replace-maxpool", "--input-shape", "3,32,32"])
    out = capsys.readouterr().out
    assert rc == 0 and "no blocking problems" in out and "folded layer1.0.bn1 into layer1.0.conv1" in out


def test_compile_writes_plan(tmp_path, capsys: pytest.CaptureFixture) -> None:
    out_path = tmp_path / "plan.json"
    rc = main(["compile", "--config", "configs/breast_cancer_mlp.yaml", "--backend", "ckks", "--layout",
               "throughput", "--out", str(out_path)])
    assert rc == 0
    plan = json.loads(out_path.read_text())
    assert plan["backend"] == "ckks" and plan["params"]["security_bits"] == 128
    assert "privml plan" in capsys.readouterr().out


def test_eval_writes_report(tmp_path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["eval", "--config", "configs/breast_cancer_mlp.yaml", "--backend", "ckks", "--layout", "throughput",
               "--report-dir", str(tmp_path), "--no-progress"])
    assert rc == 0
    (run_dir,) = tmp_path.iterdir()  # a run directory of its own
    report = json.loads((run_dir / "report.json").read_text())["reports"][0]
    assert report["samples"] > 100 and report["private_accuracy"] >= report["clear_accuracy"] - 0.03
    assert report["latency"]["requests"] == 1  # the throughput layout takes the whole split in one request
    assert any("secret key" in t for t in report["trust"])
    assert (run_dir / "report.md").read_text().startswith("# privml evaluation")
    assert "ckks-throughput" in capsys.readouterr().out


def test_eval_refuses_an_option_no_chosen_backend_takes(tmp_path) -> None:
    with pytest.raises(SystemExit, match="--parties"):
        main(["eval", "--config", "configs/breast_cancer_mlp.yaml", "--backend", "plain", "ckks", "--parties", "3",
              "--report-dir", str(tmp_path)])


def test_privml_errors_exit_cleanly(capsys: pytest.CaptureFixture) -> None:
    rc = main(["compile", "--config", "configs/does_not_exist.yaml"])
    assert rc == 2 and "not found" in capsys.readouterr().err


def test_compile_with_a_budget(tmp_path) -> None:
    out_path = tmp_path / "plan.json"
    rc = main(["compile", "--config", "configs/breast_cancer_mlp.yaml", "--backend", "ckks", "--max-error", "0.05",
               "--out", str(out_path)])
    assert rc == 0
    plan = json.loads(out_path.read_text())
    rows = [r for r in plan["layers"] if r["degree"]]
    assert rows and all(r["est_error"] <= 0.05 for r in rows)


def test_compile_and_eval_flags_come_from_the_config_fields() -> None:
    import dataclasses

    from privml.cli import _compile_options, _session_options, build_parser
    from privml.config import CONFIGS, SESSION_CONFIGS

    parser = build_parser()
    compile_parser = parser._subparsers._group_actions[0].choices["compile"]  # argparse keeps its subparsers here
    eval_parser = parser._subparsers._group_actions[0].choices["eval"]
    flags = {o for a in eval_parser._actions for o in a.option_strings}
    for cls in (*CONFIGS.values(), *SESSION_CONFIGS.values()):
        for f in dataclasses.fields(cls):
            if f.metadata.get("cli", True):
                assert "--" + f.name.replace("_", "-") in flags
    old_names = {"--max-error", "--accuracy-tolerance", "--depth-budget", "--precision-bits", "--layout", "--degree",
                 "--backend", "--replace-maxpool", "--calib"}
    assert old_names <= {o for a in compile_parser._actions for o in a.option_strings}
    args = parser.parse_args(["eval", "--backend", "mpc", "--max-error", "0.05", "--parties", "3",
                              "--weight-party", "none", "--ttp"])
    assert _compile_options(args) == {"max_error": 0.05}  # unset flags keep the config's defaults
    assert _session_options(args) == {"parties": 3, "weight_party": None, "ttp": True}
    args = parser.parse_args(["compile", "--backend", "ckks", "--layout", "throughput", "--coeff-mod-bit-sizes",
                              "60,40,60", "--no-input-expansion"])
    assert _compile_options(args) == {"layout": "throughput", "coeff_mod_bit_sizes": (60, 40, 60),
                                      "input_expansion": False}
    with pytest.raises(SystemExit):
        parser.parse_args(["compile", "--layout", "fast"])


@pytest.mark.parametrize("command", ["validate", "compile", "eval", "demo"])
def test_every_command_prints_its_help(command, capsys):
    """Help texts are %-formatted by argparse: an option's help with a bare % sign once crashed --help."""
    from privml.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "--backend" in capsys.readouterr().out or command == "demo"
