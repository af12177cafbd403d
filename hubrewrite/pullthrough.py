"""Pull-through cache mechanics: who downloads a blob, how it is written while
it streams to the client, and how waiting clients learn it is there.

One upstream fetch per digest: the first client to ask for an uncached blob
becomes its downloader (a lock in this process and, through ``flock`` on the
shared cache directory, across mirror processes); later clients wait until the
blob is committed and are then served from disk.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from mitmproxy import http

from .access import AccessMemory
from .fileserver import FileServer
from .store import BlobWriter, Store

log = logging.getLogger("hub_rewrite")

POLL_SECONDS = 0.2


class Download:
    """The right, and duty, to fetch one blob into the cache."""

    def __init__(self, cache: PullThrough, digest: str, lock_fd: int) -> None:
        self.cache = cache
        self.digest = digest
        self.lock_fd = lock_fd
        self.writer: BlobWriter | None = None
        self.finished = False

    def start_writing(self) -> BlobWriter:
        self.writer = self.cache.store.new_writer(self.digest)
        return self.writer

    def finish(self) -> bool:
        """Verify and commit what was written; release the download either way."""
        ok = self.writer.finish() if self.writer else False
        self._release()
        return ok

    def abort(self) -> None:
        if self.writer:
            self.writer.abort()
        self._release()

    def _release(self) -> None:
        if self.finished:
            return
        self.finished = True
        Store.release_lock(self.lock_fd)
        event = self.cache.inflight.pop(self.digest, None)
        if event is not None:
            event.set()


class CachingStream:
    """mitmproxy stream callable: each chunk goes to the client and to the cache.

    The last chunk is held back until the digest is verified. If it does not
    match, the flow is killed before that chunk, so the client sees a broken
    transfer instead of a complete, wrong blob.
    """

    def __init__(
        self,
        flow: http.HTTPFlow,
        download: Download,
        on_done: Callable[[bool, int], None],
        on_bytes: Callable[[int], None] = lambda n: None,
    ) -> None:
        self.flow = flow
        self.on_bytes = on_bytes
        self.download = download
        self.writer = download.start_writing()
        self.held = b""
        self.on_done = on_done

    def __call__(self, chunk: bytes) -> bytes:
        if chunk:
            self.writer.write(chunk)
            out, self.held = self.held, chunk
            self.on_bytes(len(out))
            return out
        size = self.writer.size
        if self.download.finish():
            self.on_done(True, size)
            self.on_bytes(len(self.held))
            return self.held
        self.on_done(False, size)
        if self.flow.killable:
            self.flow.kill()
        return b""


class PullThrough:
    def __init__(self, store: Store, access: AccessMemory, wait_timeout: float) -> None:
        self.store = store
        self.access = access
        self.wait_timeout = wait_timeout
        self.fileserver = FileServer(self._servable_path, store.in_use)
        # digest -> set when this process's download of it ends
        self.inflight: dict[str, asyncio.Event] = {}

    def _servable_path(self, digest: str) -> str | None:
        try:
            return str(self.store.blob_path(digest))
        except ValueError:
            return None

    async def verified_blob(self, digest: str) -> bool:
        """Is a correct copy cached? (May hash the file: done in a thread.)"""
        if not self.store.has_blob(digest):
            return False
        return await asyncio.to_thread(self.store.check_blob, digest)

    def lead(self, digest: str) -> Download | None:
        """Become the downloader of this blob, or None if someone else already is."""
        if digest in self.inflight:
            return None
        fd = self.store.download_lock(digest)
        if fd is None:
            return None  # another mirror process is downloading it
        self.inflight[digest] = asyncio.Event()
        return Download(self, digest, fd)

    async def wait_for(self, digest: str) -> None:
        """Wait until the current download of this blob ends (here or in another process)."""
        deadline = time.monotonic() + self.wait_timeout
        event = self.inflight.get(digest)
        if event is not None:
            try:
                await asyncio.wait_for(event.wait(), self.wait_timeout)
            except TimeoutError:
                pass
            return
        while time.monotonic() < deadline and not self.store.has_blob(digest):
            fd = self.store.download_lock(digest)
            if fd is not None:  # nobody holds it any more
                Store.release_lock(fd)
                return
            await asyncio.sleep(POLL_SECONDS)
