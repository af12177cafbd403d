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

The head limits are a layer put on top of each client connection's layer
stack (mitmproxy's ``next_layer`` hook): it counts what the client sends while
no request of the connection is in flight, and wakes itself up to check the
time. Bodies, responses and the bytes of a tunnel passed through untouched
are not its business.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Callable

from mitmproxy import connection, ctx, http, tcp, tls
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers.http import HttpConnectHook, HttpRequestHeadersHook

from . import connection_log
from .connlimits import ClosedLog, FileBudget
from .registry.errors import error_body
from .settings import Limits

# the hooks mitmproxy's HTTP layer starts once it has parsed a request head
HEAD_PARSED = (HttpRequestHeadersHook, HttpConnectHook)


class HeadGuard(layer.Layer):
    """Sits above a client connection's first layer; passes everything through but
    the bytes of a request head beyond the limits."""

    def __init__(self, context, child: layer.Layer, guard: ConnectionGuard) -> None:
        super().__init__(context)
        context.layers.remove(self)  # invisible to the layer decisions below it
        self.child = child
        self.guard = guard
        self.in_flight = 0
        self.head_bytes = 0
        self.idle_since = time.monotonic()
        self.passthrough = False  # a tunnel to another host, not mitmproxy's HTTP
        self.head_complete = False  # mitmproxy parsed the head: what follows is its body
        self.closed = False
        self.timer: commands.RequestWakeup | None = None

    def request_started(self) -> None:
        self.in_flight += 1
        self.head_bytes = 0

    def request_done(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)
        if self.in_flight == 0:
            self.idle_since = time.monotonic()
            self.head_bytes = 0
            self.head_complete = False

    def handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if self.closed or self._counting() or (isinstance(event, events.Wakeup) and event.command is self.timer):
            return super().handle_event(event)
        # a request in flight: its bytes go straight to the layers below, without this
        # layer's cost per event (it never pauses, so mitmproxy's pause bookkeeping has nothing to do)
        return self.child.handle_event(event)

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Wakeup) and event.command is self.timer:
            self.timer = None
            yield from self._on_timer()
            return
        if self.closed:
            return
        if isinstance(event, events.Start):
            yield from self._arm()
        elif self._counting() and isinstance(event, events.DataReceived) and event.connection is self.context.client:
            self.head_bytes += len(event.data)
            if self.head_bytes > self.guard.limits().max_head_bytes:
                yield from self._close(431, "request head too large")
                return
        for command in self.child.handle_event(event):
            if isinstance(command, HEAD_PARSED):
                # the head is whole; its body may arrive before the addons' requestheaders
                # hook (which marks the request in flight) has run, and is not a head
                self.head_complete = True
            yield command

    def _counting(self) -> bool:
        return not self.passthrough and self.in_flight == 0 and not self.head_complete

    def _arm(self) -> layer.CommandGenerator[None]:
        if self.timer is None:
            self.timer = commands.RequestWakeup(self.guard.limits().head_timeout / 2)
            yield self.timer

    def _on_timer(self) -> layer.CommandGenerator[None]:
        if self.closed:
            return
        if self._counting() and time.monotonic() - self.idle_since > self.guard.limits().head_timeout:
            if self.head_bytes:
                yield from self._close(408, "request head not sent in time")
            else:
                self.guard.count("idle connection closed")  # a kept-alive connection nobody uses
                self.closed = True
                yield commands.CloseConnection(self.context.client)
            return
        yield from self._arm()

    def _close(self, status: int, reason: str) -> layer.CommandGenerator[None]:
        self.closed = True
        self.guard.count(reason)
        if not self.context.client.tls:
            body = error_body("UNSUPPORTED", reason)
            head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
            yield commands.SendData(self.context.client, head + body)
        # else the answer would go out unencrypted: this layer sits above the client's TLS (an
        # HTTPS listener, a CONNECT tunnel the proxy intercepts), and plain text there is garbage
        # the client reports as a TLS error; the close is the answer
        yield commands.CloseConnection(self.context.client)


class ConnectionGuard:
    """The addon: the connection limit, and a HeadGuard on every client connection."""

    def __init__(self, budget_of: Callable[[], FileBudget]) -> None:
        self.budget_of = budget_of  # -> the mirror's FileBudget (its limits change with the options)
        self.open: dict[str, HeadGuard | None] = {}  # client id -> its guard (None until its first layer)
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
        if len(self.open) >= self.max_connections():
            client.error = "too many connections"
            self.count(f"too many connections (limit {self.max_connections()})")
            return
        self.open[client.id] = None
        # mitmproxy asks for the first layer (and so gets a HeadGuard) only once bytes arrive
        asyncio.get_running_loop().call_later(self.limits().head_timeout, self._close_if_silent, client)

    def _close_if_silent(self, client: connection.Client) -> None:
        """A connection that has sent nothing at all within the head timeout is closed."""
        if client.id not in self.open or self.open[client.id] is not None:
            return
        proxyserver = ctx.master.addons.get("proxyserver")
        handler = next((h for h in proxyserver.connections.values() if h.client is client), None)
        if handler is not None:
            self.count("nothing sent in time")
            handler.close_connection(client)

    def client_disconnected(self, client: connection.Client) -> None:
        self.open.pop(client.id, None)

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        """The first layer below a client connection's proxy mode: decided by mitmproxy, then guarded."""
        client = nextlayer.context.client
        if nextlayer.layer is not None or client.transport_protocol != "tcp":
            return
        if client.id not in self.open or self.open[client.id] is not None:
            return
        ctx.master.addons.get("nextlayer").next_layer(nextlayer)
        if nextlayer.layer is not None:
            guard = HeadGuard(nextlayer.context, nextlayer.layer, self)
            self.open[client.id] = guard
            nextlayer.layer = guard

    def _guard(self, client: connection.Client) -> HeadGuard | None:
        return self.open.get(client.id)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if guard := self._guard(flow.client_conn):
            guard.request_started()

    def http_connect(self, flow: http.HTTPFlow) -> None:
        if guard := self._guard(flow.client_conn):
            guard.request_started()

    def http_connected(self, flow: http.HTTPFlow) -> None:
        if guard := self._guard(flow.client_conn):
            guard.request_done()  # the tunnel's own requests are counted as they come

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        self.http_connected(flow)

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        if data.ignore_connection and (guard := self._guard(data.context.client)):
            guard.passthrough = True  # bytes of another host's TLS, passed through untouched

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        if guard := self._guard(flow.client_conn):
            guard.passthrough = True  # a raw tunnel: its bytes are another protocol's, not heads

    def websocket_start(self, flow: http.HTTPFlow) -> None:
        if guard := self._guard(flow.client_conn):
            guard.passthrough = True  # messages after the upgrade are not request heads

    def response(self, flow: http.HTTPFlow) -> None:
        if guard := self._guard(flow.client_conn):
            guard.request_done()

    def error(self, flow: http.HTTPFlow) -> None:
        self.response(flow)

