"""The blob listener (``hub_blob_listen``): blob bytes straight from the kernel.

With it on, a blob request the mirror has authorized is answered with a 307 to
a signed URL here, as Docker Hub redirects to its CDN, and this server sends
the content-addressed file with ``sendfile``: no Python in the byte path, no
mitmproxy relay. It serves nothing but verified blobs (and downloads in
progress, followed until verified) to requests whose signature holds, and
logs no signature.

It is a public port like the main one, bounded the same way (``httpserver.py``):
its share of the open files, heads within ``hub_max_head_bytes`` and
``hub_head_timeout``, an answer left unread for ``tcp_timeout``; a request with a
body is refused and the connection closed.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable

from ..connlimits import ClosedLog
from ..httpserver import HttpServer, Reply, Request, ServerLimits
from ..registry.names import DIGEST_RE
from .serving import BlobSender
from .signing import BlobUrlSigner

log = logging.getLogger("hub_rewrite")

PATH_PREFIX = "/blobs/"


class BlobListener:
    def __init__(self, signer: BlobUrlSigner, blobs: BlobSender, counted: Callable[[str, int], None],
                 limits: Callable[[], ServerLimits]) -> None:
        self.signer = signer
        self.blobs = blobs
        self.counted = counted  # (source, bytes): mitmproxy never sees these bytes
        self.server = HttpServer(self._handle, "blob listener", limits, ClosedLog("blob listener "))

    async def start_on(self, sock: socket.socket, tls: ssl.SSLContext | None) -> None:
        await self.server.start_on(sock, tls)
        host, port = sock.getsockname()[:2]
        log.info("hub_rewrite: blob listener at %s://%s:%d", "https" if tls else "http", host, port)

    async def stop(self) -> None:
        await self.server.stop()

    def location(self, base_url: str, digest: str) -> str:
        """Where a client is sent for a blob: ``base_url`` is hub_blob_url, or the mirror's host with our port."""
        return f"{base_url.rstrip('/')}{PATH_PREFIX}{digest}?{self.signer.query(digest)}"

    async def _handle(self, request: Request, reply: Reply) -> None:
        digest = request.path.rpartition(PATH_PREFIX)[2] if PATH_PREFIX in request.path else ""
        if request.method not in ("GET", "HEAD"):
            await reply.error(405, "UNSUPPORTED", "the blob listener serves GET and HEAD", request.method)
        elif request.has_body:
            await reply.error(400, "UNSUPPORTED", "this request must not carry a body", request.method)
        elif not DIGEST_RE.fullmatch(digest) or not digest.startswith("sha256:"):
            await reply.error(404, "BLOB_UNKNOWN", "not a blob", request.method)
        elif not self.signer.verify(digest, request.query.get("expires", ""), request.query.get("signature", "")):
            await reply.error(403, "DENIED", "missing, expired or invalid signature", request.method)
        else:
            await self.blobs.send(request, reply, digest, self.counted)
