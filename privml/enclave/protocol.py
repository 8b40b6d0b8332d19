"""The enclave's wire format: versioned, length-checked frames around a strict CBOR map.

A frame is ``b"PVEN" | u16 version | u16 reserved | u32 length | CBOR body`` (big endian). The
length is checked against :data:`MAX_BODY` before a single body byte is read, and the body must be a
CBOR map with exactly ``kind``, ``seq``, ``session`` and ``body``.  CBOR is decoded with every
semantic tag refused (no datetimes, bignums, shared references or application objects: data only),
no duplicate keys, no indefinite lengths and a bounded nesting depth; anything else is
:class:`~privml.errors.MalformedInput`.  No pickle: a real enclave can speak this format as is.
"""

from __future__ import annotations

import io
import math
import re
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cbor2

from privml.errors import (
    AttestationError,
    DecryptionBudgetExhausted,
    KeyMaterialError,
    MalformedInput,
    PartyFailure,
    PrivmlError,
)

MAGIC = b"PVEN"
VERSION = 1
HEADER = struct.Struct(">4sHHI")  # 8-byte header (magic, version, reserved) + u32 body length
MAX_BODY = 512 * 1024 * 1024  # bytes; checked before reading the body
MAX_DEPTH = 16  # CBOR nesting limit
SESSION_BYTES = 16

REQUEST_KINDS = frozenset({"hello", "attest", "provision", "refresh", "audit", "status", "deal_open", "deal"})
RESPONSE_KINDS = frozenset({"ok", "error"})
FIELDS = frozenset({"kind", "seq", "session", "body"})

# error code on the wire -> privml error raised by the client
ERROR_CODES: dict[str, type[PrivmlError]] = {
    "malformed": MalformedInput,
    "attestation": AttestationError,
    "budget": DecryptionBudgetExhausted,
    "key": KeyMaterialError,
    "policy": AttestationError,
}


_CODE_RE = re.compile(r"^[a-z_]{1,32}$")


def error_class(code: str) -> type[PrivmlError]:
    """The privml error a client raises for an error response with ``code``."""
    return ERROR_CODES.get(code, PrivmlError)


def error_code(exc: BaseException) -> str:
    """The wire code for an exception raised inside the enclave."""
    if isinstance(exc, PrivmlError):
        # an instance's own ``code`` (the dealer's errors: "policy", "busy", "malformed"), else the class's
        # ``wire_code`` (policy.PolicyRefused -> "policy")
        for code in (getattr(exc, "code", None), getattr(exc, "wire_code", None)):
            if isinstance(code, str) and _CODE_RE.match(code):
                return code
    if isinstance(exc, DecryptionBudgetExhausted):
        return "budget"
    if isinstance(exc, MalformedInput):
        return "malformed"
    if isinstance(exc, AttestationError):
        return "attestation"
    if isinstance(exc, KeyMaterialError):
        return "key"
    return "internal"


# --------------------------------------------------------------------------------------- CBOR


def _refuse_tag(*args: Any) -> Any:
    raise MalformedInput("CBOR semantic tags are not accepted")


# Overrides cbor2's built-in semantic decoders too (datetimes, bignums, shared values, regexes, ...).
_NO_TAGS = {t: _refuse_tag for t in (*range(0, 512), 55799, 55800, 55801)}
_PLAIN = (bool, int, float, str, bytes, type(None))


def _check_plain(obj: Any, depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise MalformedInput("CBOR nesting too deep")
    if isinstance(obj, _PLAIN):
        if isinstance(obj, float) and not math.isfinite(obj):
            raise MalformedInput("non-finite float in CBOR")
        return
    if isinstance(obj, (list, tuple)):
        for x in obj:
            _check_plain(x, depth + 1)
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, (int, str)) or isinstance(k, bool):
                raise MalformedInput("CBOR map keys must be integers or strings")
            _check_plain(v, depth + 1)
        return
    raise MalformedInput(f"unexpected CBOR item of type {type(obj).__name__}")


