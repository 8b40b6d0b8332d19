"""The README's report section is generated from committed reports (experiments/readme_report.py), not typed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("readme_report", ROOT / "experiments" / "readme_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_report_section_is_what_the_committed_reports_render() -> None:
    script = _script()
    readme = (ROOT / "README.md").read_text()
    assert script.current_block(readme) == script.expected_block(ROOT)
    runs = script.committed_runs(ROOT)
    assert runs and all(r.reports for r in runs)
    digits = runs[0]
    assert {r.backend for r in digits.reports} == {"plain", "mpc", "ckks", "hybrid"}
    for r in digits.reports:  # the figures quoted are the report's own
        assert f"{100 * r.private_accuracy:.2f}%" in script.current_block(readme)
    assert (ROOT / "docs" / "reports" / f"{digits.reports[0].model}_comparison.png").is_file()
