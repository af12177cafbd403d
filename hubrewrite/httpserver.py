"""A small HTTP/1.1 server inside mitmproxy's event loop, for what the mirror
serves itself with a streamed body: cached blobs (``sendfile``), blobs being
downloaded, and answers to requests whose body must be drained first.

mitmproxy buffers any response an addon makes, so a blob cannot be answered
from a hook without holding it in memory; a flow retargeted to this server (or
a client redirected to it) is streamed instead.

Requests are parsed by h11 (``httpwire.py``), one at a time, each head within
a size and a time limit; a body is never buffered, and one nobody read ends
the connection after its answer (it must never be taken for the next request).
Answers are written here: a file's bytes go from the kernel (``sendfile``) or in
large blocks (TLS), not through h11. Connections are accepted here, one at a
time, so that beyond the server's share of the open files (``connlimits.py``)
a connection is closed at once, and a TLS handshake counts against the head's
time like the head itself.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import h11

from .connlimits import ClosedLog
from .httpwire import HeadError, Incoming, Request
from .registry.errors import error_body

log = logging.getLogger("hub_rewrite")

TLS_BLOCK = 1 << 20  # bytes read per thread hop where TLS rules sendfile out
READ_SIZE = 1 << 16
# After a refusal the connection is closed; what the client still sends is read and
# dropped for a moment first, for closing with unread bytes makes the kernel reset the
# connection, which can destroy the answer before the client has read it.
LINGER_SECONDS = 2.0
LINGER_BYTES = 1 << 20
CLOSE_TIMEOUT = 5.0  # a TLS close waits this long for the client's close_notify
OUT_OF_FILES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
REASONS = {200: "OK", 206: "Partial Content", 307: "Temporary Redirect", 400: "Bad Request", 403: "Forbidden",
           404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout", 411: "Length Required",
           413: "Content Too Large", 416: "Range Not Satisfiable", 431: "Request Header Fields Too Large",
           501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable"}
__all__ = ["HttpServer", "Reply", "Request", "ServerLimits"]


@dataclass(frozen=True)
class ServerLimits:
    max_connections: int | None  # None: no limit (the loopback server: mitmproxy's own connections)
    head_timeout: float  # for the TLS handshake and a head, and between two requests
    max_head_bytes: int
    stall_timeout: float | None = None  # an answer the client leaves unread this long ends the connection


# the loopback server's: mitmproxy sends it heads it has bounded itself (guard.py)
LOOPBACK_LIMITS = ServerLimits(None, 30.0, 1 << 20)


class Reply:
    """The connection a handler answers on."""

    def __init__(self, writer: asyncio.StreamWriter, incoming: Incoming) -> None:
        self.writer = writer
        self.incoming = incoming
        self.closing = False  # the connection ends after this answer (it says so)

    async def head(self, status: int, headers: list[tuple[str, str]]) -> None:
        if self.closing or not self.incoming.body_read:
            headers = [*headers, ("Connection", "close")]  # a body left unread: nothing more is read here
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

    async def discard_body(self) -> None:
        """Read the request's body (Content-Length or chunked) and throw it away, so the
        connection stays in step and the client gets its answer."""
        await self.incoming.discard_body()

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
# what ends a connection without being the server's fault: the client, its bytes, the network
CLIENT_ENDED = (OSError, EOFError, asyncio.IncompleteReadError, ssl.SSLError, h11.RemoteProtocolError)


class HttpServer:
    def __init__(self, handler: Handler, name: str, limits: Callable[[], ServerLimits] = lambda: LOOPBACK_LIMITS,
                 closed_log: ClosedLog | None = None) -> None:
        self.handler = handler
        self.name = name
        self.limits = limits  # read for every connection: they change with the options
        self.closed_log = closed_log  # None: closed connections are not the operator's business
        self.port = 0
        self.open = 0  # connections being served
        self._sock: socket.socket | None = None
        self._own_socket = False
        self._tls: ssl.SSLContext | None = None
        self._accepting: asyncio.Task | None = None
        self._connections: set[asyncio.Task] = set()
        self._starting = asyncio.Lock()

    @property
    def running(self) -> bool:
        return self._accepting is not None

    async def start(self, host: str, port: int) -> None:
        """Start listening, once: concurrent callers wait for the first one."""
        async with self._starting:
            if self._accepting is None:
                self._own_socket = True
                self._serve_on(socket.create_server((host, port)), None)

    async def start_on(self, sock: socket.socket, tls: ssl.SSLContext | None = None) -> None:
        """Serve on a socket already bound and listening (its owner closes it)."""
        async with self._starting:
            if self._accepting is None:
                self._serve_on(sock, tls)

    def _serve_on(self, sock: socket.socket, tls: ssl.SSLContext | None) -> None:
        sock.setblocking(False)
        self._sock, self._tls, self.port = sock, tls, sock.getsockname()[1]
        self._accepting = asyncio.get_running_loop().create_task(self._accept(sock))

    async def stop(self) -> None:
        """Stop accepting; connections being served finish on their own."""
        accepting, self._accepting = self._accepting, None
        if accepting is not None:
            accepting.cancel()
            await asyncio.wait([accepting])  # its socket is no longer watched when its owner closes it
            if self._own_socket and self._sock is not None:
                self._sock.close()

    def _count(self, cause: str) -> None:
        if self.closed_log is not None:
            self.closed_log.count(cause)

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as e:
                if e.errno in OUT_OF_FILES:
                    self._count("out of open files (accepting paused for a second)")
                    await asyncio.sleep(1.0)
                elif e.errno != errno.ECONNABORTED:  # (a connection that went away before it was accepted)
                    log.warning("%s: accepting failed: %s", self.name, e)
                    await asyncio.sleep(1.0)
                continue
            limit = self.limits().max_connections
            if limit is not None and self.open >= limit:
                self._count(f"too many connections (limit {limit})")
                conn.close()
            else:
                self.open += 1
                task = loop.create_task(self._connection(conn))
                self._connections.add(task)
                task.add_done_callback(self._connections.discard)
            await asyncio.sleep(0)  # a burst of connections must not hold up everything else

    async def _connection(self, conn: socket.socket) -> None:
        limits = self.limits()
        writer = None
        try:
            if limits.stall_timeout is not None:
                # the kernel ends a connection whose data stays unacknowledged this long (a
                # client that stopped reading): sendfile has no timeout of its own
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(limits.stall_timeout * 1000))
            deadline = asyncio.get_running_loop().time() + limits.head_timeout
            reader, writer = await self._streams(conn, limits, deadline)
            await self._serve(reader, writer, limits, deadline)
        except CLIENT_ENDED:
            pass
        except Exception:
            log.exception("%s: internal error", self.name)
        finally:
            if writer is not None:
                await _close(writer)
            # else the socket went with its transport (a TLS handshake that failed)
            self.open -= 1

    async def _streams(self, conn: socket.socket, limits: ServerLimits, deadline: float):
        """The connection as asyncio streams; under TLS once the handshake is done, by ``deadline``."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=READ_SIZE, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        tls = {} if self._tls is None else {"ssl": self._tls, "ssl_handshake_timeout": limits.head_timeout,
                                            "ssl_shutdown_timeout": CLOSE_TIMEOUT}
        try:
            transport, _ = await loop.connect_accepted_socket(lambda: protocol, conn, **tls)
        except CLIENT_ENDED:
            if loop.time() >= deadline:
                self._count("TLS handshake not done in time")
            raise
        return reader, asyncio.StreamWriter(transport, protocol, reader, loop)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limits: ServerLimits,
                     deadline: float) -> None:
        """Requests one after the other, each head due by ``deadline``."""
        loop = asyncio.get_running_loop()
        incoming = Incoming(reader, limits.max_head_bytes, READ_SIZE)
        while True:
            reply = Reply(writer, incoming)
            try:
                request = await incoming.next_request(deadline)
            except HeadError as e:
                await self._refuse(reply, reader, e)
                return
            if request is None:
                return
            await self.handler(request, reply)
            if not incoming.body_read:
                await _linger(reader, writer)  # the body is not read: it must not become a request
                return
            if not incoming.keep_alive or writer.is_closing():
                return
            deadline = loop.time() + self.limits().head_timeout

    async def _refuse(self, reply: Reply, reader: asyncio.StreamReader, e: HeadError) -> None:
        self._count(e.cause)
        if e.status is None:
            return  # nothing started: closed without a word
        reply.closing = True
        await reply.error(e.status, "UNSUPPORTED", e.cause)
        await _linger(reader, reply.writer)


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """After the last answer: no more from us, and what the client still sends is dropped (a while)."""
    if not writer.can_write_eof():
        return  # TLS: the close that follows tells the client (close_notify) and waits for its own
    writer.write_eof()
    dropped = 0
    try:
        async with asyncio.timeout(LINGER_SECONDS):
            while dropped < LINGER_BYTES and (chunk := await reader.read(READ_SIZE)):
                dropped += len(chunk)
    except (TimeoutError, *CLIENT_ENDED):
        pass


async def _close(writer: asyncio.StreamWriter) -> None:
    """The connection's file is closed before it stops counting against the server's share."""
    writer.close()
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await writer.wait_closed()
    except (TimeoutError, *CLIENT_ENDED):
        writer.transport.abort()
