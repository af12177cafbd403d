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
  (connwork.py, with ``mitmseams.connections.close_client``), and what it sent
  and mitmproxy already read must not become thousands of flows after that.

How, in mitmproxy's proxy internals, is ``mitmseams/http2.py``; end to end it is
checked by tests/hardening/test_http2.py, which reads the resets' error codes on
the wire and counts what a rapid reset reaches.
"""

from __future__ import annotations

from mitmproxy import http
from mitmproxy.proxy.layer import NextLayer

from .mitmseams import http2, layers

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
    """Reset the flow's stream with PROTOCOL_ERROR (RFC 9113 §8.1.1) and end the flow: the
    reset goes out with what mitmproxy sends when it ends the killed flow. Where the stream is
    not found, the kill alone resets it (INTERNAL_ERROR)."""
    http2.reset_as_malformed(flow)
    if flow.killable:
        flow.kill()


class PieceReading:
    """The addon that has an HTTPS client's HTTP/2 data parsed a piece at a time, so that
    nothing more of it is parsed once the mirror closed the connection (``ConnectionWork``):
    mitmproxy would otherwise parse all it read (up to 64 KiB, some 2,000 requests of a
    client resetting streams, each a flow with its hooks). Its next_layer hook runs after
    the connection guard's, which decides the first layer."""

    def next_layer(self, nextlayer: NextLayer) -> None:
        if nextlayer.layer is None:
            layers.decide_now(nextlayer)  # mitmproxy's decision, then wrapped
        http2.read_in_pieces(nextlayer, PIECE)
