"""The MPC tensor and one party's runtime (CrypTen, cost meter, ledger of plaintexts held).

An :class:`MPCTensor`'s ``runtime`` says where it lives: a :class:`PartyRuntime` inside a party
process (payload: a CrypTen ``MPCTensor``; ops run the protocol at once), or a recording
``Program`` in the caller's process (payload: :class:`LazyNode` or :class:`Opened`).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from privml.errors import InvalidInput, PrivmlError
from privml.parties.fixed_point import open_plain
from privml.tensor import PrivateTensor


def fingerprint(t: torch.Tensor) -> str:
    """Short sha256 of a tensor's float32 values and shape (to recognise a plaintext without holding it)."""
    data = t.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(str(tuple(data.shape)).encode())
    h.update(data.numpy().tobytes())
    return h.hexdigest()[:20]


def live_fingerprints(min_numel: int = 2) -> list[str]:
    """Fingerprints of every live plain floating-point tensor in this process (a scan of the heap).

    Used to show what a party process holds at the end of a run: another party's data or weights
    would appear here if they had ever been handed to it and kept.
    """
    found = set()
    for obj in gc.get_objects():
        kind = type(obj)
        if not issubclass(kind, torch.Tensor) or issubclass(kind, PrivateTensor):
            continue
        try:
            if obj.is_meta or not obj.is_floating_point() or obj.numel() < min_numel:
                continue
            found.add(fingerprint(obj))
        except (RuntimeError, TypeError):
            continue
    return sorted(found)


@dataclass(frozen=True)
class LazyNode:
    """Payload of a not-yet-computed tensor in the caller's process: node ``node`` of a Program."""

    node: int


@dataclass(frozen=True)
class Opened:
    """Payload of a model output that the parties computed and opened to the caller."""

    value: torch.Tensor


class MPCTensor(PrivateTensor):
    """A secret-shared tensor (CrypTen payload inside a party; a lazy program node in the caller)."""

    backend_name = "mpc"
    metadata_fields = ("runtime",)

    def finalize(self) -> MPCTensor:
        """In the caller's process: run the recorded program across the parties and return the opened result."""
        if isinstance(self.payload, LazyNode):
            return self.runtime.run(self)
        return self

    @property
    def is_lazy(self) -> bool:
        return isinstance(self.payload, LazyNode)

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        if isinstance(self.payload, LazyNode):
            where = f"lazy node {self.payload.node}"
        elif isinstance(self.payload, Opened):
            where = "opened"
        else:
            where = f"shares of party {getattr(self.runtime, 'rank', '?')}"
        return f"MPCTensor(shape={list(self.shape)}, {where})"

    __str__ = __repr__


def wrap(payload: Any, runtime: Any) -> MPCTensor:
    """An MPCTensor around a CrypTen payload (shape read from the payload)."""
    return MPCTensor(payload, tuple(payload.size()), torch.float32, runtime=runtime)


class PartyRuntime:
    """One party's MPC state: CrypTen, the cost meter and the ledger of plaintexts held.

    Create it inside a party (after ``crypten.init()``, i.e. inside ``run_parties``/``join_party``).
    Every privml op on this party's tensors is metered under the running module's name.
    """

    def __init__(self, meter: bool = True) -> None:
        from privml.parties.compat import import_crypten
        from privml.parties.costs import CostMeter

        self.crypten = import_crypten()
        if not self.crypten.is_initialized():
            raise PrivmlError("privml: PartyRuntime must be created inside an MPC party (after crypten.init())")
        comm = self.crypten.comm.get()
        self.rank: int = comm.get_rank()
        self.world_size: int = comm.get_world_size()
        self.meter = CostMeter() if meter else None
        self.held: list[dict[str, Any]] = []

    def note(self, what: str, tensor: torch.Tensor, source: str = "") -> None:
        """Record that this party holds ``tensor`` in clear (what it is, where it came from, its fingerprint)."""
        self.held.append({"rank": self.rank, "pid": os.getpid(), "what": what, "source": source,
                          "shape": tuple(tensor.shape), "sha256": fingerprint(tensor)})

    @contextlib.contextmanager
    def scope(self, label: str) -> Iterator[None]:
        """Meter the communication and time inside the block under ``label``."""
        if self.meter is None:
            yield
        else:
            with self.meter.scope(label.replace("/", ".")):
                yield

    def share(self, value: torch.Tensor | None, shape: tuple[int, ...], src: int, what: str = "tensor",
              label: str = "<share>") -> MPCTensor:
        """Secret-share ``value`` held by party ``src``; the other parties pass None (they learn only ``shape``)."""
        shape = tuple(int(s) for s in shape)
        if self.rank == src:
            if value is None:
                raise PrivmlError(f"privml: party {src} must provide the {what} it shares")
            value = torch.as_tensor(value).detach().to(torch.float32)
            if tuple(value.shape) != shape:
                raise InvalidInput(f"privml: party {src}'s {what} has shape {tuple(value.shape)}, announced {shape}")
            self.note(f"own {what}", value)
            data = value
        else:
            data = torch.zeros(shape)  # CrypTen reads only the size on non-source parties
        with self.scope(label):
            payload = self.crypten.cryptensor(data, src=src)
        return MPCTensor(payload, shape, torch.float32, runtime=self)

    def public(self, value: torch.Tensor) -> Any:
        """A CrypTen tensor of a value every party knows (shared from party 0 at no communication cost)."""
        return self.crypten.cryptensor(torch.as_tensor(value, dtype=torch.float32), src=0)

    def open(self, t: MPCTensor, dst: int | None = None, what: str = "output",
             label: str = "<open>") -> torch.Tensor | None:
        """Reveal ``t`` to party ``dst`` only (None: to every party); other parties get None."""
        if not isinstance(t, MPCTensor) or t.runtime is not self:
            raise InvalidInput("privml: open() needs an MPCTensor of this party")
        with self.scope(label):
            value = open_plain(t.payload, dst=dst)  # not get_plain_text: CrypTen's decoder errs by -1.0
        if dst is not None and dst != self.rank:
            return None
        self.note(what, value)
        return value

    def costs(self) -> dict[str, Any] | None:
        return self.meter.summary() if self.meter is not None else None
