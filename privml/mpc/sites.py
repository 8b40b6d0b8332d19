"""A multi-site study: data owners at separate sites train and evaluate together by MPC, and say who held what.

Each site (a hospital, say) is one MPC party with a name, a jurisdiction label and its own slice of the rows.
``run_study`` trains a public architecture on every site's training rows (:func:`privml.mpc.train.train_private`),
then evaluates the trained model on every site's test rows, each site learning only its own predictions
(:func:`privml.mpc.roles.evaluate`, ``output_party="owners"``). Rows are read inside their owner's process only;
the other parties see secret shares. The heap scans of every party (fingerprints of every clear float tensor it
held at the protocol's checkpoints) show that no site's rows were ever in clear anywhere but at that site.

``pool`` places the parties, e.g. a :class:`privml.parties.netlab.NetLab`: one network namespace per site, linked
by shaped veth pairs, so the traffic between sites really crosses a (slow) network.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import yaml

from privml.errors import InvalidInput


@dataclass(frozen=True)
class Site:
    """One data owner: its name, jurisdiction and row ranges ``[start, stop)`` of the train and test splits."""

    name: str
    jurisdiction: str
    train_rows: tuple[int, int]
    test_rows: tuple[int, int]


@dataclass(frozen=True)
class StudyConfig:
    sites: tuple[Site, ...]
    epochs: int = 3
    lr: float = 0.1
    batch_size: int = 32
    delay_ms: float = 0.0
    rate_mbit: float | None = None

    @classmethod
    def from_yaml(cls, path: str | Path) -> StudyConfig:
        raw = yaml.safe_load(Path(path).read_text())
        try:
            sites = tuple(Site(str(s["name"]), str(s["jurisdiction"]), tuple(s["train_rows"]), tuple(s["test_rows"]))
                          for s in raw["sites"])
            train, link = raw.get("training", {}), raw.get("link", {})
            cfg = cls(sites, int(train.get("epochs", 3)), float(train.get("lr", 0.1)),
                      int(train.get("batch_size", 32)), float(link.get("delay_ms", 0.0)),
                      None if link.get("rate_mbit") is None else float(link["rate_mbit"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"privml: {path} is not a study config: {type(exc).__name__}: {exc}") from None
        cfg.check()
        return cfg

    def check(self) -> None:
        if len(self.sites) < 2:
            raise InvalidInput("privml: a study needs at least two sites")
        for split in ("train_rows", "test_rows"):
            spans = sorted(getattr(s, split) for s in self.sites)
            if any(not (0 <= a < b) for a, b in spans) or any(spans[i][1] > spans[i + 1][0]
                                                              for i in range(len(spans) - 1)):
                raise InvalidInput(f"privml: the sites' {split} must be non-empty, disjoint [start, stop) ranges")


def site_rows(split: str, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A site's private rows of the breast-cancer split (run only in that site's process)."""
    from privml.data import load_breast_cancer_split

    x, y = load_breast_cancer_split()[0 if split == "train" else 1].tensors
    if stop > len(x):
        raise InvalidInput(f"privml: rows [{start}, {stop}) exceed the {split} split's {len(x)} rows")
    return x[start:stop], y[start:stop]


def site_inputs(start: int, stop: int) -> torch.Tensor:
    return site_rows("test", start, stop)[0]


@dataclass
class StudyReport:
    config: StudyConfig
    accuracy: dict[str, float]
    pooled_accuracy: float
    holders: dict[str, dict[str, list[str]]]  # phase -> site's rows -> parties that held them in clear
    held: dict[str, list[dict[str, Any]]]  # phase -> per party what it held in clear
    costs: dict[str, dict[str, Any]] = field(default_factory=dict)
    model: nn.Module | None = None  # the jointly trained model (its weights were opened to every site)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)  # each site's decrypted predictions

    @property
    def rows_stayed_home(self) -> bool:
        """Whether every site's rows were in clear only in that site's own process, in every phase."""
        return all(holders == [name] for phase in self.holders.values() for name, holders in phase.items())

    def markdown(self) -> str:
        cfg = self.config
        link = ("unshaped" if not cfg.delay_ms and not cfg.rate_mbit else
                f"{cfg.delay_ms:g} ms one way, {cfg.rate_mbit or 'unlimited'} Mbit/s")
        lines = [f"# Multi-site study: {len(cfg.sites)} sites, MPC (CrypTen), link {link}", "",
                 "| party | site | jurisdiction | train rows | test rows | accuracy on its test rows |",
                 "|---|---|---|---|---|---|"]
        for rank, s in enumerate(cfg.sites):
            lines.append(f"| {rank} | {s.name} | {s.jurisdiction} | {s.train_rows[1] - s.train_rows[0]} | "
                         f"{s.test_rows[1] - s.test_rows[0]} | {self.accuracy[s.name]:.4f} |")
        lines += ["", f"Reference: the same training on the pooled rows in clear (what no site may do): "
                  f"{self.pooled_accuracy:.4f} accuracy on all test rows.", "",
                  "## Who held each site's rows in clear (heap scans of every party process)", "",
                  "| phase | rows of | held in clear by |", "|---|---|---|"]
        for phase, table in self.holders.items():
            for name, holders in table.items():
                lines.append(f"| {phase} | {name} | {', '.join(holders) or 'nobody'} |")
        verdict = ("No site's rows left it unencrypted: every row was in clear only in its owner's process; the "
                   "others held secret shares." if self.rows_stayed_home else
                   "WARNING: some rows were in clear outside their site (see the table).")
        lines += ["", verdict, "", "## What each party held in clear", ""]
        for phase, parties in self.held.items():
            for p in parties:
                items = "; ".join(f"{h['what']} {list(h['shape'])}" for h in p["held"]) or "nothing"
                lines.append(f"- {phase}, party {p['rank']} ({p['role']}): {items}")
        lines += ["", "## Costs", ""]
        for phase, c in self.costs.items():
            lines.append(f"- {phase}: {c['bytes'] / 1e6:.2f} MB, {c['rounds']} rounds, {c['seconds']:.2f} s")
        return "\n".join(lines) + "\n"


