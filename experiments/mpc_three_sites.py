"""Three hospitals in three network namespaces train and evaluate a model together by MPC; who held what.

    python experiments/mpc_three_sites.py                       # configs/sites/three_hospitals.yaml
    python experiments/mpc_three_sites.py --out study.md --local  # same, parties as local processes

Each hospital (a party with a jurisdiction label, `configs/sites/`) owns a slice of the breast-cancer rows.
Training (`privml.mpc.train.train_private`) and evaluation (`privml.mpc.roles.evaluate`, each hospital learning
its own predictions) run with each party in its own namespace, joined by shaped veth links
(`privml.parties.netlab.NetLab`; needs root, ip and tc). The report gives each site's accuracy, the pooled
clear reference, which process held each site's rows in clear (heap scans), what each party held, and costs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from privml.mpc.sites import StudyConfig, run_study  # noqa: E402
from privml.parties.netlab import Link, NetLab, capabilities  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/sites/three_hospitals.yaml")
    parser.add_argument("--out", help="write the Markdown report here")
    parser.add_argument("--local", action="store_true", help="local party processes instead of namespaces")
    args = parser.parse_args()
    cfg = StudyConfig.from_yaml(args.config)
    caps = capabilities()
    if args.local or not caps["netns"]:
        print(f"parties run as local processes ({'--local' if args.local else caps['reason']}), unshaped")
        report = run_study(StudyConfig(cfg.sites, cfg.epochs, cfg.lr, cfg.batch_size))
    else:
        delay = cfg.delay_ms if caps["delay"] else 0.0
        if cfg.rate_mbit and not caps["bandwidth"]:
            raise SystemExit(f"cannot shape the links: {caps['reason']}")
        if cfg.delay_ms and not caps["delay"]:
            print(f"no {cfg.delay_ms:g} ms delay: {caps['reason']}; bandwidth only")
            cfg = StudyConfig(cfg.sites, cfg.epochs, cfg.lr, cfg.batch_size, 0.0, cfg.rate_mbit)
        with NetLab(len(cfg.sites), Link(delay_ms=delay, rate_mbit=cfg.rate_mbit)) as lab:
            report = run_study(cfg, pool=lab)
    text = report.markdown()
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if not report.rows_stayed_home:
        raise SystemExit("some rows were in clear outside their site")


if __name__ == "__main__":
    main()
