"""Blob bodies read by a thread with a blocking socket, for the cache's downloads.

Over TLS an asyncio client is handed a body one TLS record at a time (16 KiB:
65,548 pieces per GiB, measured), and every piece costs a trip through the
event loop and, to reach a writer thread, a thread hop (about 170 µs here):
that was the whole cost of a cold blob. A download instead runs in threads of
its own (``cache/downloads.py``): this module's ``Body.readinto`` fills a large
buffer with ``recv_into`` on a blocking socket, and no Python runs per record on
the event loop.

HTTP/1.1, GET only, no redirects (the caller validated the URL: a registry of
the upstream table or the storage its redirect named). TLS is verified with the
mirror's own context (``upstream_client.make_ssl_context``). Connections are
kept alive and pooled per (scheme, host, port) across downloads and clients, so
a small blob costs one round trip, not a TCP and TLS handshake; at most
``max_connections`` are open at once, idle ones included. A ``start`` offset
asks for the rest of a blob (``Range``), for downloads that resume.
"""

from __future__ import annotations

import asyncio
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import h11

MAX_HEAD_BYTES = 64 * 1024  # a response head larger than this is refused
# an idle pooled connection older than this is closed, not reused: below the 60 s after which
# common load balancers close idle connections (a request racing such a close fails)
IDLE_SECONDS = 30.0
IDLE_PER_HOST = 8  # idle connections kept per host
# with bytes in hand, a body's socket waits at most this long for more before they go on to
# the disk (and followers); the timeout is changed (a syscall) twice per buffer, not per receive
POLL_SECONDS = 0.01
USER_AGENT = "hub-rewrite"
_NOT_SENT = frozenset({"host", "accept-encoding", "range", "content-length", "connection"})

Key = tuple[str, str, int]  # scheme, host, port


class BodyError(OSError):
    """The exchange broke (the peer closed, a malformed answer, no free connection)."""


class Interrupter:
    """Unblocks a thread's socket from another thread (the event loop): shutdown, not
    close, so the reading thread gets an error and closes it itself."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self.interrupted = False

    def watch(self, sock: socket.socket | None) -> None:
        with self._lock:
            self._sock = sock
            if self.interrupted and sock is not None:
                _shutdown(sock)

    def interrupt(self) -> None:
        with self._lock:
            self.interrupted = True
            if self._sock is not None:
                _shutdown(self._sock)


def _shutdown(sock: socket.socket) -> None:
    try:
        # the plain socket's shutdown: SSLSocket.shutdown would drop its SSL object under the reading thread
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass  # not connected (yet): the thread's next step fails on the flag or its own timeout


@dataclass
class Body:
    """An answer whose head has arrived; its body is read with ``readinto`` (in one thread),
    then ``close`` hands a wholly read connection back to the pool."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    length: int | None  # Content-Length, None if absent (chunked answers are never read here)
    sock: socket.socket
    pool: Pool
    key: Key
    timeout: float
    interrupter: Interrupter
    reusable: bool
    leftover: bytearray = field(default_factory=bytearray)  # body bytes that came with the head
    consumed: int = 0
    closed: bool = False
    broken: OSError | None = None  # the connection failed after bytes in hand: raised by the next read

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)

    def readinto(self, view: memoryview, flush_after: float) -> int:
        """Body bytes into ``view``, blocking: until it is full, the body is complete, or
        ``flush_after`` seconds after its first byte came (a slow upstream's bytes still go on);
        0 once the body is complete. Raises OSError: TimeoutError when the upstream sends nothing
        for the client timeout, BodyError when it closed early or was interrupted; a failure after
        bytes came in this call returns them first and is raised by the next call (so a resume
        starts after every byte received).

        The loop runs once per TLS record (16 KiB): it is kept to a receive and a clock read."""
        if self.broken is not None:
            raise self.broken
        limit = min(len(view), (self.length if self.length is not None else 1 << 62) - self.consumed)
        filled = min(limit, len(self.leftover))
        if filled:
            view[:filled] = self.leftover[:filled]
            del self.leftover[:filled]
        receive, clock, sock = self.sock.recv_into, time.monotonic, self.sock
        first = clock() if filled else None
        # nothing in hand: wait as long as the upstream may stay silent; bytes in hand: go on soon
        sock.settimeout(POLL_SECONDS if filled else self.timeout)
        while filled < limit:
            try:
                n = receive(view[filled:limit])
            except TimeoutError:
                if first is None:
                    raise  # silent for the client timeout
                break  # POLL_SECONDS without more: the bytes in hand go on now
            except OSError as e:
                if not filled:
                    raise
                self.broken = e  # the bytes in hand go on: a resume starts after them
                break
            if not n:
                closed = BodyError("the upstream closed the connection before the end of the body")
                if not filled:
                    raise closed
                self.broken = closed
                break
            filled += n
            if first is None:
                first = clock()
                sock.settimeout(POLL_SECONDS)
            elif clock() - first >= flush_after:
                break
        self.consumed += filled
        return filled

    def interrupt(self) -> None:
        """From any thread: a blocked ``readinto`` fails at once."""
        self.interrupter.interrupt()

    def close(self) -> None:
        """Back to the pool if the body was read whole and the connection may be reused."""
        if self.closed:
            return
        self.closed = True
        whole = self.length is not None and self.consumed == self.length and not self.leftover and not self.broken
        if whole and self.reusable and not self.interrupter.interrupted:
            self.interrupter.watch(None)  # a late interrupt must not reach the connection in its next use
            self.pool.put(self.key, self.sock)
        else:
            self.pool.discard(self.sock)


