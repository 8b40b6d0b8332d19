"""Typed configuration of ``privml eval``: the model, the data, and one or more backends to compare.

An eval config is a YAML file (``configs/eval/*.yaml``) or the same built from command-line flags::

    model: configs/digits_cnn.yaml            # training config (trains if its checkpoint is missing)
    tolerance: 0.02                           # allowed accuracy drop, private vs clear
    backends:
      - backend: mpc
        session: {parties: 2}
      - backend: ckks
        model: configs/finetune_digits_cnn.yaml   # this backend runs the fine-tuned model
        compile: {layout: throughput, precision_bits: 14}

Every key is checked: an unknown one is refused naming where it is and the closest valid name; ``compile``
and ``session`` options are checked by the backend's typed configs (:mod:`privml.config`).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from privml.config import CONFIGS, _Config, check_backend, option, session_config
from privml.data import DATASETS
from privml.errors import InvalidInput

DEFAULT_WATTS_PER_CORE = 10.0
"""Assumed power of one busy core (W) for the energy estimate: a server core under load, package share included."""


def _check_keys(d: dict[str, Any], names: tuple[str, ...], where: str) -> None:
    for key in d:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid fields: {', '.join(names)}"
            raise InvalidInput(f"privml: {where}: unknown field {key!r}; {hint}")


def _where(where: str, exc: InvalidInput) -> InvalidInput:
    return InvalidInput(f"privml: {where}: {str(exc).removeprefix('privml: ')}")


@dataclass(frozen=True)
class BackendRun(_Config):
    """One backend of an evaluation: its compile and session options, and optionally its own model and sizes."""

    backend: str = option("plain", "backend to evaluate on", choices=tuple(CONFIGS))
    label: str | None = option(None, "name of this run in the report (default: backend, plus layout)")
    model: str | None = option(None, "training config of the model this backend runs (default: the eval's model, "
                               "e.g. a fine-tuned polynomial model for ckks)")
    compile: Any = option(None, "privml.compile options for this backend (checked by its typed config)")
    session: Any = option(None, "privml.Session options for this backend (checked by its typed config)")
    limit: int | None = option(None, "evaluate only the first N test samples on this backend", min=1)
    batch_size: int | None = option(None, "samples per request (default: what the backend packs best: the whole "
                                    "split for plain, mpc and the throughput layout, 1 for the latency layout)",
                                    min=1)

    def __post_init__(self) -> None:
        object.__setattr__(self, "compile", dict(self.compile or {}))
        object.__setattr__(self, "session", dict(self.session or {}))
        super().__post_init__()
        CONFIGS[self.backend].check_keys(self.compile)
        CONFIGS[self.backend].from_options(**self.compile)  # types and bounds
        session_config(self.backend, **self.session)

    @property
    def name(self) -> str:
        layout = self.compile.get("layout") if self.backend in ("ckks", "hybrid") else None
        return self.label or (f"{self.backend}-{layout}" if layout else self.backend)


@dataclass(frozen=True)
class EvalConfig(_Config):
    """What ``privml eval`` runs: the model and data, the backends side by side, and how results are judged."""

    model: str = option("configs/digits_cnn.yaml", "training config of the model (trains if no checkpoint yet)")
    checkpoint: str | None = option(None, "checkpoint to evaluate (default: the one the training config names); "
                                    "refused if it was not trained for the config's model")
    dataset: str | None = option(None, "test data set (default: the training config's)", choices=(*DATASETS, None))
    limit: int | None = option(None, "evaluate only the first N test samples", min=1)
    calib: int = option(512, "calibration samples from the training split", min=1)
    tolerance: float = option(0.01, "allowed accuracy drop, private vs clear (0.01 = one point): the verdict", min=0,
                              max=1)
    confidence: float = option(0.95, "confidence of the accuracy intervals (Wilson score)", min=0.5, max=0.999)
    watts_per_core: float = option(DEFAULT_WATTS_PER_CORE, "assumed watts per busy core for the energy estimate",
                                   min=0)
    simulate: bool = option(False, "also predict each encrypted result in clear with the noise model and report "
                            "how far the prediction was from the encrypted run")
    backends: Any = option(None, "the backends to evaluate, in order (a list of BackendRun fields)")
    allow_module: tuple[str, ...] | None = option(None, "module prefixes trusted besides privml, models, "
                                                  "torchvision.models")

    def __post_init__(self) -> None:
        runs = []
        for i, entry in enumerate(self.backends or ({"backend": "plain"},)):
            where = f"backends[{i}]"
            if isinstance(entry, BackendRun):
                runs.append(entry)
                continue
            if not isinstance(entry, dict):
                raise InvalidInput(f"privml: {where}: expected a mapping of BackendRun fields, got {entry!r:.80}")
            _check_keys(entry, BackendRun.option_names(), where)
            try:
                check_backend(entry.get("backend", "plain"))
                runs.append(BackendRun(**entry))
            except InvalidInput as exc:
                raise _where(where, exc) from None
        names = [r.name for r in runs]
        if len(set(names)) != len(names):
            raise InvalidInput(f"privml: backends: two runs share a name ({names}); give them distinct labels")
        object.__setattr__(self, "backends", tuple(runs))
        super().__post_init__()

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (what a run directory records, and what its resume checks)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "backends"}
        out["allow_module"] = list(self.allow_module) if self.allow_module else None
        out["backends"] = [{f.name: getattr(r, f.name) for f in fields(r)} for r in self.backends]
        return out


def load_eval_config(path: str | Path, **overrides: Any) -> EvalConfig:
    """Read an eval config YAML; ``overrides`` (non-None values) replace its top-level fields."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise InvalidInput(f"privml: cannot read eval config {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidInput(f"privml: eval config {path}: expected a mapping of fields, got {type(data).__name__}")
    _check_keys(data, EvalConfig.option_names(), f"eval config {path}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return EvalConfig(**data)
    except InvalidInput as exc:
        raise _where(f"eval config {path}", exc) from None
    except TypeError as exc:  # a field given a wrong structure
        raise InvalidInput(f"privml: eval config {path}: {exc}") from None


__all__ = ["BackendRun", "DEFAULT_WATTS_PER_CORE", "EvalConfig", "load_eval_config"]
