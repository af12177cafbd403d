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

Blobs and manifests are served only to requests carrying this process's key (a
header mitmproxy adds to the retargeted request, never a URL, so no log shows
it). A prepared answer needs no key: its id is random, used once, and known
only to the flow it was made for; so a parked flow carries no key while
mitmweb first shows it (from ``requestheaders`` on).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets

from mitmproxy import http

from .util.bounded_dict import BoundedDict
from .cache.serving import BlobSender
from .cache.store import Store
from .httpserver import HttpServer, Reply, Request
from .registry.errors import error_body
from .registry.headers import decode_fields
from .streams import UNCLAIMED_SECONDS, Stream

KEY_HEADER = "X-Hub-Loopback-Key"
PARKED = "parked"  # the answer of a flow that never got further than requestheaders
CLIENT_URL = "hub_client_url"  # flow.metadata: the request's URL before the mirror pointed it anywhere


class Loopback:
    def __init__(self) -> None:
        self.key = secrets.token_hex(16)
        self.server = HttpServer(self._handle, "loopback server")
        # prepared answers, each used once: id -> (status, headers, body)
        self.answers = BoundedDict(10_000)
        self.blobs: BlobSender | None = None  # set while a cache is configured
        self.store: Store | None = None
        self.streams: dict[str, Stream] = {}  # each taken once, or closed after UNCLAIMED_SECONDS

    async def start(self) -> None:
        await self.server.start("127.0.0.1", 0)

    async def stop(self) -> None:
        await self.server.stop()
        for stream_id in list(self.streams):
            self._unclaimed(stream_id)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.port}{path}"

    def point_here(self, request: http.Request, path: str) -> None:
        """Retarget a flow's request to this server, with the key."""
        request.url = self.url(path)
        request.headers[KEY_HEADER] = self.key

    def park(self, flow: http.HTTPFlow, answer: http.Response | None = None) -> None:
        """Point a flow here: with ``answer``, it is what the client gets once its body is drained."""
        flow.metadata.setdefault(CLIENT_URL, flow.request.url)
        answer_id = PARKED
        if answer is not None:
            answer_id = secrets.token_hex(16)
            self.answers.put(answer_id, (answer.status_code, decode_fields(answer.headers.fields), answer.raw_content or b""))
        flow.request.url = self.url(f"/answers/{answer_id}")
        flow.request.headers.pop(KEY_HEADER, None)

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
        if kind != "answers" and not hmac.compare_digest(request.headers.get(KEY_HEADER.lower(), ""), self.key):
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


def _parked_answer() -> tuple[int, list[tuple[str, str]], bytes]:
    body = error_body("UNSUPPORTED", "this request must not carry a body")
    return 400, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))], body


def restore_client_url(flow: http.HTTPFlow) -> None:
    """Once a flow went where the mirror sent it, its record (mitmweb, saved flows, the log
    line mitmdump prints) shows the request as the client made it: never the loopback
    server's key, nor a storage URL's signature."""
    url = flow.metadata.get(CLIENT_URL)
    if url is not None:
        flow.request.url = url
    flow.request.headers.pop(KEY_HEADER, None)
