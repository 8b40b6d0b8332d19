"""The session side of the MPC backend: party roles, lazy handles, costs, the trust statement.

:func:`check_fixed_point` checks a plan's calibrated ranges against CrypTen's fixed-point headroom
(:func:`privml.parties.fixed_point.fixed_point_limit`) before any party starts.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from privml.backends.mpc.program import Program
from privml.backends.mpc.tensor import LazyNode, MPCTensor, Opened
from privml.errors import InvalidInput, PrivmlError, RangeViolation
from privml.parties.fixed_point import FRAC_BITS, RING_BITS, fixed_point_limit


def check_fixed_point(plan: Any, frac_bits: int = FRAC_BITS, margin: float = 2.0,
                      warn_bits: int = 10) -> list[str]:
    """Check every layer's calibrated input/output range against CrypTen's fixed-point headroom.

    A product of encoded values is value * 2^(2 f) before truncation and must stay below 2^63, so
    |value| * ``margin`` must stay below ``2^(63 - 2 f)`` (2^31 for f = 16): otherwise the result
    wraps around silently and :class:`RangeViolation` names the layer. Within ``warn_bits`` bits of
    that bound the 2-party truncation fails with probability ~|value| * 2^-(64 - 2 f) per element,
    so a warning string is returned (the caller decides how to show it).
    """
    limit = fixed_point_limit(frac_bits)
    notes: list[str] = []
    for lp in getattr(plan, "layers", []):
        peaks = [abs(float(v)) for r in (lp.in_range, lp.out_range) if r for v in r]
        if not peaks:
            continue
        peak = max(peaks)
        if not math.isfinite(peak) or peak * margin >= limit:
            raise RangeViolation(
                f"privml: layer '{lp.name}' ({lp.op}) reaches |value| = {peak:.4g} on the calibration data; "
                f"with margin {margin:g} that is beyond the MPC fixed-point bound 2^{RING_BITS - 1 - 2 * frac_bits} "
                f"= {limit:.4g} ({frac_bits} fractional bits in a {RING_BITS}-bit ring): products would wrap around "
                "silently. Rescale the inputs (or the layer's weights) before running it under MPC.")
        if peak * margin >= limit / 2.0**warn_bits:
            notes.append(f"privml: layer '{lp.name}' reaches |value| = {peak:.4g}, within {warn_bits} bits of the "
                         f"MPC fixed-point bound {limit:.4g}: 2-party truncation may fail with probability "
                         f"~{peak * 2.0 ** -(RING_BITS - 2 * frac_bits):.1e} per element.")
    return notes


class MPCBackend:
    """Session side of the MPC backend: party roles, lazy handles, costs and the trust statement.

    ``parties``: how many party processes (2 or more). ``data_party`` secret-shares the input,
    ``weight_party`` secret-shares the model's weights (None: the weights are public to every
    party, which makes linear layers local and cheaper), ``output_party`` is the only party that
    learns the output (None: the data party). ``ttp=True`` adds CrypTen's dealer process for the
    Beaver triples instead of letting party 0 make them; ``dealer="enclave"`` with ``enclave=`` (a
    :class:`privml.parties.dealer.EnclaveDealer` or a launched enclave) takes them from the attested
    enclave (provider "ENCLAVE"). ``timeout`` bounds every wait on another
    party (a dead or silent party raises ``PartyFailure``); ``deadline`` bounds a whole call (parties stuck in
    local work, which no per-wait timeout sees). ``remote`` / ``authkey`` / ``master_addr``: parties on other
    machines (:mod:`privml.parties.remote`), for started sessions.
    """

    name = "mpc"

    def __init__(self, plan: Any = None, parties: int = 2, data_party: int = 0, weight_party: int | None = 1,
                 output_party: int | None = None, timeout: float = 120.0, ttp: bool = False,
                 range_margin: float = 2.0, dealer: str = "tfp", enclave: Any = None,
                 deadline: float | None = None, remote: dict[int, str] | None = None, authkey: bytes | None = None,
                 master_addr: str | None = None) -> None:
        if not isinstance(parties, int) or parties < 2:
            raise InvalidInput(f"privml: the mpc backend needs parties >= 2, got {parties!r}")
        for what, r in (("data_party", data_party), ("weight_party", weight_party), ("output_party", output_party)):
            if r is not None and not (isinstance(r, int) and 0 <= r < parties):
                raise InvalidInput(f"privml: {what} must be a party rank in 0..{parties - 1}, got {r!r}")
        self.plan = plan
        self.parties = parties
        self.data_party = data_party
        self.weight_party = weight_party
        self.output_party = data_party if output_party is None else output_party
        self.timeout = float(timeout)
        self.deadline = deadline
        self.ttp = bool(ttp) or dealer == "ttp"
        # the attested enclave as dealer of Beaver triples (privml.parties.dealer); None: TFP or TTP
        self.enclave_dealer = None
        if dealer == "enclave" or enclave is not None:
            if self.ttp or dealer != "enclave" or enclave is None:
                raise InvalidInput("privml: the enclave deals Beaver triples with dealer='enclave' and enclave=... "
                                   "together (and without ttp=True)")
            from privml.parties.dealer import EnclaveDealer

            self.enclave_dealer = EnclaveDealer.coerce(enclave)
        self.remote, self.authkey, self.master_addr = dict(remote or {}), authkey, master_addr
        self.runs: list[dict[str, Any]] = []
        self.pool: Any = None  # a PartyPool while the session is started (parties stay up between calls)
        self.range_notes = check_fixed_point(plan, margin=range_margin) if plan is not None else []
        for note in self.range_notes:
            warnings.warn(note, stacklevel=3)

    def start(self) -> None:
        """Start the party processes now and keep them up for every later call (until :meth:`close`)."""
        from privml.parties.pool import PartyPool

        if self.pool is None:
            self.pool = PartyPool(self.parties, timeout=self.timeout, roles=self.roles, ttp=self.ttp,
                                  dealer=self.enclave_dealer, deadline=self.deadline, remote=self.remote,
                                  authkey=self.authkey, master_addr=self.master_addr)
        self.pool.start()

    def close(self) -> None:
        """Stop the party processes of a started session (none are left behind)."""
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    @property
    def provider(self) -> str:
        return "ENCLAVE" if self.enclave_dealer is not None else "TTP" if self.ttp else "TFP"

    @property
    def roles(self) -> list[str]:
        names = []
        for r in range(self.parties):
            tags = [t for t, who in (("data", self.data_party), ("model", self.weight_party),
                                     ("output", self.output_party)) if who == r]
            names.append("-".join([f"party{r}", *tags]))
        return names

    def encrypt(self, x: torch.Tensor) -> MPCTensor:
        """A lazy handle for ``x``: the data party secret-shares it when the model runs."""
        return Program(self, x).input()

    def decrypt(self, t: MPCTensor) -> torch.Tensor:
        """The opened output (runs the parties first if ``t`` was not computed yet)."""
        if isinstance(t.payload, LazyNode):
            t = t.finalize()
        if not isinstance(t.payload, Opened):
            raise PrivmlError("privml: this MPCTensor lives inside a party; open it there with PartyRuntime.open")
        return t.payload.value.clone()

    def costs(self) -> dict[str, Any]:
        """Costs of every run of this session, summed: whole-system bytes, rounds (per party), seconds, per layer.

        Each model call is one run of the parties; ``wall_seconds`` includes starting them. ``layers`` maps
        each module (or op, or a ``<share ...>``/``<open ...>`` step) to its bytes, rounds and seconds.
        """
        out: dict[str, Any] = {"provider": self.provider, "parties": self.parties, "runs": len(self.runs),
                               "bytes": 0, "rounds": 0, "comm_seconds": 0.0, "party_seconds": 0.0,
                               "wall_seconds": 0.0}
        layers: dict[str, dict[str, Any]] = {}
        for run in self.runs:
            c = run["costs"]
            out["bytes"] += c["total"]["bytes"]
            out["rounds"] += c["total"]["rounds"]
            out["comm_seconds"] += c["total"]["comm_seconds"]
            out["party_seconds"] += c["total"]["seconds"]
            out["wall_seconds"] += c.get("seconds_wall") or 0.0
            for name, entry in c["scopes"].items():
                acc = layers.setdefault(name, {"bytes": 0, "rounds": 0, "seconds": 0.0})
                acc["bytes"] += entry["bytes"]
                acc["rounds"] += entry["rounds"]
                acc["seconds"] += entry["seconds"]
        out["layers"] = layers
        return out

    def visibility(self) -> list[dict[str, str]]:
        """Who saw what: one row per party process, and the dealer of Beaver triples."""
        rows = []
        for r in range(self.parties):
            weights = ("plaintext (public weights)" if self.weight_party is None else
                       "plaintext (its own)" if r == self.weight_party else "random shares only")
            rows.append({"role": f"party {r}" + (" (data)" if r == self.data_party else ""),
                         "input": "plaintext (its own)" if r == self.data_party else "random shares only",
                         "weights": weights,
                         "output": "plaintext (opened to it)" if r == self.output_party else "random shares only",
                         "keys": "its PRG seeds; no secret key exists",
                         "also sees": "masked openings of Beaver products, shapes, timing"
                         + ("; generates every Beaver triple (TFP)" if r == 0 and self.provider == "TFP" else "")})
        if self.provider != "TFP":
            rows.append({"role": "dealer (" + ("attested enclave" if self.provider == "ENCLAVE" else "TTP process")
                         + ")", "input": "no", "weights": "no", "output": "no", "keys": "the Beaver triples it deals",
                         "also sees": "shapes of the requested triples"})
        return rows

    def attacker_model(self) -> str:
        dealer = {"TFP": "party 0 generates the triples (trusted first party: a test setting, not a secure "
                         "deployment)",
                  "TTP": "a separate dealer process generates the triples and must not collude with a party",
                  "ENCLAVE": "the attested enclave deals the triples and must not collude with a party"}[self.provider]
        return (f"semi-honest parties without collusion ({self.parties} parties, CrypTen additive sharing): each "
                f"follows the protocol and learns nothing from its shares; {dealer}. Not covered: a malicious party "
                "deviating from the protocol (no MACs on shares), and colluding parties, who can reconstruct "
                "everything.")

    def trust_statement(self) -> list[str]:
        provider = {
            "TFP": "Beaver triples: TFP (CrypTen's trusted first party): party 0 generates every triple itself, so "
                   "a dishonest party 0 could break privacy or correctness; this is a semi-honest test setting, not a "
                   "secure deployment.",
            "TTP": "Beaver triples: TTP: a separate dealer process generates the triples; it sees no inputs, but "
                   "must not collude with any party.",
            "ENCLAVE": "Beaver triples: ENCLAVE: the attested enclave deals the triples (each party verifies its "
                       "attestation: PCRs, certificate chain, fresh nonce, before using one) and logs every deal in "
                       "its audit log; it sees no inputs, but knows the triples, so it must not collude with any "
                       "party.",
        }[self.provider]
        weights = (f"party {self.weight_party} secret-shares the model weights; the other parties hold only their "
                   "shares (uniformly random ring elements) and the architecture." if self.weight_party is not None
                   else "the model weights are PUBLIC: every party holds them in clear.")
        return [
            f"MPC over {self.parties} party processes (CrypTen additive secret sharing, {FRAC_BITS}-bit fixed point, "
            f"semi-honest parties, no collusion).",
            f"party {self.data_party} secret-shares the input; the other parties never receive it.",
            weights,
            f"only party {self.output_party} learns the output; the session returns it to the caller.",
            "in a privml.Session the calling process holds input and model and hands the input only to the data "
            "party and the weights only to the weight party (each as its own process arguments).",
            provider,
            "leakage: shapes (batch size, layer sizes), the architecture and timing are visible to every party.",
        ]


def make_backend(plan: Any = None, **options: Any) -> MPCBackend:
    """Backend factory used by ``privml.Session`` (options: see :class:`MPCBackend`)."""
    return MPCBackend(plan, **options)
