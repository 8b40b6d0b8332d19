"""MPC workflows on top of the ``mpc`` backend: data/model owner roles (:mod:`privml.mpc.roles`) and
private training (:mod:`privml.mpc.train`).

The party runtime itself (launching, CrypTen shim, costs) lives one layer lower, in
:mod:`privml.parties`; its entry points are re-exported here for convenience.
"""

from privml.parties import (
    CostMeter,
    PartyContext,
    RunResult,
    agree,
    combine_summaries,
    import_crypten,
    join_party,
    model_digest,
    run_parties,
)

__all__ = [
    "CostMeter",
    "PartyContext",
    "RunResult",
    "agree",
    "combine_summaries",
    "import_crypten",
    "join_party",
    "model_digest",
    "run_parties",
]
