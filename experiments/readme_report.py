"""Regenerate the README's report section from `privml demo` run directories (no figure is typed by hand).

    privml demo                                           # prints its two run directories
    python experiments/readme_report.py artifacts/reports/<digits run> artifacts/reports/<lenet5 run>

Copies each run's ``report.json`` to ``docs/reports/<model>.json`` and the first run's ``comparison.png`` to
``docs/reports/``, then rewrites the README between the report markers with
:func:`readme_block`. ``tests/test_readme_report.py`` checks that the README block is what the committed
reports render to.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from privml.report import RunReport

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- privml-report:begin -->", "<!-- privml-report:end -->"
DOCS = Path("docs/reports")


def readme_block(runs: list[RunReport], plot: str | None) -> str:
    """The README section: each run's side-by-side table, then an excerpt of the first run's report and its plot."""
    lines = []
    for run in runs:
        m = run.manifest
        lines += [f"`{m.get('command', 'privml eval')}` on {m.get('versions', {}).get('platform', '')}, "
                  f"{m.get('created', '')} (run `{m.get('run_id', '')}`):", "", run.comparison_markdown()]
    if runs and runs[0].reports:
        first = runs[0]
        focus = next((r for r in first.reports if r.backend == "ckks"), first.reports[0])
        lines += ["Excerpt of the same report (`report.md`): who saw what in the "
                  f"`{focus.label}` run, and its attacker model", ""]
        cols = list(focus.visibility[0]) if focus.visibility else []
        if cols:
            lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(str(row.get(c, "")) for c in cols) + " |" for row in focus.visibility]
        lines += ["", f"**Attacker model:** {focus.attacker_model}", ""]
    if plot:
        lines += [f"![accuracy vs latency by trust assumption]({plot})", ""]
    return "\n".join(lines).rstrip() + "\n"


def current_block(readme: str) -> str:
    """The README text between the markers."""
    start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    return readme[start:end].strip("\n") + "\n"


def committed_runs(root: Path = ROOT) -> list[RunReport]:
    """The reports committed under docs/reports, in the order the README lists them (docs/reports/order.txt)."""
    names = (root / DOCS / "order.txt").read_text().split()
    return [RunReport.load(root / DOCS / f"{name}.json") for name in names]


def expected_block(root: Path = ROOT) -> str:
    """What the README section must say, given the committed reports."""
    runs = committed_runs(root)
    first = (root / DOCS / "order.txt").read_text().split()[0]
    return readme_block(runs, str(DOCS / f"{first}_comparison.png"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="privml eval run directories, the digits comparison first")
    args = parser.parse_args(argv)
    docs = ROOT / DOCS
    docs.mkdir(parents=True, exist_ok=True)
    names = []
    for i, run_dir in enumerate(map(Path, args.runs)):
        run = RunReport.load(run_dir)
        name = run.reports[0].model if run.reports else run_dir.name
        names.append(name)
        shutil.copy(run_dir / "report.json", docs / f"{name}.json")
        if i == 0:
            shutil.copy(run_dir / "comparison.png", docs / f"{name}_comparison.png")
    (docs / "order.txt").write_text("\n".join(names) + "\n")
    block = expected_block()
    readme = (ROOT / "README.md").read_text()
    start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    (ROOT / "README.md").write_text(readme[:start] + "\n" + block + readme[end:])
    print(f"README report section regenerated from {', '.join(args.runs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
