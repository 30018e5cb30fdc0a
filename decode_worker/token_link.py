"""The decode worker's end of its token link (`pdserve.api.token_link`): sends step outputs
from the engine thread without ever blocking it, and hands each request the router sends to
`on_request`.

One connection at a time is live: the latest to present the ticket of the latest `open()`.
Outputs produced while no router is connected wait for it (as they waited in a queue for Ray's
stream before). A new connection starts at the oldest unsent frame, whole, so each connection
carries whole frames; the router has already moved the requests of a link that broke, and
drops their deltas.
"""

from __future__ import annotations

import collections
import hmac
import logging
import pickle
import secrets
import select
import socket
import threading
from collections.abc import Callable

from pdserve.api.messages import LinkAddress, PrefillRequest, StepOutputs
from pdserve.api.token_link import HEADER, TICKET_BYTES, encode_frame

logger = logging.getLogger(__name__)
HANDSHAKE_TIMEOUT_S = 5.0


class TokenLink:
    def __init__(self, host: str, on_request: Callable[[PrefillRequest], None]) -> None:
        self._listener = socket.create_server((host, 0))
        self.host, self.port = host, self._listener.getsockname()[1]
        self._on_request = on_request
        self._ticket = b""
        self._lock = threading.Condition()
        self._conn: socket.socket | None = None
        self._pending: collections.deque[bytes] = collections.deque()
        self._offset = 0  # bytes of `_pending[0]` already in the live connection
        for target, name in ((self._accept, "accept"), (self._drain, "send")):
            threading.Thread(target=target, name=f"token-link-{name}", daemon=True).start()

    def open(self) -> LinkAddress:
        """A fresh address for the router to connect to (the earlier ticket stops working)."""
        with self._lock:
            self._ticket = secrets.token_bytes(TICKET_BYTES)
            return LinkAddress(self.host, self.port, self._ticket)

    def send(self, outputs: StepOutputs) -> None:
        """Queues one step's outputs and writes what the socket takes now; the sending thread
        writes the rest as the router reads."""
        frame = encode_frame(outputs)
        with self._lock:
            self._pending.append(frame)
            self._write_some()
            if self._pending:
                self._lock.notify_all()

    def _write_some(self) -> None:
        """Writes pending frames, in order, as far as the socket takes them without blocking
        (with the lock held)."""
        conn = self._conn
        while conn is not None and self._pending:
            try:
                sent = conn.send(memoryview(self._pending[0])[self._offset :], socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._drop(conn, e)
                return
            self._offset += sent
            if self._offset < len(self._pending[0]):
                return
            self._pending.popleft()
            self._offset = 0

    def _drain(self) -> None:
        while True:
            with self._lock:
                while self._conn is None or not self._pending:
                    self._lock.wait()
                conn = self._conn
            try:
                select.select([], [conn], [], 1.0)  # until the socket has room again
            except (OSError, ValueError):  # closed meanwhile
                pass
            with self._lock:
                if conn is self._conn:
                    self._write_some()

    def _drop(self, conn: socket.socket, reason: object) -> None:
        """Closes a connection; if it is the live one, the next starts at a frame's start (with
        the lock held)."""
        if conn is self._conn:
            logger.info("token link to the router closed: %s", reason)
            self._conn, self._offset = None, 0
        try:
            # NOTE: close() alone neither wakes this connection's reader thread, blocked in
            # recv, nor ends the connection while that call holds it.
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:  # already reset by the peer
            pass
        conn.close()

    def _accept(self) -> None:
        while True:
            conn, _ = self._listener.accept()
            threading.Thread(
                target=self._handshake, args=(conn,), name="token-link-join", daemon=True
            ).start()

    def _handshake(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(HANDSHAKE_TIMEOUT_S)
            ticket = _read_exactly(conn, TICKET_BYTES)
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as e:
            logger.warning("token link: a connection failed before it showed a ticket: %s", e)
            conn.close()
            return
        with self._lock:
            if not self._ticket or not hmac.compare_digest(ticket, self._ticket):
                logger.warning("token link: refused a connection with a wrong ticket")
                conn.close()
                return
            self._ticket = b""  # one connection per ticket
            if self._conn is not None:
                self._drop(self._conn, "replaced by a new connection")
            self._conn, self._offset = conn, 0
            self._write_some()
            self._lock.notify_all()
        self._read(conn)

    def _read(self, conn: socket.socket) -> None:
        """Hands each request the router sends to `on_request`, until the connection ends."""
        try:
            while True:
                (size,) = HEADER.unpack(_read_exactly(conn, HEADER.size))
                self._on_request(pickle.loads(_read_exactly(conn, size)))
        except Exception as e:  # closed, or not a frame of ours: the link is over either way
            reason: object = e
        with self._lock:
            self._drop(conn, reason)


def _read_exactly(conn: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise EOFError("the router closed the token link")
        buf += chunk
    return bytes(buf)
