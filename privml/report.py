"""Evaluation reports: accuracy with intervals, latency, per-layer costs, sizes, resources, who saw what, provenance.

``EvalReport`` is one backend's result; ``RunReport`` holds several side by side (comparison mode) with the run's
manifest. Both write JSON for machines and Markdown for people; internal details (plan arrays, expansion indices,
every timing) go in the JSON only. Every number comes from the run: accuracies from the saved predictions,
latency percentiles from the recorded timings (:func:`latency_stats`).
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

TRUST_ASSUMPTIONS = {
    "plain": "none (clear)",
    "ckks": "cryptography only",
    "mpc": "non-colluding parties",
    "hybrid": "trusted enclave (hardware)",
}
"""The trust each backend rests on: the comparison's marker and column."""


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (sound at small n and at 0% or 100%)."""
    if n <= 0:
        return (0.0, 1.0)
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, center - half), min(1.0, center + half))


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between order statistics (numpy's default)."""
    if not values:
        return float("nan")
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def latency_stats(timings: Sequence[Sequence[float]]) -> dict[str, float]:
    """From ``[(start, samples, seconds), ...]`` per request: median and p95 request latency, per-sample, rate."""
    seconds = [float(t[2]) for t in timings]
    samples = sum(int(t[1]) for t in timings)
    total = sum(seconds)
    return {"requests": len(seconds), "samples": samples, "median_s": percentile(seconds, 50),
            "p95_s": percentile(seconds, 95), "per_sample_ms": 1000 * total / max(1, samples),
            "samples_per_s": samples / total if total > 0 else float("inf"), "total_s": total}


