"""The enclave as dealer: Beaver triples and other correlated randomness for CrypTen parties.

Runs inside the enclave process (layer 2: numpy, torch, the standard library, ``privml.errors`` and the
enclave's own ``PolicyRefused``, whose wire code is "policy").
Two handlers, called by the enclave server with its ``state`` and the request body (CBOR-decoded):

``handle_deal_open(state, body)`` (the server calls ``handle_deal_open(enclave, connection, body)``)
    ``{"world_size": int, "party_keys"?: [bytes32, ...], "max_outstanding"?: int}`` opens a dealing session
    for ``world_size`` parties and returns ``{"deal_session": bytes16, "world_size", "max_outstanding"}``.
    ``party_keys`` are sha256 digests of secrets only party i holds (the launcher hands each party its own
    secret): a request for party i must then carry ``party_key`` whose sha256 is ``party_keys[i]``. Without
    them the first request for party i binds i to the secret it carries (trust on first use: a process
    claiming another party's slot first makes the real party's requests fail, before it uses any share).

``handle_deal(state, body)``
    ``{"deal_session", "party", "party_key", "request": n, "kind", "op"?, "kwargs"?, "sizes"}`` returns
    party ``party``'s shares of the ``n``-th correlated value of the session (``n`` counts the party's own
    requests from 0, without gaps or repeats) as ``{"request": n, "kind", "shares": [{"shape", "data"}]}``,
    ``data`` being raw little-endian int64 bytes (no pickles). The first party asking for ``n`` fixes what
    ``n`` is and the enclave generates it once, keeping the other parties' shares until they fetch them; a
    party whose ``n``-th request differs (kind, op, kwargs or sizes) is refused with code ``policy`` and the
    session is closed for everyone (the parties no longer run the same computation).

Kinds (CrypTen's ring: int64 with wrap-around; party 0's share is the value minus the other shares):

* ``triple`` (op in :data:`OPS`, ``sizes`` [size0, size1], conv ``kwargs``): additive shares of ``a``,
  ``b`` and ``c = op(a, b, **kwargs)``;
* ``square`` (``sizes`` [size]): additive shares of ``r`` and ``r * r``;
* ``binary`` (``sizes`` [size0, size1]): xor shares of 64-bit ``a``, ``b`` and ``c = a & b`` (broadcast);
* ``wrap`` (``sizes`` [size]): additive shares ``r_i`` of ``r`` and additive shares of the number of
  wrap-arounds of ``sum r_i`` (CrypTen's ``count_wraps``);
* ``b2a`` (``sizes`` [size]): a random bit ``r`` as additive shares (``rA``) and as one-bit xor shares (``rB``).

Every element comes from the operating system's CSPRNG (``os.urandom``). Memory is bounded: at most
``max_outstanding`` generated-but-not-fully-fetched requests per session, :data:`MAX_ELEMENTS` per tensor,
:data:`MAX_OUTSTANDING_BYTES` held for all sessions together and :data:`MAX_SESSIONS` sessions (idle ones
are dropped after :data:`SESSION_IDLE_S`). All state changes happen under locks (the server serves several
connections at once). When ``state`` has an ``audit(actor, op, count, **details)`` method, each fetch is
logged: actor ``party<i>``, op ``deal.<kind>[.<op>]``, count = elements dealt to that party.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from privml.enclave.policy import PolicyRefused
from privml.errors import MalformedInput

KINDS = ("triple", "square", "binary", "wrap", "b2a")
OPS = ("mul", "matmul", "conv1d", "conv2d", "conv_transpose1d", "conv_transpose2d")
CONV_KWARGS = ("stride", "padding", "dilation", "groups", "output_padding")
N_SIZES = {"triple": 2, "square": 1, "binary": 2, "wrap": 1, "b2a": 1}
N_SHARES = {"triple": 3, "square": 2, "binary": 3, "wrap": 2, "b2a": 2}

MAX_WORLD_SIZE = 64
MAX_DIMS = 8
MAX_ELEMENTS = 1 << 24  # per tensor (128 MiB of int64)
MAX_WORK = 1 << 36  # rough multiply-adds of one triple's product (a denial-of-service guard)
MAX_OUTSTANDING = 64  # default per session; a session may ask for fewer or up to MAX_OUTSTANDING_LIMIT
MAX_OUTSTANDING_LIMIT = 1024
MAX_OUTSTANDING_BYTES = 1 << 30  # shares generated but not yet fetched, all sessions together
MAX_SESSIONS = 256
SESSION_IDLE_S = 3600.0
SESSION_ID_BYTES = 16
PARTY_KEY_BYTES = 32


class DealError(PolicyRefused):
    """A deal request the enclave refuses (wire code "policy"); ``code`` says why ("policy", "busy")."""

    def __init__(self, message: str, code: str = "policy") -> None:
        super().__init__(message)
        self.code = code


class MalformedDeal(DealError, MalformedInput):
    """A deal request that does not follow the protocol (code "malformed")."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="malformed")