def _thaw(obj: Any) -> Any:
    """cbor2 returns tuples/frozendicts in hashable positions; give plain lists/dicts back."""
    if isinstance(obj, Mapping):
        return {k: _thaw(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_thaw(x) for x in obj]
    return obj


def loads(data: bytes | memoryview) -> Any:
    """Strict CBOR decoding (data items only, exactly one item); MalformedInput on anything else."""
    fp = io.BytesIO(bytes(data))
    try:
        obj = cbor2.CBORDecoder(fp, semantic_decoders=_NO_TAGS, tag_hook=_refuse_tag, max_depth=MAX_DEPTH,
                                allow_indefinite=False, allow_duplicate_keys=False).decode()
        if fp.read(1):
            raise MalformedInput("trailing bytes after the CBOR item")
    except MalformedInput:
        raise
    except (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError, MemoryError) as exc:
        raise MalformedInput(f"bad CBOR: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - a decoder must never leak arbitrary exceptions
        raise MalformedInput(f"bad CBOR: {type(exc).__name__}") from exc
    _check_plain(obj)
    return _thaw(obj)


def dumps(obj: Any) -> bytes:
    """Canonical (deterministic) CBOR: what hashes and signatures are computed over."""
    return cbor2.dumps(obj, canonical=True)


# --------------------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class Message:
    kind: str
    seq: int
    session: bytes
    body: dict


def encode(kind: str, seq: int, session: bytes, body: Mapping) -> bytes:
    """One frame (header + CBOR body)."""
    payload = dumps({"kind": kind, "seq": seq, "session": bytes(session), "body": dict(body)})
    if len(payload) > MAX_BODY:
        raise MalformedInput(f"message body of {len(payload)} bytes exceeds the limit of {MAX_BODY}")
    return HEADER.pack(MAGIC, VERSION, 0, len(payload)) + payload


def parse_header(header: bytes) -> int:
    """Body length announced by a 12-byte header, after checking magic, version and size."""
    if len(header) != HEADER.size:
        raise MalformedInput(f"truncated frame header ({len(header)} of {HEADER.size} bytes)")
    magic, version, reserved, length = HEADER.unpack(header)
    if magic != MAGIC:
        raise MalformedInput("bad frame magic")
    if version != VERSION:
        raise MalformedInput(f"unsupported protocol version {version} (this side speaks {VERSION})")
    if reserved != 0:
        raise MalformedInput("reserved header field is not zero")
    if length > MAX_BODY:
        raise MalformedInput(f"frame announces {length} bytes, above the limit of {MAX_BODY}")
    return length


def parse_body(payload: bytes, kinds: frozenset[str]) -> Message:
    """Validate a frame's CBOR body: exactly the four fields, right types, a known kind."""
    obj = loads(payload)
    if not isinstance(obj, dict):
        raise MalformedInput("message body is not a CBOR map")
    if set(obj) != FIELDS:
        raise MalformedInput(f"message fields must be exactly {sorted(FIELDS)}, got {sorted(map(str, obj))}")
    kind, seq, session, body = obj["kind"], obj["seq"], obj["session"], obj["body"]
    if not isinstance(kind, str) or kind not in kinds:
        raise MalformedInput(f"unknown message kind {kind!r}")
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < 2**63:
        raise MalformedInput("seq must be a non-negative integer")
    if not isinstance(session, bytes) or len(session) != SESSION_BYTES:
        raise MalformedInput(f"session must be {SESSION_BYTES} bytes")
    if not isinstance(body, dict):
        raise MalformedInput("message body field must be a map")
    return Message(kind, seq, session, body)


def decode(frame: bytes, kinds: frozenset[str] = REQUEST_KINDS | RESPONSE_KINDS) -> Message:
    """Parse one complete frame from bytes (header, exact length, body)."""
    length = parse_header(bytes(frame[: HEADER.size]))
    rest = frame[HEADER.size:]
    if len(rest) != length:
        raise MalformedInput(f"frame body has {len(rest)} bytes, header says {length}")
    return parse_body(rest, kinds)


def _recv_exact(sock: socket.socket, n: int, peer: str) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = sock.recv(min(n - len(buf), 1 << 20))
        except TimeoutError as exc:
            raise PartyFailure(f"{peer} did not answer in time") from exc
        except OSError as exc:
            raise PartyFailure(f"connection to {peer} failed: {exc}") from exc
        if not chunk:
            if not buf and n == HEADER.size:
                raise ConnectionClosed(f"{peer} closed the connection")
            raise MalformedInput(f"truncated frame from {peer} ({len(buf)} of {n} bytes)")
        buf += chunk
    return bytes(buf)


class ConnectionClosed(PartyFailure):
    """The peer closed the connection cleanly between frames."""


def read_message(sock: socket.socket, kinds: frozenset[str], peer: str = "peer") -> Message:
    """Read one frame from ``sock``: header first, size checked, then exactly the body."""
    length = parse_header(_recv_exact(sock, HEADER.size, peer))
    return parse_body(_recv_exact(sock, length, peer) if length else b"", kinds)


# --------------------------------------------------------------------------------------- body fields


def field(body: Mapping, name: str, typ: type | tuple[type, ...], *, max_len: int | None = None,
          optional: bool = False) -> Any:
    """``body[name]`` checked for type (and length for bytes/str); MalformedInput otherwise."""
    if name not in body:
        if optional:
            return None
        raise MalformedInput(f"missing field {name!r}")
    value = body[name]
    if isinstance(value, bool) and typ is int:
        raise MalformedInput(f"field {name!r} must be an integer")
    if not isinstance(value, typ):
        raise MalformedInput(f"field {name!r} has type {type(value).__name__}")
    if max_len is not None and isinstance(value, (bytes, str, list)) and len(value) > max_len:
        raise MalformedInput(f"field {name!r} is too long ({len(value)} > {max_len})")
    return value


def only_fields(body: Mapping, allowed: set[str]) -> None:
    extra = set(body) - allowed
    if extra:
        raise MalformedInput(f"unexpected fields {sorted(map(str, extra))}")
