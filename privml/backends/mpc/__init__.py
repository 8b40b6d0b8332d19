"""The ``mpc`` backend: ``MPCTensor`` over CrypTen secret shares, computed by real party processes.

An :class:`MPCTensor` lives in one of two worlds:

* **Inside a party process** (started by :func:`privml.parties.run_parties` or joined with
  :func:`privml.parties.join_party`) its payload is a CrypTen ``MPCTensor`` and every op runs the
  CrypTen protocol at once. A :class:`PartyRuntime` carries the party's state: the cost meter
  (bytes, rounds, seconds per layer) and a ledger of every plaintext tensor the party held.
* **In the caller's process** (``privml.Session(plan)``) CrypTen is never initialised:
  ``session.encrypt(x)`` returns a lazy handle, the compiled model records its ops on it into a
  :class:`Program`, and the model's output ``finalize()`` (called by ``CompiledModel``) launches
  the parties, which replay the program on secret shares. The data party receives only ``x``, the
  weight party only the weights (each as its own process argument), and only the output party's
  opened result comes back; ``session.decrypt`` returns it.

Modules: :mod:`.tensor` (the tensor and a party's runtime), :mod:`.handlers` (one CrypTen protocol
per registry op), :mod:`.program` (recording and replay), :mod:`.backend` (``MPCBackend``, the
session object: roles, costs, trust statement, the fixed-point range check of a plan).
"""

from privml.backends.mpc.backend import MPCBackend, check_fixed_point, make_backend
from privml.backends.mpc.handlers import dispatch, execute, power_schedule
from privml.backends.mpc.program import Program, replay_party
from privml.backends.mpc.tensor import LazyNode, MPCTensor, Opened, PartyRuntime, fingerprint, live_fingerprints
from privml.parties.fixed_point import FRAC_BITS, RING_BITS, fixed_point_limit

__all__ = [
    "FRAC_BITS",
    "RING_BITS",
    "LazyNode",
    "MPCBackend",
    "MPCTensor",
    "Opened",
    "PartyRuntime",
    "Program",
    "check_fixed_point",
    "dispatch",
    "execute",
    "fingerprint",
    "fixed_point_limit",
    "live_fingerprints",
    "make_backend",
    "power_schedule",
    "replay_party",
]