class Pool:
    """Open connections per host, idle ones kept for reuse; at most ``limit`` open at once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open = 0
        self._closed = False
        self._idle: dict[Key, list[tuple[socket.socket, float]]] = {}
        self._changed = threading.Condition()

    def take(self, key: Key, timeout: float) -> socket.socket | None:
        """An idle live connection to ``key``, else None with a slot reserved for a new one
        (an idle connection elsewhere is closed for it if need be). Raises BodyError when no
        slot frees up within ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                idle = self._idle.get(key, [])
                while idle:
                    sock, since = idle.pop()
                    if time.monotonic() - since < IDLE_SECONDS and _alive(sock):
                        return sock
                    self._close(sock)
                if self._open < self.limit or self._close_any_idle():
                    self._open += 1
                    return None
                if not self._changed.wait(deadline - time.monotonic()):
                    raise BodyError("no connection to the upstream free in time")

    def put(self, key: Key, sock: socket.socket) -> None:
        with self._changed:
            if self._closed:
                self._close(sock)
                return
            idle = self._idle.setdefault(key, [])
            idle.append((sock, time.monotonic()))
            if len(idle) > IDLE_PER_HOST:
                self._close(idle.pop(0)[0])
            self._changed.notify()

    def discard(self, sock: socket.socket | None) -> None:
        """A connection (or a reserved slot: None) that will not be reused."""
        with self._changed:
            if sock is None:
                self._open -= 1
            else:
                self._close(sock)
            self._changed.notify()

    def _close_any_idle(self) -> bool:
        for idle in self._idle.values():
            if idle:
                self._close(idle.pop(0)[0])
                return True
        return False

    def _close(self, sock: socket.socket) -> None:
        self._open -= 1
        try:
            sock.close()
        except OSError:
            pass

    def close(self) -> None:
        with self._changed:
            self._closed = True
            for idle in self._idle.values():
                while idle:
                    self._close(idle.pop()[0])