# ----------------------------------------------------------------------------- randomness


def random_ring(shape: tuple[int, ...]) -> torch.Tensor:
    """Uniform int64 ring elements from the OS CSPRNG."""
    n = math.prod(shape)
    data = np.frombuffer(os.urandom(8 * n), dtype="<i8").astype(np.int64, copy=True) if n else np.zeros(0, np.int64)
    return torch.from_numpy(data).reshape(shape)


def random_bits(shape: tuple[int, ...]) -> torch.Tensor:
    """Uniform 0/1 int64 values from the OS CSPRNG."""
    n = math.prod(shape)
    data = (np.frombuffer(os.urandom(n), dtype=np.uint8) & 1).astype(np.int64) if n else np.zeros(0, np.int64)
    return torch.from_numpy(data).reshape(shape)


def additive_shares(value: torch.Tensor, world_size: int) -> list[torch.Tensor]:
    """``world_size`` int64 tensors summing (with wrap-around) to ``value``; party 0's is the correction."""
    others = [random_ring(tuple(value.shape)) for _ in range(world_size - 1)]
    first = value.clone()
    for s in others:
        first -= s
    return [first, *others]


def xor_shares(value: torch.Tensor, world_size: int) -> list[torch.Tensor]:
    """``world_size`` int64 tensors whose xor is ``value``."""
    others = [random_ring(tuple(value.shape)) for _ in range(world_size - 1)]
    first = value.clone()
    for s in others:
        first ^= s
    return [first, *others]


def count_wraps(shares: list[torch.Tensor]) -> torch.Tensor:
    """Wrap-arounds of the int64 sum of ``shares``, exactly as ``crypten.common.util.count_wraps``."""
    result = torch.zeros_like(shares[0], dtype=torch.long)
    prev = shares[0]
    for cur in shares[1:]:
        nxt = cur + prev
        result -= ((prev < 0) & (cur < 0) & (nxt > 0)).long()
        result += ((prev > 0) & (cur > 0) & (nxt < 0)).long()
        prev = nxt
    return result


# ----------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class DealSpec:
    """What one request asks for, canonical (compared across parties)."""

    kind: str
    op: str | None
    kwargs: tuple[tuple[str, Any], ...]
    sizes: tuple[tuple[int, ...], ...]

    def describe(self) -> str:
        op = f" {self.op}" if self.op else ""
        kw = ", ".join(f"{k}={v}" for k, v in self.kwargs)
        return f"{self.kind}{op} sizes {[list(s) for s in self.sizes]}" + (f" ({kw})" if kw else "")

    @property
    def audit_op(self) -> str:
        return f"deal.{self.kind}" + (f".{self.op}" if self.op else "")