@dataclass
class EvalReport:
    """What one private evaluation measured. ``costs``, ``visibility`` and ``trust`` come from the backend."""

    model: str
    backend: str
    samples: int
    clear_accuracy: float
    private_accuracy: float
    agreement: float
    max_abs_logit_error: float
    seconds_total: float
    seconds_per_sample: float
    label: str = ""
    encryption_error: float = 0.0
    approximation_error: float = 0.0
    confidence: float = 0.95
    clear_interval: tuple[float, float] = (0.0, 1.0)
    private_interval: tuple[float, float] = (0.0, 1.0)
    tolerance: float = 0.01
    verdict: str = ""
    latency: dict[str, float] = field(default_factory=dict)
    setup_seconds: float = 0.0
    resumed_requests: int = 0  # requests read back from an interrupted run's store, not redone
    resources: dict[str, Any] = field(default_factory=dict)
    sizes: dict[str, Any] = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)
    out_of_range_inputs: list[int] = field(default_factory=list)  # samples whose inputs left the calibrated range
    out_of_range_outputs: list[int] = field(default_factory=list)  # samples whose decrypted outputs did
    simulation: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    costs: dict[str, Any] = field(default_factory=dict)
    visibility: list[dict[str, str]] = field(default_factory=list)
    attacker_model: str = ""
    trust: list[str] = field(default_factory=list)
    plan_summary: dict[str, Any] = field(default_factory=dict)
    timings: list[list[float]] = field(default_factory=list)  # [start, samples, seconds] per request (JSON only)
    predictions: dict[str, Any] = field(default_factory=dict)  # labels and argmax per sample (JSON only)
    provenance: dict[str, Any] = field(default_factory=dict)  # enclave measurement, attestation, audit-log head
    environment: dict[str, Any] = field(default_factory=dict)

    @property
    def trust_assumption(self) -> str:
        return TRUST_ASSUMPTIONS.get(self.backend, self.backend)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalReport:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        for key in ("clear_interval", "private_interval"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    def markdown(self, level: int = 1) -> str:
        h = "#" * level
        lat = self.latency or {}
        ci = f"{round(100 * self.confidence)}%"
        lines = [
            f"{h} {self.label or self.backend}: {self.model} on `{self.backend}`",
            "",
            f"**Verdict:** {self.verdict}" if self.verdict else "",
            "",
            "| metric | value |",
            "|---|---|",
            f"| samples | {self.samples} |",
            f"| clear accuracy (original model) | {_pct(self.clear_accuracy)} ({ci} CI {_ci(self.clear_interval)}) |",
            f"| private accuracy | {_pct(self.private_accuracy)} ({ci} CI {_ci(self.private_interval)}) |",
            f"| prediction agreement | {_pct(self.agreement)} |",
            f"| max abs logit error vs original model | {self.max_abs_logit_error:.3g} |",
            f"| of which approximation (clear approximated vs original) | {self.approximation_error:.3g} |",
            f"| of which encryption (private vs clear approximated) | {self.encryption_error:.3g} |",
            f"| samples with inputs outside the calibrated range | {_indices(self.out_of_range_inputs)} |",
            f"| samples with outputs outside the calibrated range | {_indices(self.out_of_range_outputs)} |",
        ]
        if lat:
            lines += [
                f"| requests x batch | {lat.get('requests')} requests for {lat.get('samples')} samples |",
                f"| request latency, median / p95 | {_sec(lat.get('median_s'))} / {_sec(lat.get('p95_s'))} |",
                f"| per sample (amortized) | {lat.get('per_sample_ms', 0):.2f} ms |",
                f"| throughput | {lat.get('samples_per_s', 0):.3g} samples/s |",
            ]
        if self.resumed_requests:
            lines.append(f"| resumed | {self.resumed_requests} finished requests read back from the interrupted run |")
        lines += [f"| total time (requests) | {self.seconds_total:.2f} s |",
                  f"| setup (keys, parties, enclave) | {self.setup_seconds:.2f} s |"]
        res = self.resources or {}
        if res:
            lines += [f"| peak memory (RSS, this process and its children) | {res.get('peak_rss_gb', 0):.2f} GB "
                      f"({res.get('rss_at_start_gb', 0):.2f} GB before this backend started) |",
                      f"| CPU time | {res.get('cpu_seconds', 0):.1f} s |",
                      f"| energy estimate | {res.get('energy_wh', 0):.3g} Wh ({res.get('energy_j', 0):.3g} J) |"]
        lines += [f"| {k.replace('_', ' ')} | {_human(k, v)} |" for k, v in (self.sizes or {}).items()]
        if res.get("assumption"):
            lines += ["", f"Energy: {res['assumption']}"]
        if self.simulation:
            s = self.simulation
            lines += ["", f"{h}# Simulated in clear (`--simulate`)", "",
                      f"Predicted with {s.get('mode')}: accuracy {_pct(s.get('accuracy', 0))}; vs the encrypted run: "
                      f"max |logit difference| {s.get('max_abs_logit_difference', 0):.3g}, predictions agree on "
                      f"{_pct(s.get('prediction_agreement', 0))}, accuracy difference "
                      f"{100 * s.get('accuracy_difference', 0):+.2f} points."]
        if self.layers:
            cols = _columns(self.layers)
            lines += ["", f"{h}# Cost per layer", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            for row in self.layers:
                lines.append("| " + " | ".join(_cell(row.get(c)) for c in cols) + " |")
            lines += ["", "Time is charged to the layer that computes it: a linear map fused into the next one is "
                      "paid there; `(rest)` is what ran outside modules (functional ops, the final decode)."]
        counters = {k: v for k, v in (self.costs or {}).items() if k != "layers" and _short_value(v)}
        if counters:
            lines += ["", f"{h}# Backend costs", "", "| cost | value |", "|---|---|"]
            lines += [f"| {k} | {_cell(v)} |" for k, v in counters.items()]
        if self.plan_summary:
            short = {k: v for k, v in self.plan_summary.items() if _short_value(v)}
            rest = sorted(set(self.plan_summary) - set(short))
            lines += ["", f"{h}# Plan", ""] + [f"- {k}: {v}" for k, v in short.items()]
            if rest:
                lines.append(f"- in the JSON only: {', '.join(rest)}")
        if self.visibility:
            cols = _columns(self.visibility)
            lines += ["", f"{h}# Who saw what", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in self.visibility]
        if self.attacker_model:
            lines += ["", f"**Attacker model:** {self.attacker_model}"]
        if self.trust:
            lines += [""] + [f"- {t}" for t in self.trust]
        return "\n".join(line for i, line in enumerate(lines) if line or (i and lines[i - 1])) + "\n"

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
        js.write_text(json.dumps(self.to_dict(), indent=2, default=str))
        md.write_text(self.markdown())
        return js, md


@dataclass
class RunReport:
    """One ``privml eval`` run: its backends side by side, the manifest, the plots."""

    reports: list[EvalReport]
    manifest: dict[str, Any] = field(default_factory=dict)
    plots: list[str] = field(default_factory=list)

    def comparison(self) -> list[dict[str, Any]]:
        """One row per backend: the side-by-side table's numbers."""
        rows = []
        for r in self.reports:
            lat = r.latency or {}
            rows.append({
                "run": r.label or r.backend, "backend": r.backend, "model": r.model, "trust": r.trust_assumption,
                "samples": r.samples, "clear_accuracy": r.clear_accuracy, "private_accuracy": r.private_accuracy,
                "private_interval": list(r.private_interval), "agreement": r.agreement,
                "per_sample_ms": lat.get("per_sample_ms", 1000 * r.seconds_per_sample),
                "median_request_s": lat.get("median_s"), "p95_request_s": lat.get("p95_s"),
                "peak_rss_gb": (r.resources or {}).get("peak_rss_gb"),
                "energy_wh": (r.resources or {}).get("energy_wh"),
                "verdict": r.verdict.split(":")[0] if r.verdict else ""})
        return rows

    def comparison_markdown(self) -> str:
        """The side-by-side table (also what the README shows)."""
        conf = round(100 * (self.reports[0].confidence if self.reports else 0.95))
        lines = [f"| run | model | trust | samples | clear acc | private acc ({conf}% CI) | agreement | per sample | "
                 "request median / p95 | peak RSS | energy | verdict |", "|" + "---|" * 12]
        for row in self.comparison():
            lo, hi = row["private_interval"]
            lines.append(
                f"| {row['run']} | {row['model']} | {row['trust']} | {row['samples']} | {_pct(row['clear_accuracy'])} "
                f"| {_pct(row['private_accuracy'])} [{100 * lo:.1f}, {100 * hi:.1f}] | {_pct(row['agreement'])} | "
                f"{_ms(row['per_sample_ms'])} | {_sec(row['median_request_s'])} / {_sec(row['p95_request_s'])} | "
                f"{_num(row['peak_rss_gb'], ' GB')} | {_num(row['energy_wh'], ' Wh')} | {row['verdict']} |")
        return "\n".join(lines) + "\n"

    def markdown(self) -> str:
        m = self.manifest or {}
        lines = ["# privml evaluation report", ""]
        if m.get("command"):
            lines += [f"Command: `{m['command']}`  ", f"Run: `{m.get('run_id', '')}`, {m.get('created', '')}", ""]
        lines += ["## Side by side", "", self.comparison_markdown()]
        for p in self.plots:
            lines += [f"![{Path(p).stem}]({p})", ""]
        for r in self.reports:
            lines += [r.markdown(level=2), ""]
        if m:
            lines += ["## Manifest (provenance)", "", "| field | value |", "|---|---|"]
            lines += [f"| {k} | {v} |" for k, v in _flatten(m).items() if _short_value(v) and not k.endswith(".bytes")]
            lines += ["", "Every `sha256` names a file: check it with `sha256sum`, or `privml.manifest.verify`."]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        return {"manifest": self.manifest, "comparison": self.comparison(), "plots": self.plots,
                "reports": [r.to_dict() for r in self.reports]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunReport:
        return cls([EvalReport.from_dict(r) for r in d.get("reports", [])], d.get("manifest", {}),
                   list(d.get("plots", [])))

    @classmethod
    def load(cls, path: str | Path) -> RunReport:
        """A report from its ``report.json`` (or the run directory holding it)."""
        path = Path(path)
        return cls.from_dict(json.loads((path / "report.json" if path.is_dir() else path).read_text()))

    def write(self, directory: str | Path) -> tuple[Path, Path]:
        out = Path(directory)
        js, md = out / "report.json", out / "report.md"
        js.write_text(json.dumps(self.to_dict(), indent=2, default=str))
        md.write_text(self.markdown())
        return js, md


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _ci(iv: Sequence[float]) -> str:
    return f"[{100 * iv[0]:.1f}%, {100 * iv[1]:.1f}%]"


def _sec(v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    return f"{1000 * v:.1f} ms" if v < 1 else f"{v:.2f} s"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g} ms"


def _num(v: float | None, unit: str) -> str:
    return "-" if v is None else f"{v:.3g}{unit}"


def _human(key: str, v: Any) -> str:
    if isinstance(v, int) and "bytes" in key:
        return f"{v / 1e6:.2f} MB" if v >= 1e5 else f"{v} B"
    return _cell(v)


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _short_value(v: Any, most: int = 100) -> bool:
    """Whether a value is worth a Markdown cell: scalars and short lists; big arrays stay in the JSON."""
    if isinstance(v, (dict, list, tuple)):
        return len(json.dumps(v, default=str)) <= most
    return len(str(v)) <= most


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    cols: list[str] = []
    for row in rows:
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