def _alive(sock: socket.socket) -> bool:
    """An idle connection is fit for a request when nothing is readable on it (a close or
    stray bytes would be)."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return False
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    try:
        return not poller.poll(0)
    except OSError:
        return False


class BodyFetcher:
    """Blocking GETs of blob bodies; every method runs in the calling (non-loop) thread."""

    def __init__(self, tls: ssl.SSLContext, timeout: float, max_connections: int) -> None:
        self.tls = tls
        self.timeout = timeout
        self.pool = Pool(max_connections)

    def open(self, url: str, headers: list[tuple[str, str]], interrupter: Interrupter, start: int = 0) -> Body:
        """Send the request and read the answer's head. A pooled connection that turns out
        closed is replaced by a new one, once. Raises OSError (ssl.SSLError, TimeoutError, BodyError)."""
        parts = urlsplit(url)
        scheme, host = parts.scheme, parts.hostname or ""
        port = parts.port or (443 if scheme == "https" else 80)
        key = (scheme, host, port)
        target, fields = _request_fields(parts, headers, start)
        while True:
            sock = self.pool.take(key, self.timeout)
            fresh = sock is None
            try:
                if fresh:
                    sock = self._connect(key, interrupter)
                return self._exchange(key, sock, fields, target, interrupter)
            except OSError:
                self.pool.discard(sock)
                if fresh or interrupter.interrupted:
                    raise
                # a pooled connection the upstream had closed meanwhile: the next one gets the request
            except BaseException:
                self.pool.discard(sock)
                raise

    def _connect(self, key: Key, interrupter: Interrupter) -> socket.socket:
        scheme, host, port = key
        sock = None
        try:
            for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
                sock = socket.socket(family, kind, proto)
                interrupter.watch(sock)
                sock.settimeout(self.timeout)
                try:
                    sock.connect(address)
                    break
                except OSError:
                    sock.close()
                    sock = None
                    if interrupter.interrupted:
                        raise
            if sock is None:
                raise BodyError(f"no address of {host} accepted a connection")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if scheme == "https":
                sock = self.tls.wrap_socket(sock, server_hostname=host)
                interrupter.watch(sock)
            return sock
        except BaseException:
            if sock is not None:
                sock.close()
            raise

    def _exchange(self, key: Key, sock: socket.socket, fields: list[tuple[str, str]], target: str,
                  interrupter: Interrupter) -> Body:
        interrupter.watch(sock)
        if interrupter.interrupted:
            raise BodyError("interrupted")
        parser = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        try:
            request = _encode(parser, target, fields)
            sock.settimeout(self.timeout)
            sock.sendall(request)
            head = _next_response(parser, sock)
            leftover = bytearray()
            while isinstance(event := parser.next_event(), h11.Data):
                leftover += event.data
        except h11.ProtocolError as e:
            raise BodyError(f"HTTP/1.1 exchange with the upstream failed: {e}") from e
        fields = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in head.headers.raw_items()]
        return Body(head.status_code, head.reason.decode("latin-1"), fields, _content_length(head), sock, self.pool,
                    key, self.timeout, interrupter, head.http_version == b"1.1" and _keeps_alive(head), leftover)

    def close(self) -> None:
        self.pool.close()


def _request_fields(parts, headers: list[tuple[str, str]], start: int) -> tuple[str, list[tuple[str, str]]]:
    """The request's target and header fields: the caller's, without credentials in the URL,
    compression (the bytes must be the blob's) or a client's Range."""
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host = parts.netloc.rpartition("@")[2]  # never the userinfo
    fields = [("Host", host)] + [(k, v) for k, v in headers if k.lower() not in _NOT_SENT]
    if not any(k.lower() == "user-agent" for k, _ in fields):
        fields.append(("User-Agent", USER_AGENT))
    if start:
        fields.append(("Range", f"bytes={start}-"))
    return target, fields


def _encode(parser: h11.Connection, target: str, fields: list[tuple[str, str]]) -> bytes:
    """The request's bytes, checked by h11 (no header a client could smuggle a line into)."""
    encoded = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in fields]
    return parser.send(h11.Request(method="GET", target=target.encode("latin-1"), headers=encoded)) + \
        parser.send(h11.EndOfMessage())


def _next_response(parser: h11.Connection, sock: socket.socket) -> h11.Response:
    while True:
        event = parser.next_event()
        if event is h11.NEED_DATA:
            parser.receive_data(sock.recv(65536))
        elif isinstance(event, h11.Response):
            return event
        elif not isinstance(event, h11.InformationalResponse):
            raise BodyError(f"unexpected answer from the upstream: {type(event).__name__}")


def _content_length(head: h11.Response) -> int | None:
    if any(k == b"transfer-encoding" for k, _ in head.headers):
        return None
    values = [v for k, v in head.headers if k == b"content-length"]
    return int(values[0]) if values and values[0].isdigit() else None


def _keeps_alive(head: h11.Response) -> bool:
    tokens = {t.strip().lower() for k, v in head.headers if k == b"connection" for t in v.split(b",")}
    return b"close" not in tokens


async def in_thread(work: Callable[[], Body], interrupter: Interrupter) -> Body:
    """``work()`` in a thread of its own (not the loop's small default executor: a download
    holds its thread for as long as it runs); cancelled, the socket is interrupted and a
    result that still comes is closed."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Body] = loop.create_future()

    def settle(result: Body | None, error: BaseException | None) -> None:
        if future.cancelled():
            if result is not None:
                result.close()
        elif error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        result, error = None, None
        try:
            result = work()
        except BaseException as e:  # handed to the awaiting coroutine
            error = e
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop is closed (shutdown): nobody waits
            if result is not None:
                result.close()

    threading.Thread(target=run, name="blob-open", daemon=True).start()
    try:
        return await future
    except asyncio.CancelledError:
        interrupter.interrupt()
        raise
