"""Client connections, bounded before mitmproxy's HTTP layer sees them.

mitmproxy reads a request head of any size and waits for it as long as bytes
trickle in, and accepts connections until the process runs out of files. A
mirror on a public address needs limits there: how many connections it serves
at once (its share of the open files, ``connlimits.py``), how large a request
head may be, and how long a client may take to send one (or leave a
connection idle between requests). Beyond them a
connection is closed, with a 431 or 408 where a head was started (in plain
HTTP: over TLS this layer cannot encrypt, so the close is all), and the
operator reads one log line per cause and minute, not one per connection.

The head limits are a ``HeadWatch`` on each client connection: a layer put on
top of the connection's layers (``mitmseams.layers.HeadLayer``, from mitmproxy's
``next_layer`` hook) shows it what the client sends while no request of the
connection is in flight, and wakes it up to check the time. Bodies, responses
and the bytes of a tunnel passed through untouched are not its business.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Callable

from mitmproxy import connection, http, tcp, tls
from mitmproxy.proxy.layer import NextLayer

from . import connection_log
from .connlimits import ClosedLog, FileBudget
from .mitmseams import connections
from .mitmseams.layers import CloseClient, watch_heads
from .registry.errors import error_body
from .settings import Limits


class HeadWatch:
    """One client connection's request heads as the guard limits them: their bytes, and the
    time the client takes, while none of its requests is in flight. The layer that shows it
    the client's bytes and closes the connection when it says so is ``mitmseams.layers.HeadLayer``."""

    def __init__(self, guard: ConnectionGuard) -> None:
        self.guard = guard
        self.in_flight = 0
        self.head_bytes = 0
        self.idle_since = time.monotonic()
        self.passthrough = False  # a tunnel to another host, not mitmproxy's HTTP
        self.head_complete = False  # mitmproxy parsed the head: what follows is its body
        self.closed = False

    def request_started(self) -> None:
        self.in_flight += 1
        self.head_bytes = 0

    def request_done(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)
        if self.in_flight == 0:
            self.idle_since = time.monotonic()
            self.head_bytes = 0
            self.head_complete = False

    def watching(self) -> bool:
        return not self.passthrough and self.in_flight == 0 and not self.head_complete

    def check_every(self) -> float:
        return self.guard.limits().head_timeout / 2

    def received(self, size: int) -> CloseClient | None:
        self.head_bytes += size
        if self.head_bytes > self.guard.limits().max_head_bytes:
            return self._refuse(431, "request head too large")
        return None

    def head_parsed(self) -> None:
        # the head is whole; its body may arrive before the addons' requestheaders
        # hook (which marks the request in flight) has run, and is not a head
        self.head_complete = True

    def timer_fired(self) -> CloseClient | None:
        if not self.watching() or time.monotonic() - self.idle_since <= self.guard.limits().head_timeout:
            return None
        if self.head_bytes:
            return self._refuse(408, "request head not sent in time")
        self.guard.count("idle connection closed")  # a kept-alive connection nobody uses
        self.closed = True
        return CloseClient()

    def _refuse(self, status: int, reason: str) -> CloseClient:
        """Closed with a registry error (sent in plain HTTP only: over TLS the close is all)."""
        self.closed = True
        self.guard.count(reason)
        body = error_body("UNSUPPORTED", reason)
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        return CloseClient(head + body)


class ConnectionGuard:
    """The addon: the connection limit, and a HeadWatch on every client connection."""

    def __init__(self, budget_of: Callable[[], FileBudget | None]) -> None:
        self.budget_of = budget_of  # -> the mirror's FileBudget (its limits change with the options); None: not running
        self.open: dict[str, HeadWatch | None] = {}  # client id -> its watch (None until its first layer)
        self.closed_log = ClosedLog()

    def limits(self) -> Limits:  # a method: mitmproxy reads every attribute of an addon when it loads
        return self.budget_of().limits()

    def count(self, cause: str) -> None:
        self.closed_log.count(cause)

    def max_connections(self) -> int:
        """The main port's share of the open files (the blob listener has the same)."""
        return self.budget_of().connections()

    # ---- hooks -----------------------------------------------------------

    def load(self, loader) -> None:
        connection_log.install()  # what is said about single connections is this guard's to say

    def done(self) -> None:
        connection_log.uninstall()

    def running(self) -> None:
        """Out of files despite the limit (a burst of connections): asyncio pauses accepting
        for a second and calls the loop's exception handler for each; a count, not a traceback."""
        loop = asyncio.get_running_loop()
        previous = loop.get_exception_handler()

        def handler(loop, context) -> None:
            error = context.get("exception")
            if isinstance(error, OSError) and error.errno in (errno.EMFILE, errno.ENFILE):
                self.count("out of open files (accepting paused for a second)")
            elif previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)

        loop.set_exception_handler(handler)

    def client_connected(self, client: connection.Client) -> None:
        if self.budget_of() is None:
            client.error = "the mirror is not running"  # its options stopped the start: closed at once
            return
        if len(self.open) >= self.max_connections():
            client.error = "too many connections"
            self.count(f"too many connections (limit {self.max_connections()})")
            return
        self.open[client.id] = None
        # mitmproxy asks for the first layer (and so gets a HeadWatch) only once bytes arrive
        asyncio.get_running_loop().call_later(self.limits().head_timeout, self._close_if_silent, client)

    def _close_if_silent(self, client: connection.Client) -> None:
        """A connection that has sent nothing at all within the head timeout is closed."""
        if client.id not in self.open or self.open[client.id] is not None:
            return
        if connections.close_client(client):
            self.count("nothing sent in time")

    def client_disconnected(self, client: connection.Client) -> None:
        self.open.pop(client.id, None)

    def next_layer(self, nextlayer: NextLayer) -> None:
        """The first layer below a client connection's proxy mode: decided by mitmproxy, then watched."""
        client = nextlayer.context.client
        if nextlayer.layer is not None or client.transport_protocol != "tcp":
            return
        if client.id not in self.open or self.open[client.id] is not None:
            return
        watch = HeadWatch(self)
        if watch_heads(nextlayer, watch):
            self.open[client.id] = watch

    def _watch(self, client: connection.Client) -> HeadWatch | None:
        return self.open.get(client.id)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if watch := self._watch(flow.client_conn):
            watch.request_started()

    def http_connect(self, flow: http.HTTPFlow) -> None:
        if watch := self._watch(flow.client_conn):
            watch.request_started()

    def http_connected(self, flow: http.HTTPFlow) -> None:
        if watch := self._watch(flow.client_conn):
            watch.request_done()  # the tunnel's own requests are counted as they come

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        self.http_connected(flow)

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        if data.ignore_connection and (watch := self._watch(data.context.client)):
            watch.passthrough = True  # bytes of another host's TLS, passed through untouched

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        if watch := self._watch(flow.client_conn):
            watch.passthrough = True  # a raw tunnel: its bytes are another protocol's, not heads

    def websocket_start(self, flow: http.HTTPFlow) -> None:
        if watch := self._watch(flow.client_conn):
            watch.passthrough = True  # messages after the upgrade are not request heads

    def response(self, flow: http.HTTPFlow) -> None:
        if watch := self._watch(flow.client_conn):
            watch.request_done()

    def error(self, flow: http.HTTPFlow) -> None:
        self.response(flow)

