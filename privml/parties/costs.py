"""Per-scope communication accounting for code running inside an MPC party.

CrypTen's communicator counts, per party, one *round* for every communication call
(send/recv, all_reduce, broadcast, ... - a batched all_reduce of several tensors is one
round) and the *bytes* of the 64-bit ring elements this party sends and receives as its
logging decorator estimates them (e.g. an all_reduce of n elements is logged as 2n
elements: one ring send, one ring receive). It only counts while
``crypten.cfg.communicator.verbose`` is True, which :class:`CostMeter` switches on.

Worked example (2 parties, TFP provider, one private elementwise product of two
secret-shared tensors of n elements): the Beaver triple comes from party 0's generator
and is shared with pseudo-random zero sharings, so it costs nothing; the parties then
open epsilon = x - a and delta = y - b in ONE batched all_reduce of 2n elements, logged as
2 * 2n elements = 32n bytes; truncating the fixed-point product is local for 2 parties.
So each party reports exactly 1 round and 32n bytes. With 3 or more parties truncation
needs extra rounds. Whole-system bytes are the sum over parties divided by 2 (each byte
is logged by its sender and its receiver): see :func:`combine_summaries`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from privml.errors import InvalidInput, PrivmlError
from privml.parties.compat import import_crypten

_FIELDS = ("bytes", "rounds", "comm_seconds", "seconds")


def _zero() -> dict[str, Any]:
    return {"bytes": 0, "rounds": 0, "comm_seconds": 0.0, "seconds": 0.0, "calls": 0}


def _delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    return {key: after[key] - before[key] for key in _FIELDS}


class CostMeter:
    """Collects bytes, rounds and seconds per named scope inside one party.

    Use inside a party after ``crypten.init()`` (i.e. inside ``run_parties``/``join_party``)::

        meter = CostMeter()
        with meter.scope("layer1.conv"):
            y = conv(x)
        return meter.summary()          # picklable dict, back to the parent

    Nested scopes are recorded as ``"outer/inner"`` and their costs are also part of the
    outer scope. A scope entered several times accumulates (``calls`` counts entries).
    The total runs from the meter's creation; ``unscoped`` is what no top-level scope saw,
    so the top-level scopes plus ``unscoped`` add up to ``total``.
    """

    def __init__(self) -> None:
        crypten = import_crypten()
        if not crypten.is_initialized():
            raise PrivmlError("CostMeter must be created inside an MPC party (after crypten.init())")
        crypten.cfg.communicator.verbose = True
        self._crypten = crypten
        self._comm = crypten.comm.get()
        self._start = self._read()
        self._stack: list[str] = []
        self.scopes: dict[str, dict[str, Any]] = {}

    def _read(self) -> dict[str, Any]:
        stats = self._comm.get_communication_stats()
        return {"bytes": stats["bytes"], "rounds": stats["rounds"], "comm_seconds": stats["time"],
                "seconds": time.perf_counter()}

    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[None]:
        """Attribute the communication done inside the ``with`` block to ``name``."""
        if not isinstance(name, str) or not name or "/" in name:
            raise InvalidInput(f"scope name must be a non-empty string without '/', got {name!r}")
        full = "/".join([*self._stack, name])
        self._stack.append(name)
        before = self._read()
        try:
            yield
        finally:
            delta = _delta(self._read(), before)
            self._stack.pop()
            entry = self.scopes.setdefault(full, _zero())
            for key in _FIELDS:
                entry[key] += delta[key]
            entry["calls"] += 1

    def total(self) -> dict[str, Any]:
        """Costs since the meter was created."""
        return _clean(_delta(self._read(), self._start))

    def summary(self) -> dict[str, Any]:
        """Picklable dict: rank, provider, total, per-scope costs, unscoped remainder."""
        total = self.total()
        top = [entry for name, entry in self.scopes.items() if "/" not in name]
        unscoped = {key: total[key] - sum(entry[key] for entry in top) for key in _FIELDS}
        return {
            "rank": self._comm.get_rank(),
            "world_size": self._comm.get_world_size(),
            "provider": str(self._crypten.cfg.mpc.provider),
            "total": total,
            "scopes": {name: _clean(entry) for name, entry in self.scopes.items()},
            "unscoped": _clean(unscoped),
        }


def _clean(entry: dict[str, Any]) -> dict[str, Any]:
    """Plain Python numbers; bytes as int (CrypTen logs pickled objects in fractional elements)."""
    out = dict(entry)
    out["bytes"] = int(round(out["bytes"]))
    out["rounds"] = int(out["rounds"])
    out["comm_seconds"] = float(out["comm_seconds"])
    out["seconds"] = float(out["seconds"])
    if "calls" in out:
        out["calls"] = int(out["calls"])
    return out


def combine_summaries(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Whole-system view of per-party summaries (e.g. the list ``run_parties`` returns).

    bytes = sum over parties / 2 (each byte is logged by sender and receiver);
    rounds and seconds = max over parties (parties run their rounds in lockstep).
    """
    if not summaries:
        raise InvalidInput("combine_summaries needs at least one party summary")

    def merge(entries: list[dict[str, Any]]) -> dict[str, Any]:
        return {"bytes": sum(e["bytes"] for e in entries) // 2,
                "rounds": max(e["rounds"] for e in entries),
                "comm_seconds": max(e["comm_seconds"] for e in entries),
                "seconds": max(e["seconds"] for e in entries)}

    names = list(dict.fromkeys(name for s in summaries for name in s["scopes"]))
    return {
        "parties": len(summaries),
        "provider": summaries[0]["provider"],
        "total": merge([s["total"] for s in summaries]),
        "scopes": {name: merge([s["scopes"][name] for s in summaries if name in s["scopes"]])
                   for name in names},
        "unscoped": merge([s["unscoped"] for s in summaries]),
    }
