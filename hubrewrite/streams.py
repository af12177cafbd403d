"""A blob sent to one client straight from its source, without a disk: the mirror's own
transfer where there is no cache, so that a cut is resumed and the client sees one 200.

Without ``hub_cache_dir`` mitmproxy used to relay a blob from the CDN itself, and a
connection cut in the middle failed the client's transfer. Now the registry's redirect is
opened by the download engine as for the cache (``upstream_bodies``, resumed by
``upstream_resume.Resuming``) and read and hashed by ``blobwriter.Copy``'s two threads; instead
of a file, ``PipeWriter`` hands each buffer to the event loop, where the loopback server sends
it on mitmproxy's request for ``/streams/<id>`` (``loopback.py``). Memory stays bounded: the
copy's three buffers, ``PipeWriter.DEPTH`` buffers handed over, and what the socket holds. As
for followers of a download, the last byte is held back until the whole blob matched its
digest: a transfer that fails, or whose bytes are not the blob, ends short (a failed transfer,
never a complete-looking wrong blob).

A stream is made in the request hook (its answer's head is in: the client gets a registry
error, not a broken 200, when the source refuses) and taken by the loopback server moments
later; one that nobody takes within ``UNCLAIMED_SECONDS`` (its client went away) is closed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from collections.abc import Callable

from .cache.blobwriter import Copy
from .httpserver import Reply, Request
from .upstream_bodies import Body
from .upstream_resume import Origin, Resuming

log = logging.getLogger("hub_rewrite")

UNCLAIMED_SECONDS = 30.0
_END = object()


class PipeWriter:
    """``Copy``'s writer for a stream (its writing thread calls ``write`` and ``finish``): hashes
    each buffer and hands a copy of it to the event loop, at most ``DEPTH`` at a time; the last
    byte only once the whole blob matched its digest."""

    DEPTH = 2
    WAIT = 0.2  # how often a writer waiting for room looks whether the client went away

    def __init__(self, digest: str, size: int, loop: asyncio.AbstractEventLoop) -> None:
        algorithm, _, self.hex = digest.partition(":")
        self.hasher = hashlib.new(algorithm)
        self.size, self.seen, self.loop = size, 0, loop
        self.chunks: asyncio.Queue = asyncio.Queue()  # bytes, then _END or the error that ended it
        self.closed = False  # the client went away: nothing more is taken
        self._room = threading.Semaphore(self.DEPTH)
        self._last = b""

    def write(self, chunk: memoryview) -> None:
        self.hasher.update(chunk)
        self.seen += len(chunk)
        if self.seen == self.size:
            self._last, chunk = bytes(chunk[-1:]), chunk[:-1]  # held back until verified
        if chunk:
            self._hand(bytes(chunk))  # a copy: Copy reuses its buffer, asyncio keeps what it could not send yet

    def finish(self) -> bool:
        if self.seen != self.size or self.hasher.hexdigest() != self.hex:
            return False
        self._hand(self._last)
        return True

    def abort(self) -> None:
        pass  # nothing to throw away: the loop ends the answer when Copy says so

    def taken(self) -> None:
        """From the loop: a chunk went into the client's socket."""
        self._room.release()

    def _hand(self, data: bytes) -> None:
        while not self._room.acquire(timeout=self.WAIT):
            if self.closed:
                break
        if self.closed:
            raise ConnectionAbortedError("the client went away")
        self.loop.call_soon_threadsafe(self.chunks.put_nowait, data)


class Stream:
    """One client's blob from its source; made on the loop in the request hook."""

    def __init__(self, body: Body, origin: Origin, digest: str, headers: list[tuple[str, str]],
                 on_bytes: Callable[[int], None]) -> None:
        self.loop = asyncio.get_running_loop()
        self.source = Resuming(body, origin, digest, self.loop)  # made here: its resumes are this client's side flows
        self.digest, self.headers, self.on_bytes = digest, headers, on_bytes
        self.size = self.source.length
        self.taken = False
        self._ended = False

    def close(self) -> None:
        """Never sent (its client went away): the source's connection is let go."""
        if not self.taken:
            self.taken = True
            self.source.close()

    async def send(self, request: Request, reply: Reply) -> None:
        self.taken = True
        if request.method != "GET":
            self.source.close()
            await reply.head(200, [*self.headers, ("Content-Length", str(self.size))])
            return
        writer = PipeWriter(self.digest, self.size, self.loop)
        copy = Copy(self.source, writer, self.loop, self.on_bytes, lambda committed, error: self._ended_with(
            writer, committed, error))
        copy.start()
        try:
            await reply.head(200, [*self.headers, ("Content-Length", str(self.size))])
            if not await self._pump(writer, reply):
                reply.abort()  # short of Content-Length: the client sees a failed transfer
        finally:
            writer.closed = True
            if not self._ended:
                copy.cancel()  # the client went away: so does the source

    async def _pump(self, writer: PipeWriter, reply: Reply) -> bool:
        while (item := await writer.chunks.get()) is not _END:
            if isinstance(item, BaseException):
                return False
            reply.writer.write(item)
            writer.taken()
            await reply.writer.drain()
        return True

    def _ended_with(self, writer: PipeWriter, committed: bool, error: BaseException | None) -> None:
        self._ended = True
        if committed:
            if self.source.resumes:
                log.info("blob %s streamed (%d bytes, resumed %d times)", self.digest, self.size, self.source.resumes)
            writer.chunks.put_nowait(_END)
            return
        if error is None:
            log.error("blob %s from its source does not match its digest: transfer aborted", self.digest)
        elif not isinstance(error, (ConnectionAbortedError, asyncio.CancelledError)):
            log.warning("blob %s: streamed transfer failed after %d bytes: %s", self.digest, writer.seen,
                        str(error) or type(error).__name__)
        writer.chunks.put_nowait(error or ValueError("digest mismatch"))
