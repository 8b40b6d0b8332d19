"""Party runtime below the MPC backend: CrypTen compatibility, party launching, fault handling, costs.

Importing this package does not import CrypTen (nor torch.distributed): CrypTen is loaded
inside party processes, through :func:`import_crypten`, on first use.
"""

from privml.parties.compat import import_crypten
from privml.parties.costs import CostMeter, combine_summaries
from privml.parties.launcher import PartyContext, RunResult, agree, join_party, model_digest, run_parties

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
