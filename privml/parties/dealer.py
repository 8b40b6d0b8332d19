"""The attested enclave as CrypTen's dealer of Beaver triples: provider ``"ENCLAVE"``.

CrypTen's default provider "TFP" lets party 0 generate every Beaver triple (it could cheat); "TTP"
runs an unattested dealer process. Here the simulated enclave (:mod:`privml.enclave`) deals the
correlated randomness: each party verifies the enclave's attestation (fresh nonce, certificate chain
to the pinned root, expected PCRs, region) before it uses a single triple, then fetches its own
shares of each triple over its own connection (``deal`` requests, counted by the party; the enclave
refuses parties whose n-th requests differ). The enclave logs every deal in its audit log.

Parent side: :class:`EnclaveDealer` (what a user passes to ``run_parties(..., dealer=...)`` or a
session's ``enclave=``) opens a dealing session before the parties start (``deal_open``), with one
fresh secret per party: the enclave holds only their digests, and each party receives only its own
secret, so no process can fetch another party's shares.

Party side: :func:`install_enclave_provider`, called after ``crypten.init()``, registers an
:class:`EnclaveTupleProvider` in CrypTen's table of providers under ``"ENCLAVE"`` and selects it with
``crypten.cfg.mpc.provider``; :func:`uninstall_enclave_provider` undoes both.

Trust: the enclave knows every triple (as CrypTen's TTP does), so it must not collude with a party;
unlike TTP its code and configuration are attested (PCRs) and its deals audited. It sees no inputs.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from privml.errors import AttestationError, InvalidInput, MalformedInput, PartyFailure, PrivmlError
from privml.parties.compat import import_crypten

PROVIDER_NAME = "ENCLAVE"
PARTY_KEY_BYTES = 32
NONCE_BYTES = 32
_SUPPORTED = "__SUPPORTED_PROVIDERS"  # crypten.mpc's module-level dict: name -> provider instance


@dataclass(frozen=True)
class EnclaveDealer:
    """Where the dealing enclave is and how to recognise it.

    ``address``: the enclave's socket (``privml.enclave.launch(...).address``); ``root_certificate``: the
    pinned vendor root (PEM or DER); ``expected_pcrs``: the measurements to accept
    (``privml.enclave.expected_measurement(config)``, PCR0 required); ``allowed_regions``: regions to
    accept (None: any); ``timeout``: seconds to wait for the enclave (None: the run's timeout);
    ``max_outstanding``: undelivered requests the enclave may hold for the session (None: its default).
    """

    address: str
    root_certificate: bytes | str
    expected_pcrs: Mapping[int, bytes]
    allowed_regions: tuple[str, ...] | None = None
    timeout: float | None = None
    max_outstanding: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.address, str) or not self.address:
            raise InvalidInput(f"privml: EnclaveDealer address must be the enclave's socket path, got "
                               f"{self.address!r:.80}")
        if not isinstance(self.root_certificate, (bytes, str)) or not self.root_certificate:
            raise InvalidInput("privml: EnclaveDealer needs the pinned root_certificate (PEM or DER)")
        if not isinstance(self.expected_pcrs, Mapping) or 0 not in self.expected_pcrs:
            raise InvalidInput("privml: EnclaveDealer needs expected_pcrs with PCR0 "
                               "(privml.enclave.expected_measurement(config))")
        object.__setattr__(self, "expected_pcrs", {int(k): bytes(v) for k, v in self.expected_pcrs.items()})
        if self.allowed_regions is not None:
            regions = (self.allowed_regions,) if isinstance(self.allowed_regions, str) else self.allowed_regions
            object.__setattr__(self, "allowed_regions", tuple(regions))
        if self.timeout is not None and not (isinstance(self.timeout, (int, float)) and self.timeout > 0):
            raise InvalidInput(f"privml: EnclaveDealer timeout must be a positive number, got {self.timeout!r}")

    @classmethod
    def coerce(cls, obj: Any, expected_pcrs: Mapping[int, bytes] | None = None) -> EnclaveDealer:
        """An EnclaveDealer from itself, or from an object with ``address`` and ``root_certificate`` (e.g. the
        :class:`privml.enclave.EnclaveProcess` you launched) and either ``expected_pcrs`` or an enclave
        ``config``, whose measurement this install then computes (``expected_measurement(config)``)."""
        if isinstance(obj, cls):
            return obj
        pcrs = expected_pcrs if expected_pcrs is not None else getattr(obj, "expected_pcrs", None)
        if pcrs is None and getattr(obj, "config", None) is not None:
            from privml.enclave.attest import expected_measurement

            pcrs = expected_measurement(obj.config)
        if not hasattr(obj, "address") or not hasattr(obj, "root_certificate") or pcrs is None:
            raise InvalidInput(
                f"privml: the enclave dealer must be a privml.parties.EnclaveDealer(address, root_certificate, "
                f"expected_pcrs) (the parties verify the enclave's attestation against them), got "
                f"{type(obj).__name__}")
        return cls(str(obj.address), obj.root_certificate, pcrs, getattr(obj, "allowed_regions", None))

    def connect(self, timeout: float) -> tuple[Any, Any]:
        """An attested client (fresh nonce), and the verified attestation; AttestationError if it fails."""
        from privml.enclave.attest import verify_attestation
        from privml.enclave.client import EnclaveClient

        client = EnclaveClient(self.address, timeout=self.timeout or timeout)
        try:
            nonce = os.urandom(NONCE_BYTES)
            doc = _attestation_document(client, nonce)
            attestation = verify_attestation(doc, root_certificate=self.root_certificate,
                                             expected_pcrs=self.expected_pcrs, nonce=nonce,
                                             allowed_regions=self.allowed_regions)
        except BaseException:
            _close(client)
            raise
        return client, attestation

    def open_session(self, world_size: int, timeout: float = 120.0, *, party_secrets: bool = True) -> DealSession:
        """Verify the enclave, then open a dealing session for ``world_size`` parties.

        ``party_secrets``: make one secret per party (hand party r only ``for_party(r, ...)``); False for
        parties on other machines (``join_party``): each binds its slot with its own secret on first use.
        """
        keys = [os.urandom(PARTY_KEY_BYTES) for _ in range(world_size)] if party_secrets else []
        client, _ = self.connect(timeout)
        try:
            body: dict[str, Any] = {"world_size": int(world_size)}
            if keys:
                body["party_keys"] = [hashlib.sha256(k).digest() for k in keys]
            if self.max_outstanding is not None:
                body["max_outstanding"] = int(self.max_outstanding)
            reply = client.request("deal_open", body)
        finally:
            _close(client)
        sid = reply.get("deal_session") if isinstance(reply, Mapping) else None
        if not isinstance(sid, bytes):
            raise MalformedInput("privml: the enclave's deal_open reply has no deal_session")
        return DealSession(self, sid, keys)


@dataclass(frozen=True)
class DealSession:
    """An open dealing session: its id and each party's secret (each party gets only its own)."""

    dealer: EnclaveDealer
    deal_session: bytes
    party_keys: list[bytes]

    def for_party(self, rank: int, timeout: float) -> dict[str, Any]:
        """The picklable keyword arguments of :func:`install_enclave_provider` for party ``rank``."""
        d = self.dealer
        return {"address": d.address, "deal_session": self.deal_session, "root_certificate": d.root_certificate,
                "expected_pcrs": dict(d.expected_pcrs), "allowed_regions": d.allowed_regions,
                "timeout": d.timeout or timeout, "party_key": self.party_keys[rank] if self.party_keys else None}


def _attestation_document(client: Any, nonce: bytes) -> bytes:
    """The enclave's attestation document for ``nonce`` (through the client's own call when it has one)."""
    attest = getattr(client, "attest", None)
    if callable(attest):
        doc = attest(nonce)
    else:
        doc = client.request("attest", {"nonce": nonce})
    if isinstance(doc, Mapping):
        doc = doc.get("document", doc.get("attestation"))
    if hasattr(doc, "document"):
        doc = doc.document
    if not isinstance(doc, bytes):
        raise AttestationError("privml: the enclave returned no attestation document")
    return doc


def _close(client: Any) -> None:
    close = getattr(client, "close", None)
    if callable(close):
        try:
            close()
        except Exception:  # noqa: BLE001 - closing a dead connection must not hide the real error
            pass


# ----------------------------------------------------------------------------- party side


def _cbor_kwargs(op: str, args: tuple, kwargs: dict) -> dict[str, Any]:
    """A triple op's keyword arguments as CBOR-safe values (ints and lists of ints)."""
    if args:
        from privml.errors import UnsupportedOperation

        raise UnsupportedOperation(f"privml: the enclave dealer takes {op} arguments by keyword only, got {args!r:.80}")
    out: dict[str, Any] = {}
    for name, value in kwargs.items():
        if isinstance(value, (tuple, list, torch.Size)):
            out[name] = [int(v) for v in value]
        elif isinstance(value, int) and not isinstance(value, bool):
            out[name] = int(value)
        else:
            from privml.errors import UnsupportedOperation

            raise UnsupportedOperation(f"privml: the enclave dealer cannot deal {op} triples with {name}={value!r:.40}")
    return out


def _decode(share: Any, shape: tuple[int, ...], what: str) -> torch.Tensor:
    """One share from the wire: int64 little-endian bytes of exactly ``shape``."""
    if not isinstance(share, Mapping) or not isinstance(share.get("data"), bytes):
        raise MalformedInput(f"privml: the enclave's {what} share is not a {{shape, data}} map")
    got = share.get("shape")
    if not isinstance(got, (list, tuple)) or tuple(got) != tuple(shape):
        raise MalformedInput(f"privml: the enclave dealt a {what} share of shape {got!r:.60}, expected {list(shape)}")
    data = share["data"]
    if len(data) != 8 * math.prod(shape):
        raise MalformedInput(f"privml: the enclave's {what} share has {len(data)} bytes, expected "
                             f"{8 * math.prod(shape)}")
    return torch.from_numpy(np.frombuffer(data, dtype="<i8").astype(np.int64)).reshape(shape)


def _product_shape(op: str, size0: tuple, size1: tuple, kwargs: dict) -> tuple[int, ...]:
    if op == "mul":
        return tuple(torch.broadcast_shapes(size0, size1))
    a = torch.empty(size0, device="meta")
    b = torch.empty(size1, device="meta")
    return tuple(getattr(torch, op)(a, b, **kwargs).shape)


class _ProviderMethods:
    """The TupleProvider methods; mixed into a subclass of CrypTen's TupleProvider on first use."""

    NAME = PROVIDER_NAME

    def __init__(self, client: Any, deal_session: bytes, party: int, party_key: bytes) -> None:
        super().__init__()  # TupleProvider: tracing and caches
        self.client = client
        self.deal_session = deal_session
        self.party = party
        self.party_key = party_key
        self.requests = 0  # this party's requests so far: the number of the next one

    def _deal(self, kind: str, sizes: Sequence[tuple[int, ...]], shapes: Sequence[tuple[int, ...]],
              op: str | None = None, kwargs: dict | None = None) -> list[torch.Tensor]:
        n = self.requests
        body: dict[str, Any] = {"deal_session": self.deal_session, "party": self.party, "party_key": self.party_key,
                                "request": n, "kind": kind, "sizes": [[int(v) for v in s] for s in sizes]}
        if op is not None:
            body["op"] = op
        if kwargs:
            body["kwargs"] = kwargs
        what = f"{kind}{' ' + op if op else ''} {[list(s) for s in sizes]}"
        try:
            reply = self.client.request("deal", body)
        except PartyFailure:
            raise
        except PrivmlError as exc:
            raise PartyFailure(f"party {self.party}: the enclave dealer refused request {n} ({what}): "
                               f"{type(exc).__name__}: {exc}") from exc
        self.requests = n + 1
        if not isinstance(reply, Mapping) or reply.get("request") != n or not isinstance(reply.get("shares"), list) \
                or len(reply["shares"]) != len(shapes):
            raise MalformedInput(f"privml: the enclave's reply to deal request {n} ({what}) is malformed")
        return [_decode(s, shape, what) for s, shape in zip(reply["shares"], shapes, strict=True)]

    @staticmethod
    def _on(t: torch.Tensor, device: Any) -> torch.Tensor:
        return t if device is None or torch.device(device).type == "cpu" else t.to(device)

    def generate_additive_triple(self, size0, size1, op, device=None, *args, **kwargs):  # noqa: ANN001, ANN201
        """Beaver triple (a, b, c = op(a, b)) as arithmetic shares dealt by the enclave."""
        from crypten.mpc.primitives import ArithmeticSharedTensor

        size0, size1 = tuple(size0), tuple(size1)
        kw = _cbor_kwargs(op, args, kwargs)
        out = _product_shape(op, size0, size1, kwargs)
        a, b, c = self._deal("triple", [size0, size1], [size0, size1, out], op=op, kwargs=kw)
        return tuple(ArithmeticSharedTensor.from_shares(self._on(t, device), precision=0) for t in (a, b, c))

    def square(self, size, device=None):  # noqa: ANN001, ANN201
        """(r, r * r) as arithmetic shares dealt by the enclave."""
        from crypten.mpc.primitives import ArithmeticSharedTensor

        size = tuple(size)
        r, r2 = self._deal("square", [size], [size, size])
        return tuple(ArithmeticSharedTensor.from_shares(self._on(t, device), precision=0) for t in (r, r2))

    def generate_binary_triple(self, size0, size1, device=None):  # noqa: ANN001, ANN201
        """Binary triple (a, b, c = a & b) as xor shares dealt by the enclave."""
        from crypten.mpc.primitives import BinarySharedTensor

        size0, size1 = tuple(size0), tuple(size1)
        out = tuple(torch.broadcast_shapes(size0, size1))
        a, b, c = self._deal("binary", [size0, size1], [size0, size1, out])
        return tuple(BinarySharedTensor.from_shares(self._on(t, device)) for t in (a, b, c))

    def wrap_rng(self, size, device=None):  # noqa: ANN001, ANN201
        """Random shared r and the shared count of its shares' wrap-arounds."""
        from crypten.mpc.primitives import ArithmeticSharedTensor

        size = tuple(size)
        r, theta = self._deal("wrap", [size], [size, size])
        return tuple(ArithmeticSharedTensor.from_shares(self._on(t, device), precision=0) for t in (r, theta))

    def B2A_rng(self, size, device=None):  # noqa: ANN001, ANN201, N802 - CrypTen's name
        """A random bit as arithmetic (rA) and binary (rB) shares."""
        from crypten.mpc.primitives import ArithmeticSharedTensor, BinarySharedTensor

        size = tuple(size)
        ra, rb = self._deal("b2a", [size], [size, size])
        return (ArithmeticSharedTensor.from_shares(self._on(ra, device), precision=0),
                BinarySharedTensor.from_shares(self._on(rb, device)))

    def close(self) -> None:
        _close(self.client)


_PROVIDER_CLASS: type | None = None


def provider_class() -> type:
    """``EnclaveTupleProvider``: a subclass of CrypTen's ``TupleProvider`` (built on first use, so importing
    this module does not import CrypTen)."""
    global _PROVIDER_CLASS
    if _PROVIDER_CLASS is None:
        crypten = import_crypten()
        base = crypten.mpc.provider.provider.TupleProvider
        _PROVIDER_CLASS = type("EnclaveTupleProvider", (_ProviderMethods, base),
                               {"__module__": __name__, "__doc__": "CrypTen tuple provider whose "
                                "correlated randomness the attested enclave deals (privml)."})
    return _PROVIDER_CLASS


def __getattr__(name: str) -> Any:
    if name == "EnclaveTupleProvider":
        return provider_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _providers(crypten: Any) -> dict:
    table = vars(crypten.mpc).get(_SUPPORTED)
    if not isinstance(table, dict):
        raise PrivmlError("privml: this CrypTen version has no table of tuple providers (crypten.mpc."
                          f"{_SUPPORTED}); the enclave dealer needs CrypTen 0.4.1")
    return table


def install_enclave_provider(address: str, deal_session: bytes, *, root_certificate: bytes | str,
                             expected_pcrs: Mapping[int, bytes], allowed_regions: Sequence[str] | None = None,
                             timeout: float = 120.0, party_key: bytes | None = None,
                             rank: int | None = None) -> Any:
    """Inside a party, after ``crypten.init()``: verify the enclave, then make CrypTen take triples from it.

    Verifies the enclave's attestation with a fresh nonce (:class:`~privml.errors.AttestationError` if any
    check fails; nothing is installed then), registers an ``EnclaveTupleProvider`` as ``"ENCLAVE"`` in
    CrypTen's provider table and sets ``crypten.cfg.mpc.provider = "ENCLAVE"``. ``party_key`` is this
    party's secret for the session (from the launcher; None: a fresh one, bound on first use). ``rank``
    defaults to CrypTen's rank. Returns the provider (its ``requests`` counts the deals so far).
    """
    crypten = import_crypten()
    if not crypten.is_initialized():
        raise PrivmlError("privml: install_enclave_provider must be called inside a party, after crypten.init()")
    if not isinstance(deal_session, bytes):
        raise InvalidInput("privml: deal_session must be the bytes the enclave's deal_open returned")
    rank = crypten.comm.get().get_rank() if rank is None else int(rank)
    key = os.urandom(PARTY_KEY_BYTES) if party_key is None else party_key
    dealer = EnclaveDealer(address, root_certificate, expected_pcrs,
                           tuple(allowed_regions) if allowed_regions is not None else None, timeout)
    try:
        client, _ = dealer.connect(timeout)
    except AttestationError as exc:
        raise AttestationError(f"privml: party {rank} refuses the enclave dealer at {address}: its attestation "
                               f"failed ({exc}); no triple was used") from exc
    provider = provider_class()(client, deal_session, rank, key)
    _providers(crypten)[PROVIDER_NAME] = provider
    crypten.cfg.mpc.provider = PROVIDER_NAME
    return provider


def uninstall_enclave_provider(previous: str = "TFP") -> None:
    """Undo :func:`install_enclave_provider`: close the connection, select ``previous`` again."""
    crypten = import_crypten()
    provider = _providers(crypten).pop(PROVIDER_NAME, None)
    if provider is not None:
        provider.close()
    if crypten.cfg.mpc.provider == PROVIDER_NAME:
        crypten.cfg.mpc.provider = previous
