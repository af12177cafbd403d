"""The mirror's own server on a loopback port, where mitmproxy fetches what the
mirror serves itself with a streamed body.

A client flow the mirror serves is pointed here from ``requestheaders`` on:
whatever mitmproxy does by itself before the ``request`` hook (streaming a large
or chunked request body, for one) can only ever reach the mirror, never an
upstream. Then the flow is either answered by the addon, retargeted upstream
(a CDN, a push), or left here for:

- ``/blobs/<digest>``: a cached blob, or one being downloaded (followed);
- ``/manifests/<digest>``: a large cached manifest, streamed rather than
  copied into memory for every client;
- ``/streams/<id>``: a blob sent from its source without a disk (no cache:
  ``streams.py``), taken once;
- ``/answers/<id>``: a prepared answer given after the request's body has been
  read and thrown away: a refusal, or (while flows are recorded) an answer that
  carries a credential, streamed so that its record can be redacted
  (``debug/records.py``).

Who may ask: only mitmproxy, for a flow the mirror pointed here, at the path it
pointed it at, once. Nothing in the request says so: whatever a request carries
is the flow's, which every addon, mitmweb (its websocket gets the flow right after
the ``request`` hook, before mitmproxy sends it) and saved flows see. The
connection does: mitmproxy opens it and makes it the flow's ``server_conn``, its
two addresses included, before it writes a byte of the request
(``proxy/server.py``, ``proxy/layers/http``); a socket's two ends are unique on
the host while it is open, so a request that arrives on a connection whose ends
are a pointed flow's ``server_conn``'s comes from mitmproxy, for that flow. A
request on any other connection (a local process, a client passed through the
forward proxy to this port, a replay of what a record shows) is refused.
Only ``/answers/parked`` (a flow parked with no answer of its own) is answered
to anyone: it is the same refusal for all.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from dataclasses import dataclass

from mitmproxy import http

from .util.bounded_dict import BoundedDict
from .cache.serving import BlobSender
from .cache.store import Store
from .httpserver import HttpServer, Reply, Request
from .registry.errors import error_body
from .registry.headers import decode_fields
from .streams import UNCLAIMED_SECONDS, Stream

PARKED = "parked"  # the answer of a flow that never got further than requestheaders
CLIENT_URL = "hub_client_url"  # flow.metadata: the request's URL before the mirror pointed it anywhere
MAX_POINTED = 10_000  # flows pointed here whose request has not arrived (each is taken at once)


@dataclass(frozen=True)
class Pointed:
    """A flow the mirror pointed here, at ``path``, whose request has not arrived yet."""

    flow: http.HTTPFlow
    path: str

    def sent(self, path: str, peer, here) -> bool:
        """Is this the flow's request, sent by mitmproxy on the connection it opened for it?"""
        conn = self.flow.server_conn
        return path == self.path and _same(conn.sockname, peer) and _same(conn.peername, here)


