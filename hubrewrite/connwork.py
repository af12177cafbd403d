"""The mirror's work for one client connection's requests, bounded.

Over HTTP/2 a client can open a stream and reset it at once, thousands of times
a second ("rapid reset", CVE-2023-44487). mitmproxy runs the mirror's hooks for
each such stream and tells it of the reset only once its hook is done: 20,000
HEADERS+RST_STREAM pairs on one connection made about 4,800 upstream requests
and slowed every other client tenfold.

A client may have at most ``MAX_STREAMS`` streams open (what mitmproxy's h2
announces), and a request the mirror holds (from its head to its answer or
error) is an open stream unless the client reset it. Many more requests of one
connection in the mirror at once mean resets: the connection is closed, and its
requests still in the mirror are dropped without their work. As Go's HTTP/2
server does since that CVE, at most ``ACTIVE`` requests of a connection do
their work at once; the others wait their turn, and never start if the
connection goes meanwhile. Over HTTP/1.1 a connection has one request at a
time, so none of this ever holds one back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from mitmproxy import connection, http
from mitmproxy.connection import ConnectionState

from .mitmseams.http2 import MAX_CONCURRENT_STREAMS

ACTIVE = 8  # requests of one connection worked on at once (a registry client pulls a few layers at a time)
MAX_STREAMS = MAX_CONCURRENT_STREAMS  # what mitmproxy's HTTP/2 server lets a client open
# requests of one connection in the mirror at once beyond which it reset streams: twice the streams
# it may have open, as a streamed answer's flow ends a moment after its stream
MAX_HELD = 2 * MAX_STREAMS


@dataclass
class _Connection:
    held: set[str] = field(default_factory=set)  # its flows in the mirror: head arrived, not yet answered
    active: int = 0  # requests doing their work
    waiting: deque[asyncio.Future[bool]] = field(default_factory=deque)  # requests waiting for a turn


class ConnectionWork:
    def __init__(self, close: Callable[[connection.Client], object], count: Callable[[str], None]) -> None:
        self.close = close  # closes a client connection
        self.count = count  # logs a cause, once per minute
        self.connections: dict[str, _Connection] = {}  # client id -> its requests in the mirror

    def arrived(self, flow: http.HTTPFlow) -> bool:
        """A request's head arrived: False, drop it (its connection is closed, or is closed now)."""
        client = flow.client_conn
        if not client.state & ConnectionState.CAN_WRITE:
            return False  # nobody to answer
        conn = self.connections.setdefault(client.id, _Connection())
        conn.held.add(flow.id)
        if len(conn.held) <= MAX_HELD:
            return True
        self.count(f"more requests at once than open HTTP/2 streams allow ({MAX_STREAMS}): streams reset")
        self.close(client)
        self.disconnected(client)
        return False

    def finished(self, flow: http.HTTPFlow) -> None:
        """A request was answered or ended in an error."""
        conn = self.connections.get(flow.client_conn.id)
        if conn is not None:
            conn.held.discard(flow.id)
            self._forget_if_idle(flow.client_conn, conn)

    @contextlib.asynccontextmanager
    async def turn(self, client: connection.Client) -> AsyncIterator[bool]:
        """Wait for this request's turn to work: True, do it; False, its connection is gone."""
        conn = self.connections.setdefault(client.id, _Connection())
        if not await self._enter(client, conn):
            yield False
            return
        try:
            yield True
        finally:
            self._leave(client, conn)

    async def _enter(self, client: connection.Client, conn: _Connection) -> bool:
        if not client.state & ConnectionState.CAN_WRITE:
            self._forget_if_idle(client, conn)
            return False
        if conn.active < ACTIVE:
            conn.active += 1
            return True
        turn = asyncio.get_running_loop().create_future()
        conn.waiting.append(turn)
        try:
            return await turn  # True: a finished request handed over its turn (active unchanged)
        except asyncio.CancelledError:
            if not turn.cancelled() and turn.result():
                self._leave(client, conn)  # handed a turn just as it was cancelled
            elif turn in conn.waiting:
                conn.waiting.remove(turn)
            raise

    def _leave(self, client: connection.Client, conn: _Connection) -> None:
        while conn.waiting:
            turn = conn.waiting.popleft()
            if not turn.done():
                turn.set_result(bool(client.state & ConnectionState.CAN_WRITE))
                if turn.result():
                    return
        conn.active -= 1
        self._forget_if_idle(client, conn)

    def disconnected(self, client: connection.Client) -> None:
        """The connection is gone: its requests waiting for a turn never start."""
        conn = self.connections.pop(client.id, None)
        while conn is not None and conn.waiting:
            turn = conn.waiting.popleft()
            if not turn.done():
                turn.set_result(False)

    def _forget_if_idle(self, client: connection.Client, conn: _Connection) -> None:
        if not conn.held and conn.active == 0 and not conn.waiting and self.connections.get(client.id) is conn:
            del self.connections[client.id]