def _int(value: Any, what: str, low: int = 0, high: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise MalformedDeal(f"deal: {what} must be an integer {bound}, got {value!r:.80}")
    return value


def _shape(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or len(value) > MAX_DIMS:
        raise MalformedDeal(f"deal: {what} must be a list of at most {MAX_DIMS} sizes, got {value!r:.80}")
    shape = tuple(_int(v, f"{what} entries", 0, MAX_ELEMENTS) for v in value)
    if math.prod(shape) > MAX_ELEMENTS:
        raise DealError(f"deal: {what} {list(shape)} has more than {MAX_ELEMENTS} elements; split the computation")
    return shape


def _kwarg(name: str, value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        if not 1 <= len(value) <= 3:
            raise MalformedDeal(f"deal: kwarg {name} must be an integer or 1-3 integers, got {value!r:.80}")
        return tuple(_int(v, f"kwarg {name}", 0, 1 << 16) for v in value)
    return _int(value, f"kwarg {name}", 0, 1 << 16)


def parse_spec(body: dict) -> DealSpec:
    """The canonical request of a deal body; MalformedDeal if it does not follow the protocol."""
    kind = body.get("kind")
    if kind not in KINDS:
        raise MalformedDeal(f"deal: kind must be one of {', '.join(KINDS)}, got {kind!r:.40}")
    sizes = body.get("sizes")
    if not isinstance(sizes, (list, tuple)) or len(sizes) != N_SIZES[kind]:
        raise MalformedDeal(f"deal: a {kind} request needs sizes = {N_SIZES[kind]} shape(s), got {sizes!r:.80}")
    shapes = tuple(_shape(s, f"sizes[{i}]") for i, s in enumerate(sizes))
    op, kwargs = None, {}
    if kind == "triple":
        op = body.get("op")
        if op not in OPS:
            raise MalformedDeal(f"deal: triple op must be one of {', '.join(OPS)}, got {op!r:.40}")
        raw = body.get("kwargs") or {}
        if not isinstance(raw, dict):
            raise MalformedDeal(f"deal: kwargs must be a map, got {type(raw).__name__}")
        if raw and not op.startswith("conv"):
            raise MalformedDeal(f"deal: {op} takes no kwargs, got {sorted(raw)}")
        for name, value in raw.items():
            allowed = CONV_KWARGS if op.startswith("conv_transpose") else CONV_KWARGS[:4]
            if name not in allowed:
                raise MalformedDeal(f"deal: {op} kwarg {name!r:.40} is not one of {', '.join(allowed)}")
            kwargs[name] = _kwarg(name, value)
    elif body.get("op") not in (None, "") or body.get("kwargs"):
        raise MalformedDeal(f"deal: a {kind} request takes no op or kwargs")
    return DealSpec(kind, op, tuple(sorted(kwargs.items())), shapes)


def _product_shape(spec: DealSpec) -> tuple[int, ...]:
    """Output shape of a triple's product (computed on meta tensors); MalformedDeal if shapes do not fit."""
    s0, s1 = spec.sizes
    try:
        if spec.kind == "binary" or spec.op == "mul":
            return tuple(torch.broadcast_shapes(s0, s1))
        a = torch.empty(s0, dtype=torch.float32, device="meta")
        b = torch.empty(s1, dtype=torch.float32, device="meta")
        return tuple(getattr(torch, spec.op)(a, b, **dict(spec.kwargs)).shape)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise MalformedDeal(f"deal: {spec.describe()} is not a valid product: {str(exc)[:200]}") from None


def _check_cost(spec: DealSpec) -> None:
    if spec.kind not in ("triple", "binary"):
        return
    out = _product_shape(spec)
    n_out = math.prod(out)
    if n_out > MAX_ELEMENTS:
        raise DealError(f"deal: {spec.describe()} gives {n_out} elements, more than {MAX_ELEMENTS}; split it")
    if spec.kind == "triple" and spec.op != "mul":
        s0, s1 = spec.sizes
        if spec.op == "matmul":
            inner = s0[-1] if s0 else 1
        else:  # conv: each output element sums (C_in / groups) * kernel products
            inner = math.prod(s1[1:]) if not spec.op.startswith("conv_transpose") else math.prod(s1) // max(
                1, s1[1] if len(s1) > 1 else 1)
        if n_out * max(1, inner) > MAX_WORK:
            raise DealError(f"deal: {spec.describe()} needs ~{n_out * inner:.3g} multiply-adds, more than the "
                            f"enclave deals in one request ({MAX_WORK:.3g}); split the computation")


def generate(spec: DealSpec, world_size: int) -> list[list[torch.Tensor]]:
    """Every party's shares of one request: ``result[party]`` is a list of int64 tensors."""
    n = world_size
    if spec.kind == "triple":
        a, b = random_ring(spec.sizes[0]), random_ring(spec.sizes[1])
        c = a * b if spec.op == "mul" else getattr(torch, spec.op)(a, b, **dict(spec.kwargs))
        parts = [additive_shares(a, n), additive_shares(b, n), additive_shares(c, n)]
    elif spec.kind == "square":
        r = random_ring(spec.sizes[0])
        parts = [additive_shares(r, n), additive_shares(r * r, n)]
    elif spec.kind == "binary":
        a, b = random_ring(spec.sizes[0]), random_ring(spec.sizes[1])
        parts = [xor_shares(a, n), xor_shares(b, n), xor_shares(a & b, n)]
    elif spec.kind == "wrap":
        r = [random_ring(spec.sizes[0]) for _ in range(n)]
        parts = [r, additive_shares(count_wraps(r), n)]
    else:  # b2a: one random bit, arithmetic shares and one-bit xor shares (as CrypTen's TTP deals it)
        bits = [random_bits(spec.sizes[0]) for _ in range(n)]
        r = bits[0].clone()
        for b in bits[1:]:
            r ^= b
        parts = [additive_shares(r, n), bits]
    return [[p[party] for p in parts] for party in range(n)]


def encode_share(t: torch.Tensor) -> dict:
    """One share on the wire: its shape and raw little-endian int64 bytes."""
    return {"shape": list(t.shape), "data": t.contiguous().numpy().astype("<i8", copy=False).tobytes()}


# ----------------------------------------------------------------------------- sessions


@dataclass
class _Record:
    spec: DealSpec
    shares: dict[int, list[dict]]
    nbytes: int


@dataclass
class _Session:
    sid: bytes
    world_size: int
    max_outstanding: int
    party_keys: list[bytes | None]
    next_request: list[int]
    records: dict[int, _Record] = field(default_factory=dict)
    failed: str | None = None
    last_used: float = field(default_factory=time.monotonic)
    deals: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def outstanding_bytes(self) -> int:
        return sum(r.nbytes for r in self.records.values())


class Dealer:
    """All dealing sessions of one enclave (kept on ``state.dealer``)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sessions: dict[bytes, _Session] = {}
        self.outstanding_bytes = 0

    def _evict(self, now: float) -> None:
        """Drop idle sessions (caller holds ``self.lock``)."""
        for sid, s in list(self.sessions.items()):
            if now - s.last_used > SESSION_IDLE_S:
                self._drop(sid)

    def _drop(self, sid: bytes) -> None:
        s = self.sessions.pop(sid, None)
        if s is not None:
            self.outstanding_bytes -= s.outstanding_bytes()
            s.records.clear()

    def open(self, body: dict) -> dict:
        world_size = _int(body.get("world_size"), "world_size", 2, MAX_WORLD_SIZE)
        max_outstanding = _int(body.get("max_outstanding", MAX_OUTSTANDING), "max_outstanding", 1,
                               MAX_OUTSTANDING_LIMIT)
        keys = body.get("party_keys")
        if keys is None:
            party_keys: list[bytes | None] = [None] * world_size
        else:
            if (not isinstance(keys, (list, tuple)) or len(keys) != world_size
                    or not all(isinstance(k, bytes) and len(k) == 32 for k in keys)):
                raise MalformedDeal(f"deal_open: party_keys must be {world_size} sha256 digests (32 bytes each)")
            if len(set(keys)) != len(keys):
                raise MalformedDeal("deal_open: party_keys must differ from party to party")
            party_keys = list(keys)
        with self.lock:
            now = time.monotonic()
            self._evict(now)
            if len(self.sessions) >= MAX_SESSIONS:
                idle = [s for s in self.sessions.values() if not s.records]
                if not idle:
                    raise DealError(f"deal_open: {MAX_SESSIONS} dealing sessions are busy; try later", code="busy")
                self._drop(min(idle, key=lambda s: s.last_used).sid)
            sid = os.urandom(SESSION_ID_BYTES)
            self.sessions[sid] = _Session(sid, world_size, max_outstanding, party_keys, [0] * world_size)
        return {"deal_session": sid, "world_size": world_size, "max_outstanding": max_outstanding}

    def _session(self, body: dict) -> _Session:
        sid = body.get("deal_session")
        if not isinstance(sid, bytes) or len(sid) != SESSION_ID_BYTES:
            raise MalformedDeal(f"deal: deal_session must be the {SESSION_ID_BYTES} bytes deal_open returned")
        with self.lock:
            session = self.sessions.get(sid)
        if session is None:
            raise DealError("deal: unknown or expired deal_session (open one with deal_open)")
        return session

    def deal(self, state: Any, body: dict) -> dict:
        session = self._session(body)
        party = _int(body.get("party"), "party", 0, session.world_size - 1)
        n = _int(body.get("request"), "request")
        key = body.get("party_key")
        if not isinstance(key, bytes) or len(key) != PARTY_KEY_BYTES:
            raise MalformedDeal(f"deal: party_key must be the party's {PARTY_KEY_BYTES}-byte secret")
        spec = parse_spec(body)
        _check_cost(spec)
        with session.lock:
            session.last_used = time.monotonic()
            digest = hashlib.sha256(key).digest()
            bound = session.party_keys[party]
            if bound is not None and not hmac.compare_digest(bound, digest):
                raise DealError(f"deal: party {party}'s key does not match the one this session holds for it "
                                "(another process may be using its slot)")
            if session.failed is not None:
                raise DealError(f"deal: this dealing session was closed: {session.failed}")
            if bound is None:
                session.party_keys[party] = digest  # trust on first use
            expected = session.next_request[party]
            if n != expected:
                raise DealError(f"deal: party {party} asked for request {n} but its next request is {expected} "
                                "(requests count 0, 1, 2, ... per party, without gaps or repeats)")
            record = session.records.get(n)
            if record is None:
                record = self._create(session, spec, n, party)
            elif record.spec != spec:
                message = (f"party {party}'s request {n} ({spec.describe()}) differs from what another party asked "
                           f"for at {n} ({record.spec.describe()}): the parties are not running the same "
                           "computation")
                self._fail(session, message)
                raise DealError(f"deal: {message}; session closed")
            shares = record.shares.pop(party)
            session.next_request[party] += 1
            session.deals += 1
            if not record.shares:
                del session.records[n]
                with self.lock:
                    self.outstanding_bytes -= record.nbytes
        _audit(state, f"party{party}", spec.audit_op, sum(math.prod(s["shape"]) for s in shares),
               f"deal:{session.sid.hex()[:16]}")
        return {"request": n, "kind": spec.kind, "shares": shares}

    def _create(self, session: _Session, spec: DealSpec, n: int, party: int) -> _Record:
        """Generate request ``n`` (caller holds ``session.lock``)."""
        if len(session.records) >= session.max_outstanding:
            behind = [p for p in range(session.world_size) if session.next_request[p] <= min(session.records)]
            raise DealError(f"deal: party {party} is {len(session.records)} requests ahead of party "
                            f"{behind[0] if behind else '?'}; the enclave holds at most {session.max_outstanding} "
                            "undelivered requests per session", code="busy")
        nbytes = 8 * (session.world_size - 1) * sum(_sizes_of(spec))
        with self.lock:
            if self.outstanding_bytes + nbytes > MAX_OUTSTANDING_BYTES:
                raise DealError(f"deal: the enclave already holds {self.outstanding_bytes} bytes of undelivered "
                                f"shares (limit {MAX_OUTSTANDING_BYTES}); try later", code="busy")
            self.outstanding_bytes += nbytes
        try:
            per_party = generate(spec, session.world_size)
        except BaseException:
            with self.lock:
                self.outstanding_bytes -= nbytes
            raise
        record = _Record(spec, {p: [encode_share(t) for t in ts] for p, ts in enumerate(per_party)}, nbytes)
        session.records[n] = record
        return record

    def _fail(self, session: _Session, message: str) -> None:
        session.failed = message
        freed = session.outstanding_bytes()
        session.records.clear()
        with self.lock:
            self.outstanding_bytes -= freed


def _sizes_of(spec: DealSpec) -> list[int]:
    """Elements of each share a party receives for ``spec``."""
    if spec.kind == "triple":
        return [math.prod(spec.sizes[0]), math.prod(spec.sizes[1]), math.prod(_product_shape(spec))]
    if spec.kind == "binary":
        return [math.prod(spec.sizes[0]), math.prod(spec.sizes[1]), math.prod(_product_shape(spec))]
    return [math.prod(spec.sizes[0])] * N_SHARES[spec.kind]


def _audit(state: Any, actor: str, op: str, count: int, key_id: str) -> None:
    """One audit entry on the server's log (``state.audit_log`` or ``state.audit``), if it keeps one."""
    log = getattr(state, "audit_log", None) or getattr(state, "audit", None)
    if log is None:
        return
    append = getattr(log, "append", None)
    if callable(append):
        append(actor=actor, op=op, key_id=key_id, count=count)
    elif callable(log):
        log(actor=actor, op=op, key_id=key_id, count=count)


_STATE_LOCK = threading.Lock()


def dealer_of(state: Any) -> Dealer:
    """The :class:`Dealer` kept on ``state`` (created on first use, thread-safe)."""
    dealer = getattr(state, "dealer", None)
    if isinstance(dealer, Dealer):
        return dealer
    with _STATE_LOCK:
        dealer = getattr(state, "dealer", None)
        if not isinstance(dealer, Dealer):
            dealer = Dealer()
            state.dealer = dealer
    return dealer


def _body(args: tuple) -> Any:
    """The request body: handlers are called as ``(state, body)`` or as the server does, ``(state, conn, body)``."""
    if len(args) not in (1, 2):
        raise TypeError(f"a deal handler takes (state, body) or (state, connection, body), got {len(args) + 1} "
                        "arguments")
    body = args[-1]
    if not isinstance(body, dict):
        raise MalformedDeal("deal: the body must be a map")
    return body


def handle_deal_open(state: Any, *args: Any) -> dict:
    """Open a dealing session (see the module docstring); ``handle_deal_open(state[, conn], body)``."""
    return dealer_of(state).open(_body(args))


def handle_deal(state: Any, *args: Any) -> dict:
    """Deal one party its shares of its next correlated value; ``handle_deal(state[, conn], body)``."""
    return dealer_of(state).deal(state, _body(args))
