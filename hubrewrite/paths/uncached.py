"""A whole blob GET without a cache: the mirror's own transfer from the registry's redirect,
sent through the loopback server (``streams.py``) instead of relayed by mitmproxy, so that a
connection cut in the middle is resumed (``upstream_resume``) and the client sees one 200
whose bytes were checked against the digest before its last byte went out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from mitmproxy import http

from ..cache.serving import blob_headers
from ..client_request import ClientRequest, Retarget, Transfer, TransferSource
from ..loopback import Loopback
from ..streams import Stream
from .origins import Reprobe, open_source, storage_error
from .parts import Upstreams

if TYPE_CHECKING:
    from .blobs import Probe


async def stream(request: ClientRequest, upstreams: Upstreams, loopback: Loopback, probe: Probe,
                 reprobe: Reprobe) -> http.Response | Retarget | None:
    """The client's answer, or None where the source gives no length (chunked): relayed as before."""
    digest = request.route.reference
    opened = await open_source(upstreams, digest, probe, request.headers, reprobe, "blob streamed to the client")
    if isinstance(opened, http.Response):
        return opened
    body, origin = opened
    if body.status != 200:
        body.close()
        return storage_error(digest, body.status, body.reason)
    if body.length is None:
        body.close()
        return None
    kept = probe.kept or []
    on_bytes = upstreams.metrics.bytes_fetched.labels(request.upstream.base).inc
    path = loopback.offer(Stream(body, origin, digest, blob_headers(digest), on_bytes))
    request.flow.comment += f"; blob streamed from {urlsplit(origin.url).hostname} by the mirror"
    return Retarget(path, Transfer(digest, kept, TransferSource.STREAM), loopback=True)
