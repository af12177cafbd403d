"""What the mirror does to a client's HTTP/2 streams and connection that mitmproxy's hooks cannot.

mitmproxy lets an addon answer or kill a flow (an HTTP/2 stream is then reset
with INTERNAL_ERROR); not reset a stream as malformed, close a client's
connection, or stop parsing what it read from one. The mirror needs all three:

- RFC 9113 §8.1.1 wants a request whose ``content-length`` disagrees with its
  DATA reset with PROTOCOL_ERROR; h2 checks that for DATA frames, but not for
  a HEADERS frame that ends the stream, and such a request reached the mirror
  as a GET announcing a body that never comes (its refusal, parked at the
  loopback server until the body is read, then waited there for ever);
- a client that resets streams as fast as it opens them is disconnected
  (connwork.py), and what it sent and mitmproxy already read must not become
  thousands of flows after that.

Everything here reaches into mitmproxy 12's proxy internals: the connection
handlers of the ``proxyserver`` addon and their transports, a context's layer
stack, ``HttpLayer``'s streams and connections, ``Http2Server``'s h2
connection, the layer below a client's TLS. It is kept to this module and
checked by tests/hardening/test_http2.py, which reads the resets' error codes
on the wire and counts what a rapid reset reaches.
"""

from __future__ import annotations

import h2.errors
import h2.exceptions
from mitmproxy import connection, ctx, http
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import events, layer
from mitmproxy.proxy.layers import ClientTLSLayer
from mitmproxy.proxy.layers.http import HttpLayer
from mitmproxy.proxy.layers.http._http2 import Http2Server

# bytes of an HTTP/2 client's data handed to mitmproxy's HTTP layer at a time (about a hundred
# HEADERS frames at most)
PIECE = 4096


def body_disagrees_with_length(request: http.Request) -> bool:
    """An HTTP/2 request whose whole body (read by now) is not as long as its ``content-length``."""
    if not request.is_http2 or request.stream or request.raw_content is None:
        return False
    lengths = request.headers.get_all("content-length")
    return any(value.strip() != str(len(request.raw_content)) for value in lengths)


def reset_as_malformed(flow: http.HTTPFlow) -> None:
    """Reset the flow's stream with PROTOCOL_ERROR (RFC 9113 §8.1.1) and end the flow.

    The reset frame waits in the h2 connection's buffer; mitmproxy sends it with
    what it sends when it ends the killed flow. Without the layers this relies on,
    the kill alone resets the stream (INTERNAL_ERROR)."""
    found = _h2_stream_of(flow)
    if found is not None:
        server, stream_id = found
        try:
            server.h2_conn.reset_stream(stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
        except h2.exceptions.H2Error:
            pass  # already closed (the client reset it): the kill below ends the flow
    if flow.killable:
        flow.kill()


def close_client(client: connection.Client) -> bool:
    """Close a client connection now (its streams end with it); False if it is already gone.

    The handler stops reading at once; its socket is closed here too, as the handler, cancelled
    while it works through what it already read, may not get to close it itself."""
    handler = _handler_of(client)
    if handler is None:
        return False
    handler.close_connection(client)
    transport = handler.transports.get(client)
    if transport is not None and transport.writer is not None:
        transport.writer.close()
    return True


class ReadInPieces(layer.Layer):
    """Sits above an HTTPS client's HTTP layer: hands it what an HTTP/2 client sent a piece
    at a time, and nothing more once the connection is closed.

    mitmproxy reads up to 64 KiB at once and parses all of it before it looks at the
    connection again; in 64 KiB a client resetting streams fits some 2,000 requests, each a
    flow with its hooks. When the mirror closes such a connection (``ConnectionWork``), its
    hooks have run for the piece being parsed; the rest of what was read is dropped."""

    def __init__(self, context, child: layer.Layer) -> None:
        super().__init__(context)
        context.layers.remove(self)  # invisible to the layers below
        self.child = child

    def handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        client = self.context.client
        if not (isinstance(event, events.DataReceived) and event.connection is client and client.alpn == b"h2"):
            yield from self.child.handle_event(event)
            return
        for start in range(0, len(event.data), PIECE):
            if not client.state & ConnectionState.CAN_READ:
                return  # closed by a hook of the piece before
            yield from self.child.handle_event(events.DataReceived(client, event.data[start:start + PIECE]))

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        yield from self.child.handle_event(event)  # unused: handle_event is taken over


class PieceReading:
    """The addon that puts ``ReadInPieces`` above the HTTP layer below a client's TLS. Its
    next_layer hook runs after the connection guard's, which decides the first layer."""

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        if nextlayer.layer is None:
            ctx.master.addons.get("nextlayer").next_layer(nextlayer)  # mitmproxy's decision, then wrapped
        parent = nextlayer.layer
        while parent is not None and not isinstance(parent, ReadInPieces):
            name = "child_layer" if hasattr(parent, "child_layer") else "child"
            below = getattr(parent, name, None)
            if isinstance(below, HttpLayer) and isinstance(parent, ClientTLSLayer):
                setattr(parent, name, ReadInPieces(below.context, below))
                return
            parent = below


def _handler_of(client: connection.Client):
    proxyserver = ctx.master.addons.get("proxyserver")
    return next((h for h in proxyserver.connections.values() if h.client is client), None)


def _h2_stream_of(flow: http.HTTPFlow) -> tuple[Http2Server, int] | None:
    handler = _handler_of(flow.client_conn)
    if handler is None:
        return None
    for http_layer in handler.layer.context.layers:
        if not isinstance(http_layer, HttpLayer):
            continue
        server = http_layer.connections.get(flow.client_conn)
        stream_id = next((i for i, stream in http_layer.streams.items() if getattr(stream, "flow", None) is flow),
                         None)
        if isinstance(server, Http2Server) and stream_id is not None:
            return server, stream_id
    return None
