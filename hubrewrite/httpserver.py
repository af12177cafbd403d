"""A small HTTP/1.1 server inside mitmproxy's event loop, for what the mirror
serves itself with a streamed body: cached blobs (``sendfile``), blobs being
downloaded, and answers to requests whose body must be drained first.

mitmproxy buffers any response an addon makes, so a blob cannot be answered
from a hook without holding it in memory; a flow retargeted to this server (or
a client redirected to it) is streamed instead. It reads one request head at a
time with a size and time limit and never buffers a body.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl

from .registry.errors import error_body

log = logging.getLogger("hub_rewrite")

MAX_HEAD = 16384
TLS_BLOCK = 1 << 20  # bytes read per thread hop where TLS rules sendfile out
HEAD_TIMEOUT = 30.0
REASONS = {200: "OK", 206: "Partial Content", 307: "Temporary Redirect", 400: "Bad Request", 403: "Forbidden",
           404: "Not Found", 405: "Method Not Allowed", 411: "Length Required", 413: "Content Too Large",
           416: "Range Not Satisfiable", 502: "Bad Gateway", 503: "Service Unavailable"}


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names; a repeated header keeps its first value

    @property
    def keep_alive(self) -> bool:
        return self.headers.get("connection", "").lower() != "close"


class Reply:
    """The connection a handler answers on."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def head(self, status: int, headers: list[tuple[str, str]]) -> None:
        lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}"] + [f"{k}: {v}" for k, v in headers]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await self.writer.drain()

    async def whole(self, status: int, headers: list[tuple[str, str]], body: bytes, method: str = "GET") -> None:
        await self.head(status, [*headers, ("Content-Length", str(len(body)))])
        if body and method != "HEAD":
            self.writer.write(body)
            await self.writer.drain()

    async def error(self, status: int, code: str, message: str, method: str = "GET") -> None:
        await self.whole(status, [("Content-Type", "application/json"),
                                  ("Docker-Distribution-API-Version", "registry/2.0")],
                         error_body(code, message), method)

    async def file(self, file, offset: int, count: int) -> None:
        """``count`` bytes of an open file from ``offset``: sendfile where the transport allows it."""
        await self.writer.drain()
        if self.writer.get_extra_info("ssl_object") is None:
            await asyncio.get_running_loop().sendfile(self.writer.transport, file, offset, count)
            return
        # Under TLS the bytes must pass through Python to be encrypted. asyncio's own fallback
        # reads 16 KiB per thread hop (11 CPU s per GiB here); a block of TLS_BLOCK per hop
        # costs a fraction of that, and at most one block is held per connection.
        fd = file.fileno()
        while count > 0:
            block = await asyncio.to_thread(os.pread, fd, min(count, TLS_BLOCK), offset)
            if not block:
                raise ConnectionAbortedError("the file is shorter than the answer announced")
            self.writer.write(block)
            await self.writer.drain()
            offset += len(block)
            count -= len(block)

    def abort(self) -> None:
        """End the connection mid-answer: the client sees a failed transfer."""
        self.writer.transport.abort()


Handler = Callable[[Request, Reply], Awaitable[None]]


async def read_head(reader: asyncio.StreamReader) -> Request | None:
    """The next request head, or None at the end of the connection. Raises ValueError if malformed."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
    except (asyncio.IncompleteReadError, TimeoutError):
        return None
    except asyncio.LimitOverrunError as e:
        raise ValueError("request head too large") from e
    lines = head.decode("latin-1").split("\r\n")
    try:
        method, target, _ = lines[0].split(" ", 2)
    except ValueError as e:
        raise ValueError("malformed request line") from e
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers.setdefault(name.strip().lower(), value.strip())
    path, _, query = target.partition("?")
    return Request(method, path, dict(parse_qsl(query)), headers)


async def drain_body(reader: asyncio.StreamReader, request: Request) -> None:
    """Read and discard a request's body (Content-Length or chunked), so the
    connection stays in step and the client gets its answer."""
    if "chunked" in request.headers.get("transfer-encoding", "").lower():
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                    pass
                return
            await _discard(reader, size + 2)
    length = request.headers.get("content-length", "0").strip()
    await _discard(reader, int(length) if length.isdigit() else 0)


async def _discard(reader: asyncio.StreamReader, count: int) -> None:
    while count > 0:
        chunk = await reader.read(min(count, 1 << 16))
        if not chunk:
            raise asyncio.IncompleteReadError(b"", count)
        count -= len(chunk)


class HttpServer:
    def __init__(self, handler: Handler, name: str) -> None:
        self.handler = handler
        self.name = name
        self.server: asyncio.base_events.Server | None = None
        self.port = 0
        self._starting = asyncio.Lock()

    async def start(self, host: str, port: int) -> None:
        """Start listening, once: concurrent callers wait for the first one."""
        async with self._starting:
            if self.server is None:
                self.server = await asyncio.start_server(self._serve, host, port, limit=MAX_HEAD)
                self.port = self.server.sockets[0].getsockname()[1]

    async def start_on(self, sock, tls: ssl.SSLContext | None = None) -> None:
        """Serve on a socket already bound and listening."""
        async with self._starting:
            if self.server is None:
                self.server = await asyncio.start_server(self._serve, sock=sock, ssl=tls, limit=MAX_HEAD)
                self.port = sock.getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reply = Reply(reader, writer)
        try:
            while True:
                try:
                    request = await read_head(reader)
                except ValueError as e:
                    await reply.error(400, "UNSUPPORTED", str(e))
                    return
                if request is None:
                    return
                await self.handler(request, reply)
                if not request.keep_alive or writer.is_closing():
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ssl.SSLError, ValueError):
            pass
        except Exception:
            log.exception("%s: internal error", self.name)
        finally:
            writer.close()