def run_study(cfg: StudyConfig, model_spec: Any = None, pool: Any = None, timeout: float = 600.0) -> StudyReport:
    """Train on every site's rows, evaluate on every site's test rows, and report who held what in clear."""
    from privml.backends.mpc import fingerprint
    from privml.mpc.roles import Source, evaluate
    from privml.mpc.train import accuracy, train_plain, train_private

    cfg.check()
    if model_spec is None:
        from models.breast_cancer import BreastCancerMLP

        model_spec = BreastCancerMLP
    torch.manual_seed(0)
    init = model_spec().eval()
    names = [s.name for s in cfg.sites]
    roles = [f"{s.name} [{s.jurisdiction}]" for s in cfg.sites]
    train_sources = {r: Source(functools.partial(site_rows, "train", *s.train_rows), f"{s.name} training rows")
                     for r, s in enumerate(cfg.sites)}
    trained = train_private(init, train_sources, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                            output_party=None, timeout=timeout, pool=pool)
    test_sources = {r: Source(functools.partial(site_inputs, *s.test_rows), f"{s.name} test rows")
                    for r, s in enumerate(cfg.sites)}
    weights = {k: v.detach().clone() for k, v in trained.model.state_dict().items()}
    ev = evaluate(model_spec, test_sources, (0, functools.partial(dict, weights)), output_party="owners",
                  roles=roles, timeout=timeout, pool=pool)
    # the checks below recompute the rows here only to know their fingerprints and the right answers
    accuracy_by_site, holders = {}, {"training": {}, "evaluation": {}}
    parties = {"training": trained.parties, "evaluation": ev.parties}
    for rank, s in enumerate(cfg.sites):
        xt, yt = site_rows("train", *s.train_rows)
        xe, ye = site_rows("test", *s.test_rows)
        accuracy_by_site[s.name] = float((ev.output[rank].argmax(1) == ye).float().mean())
        for phase, fp in (("training", fingerprint(xt)), ("evaluation", fingerprint(xe))):
            holders[phase][s.name] = [names[p["rank"]] for p in parties[phase] if fp in p["fingerprints"]]
    x_all = torch.cat([site_rows("train", *s.train_rows)[0] for s in cfg.sites])
    y_all = torch.cat([site_rows("train", *s.train_rows)[1] for s in cfg.sites])
    pooled = train_plain(_fresh(model_spec), x_all, y_all, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size)
    xe_all = torch.cat([site_rows("test", *s.test_rows)[0] for s in cfg.sites])
    ye_all = torch.cat([site_rows("test", *s.test_rows)[1] for s in cfg.sites])
    held = {phase: [{"rank": p["rank"], "role": roles[p["rank"]], "held": p["held"]} for p in ps]
            for phase, ps in parties.items()}
    costs = {"training": _total(trained.costs, trained.seconds), "evaluation": _total(ev.costs, ev.seconds)}
    outputs = {s.name: ev.output[rank] for rank, s in enumerate(cfg.sites)}
    return StudyReport(cfg, accuracy_by_site, accuracy(pooled, xe_all, ye_all), holders, held, costs, trained.model,
                       outputs)


def _fresh(model_spec: Any) -> nn.Module:
    torch.manual_seed(0)
    return model_spec().eval()


def _total(costs: dict[str, Any], seconds: float) -> dict[str, Any]:
    total = costs.get("total", costs)
    return {"bytes": int(total.get("bytes", 0)), "rounds": int(total.get("rounds", 0)), "seconds": float(seconds)}
