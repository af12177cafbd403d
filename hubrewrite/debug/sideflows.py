"""The mirror's own upstream exchanges, as flows of their own in mitmweb and in saved flows.

Someone debugging a failing pull needs to see what the mirror did on a client's
behalf: realm discovery, the token request and the token service's answer, the
blob probe and its 307, access and tag HEADs, the cache's download. The
mirror's HTTP client reports each exchange; here it becomes an ``HTTPFlow``
(headers, small bodies, never a blob's, its timing), marked, its comment
naming the client flow it served (whose comment names it back), with
credentials as fingerprints unless ``hub_show_secrets``. It goes through
mitmproxy's hooks like any flow, so the view shows it and ``-w`` saves it.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from urllib.parse import urlsplit

from mitmproxy import connection, http
from mitmproxy.flow import Error

from ..loopback import CLIENT_URL
from ..mitmseams.hooks import run_hooks
from ..registry.headers import encode_fields
from ..upstream_client import Exchange
from .redact import redact_flow

log = logging.getLogger("hub_rewrite")

MARKER = ":arrow_right_hook:"
SIDE_FLOW = "hub_side_flow"  # flow.metadata key: the client flow's id (our own hooks skip these)
MAX_BODY = 64 * 1024  # bodies kept on a side flow (tokens, manifests, errors); never a blob's

# the client flow a request hook is serving: the mirror's exchanges within it are its side flows
serving: contextvars.ContextVar[http.HTTPFlow | None] = contextvars.ContextVar("hub_serving", default=None)


class SideFlows:
    def __init__(self, enabled, show_secrets) -> None:
        self.enabled = enabled  # -> bool
        self.show_secrets = show_secrets  # -> bool
        self._pending: set[asyncio.Task] = set()

    def record(self, exchange: Exchange) -> None:
        client_flow = serving.get()
        if not self.enabled() or client_flow is None:
            return
        flow = self._flow(exchange, client_flow)
        client_flow.comment += f"; side flow {flow.id[:8]}: {exchange.purpose}"
        task = asyncio.get_running_loop().create_task(self._publish(flow))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _flow(self, x: Exchange, client_flow: http.HTTPFlow) -> http.HTTPFlow:
        client = connection.Client(peername=("hub-rewrite", 0), sockname=("hub-rewrite", 0), timestamp_start=x.started)
        side = http.HTTPFlow(client, connection.Server(address=None))
        side.request = http.Request.make(x.method, x.url, x.request_body or b"", http.Headers(encode_fields(x.request_headers)))
        side.request.timestamp_start = side.request.timestamp_end = x.started
        if x.status is not None:
            body = b"" if x.response_body is None else x.response_body[:MAX_BODY]
            side.response = http.Response(b"HTTP/1.1", x.status, x.reason.encode(),
                                          http.Headers(encode_fields(x.response_headers)), body, None,
                                          x.answered or x.started, x.ended or x.answered or x.started)
        if x.error is not None:
            side.error = Error(x.error)
        side.marked = MARKER
        what = f"{client_flow.request.method} {urlsplit(client_flow.metadata.get(CLIENT_URL, client_flow.request.url)).path}"
        side.comment = f"hub side flow: {x.purpose}, for client flow {client_flow.id[:8]} ({what})"
        side.metadata[SIDE_FLOW] = client_flow.id
        side.live = False
        return side if self.show_secrets() else redact_flow(side)

    async def _publish(self, flow: http.HTTPFlow) -> None:
        """Through every addon's hooks (the view shows it, save_stream_file writes it, the dumper prints it)."""
        try:
            await run_hooks(flow)
        except Exception:
            log.exception("hub_rewrite: could not show a side flow")


def is_side_flow(flow: http.HTTPFlow) -> bool:
    return SIDE_FLOW in flow.metadata
