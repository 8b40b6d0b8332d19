"""The coordinator's end of a remote pooled party: the authenticated control connection to a party host.

``privml.parties.pool`` uses this to reach parties on other machines; the host side that runs the party is
``privml.parties.remote`` (which imports the pool, never the reverse).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import pickle
from typing import Any

from privml.errors import InvalidInput, PartyFailure

MIN_AUTHKEY = 16


def _parse(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise InvalidInput(f"privml: a party host address is host:port, got {address!r}")
    return host, int(port)


class RemoteParty:
    """What a pool needs of a party process, for one on another machine: liveness, a sentinel, stop."""

    def __init__(self, conn: Any, address: str) -> None:
        self.conn, self.address = conn, address
        self.pid = None
        self.exitcode: int | str | None = None
        # a death shows as EOF on the connection itself (which the pool waits on); the sentinel never fires
        self._quiet, self._unused = os.pipe()

    @property
    def sentinel(self) -> int:
        return self._quiet

    def is_alive(self) -> bool:
        return not self.conn.closed

    def join(self, timeout: float | None = None) -> None:
        """Called once the pool saw the connection end (or before stopping it): record why."""
        if self.exitcode is None and (self.conn.closed or self.conn.poll(timeout or 0)):
            self.exitcode = f"lost its party host at {self.address} (the party died or the host stopped)"

    def terminate(self) -> None:
        if not self.conn.closed:
            self.conn.close()
            os.close(self._quiet)
            os.close(self._unused)
        if self.exitcode is None:
            self.exitcode = -15

    kill = terminate


def connect(address: str, authkey: bytes, start: tuple, timeout: float) -> tuple[RemoteParty, Any]:
    """Open the control connection to the party host at ``address`` and send the party's ``start`` arguments."""
    if not isinstance(authkey, bytes) or len(authkey) < MIN_AUTHKEY:
        raise InvalidInput(f"privml: remote parties need an authkey of at least {MIN_AUTHKEY} random bytes")
    host, port = _parse(address)
    try:
        conn = multiprocessing.connection.Client((host, port), authkey=authkey)
    except multiprocessing.AuthenticationError:
        raise PartyFailure(f"privml: the party host at {address} refused the authkey (or is not a privml party "
                           "host)") from None
    except OSError as exc:
        raise PartyFailure(f"privml: cannot reach the party host at {address}: {exc}") from None
    conn.send_bytes(pickle.dumps(("start", start), protocol=pickle.HIGHEST_PROTOCOL))
    return RemoteParty(conn, address), conn