class Loopback:
    def __init__(self) -> None:
        self.server = HttpServer(self._handle, "loopback server")
        # prepared answers, each used once: id -> (status, headers, body)
        self.answers = BoundedDict(10_000)
        self.blobs: BlobSender | None = None  # set while a cache is configured
        self.store: Store | None = None
        self.streams: dict[str, Stream] = {}  # each taken once, or closed after UNCLAIMED_SECONDS
        self.pointed = BoundedDict(MAX_POINTED)  # flow id -> Pointed

    async def start(self) -> None:
        await self.server.start("127.0.0.1", 0)

    async def stop(self) -> None:
        await self.server.stop()
        for stream_id in list(self.streams):
            self._unclaimed(stream_id)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.port}{path}"

    def point_here(self, flow: http.HTTPFlow, path: str) -> None:
        """Retarget a flow's request to this server: its request, and no other, gets ``path`` once."""
        flow.request.url = self.url(path)
        self.pointed.put(flow.id, Pointed(flow, path))

    def park(self, flow: http.HTTPFlow, answer: http.Response | None = None) -> None:
        """Point a flow here: with ``answer``, it is what the client gets once its body is drained."""
        flow.metadata.setdefault(CLIENT_URL, flow.request.url)
        if answer is None:
            self.forget(flow)
            flow.request.url = self.url(f"/answers/{PARKED}")
            return
        answer_id = secrets.token_hex(16)
        self.answers.put(answer_id, (answer.status_code, decode_fields(answer.headers.fields), answer.raw_content or b""))
        self.point_here(flow, f"/answers/{answer_id}")

    def forget(self, flow: http.HTTPFlow) -> None:
        """The flow went elsewhere, got its answer or failed: nothing here is for it any more."""
        self.pointed.pop(flow.id, None)

    def offer(self, stream: Stream) -> str:
        """The path where mitmproxy fetches this stream (once)."""
        stream_id = secrets.token_hex(16)
        self.streams[stream_id] = stream
        asyncio.get_running_loop().call_later(UNCLAIMED_SECONDS, self._unclaimed, stream_id)
        return f"/streams/{stream_id}"

    def _unclaimed(self, stream_id: str) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            stream.close()

    async def _handle(self, request: Request, reply: Reply) -> None:
        kind, _, name = request.path.lstrip("/").partition("/")
        if request.path != f"/answers/{PARKED}" and not self._sent_for_a_flow(request, reply):
            await reply.error(403, "DENIED", "not for you", request.method)
            return
        if kind == "answers":
            await reply.discard_body()
            status, headers, body = self.answers.pop(name, None) or _parked_answer()
            await reply.head(status, headers)
            if body and request.method != "HEAD":
                reply.writer.write(body)
                await reply.writer.drain()
            return
        if kind == "streams" and (stream := self.streams.pop(name, None)) is not None:
            await stream.send(request, reply)
        elif request.method not in ("GET", "HEAD") or self.blobs is None or self.store is None:
            await reply.error(404, "UNSUPPORTED", "nothing here", request.method)
        elif kind == "blobs":
            await self.blobs.send(request, reply, name)
        elif kind == "manifests":
            await self._send_manifest(request, reply, name)
        else:
            await reply.error(404, "UNSUPPORTED", "nothing here", request.method)

    def _sent_for_a_flow(self, request: Request, reply: Reply) -> bool:
        """Taken once: the request of a flow pointed here, on the connection mitmproxy opened for it."""
        peer, here = reply.writer.get_extra_info("peername"), reply.writer.get_extra_info("sockname")
        for flow_id, pointed in self.pointed.items():
            if pointed.sent(request.path, peer, here):
                del self.pointed[flow_id]
                return True
        return False

    async def _send_manifest(self, request: Request, reply: Reply, digest: str) -> None:
        assert self.store is not None
        path = self.store.manifest_path(digest)
        try:
            with open(path, "rb") as f:
                if await asyncio.to_thread(_sha256_of, f) != digest:
                    raise FileNotFoundError
                media_type = path.with_name(path.name + ".type").read_text()
                size = f.seek(0, 2)
                await reply.head(200, [("Content-Type", media_type), ("Docker-Content-Digest", digest),
                                       ("ETag", f'"{digest}"'), ("Content-Length", str(size))])
                if request.method == "GET":
                    await reply.file(f, 0, size)
        except (FileNotFoundError, ValueError):
            await reply.error(404, "MANIFEST_UNKNOWN", "manifest unknown to the cache", request.method)


def _sha256_of(f) -> str:
    f.seek(0)
    return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


def _same(address, other) -> bool:
    """The same (host, port): an IPv6 socket's address has two more items."""
    return bool(address) and bool(other) and tuple(address[:2]) == tuple(other[:2])


def _parked_answer() -> tuple[int, list[tuple[str, str]], bytes]:
    body = error_body("UNSUPPORTED", "this request must not carry a body")
    return 400, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))], body


def restore_client_url(flow: http.HTTPFlow) -> None:
    """Once a flow went where the mirror sent it, its record (mitmweb, saved flows, the log
    line mitmdump prints) shows the request as the client made it: not the loopback
    server's paths, nor a storage URL's signature."""
    url = flow.metadata.get(CLIENT_URL)
    if url is not None:
        flow.request.url = url
