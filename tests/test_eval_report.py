"""``privml eval`` runs and their reports: numbers from the run, manifests that verify, resume, configs, bad input.

The runs use the breast-cancer MLP (trained on first use, ~10 s) on real backends: plain, CKKS (throughput
layout, real SEAL ciphertexts) and MPC (two real CrypTen party processes).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from privml.errors import InvalidInput
from privml.eval_config import EvalConfig, load_eval_config
from privml.manifest import sha256_file, tensors_sha256, verify
from privml.report import RunReport, latency_stats, percentile, wilson_interval
from privml.runs import run_eval

BC = "configs/breast_cancer_mlp.yaml"


def _walk(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, node


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> RunReport:
    cfg = EvalConfig(model=BC, limit=40, tolerance=0.05, simulate=True, backends=[
        {"backend": "plain"}, {"backend": "ckks", "compile": {"layout": "throughput"}, "batch_size": 20},
        {"backend": "mpc", "session": {"parties": 2}}])
    return run_eval(cfg, tmp_path_factory.mktemp("reports"), progress=False)


def test_the_reports_numbers_come_from_the_run(compared: RunReport) -> None:
    run_dir = Path(compared.manifest["run_dir"])
    saved = RunReport.load(run_dir)
    assert [r.label for r in saved.reports] == ["plain", "ckks-throughput", "mpc"]
    for r in saved.reports:
        pred = json.loads((run_dir / "predictions" / f"{r.label}.json").read_text())
        labels, private, clear = (torch.tensor(pred[k]) for k in ("labels", "private", "clear"))
        assert r.private_accuracy == pytest.approx(float((private == labels).float().mean()))
        assert r.clear_accuracy == pytest.approx(float((clear == labels).float().mean()))
        assert r.agreement == pytest.approx(float((private == clear).float().mean()))
        k = int((private == labels).sum())
        assert tuple(r.private_interval) == pytest.approx(wilson_interval(k, len(labels), r.confidence))
        stats = latency_stats(r.timings)  # percentiles recomputed from the recorded request timings
        assert r.latency["median_s"] == pytest.approx(stats["median_s"])
        assert r.latency["p95_s"] == pytest.approx(stats["p95_s"])
        assert sum(t[1] for t in r.timings) == r.samples == 40
        assert r.resources["energy_j"] == pytest.approx(r.resources["cpu_seconds"] * r.resources["watts_per_core"],
                                                        rel=1e-3, abs=1e-3)
        assert r.visibility and r.attacker_model and r.verdict.startswith(("PASS", "FAIL"))
    ckks = saved.reports[1]
    assert ckks.latency["requests"] == 2  # batch_size 20 over 40 samples
    assert ckks.sizes["public_context_bytes"] > 1e6 and ckks.sizes["request_bytes"] > 0
    assert any(row.get("rotations") or row.get("ct_pt_mults") for row in ckks.layers)  # per-layer op counts
    assert ckks.simulation["accuracy"] > 0.8 and ckks.simulation["max_abs_logit_difference"] < 1.0
    mpc = saved.reports[2]
    assert {row["role"] for row in mpc.visibility} >= {"party 0 (data)", "party 1"}
    assert sum(row.get("bytes", 0) for row in mpc.layers) > 0  # per-layer communication from the parties
    assert mpc.resources["cpu_seconds"] > 0  # the party processes' CPU time counted
    md = (run_dir / "report.md").read_text()
    assert max(len(line) for line in md.splitlines()) < 600  # internal arrays stay in the JSON
    assert "## Side by side" in md and "Who saw what" in md and "Attacker model" in md


def test_every_manifest_field_is_filled_and_its_hashes_verify(compared: RunReport) -> None:
    from privml.data import get_dataset
    from privml.train import load_model_from_checkpoint

    m = compared.manifest
    run_dir = Path(m["run_dir"])
    empty = [p for p, v in _walk(m) if v is None or v == "" or v == []]
    assert not empty, empty
    assert json.loads((run_dir / "manifest.json").read_text()) == m
    assert verify(m, run_dir) == []  # every {path, sha256} names a file with that hash
    assert m["model"]["checkpoint"]["sha256"] == sha256_file(m["model"]["checkpoint"]["path"])
    model = load_model_from_checkpoint(m["model"]["checkpoint"]["path"])
    assert m["model"]["weights_sha256"] == tensors_sha256(model.state_dict())
    _, test = get_dataset("breast_cancer", seed=0)
    x, y = test.tensors
    assert m["data"]["sha256"] == tensors_sha256([x[:40], y[:40]])
    assert m["backends"]["ckks-throughput"]["parameters"]["security"].startswith("128-bit")
    for k in ("torch", "tenseal", "crypten", "privml"):
        assert m["versions"][k] != "not installed"
    plan = run_dir / m["backends"]["mpc"]["plan"]["path"]
    plan.write_text(plan.read_text() + " ")  # tampering is caught
    assert verify(m, run_dir) == [m["backends"]["mpc"]["plan"]["path"]]


def test_plots_are_written_and_sized_to_read(compared: RunReport) -> None:
    import matplotlib.image

    run_dir = Path(compared.manifest["run_dir"])
    assert compared.plots[0] == "comparison.png" and len(compared.plots) >= 2
    for name in compared.plots:
        img = matplotlib.image.imread(run_dir / name)
        assert img.shape[1] >= 800 and img.shape[0] >= 250, name


def test_each_run_writes_its_own_directory(tmp_path) -> None:
    cfg = EvalConfig(model=BC, limit=8)
    a = run_eval(cfg, tmp_path, progress=False)
    b = run_eval(cfg, tmp_path, progress=False)
    assert a.manifest["run_dir"] != b.manifest["run_dir"] and len(list(tmp_path.iterdir())) == 2


def test_resuming_an_interrupted_run_gives_the_same_report(tmp_path) -> None:
    cfg = EvalConfig(model=BC, limit=60, backends=[
        {"backend": "plain", "batch_size": 20}, {"backend": "ckks", "compile": {"layout": "throughput"},
                                                 "batch_size": 20}])
    full = run_eval(cfg, tmp_path / "full", progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_eval(cfg, tmp_path / "cut", progress=False, stop_after=4)  # plain's 3 requests, then ckks's first
    (run_dir,) = (tmp_path / "cut").iterdir()
    first = run_dir / "requests" / "ckks-throughput" / "request_0000000.pt"
    stamp = first.stat().st_mtime_ns
    assert not (run_dir / "report.json").exists()
    resumed = run_eval(resume=run_dir, progress=False)
    assert first.stat().st_mtime_ns == stamp  # the finished request was read back, not redone
    for a, b in zip(full.reports, resumed.reports, strict=True):
        assert (a.label, a.samples, a.clear_accuracy, a.private_accuracy, a.agreement) == \
            (b.label, b.samples, b.clear_accuracy, b.private_accuracy, b.agreement)
        assert a.predictions == b.predictions
        assert [t[:2] for t in a.timings] == [t[:2] for t in b.timings]
        # op counts summed over both sessions; encodes excepted: each session encodes the weight diagonals once
        counters = {k: v for k, v in a.costs.items() if k.startswith("ops: ") and k != "ops: encodes"}
        assert counters == {k: b.costs[k] for k in counters}
    assert verify(resumed.manifest, run_dir) == []


def test_resume_needs_a_run_directory(tmp_path) -> None:
    with pytest.raises(InvalidInput, match="not a privml eval run directory"):
        run_eval(resume=tmp_path)


@pytest.mark.parametrize("path", sorted(Path("configs/eval").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_eval_config_loads(path: Path) -> None:
    cfg = load_eval_config(path)
    assert cfg.backends
    for config in {cfg.model, *(r.model for r in cfg.backends if r.model)}:
        assert Path(config).is_file()


def test_a_config_with_a_typo_names_the_field(tmp_path) -> None:
    bad = tmp_path / "eval.yaml"
    bad.write_text(f"model: {BC}\ntolerence: 0.02\n")
    with pytest.raises(InvalidInput, match=r"unknown field 'tolerence'; did you mean 'tolerance'"):
        load_eval_config(bad)
    bad.write_text(f"model: {BC}\nbackends:\n  - backend: ckks\n    compile: {{layuot: throughput}}\n")
    with pytest.raises(InvalidInput, match=r"backends\[0\].*'layuot'.*did you mean 'layout'"):
        load_eval_config(bad)
    bad.write_text(f"model: {BC}\nbackends:\n  - backend: mpc\n    sesion: {{parties: 3}}\n")
    with pytest.raises(InvalidInput, match=r"backends\[0\].*'sesion'.*did you mean 'session'"):
        load_eval_config(bad)
    bad.write_text(f"model: {BC}\ntolerance: lots\n")
    with pytest.raises(InvalidInput, match="tolerance must be"):
        load_eval_config(bad)


def test_an_unknown_backend_is_refused_by_name(tmp_path, capsys) -> None:
    from privml.cli import main

    with pytest.raises(InvalidInput, match=r"backends\[1\].*'ckkks'.*did you mean 'ckks'"):
        EvalConfig(model=BC, backends=[{"backend": "plain"}, {"backend": "ckkks"}])
    assert main(["eval", "--config", BC, "--backend", "plain", "ckkks", "--report-dir", str(tmp_path)]) == 2
    assert "ckkks" in capsys.readouterr().err and not any(tmp_path.iterdir())


def test_a_dataset_of_the_wrong_shape_is_refused(tmp_path) -> None:
    with pytest.raises(InvalidInput, match=r"dataset: 'digits' gives samples of shape \(1, 8, 8\)"):
        run_eval(EvalConfig(model=BC, dataset="digits"), tmp_path, progress=False)


def test_a_checkpoint_trained_for_another_model_is_refused(tmp_path) -> None:
    import shutil

    import yaml

    from privml.train import train_or_load

    _, dm = train_or_load(BC)
    other = tmp_path / "checkpoints"
    other.mkdir()
    shutil.copy(dm.checkpoint_path, other / "model.ckpt")
    cfg = yaml.safe_load(Path(BC).read_text())
    cfg["model"]["model"]["init_args"] = {**(cfg["model"]["model"].get("init_args") or {}), "hidden": 7}
    cfg["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(other)  # the old directory, a new model
    renamed = tmp_path / "renamed.yaml"
    renamed.write_text(yaml.safe_dump(cfg))
    with pytest.raises(InvalidInput, match=r"not trained for the model the config names.*init_args\.hidden"):
        train_or_load(renamed)
    with pytest.raises(InvalidInput, match=r"model\.model\.class_path"):  # --checkpoint of another model
        run_eval(EvalConfig(model="configs/digits_cnn.yaml", checkpoint=str(other / "model.ckpt"), limit=4),
                 tmp_path / "reports", progress=False)


def test_percentiles_and_intervals() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5 and percentile([5.0], 95) == 5.0
    lo, hi = wilson_interval(9, 10, 0.95)
    assert lo == pytest.approx(0.5958, abs=1e-3) and hi == pytest.approx(0.9821, abs=1e-3)
    assert wilson_interval(4, 4, 0.95)[0] < 0.6  # "100%" on 4 samples is a wide interval
