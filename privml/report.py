"""Evaluation reports: accuracy clear vs private, latency, costs and who saw what, as JSON and Markdown."""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class EvalReport:
    """What one private evaluation measured. ``costs`` and ``trust`` come from the backend."""

    model: str
    backend: str
    samples: int
    clear_accuracy: float
    private_accuracy: float
    agreement: float
    max_abs_logit_error: float
    seconds_total: float
    seconds_per_sample: float
    encryption_error: float = 0.0
    approximation_error: float = 0.0
    out_of_range_inputs: list[int] = field(default_factory=list)  # samples whose inputs left the calibrated range
    out_of_range_outputs: list[int] = field(default_factory=list)  # samples whose decrypted outputs did
    options: dict[str, Any] = field(default_factory=dict)
    costs: dict[str, Any] = field(default_factory=dict)
    trust: list[str] = field(default_factory=list)
    plan_summary: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def markdown(self) -> str:
        lines = [
            f"# privml evaluation: {self.model} on `{self.backend}`",
            "",
            "| metric | value |",
            "|---|---|",
            f"| samples | {self.samples} |",
            f"| clear accuracy | {100 * self.clear_accuracy:.2f}% |",
            f"| private accuracy | {100 * self.private_accuracy:.2f}% |",
            f"| prediction agreement | {100 * self.agreement:.2f}% |",
            f"| max abs logit error vs original model | {self.max_abs_logit_error:.3g} |",
            f"| of which approximation (clear approximated vs original) | {self.approximation_error:.3g} |",
            f"| of which encryption (private vs clear approximated) | {self.encryption_error:.3g} |",
            f"| samples with inputs outside the calibrated range | {_indices(self.out_of_range_inputs)} |",
            f"| samples with outputs outside the calibrated range | {_indices(self.out_of_range_outputs)} |",
            f"| time per sample | {1000 * self.seconds_per_sample:.2f} ms |",
            f"| total time | {self.seconds_total:.2f} s |",
        ]
        layers = self.costs.get("layers") if isinstance(self.costs.get("layers"), dict) else None
        lines += [f"| {k} | {v} |" for k, v in self.costs.items() if k != "layers"]
        if layers:
            lines += ["", "## Cost per layer", "", "| layer | " + " | ".join(_columns(layers)) + " |",
                      "|---|" + "---|" * len(_columns(layers))]
            for name, row in layers.items():
                cells = [f"{row.get(c, '')}" if not isinstance(row.get(c), float) else f"{row[c]:.4g}"
                         for c in _columns(layers)]
                lines.append(f"| {name or '<root>'} | " + " | ".join(cells) + " |")
        if self.plan_summary:
            lines += ["", "## Plan", ""] + [f"- {k}: {v}" for k, v in self.plan_summary.items()]
        if self.trust:
            lines += ["", "## Who saw what", ""] + [f"- {t}" for t in self.trust]
        return "\n".join(lines) + "\n"

    def short(self) -> str:
        layout = f", {self.options['layout']}" if self.options.get("layout") else ""
        return (f"{self.model} [{self.backend}{layout}]: clear acc {100 * self.clear_accuracy:.2f}% | "
                f"private acc {100 * self.private_accuracy:.2f}% | "
                f"agreement {100 * self.agreement:.2f}% | max |logit err| {self.max_abs_logit_error:.2g} | "
                f"{1000 * self.seconds_per_sample:.2f} ms/sample ({self.samples} samples, {self.seconds_total:.1f} s)"
                + (f" | out of range: {len(self.out_of_range_inputs)} inputs, {len(self.out_of_range_outputs)} outputs"
                   if self.out_of_range_inputs or self.out_of_range_outputs else ""))

    def write(self, directory: str | Path, stem: str | None = None) -> tuple[Path, Path]:
        """Write ``<stem>.json`` and ``<stem>.md`` into ``directory``; returns both paths."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        stem = stem or f"{self.model}_{self.backend}"
        js, md = out / f"{stem}.json", out / f"{stem}.md"
        js.write_text(json.dumps(self.to_dict(), indent=2))
        md.write_text(self.markdown())
        return js, md


def _columns(layers: dict[str, dict]) -> list[str]:
    cols: list[str] = []
    for row in layers.values():
        cols += [c for c in row if c not in cols]
    return cols


def environment() -> dict[str, Any]:
    """Where the numbers were measured."""
    return {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
            "threads": torch.get_num_threads(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def _indices(items: list[int], most: int = 20) -> str:
    """'none', or the count and the first sample indices."""
    if not items:
        return "none"
    shown = ", ".join(map(str, items[:most])) + (", ..." if len(items) > most else "")
    return f"{len(items)} ({shown})"
