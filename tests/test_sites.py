"""The multi-site study: three sites train and evaluate together, each in its own network namespace.

Checks that the evaluation gives each site the jointly trained model's outputs on its rows, that joint
training matches clear training on the pooled rows, and that the heap scans find every site's rows in clear in
that site's process only. Needs root, ip and tc (skipped with the reason elsewhere).
"""

from __future__ import annotations

import pytest
import torch

from privml.errors import InvalidInput
from privml.mpc.sites import Site, StudyConfig, run_study, site_rows
from privml.parties.netlab import Link, NetLab, capabilities

CAPS = capabilities()
SITES = (Site("A", "DE", (0, 40), (0, 8)), Site("B", "FR", (40, 80), (8, 16)), Site("C", "CH", (80, 120), (16, 24)))


@pytest.mark.slow
@pytest.mark.skipif(not CAPS["netns"] or not CAPS["bandwidth"], reason=str(CAPS["reason"]))
def test_three_sites_in_namespaces_keep_their_rows_home():
    from privml.mpc.train import train_plain

    cfg = StudyConfig(SITES, epochs=1, lr=0.1, batch_size=20, rate_mbit=200.0)
    with NetLab(3, Link(rate_mbit=200.0)) as lab:
        report = run_study(cfg, pool=lab)
    assert report.rows_stayed_home
    assert set(report.holders) == {"training", "evaluation"}
    for table in report.holders.values():
        assert table == {"A": ["A"], "B": ["B"], "C": ["C"]}
    # joint training = clear training on the pooled rows (same initial weights and batch order)
    from models.breast_cancer import BreastCancerMLP

    torch.manual_seed(0)
    x = torch.cat([site_rows("train", *s.train_rows)[0] for s in SITES])
    y = torch.cat([site_rows("train", *s.train_rows)[1] for s in SITES])
    clear = train_plain(BreastCancerMLP().eval(), x, y, epochs=1, lr=0.1, batch_size=20)
    for (name, p), q in zip(report.model.state_dict().items(), clear.state_dict().values(), strict=True):
        assert (p - q).abs().max() < 2e-2, name
    with torch.no_grad():
        for s in SITES:
            xe = site_rows("test", *s.test_rows)[0]
            assert (report.outputs[s.name] - report.model(xe)).abs().max() < 1e-2
    text = report.markdown()
    assert "No site's rows left it unencrypted" in text and "| 2 | C | CH |" in text
    assert report.costs["training"]["bytes"] > 0 and report.costs["evaluation"]["rounds"] > 0


def test_study_configs_are_checked(tmp_path):
    with pytest.raises(InvalidInput, match="disjoint"):
        StudyConfig((Site("A", "DE", (0, 50), (0, 5)), Site("B", "FR", (40, 80), (5, 10)))).check()
    with pytest.raises(InvalidInput, match="two sites"):
        StudyConfig((SITES[0],)).check()
    bad = tmp_path / "study.yaml"
    bad.write_text("sites: [{name: A}]\n")
    with pytest.raises(InvalidInput, match="not a study config"):
        StudyConfig.from_yaml(bad)
    cfg = StudyConfig.from_yaml("configs/sites/three_hospitals.yaml")
    assert [s.jurisdiction.split()[0] for s in cfg.sites] == ["DE", "FR", "CH"]
