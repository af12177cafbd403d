"""A blob being downloaded into the store: written to tmp/<hex>.download, committed only if verified."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from .digests import hex_of

if TYPE_CHECKING:
    from .store import Store


class BlobWriter:
    """Writes a blob being downloaded; commits it only if complete and verified."""

    def __init__(self, store: Store, digest: str) -> None:
        self.store = store
        self.digest = digest
        self.hex = hex_of(digest)
        self.path = store.download_path(digest)
        # unbuffered: every byte counted as written is in the file for followers to read
        self.file = open(self.path, "wb", buffering=0)
        self.hasher = hashlib.sha256()
        self.size = 0
        self.done = False

    def write(self, chunk: bytes) -> None:
        """Raises OSError when the disk refuses (full): the download then fails."""
        view = memoryview(chunk)
        try:
            while view:
                view = view[self.file.write(view):]
        except OSError as e:
            self.store.note_problem(e)
            raise
        self.hasher.update(chunk)
        self.size += len(chunk)

    def finish(self) -> bool:
        """Verify and commit; False (and nothing kept) if the bytes do not match the digest."""
        if self.done:
            return False
        self.done = True
        try:
            self.file.close()
        except OSError as e:
            self.store.note_problem(e)
            self.path.unlink(missing_ok=True)
            return False
        if self.hasher.hexdigest() != self.hex:
            self.path.unlink(missing_ok=True)
            return False
        return self.store.commit_blob(self.path, self.hex)

    def abort(self) -> None:
        if self.done:
            return
        self.done = True
        try:
            self.file.close()
        except OSError:
            pass  # the bytes are thrown away anyway
        self.path.unlink(missing_ok=True)


class WriteBehind:
    """A download's disk writes and hashing in a thread of their own, up to DEPTH
    chunks behind the network reads.

    Writing a new file is the costliest step of a cold blob: every page of it is
    fresh page cache, and on a virtual machine a fresh page can cost more than
    the network read of it. In the event loop that cost stopped the reads (and
    every other flow); here the loop keeps reading while the thread writes.
    One thread per download keeps the chunks in order; ``written(n)`` runs in the
    loop once n more bytes are on disk, so followers never see bytes not written.
    """

    DEPTH = 4  # chunks in flight: at most DEPTH x the read size in memory

    def __init__(self, writer: BlobWriter, written: Callable[[int], None]) -> None:
        self.writer = writer
        self.written = written
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="blob-write")
        self.slots = asyncio.Semaphore(self.DEPTH)
        self.error: BaseException | None = None

    async def write(self, chunk: bytes) -> None:
        """Queue a chunk; raises the error of an earlier write (OSError: the disk refused)."""
        await self.slots.acquire()
        if self.error is not None:
            self.slots.release()
            raise self.error
        future = asyncio.get_running_loop().run_in_executor(self.thread, self.writer.write, chunk)
        future.add_done_callback(lambda f: self._done(f, len(chunk)))

    def _done(self, future: asyncio.Future, n: int) -> None:
        self.slots.release()
        if future.cancelled() or self.error is not None:
            return
        if (error := future.exception()) is not None:
            self.error = error
        else:
            self.written(n)

    async def finish(self) -> bool:
        """After the queued writes: verify and commit (BlobWriter.finish); raises a write's error."""
        loop = asyncio.get_running_loop()
        committed = await loop.run_in_executor(self.thread, self.writer.finish)
        if self.error is not None:
            raise self.error
        return committed

    async def abort(self) -> None:
        """After the queued writes: throw the file away (no-op once finished or aborted)."""
        try:
            if not self.writer.done:  # set only in the thread, after every write queued before
                await asyncio.shield(asyncio.get_running_loop().run_in_executor(self.thread, self.writer.abort))
        finally:
            self.thread.shutdown(wait=False)  # queued work still runs, then the thread ends
