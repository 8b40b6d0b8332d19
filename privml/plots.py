"""PNG plots of an evaluation: accuracy vs latency by trust assumption, and time per layer.

matplotlib (Agg, no display) is imported on first use, like the optional backends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from privml.report import TRUST_ASSUMPTIONS, EvalReport

_STYLE = {  # trust assumption -> (marker, colour of its layer plot)
    TRUST_ASSUMPTIONS["plain"]: ("o", "#7f7f7f"),
    TRUST_ASSUMPTIONS["ckks"]: ("s", "#1f77b4"),
    TRUST_ASSUMPTIONS["mpc"]: ("^", "#2ca02c"),
    TRUST_ASSUMPTIONS["hybrid"]: ("D", "#d62728"),
}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def comparison_plot(reports: list[EvalReport], path: str | Path) -> Path:
    """Private accuracy (with its confidence interval) vs per-sample latency: marker = trust assumption, one colour
    and legend entry per run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5), dpi=120)
    colours = plt.get_cmap("tab10").colors
    for i, r in enumerate(reports):
        trust = r.trust_assumption
        marker = _STYLE.get(trust, ("x", ""))[0]
        ms = max((r.latency or {}).get("per_sample_ms", 1000 * r.seconds_per_sample), 1e-3)
        acc = 100 * r.private_accuracy
        lo, hi = (100 * v for v in r.private_interval)
        ax.errorbar([ms], [acc], yerr=[[acc - lo], [hi - acc]], fmt=marker, color=colours[i % len(colours)],
                    markersize=9, capsize=4, label=f"{r.label or r.backend}: {trust}, n={r.samples}")
    if reports:
        clear = 100 * reports[0].clear_accuracy
        ax.axhline(clear, color="#7f7f7f", linestyle="--", linewidth=1,
                   label=f"clear accuracy, original model ({clear:.2f}%, n={reports[0].samples})")
    ax.set_xscale("log")
    ax.set_xlabel("latency per sample, amortized (ms, log scale)")
    ax.set_ylabel(f"private accuracy (%), {round(100 * (reports[0].confidence if reports else 0.95))}% interval")
    ax.set_title(f"privml: accuracy vs latency by trust assumption ({reports[0].model if reports else ''})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="run: trust assumption",
              title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def layer_plot(report: EvalReport, path: str | Path) -> Path | None:
    """Seconds per layer (horizontal bars, the first layer on top); None when no layer was timed."""
    rows = [(r["layer"], float(r.get("seconds") or 0.0)) for r in report.layers if r.get("seconds")]
    if not rows:
        return None
    plt = _pyplot()
    rows = rows[::-1]
    fig, ax = plt.subplots(figsize=(7.5, max(2.5, 0.32 * len(rows) + 1.2)), dpi=120)
    ax.barh([name for name, _ in rows], [s for _, s in rows], color=_STYLE.get(report.trust_assumption,
                                                                                ("", "#444"))[1])
    ax.set_xlabel(f"seconds over {report.samples} samples ({report.latency.get('requests', '?')} requests)")
    ax.set_ylabel("layer (module)")
    ax.set_title(f"time per layer: {report.label or report.backend} ({report.model})")
    ax.grid(True, axis="x", alpha=0.3)
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
