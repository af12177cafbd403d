"""A client's HTTP/2 streams, below what mitmproxy's hooks reach.

Relies on: the layer stack under a connection handler
(``handler.layer.context.layers``), ``HttpLayer.streams`` (stream id -> its
stream, holding the ``flow``) and ``HttpLayer.connections`` (the client -> its
``Http2Server``), ``Http2Server.h2_conn`` (the h2 connection whose frames
mitmproxy sends along with the next data it sends), the TLS layers'
``child_layer``, and the number of streams mitmproxy's HTTP/2 server lets a client
open (h2's default, which mitmproxy keeps).
Why: a hook can kill a flow, which resets its stream with INTERNAL_ERROR, but RFC
9113 §8.1.1 wants PROTOCOL_ERROR for a malformed request; and mitmproxy parses
all it read from a client (up to 64 KiB: some 2,000 HEADERS frames) before it
looks at the connection again, so a connection the mirror closed from a hook
would still become thousands of flows.
"""

from __future__ import annotations

import h2.errors
import h2.exceptions
from mitmproxy import http
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import events, layer
from mitmproxy.proxy.layers import ClientTLSLayer
from mitmproxy.proxy.layers.http import HttpLayer
from mitmproxy.proxy.layers.http._http2 import Http2Server

from .connections import handler_of
from .layers import Overlay

# SETTINGS_MAX_CONCURRENT_STREAMS of mitmproxy's HTTP/2 server: h2's default, which it keeps
MAX_CONCURRENT_STREAMS = 100


def reset_as_malformed(flow: http.HTTPFlow) -> None:
    """Reset the flow's HTTP/2 stream with PROTOCOL_ERROR, through the h2 connection of the
    ``Http2Server`` that ``HttpLayer.connections`` holds for the client, the stream found in
    ``HttpLayer.streams``. The frame waits in the h2 connection's buffer, to be sent with what
    mitmproxy sends when the flow ends (killed); a flow not found here (its connection gone,
    HTTP/1) is left as it is."""
    found = _h2_stream_of(flow)
    if found is not None:
        server, stream_id = found
        try:
            server.h2_conn.reset_stream(stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
        except h2.exceptions.H2Error:
            pass  # already closed (the client reset it)


def _h2_stream_of(flow: http.HTTPFlow) -> tuple[Http2Server, int] | None:
    handler = handler_of(flow.client_conn)
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


class ReadInPieces(Overlay):
    """Hands the HTTP layer below it what an HTTP/2 client sent ``piece`` bytes at a time,
    and nothing more once the client connection is closed (by a hook of the piece before:
    mitmproxy runs hooks as eager tasks, while the layers work through an event)."""

    def __init__(self, context, child: layer.Layer, piece: int) -> None:
        super().__init__(context, child)
        self.piece = piece

    def handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        client = self.context.client
        if not (isinstance(event, events.DataReceived) and event.connection is client and client.alpn == b"h2"):
            yield from self.child.handle_event(event)
            return
        for start in range(0, len(event.data), self.piece):
            if not client.state & ConnectionState.CAN_READ:
                return
            yield from self.child.handle_event(events.DataReceived(client, event.data[start:start + self.piece]))

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        yield from self.child.handle_event(event)  # unused: handle_event is taken over


def read_in_pieces(nextlayer: layer.NextLayer, piece: int) -> None:
    """Put ``ReadInPieces`` above the HTTP layer right below a client's TLS among the layers
    decided for ``nextlayer`` (an HTTPS listener's stack; once), walking down the TLS layers'
    ``child_layer`` and the overlays' ``child``."""
    parent = nextlayer.layer
    while parent is not None and not isinstance(parent, ReadInPieces):
        name = "child_layer" if hasattr(parent, "child_layer") else "child"
        below = getattr(parent, name, None)
        if isinstance(below, HttpLayer) and isinstance(parent, ClientTLSLayer):
            setattr(parent, name, ReadInPieces(below.context, below, piece))
            return
        parent = below
