"""A blob being downloaded into the store: written to tmp/<hex>.download, committed only if verified."""

from __future__ import annotations

import asyncio
import hashlib
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

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

    def write(self, chunk: bytes | memoryview) -> None:
        """Raises OSError when the disk refuses (full): the download then fails."""
        view = memoryview(chunk)
        self.hasher.update(view)
        try:
            while view:
                view = view[self.file.write(view):]
        except OSError as e:
            self.store.note_problem(e)
            raise
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


class Source(Protocol):
    """A blob's bytes as a download's threads read them: an upstream answer
    (``upstream_bodies.Body``) or an object of the shared bucket (``shared.BucketSource``)."""

    length: int

    def readinto(self, view: memoryview, flush_after: float) -> int:
        """Bytes into ``view``, blocking: until it is full, the source ends, or ``flush_after``
        seconds after the first byte came; 0 at the end."""

    def interrupt(self) -> None:
        """From any thread: a blocked readinto fails at once."""

    def close(self) -> None:
        """After the last read (in the reading thread)."""


_END, _CANCEL = object(), object()


class Copy:
    """A download's bytes from its source into its ``BlobWriter``, in two threads of its own:
    one reads (over TLS: receives and decrypts) into 1 MiB buffers, the other hashes and writes
    them, so both cores work and the event loop runs no Python per network read. The loop is
    told of bytes once they are on disk (``written(n)``, through ``call_soon_threadsafe``:
    followers never see bytes not written) and once at the end (``ended(committed, error)``).

    A buffer goes to the writer when full, or WAKE_SECONDS after its first byte came (a slow
    source still reaches followers within that time). At most DEPTH buffers per download.
    The loop hears of TELL_BYTES at once, or of what is on disk WAKE_SECONDS after the first
    of it was written: each time it is told, every follower makes a ``sendfile`` and the loop
    runs some Python (about 0.2 CPU s per GiB when told of every MiB, measured), so a fast
    download tells it seldom and a slow one still within WAKE_SECONDS.
    """

    BUFFER = 1 << 20
    DEPTH = 3
    WAKE_SECONDS = 0.02
    TELL_BYTES = 8 << 20

    def __init__(self, source: Source, writer: BlobWriter, loop: asyncio.AbstractEventLoop,
                 written: Callable[[int], None], ended: Callable[[bool, BaseException | None], None]) -> None:
        self.source, self.writer, self.loop = source, writer, loop
        self.written, self.ended = written, ended
        self.size = source.length
        self._full: queue.SimpleQueue = queue.SimpleQueue()  # (buffer, n), _END, _CANCEL or an error, in order
        self._free: queue.SimpleQueue = queue.SimpleQueue()  # empty buffers; None: the writer stopped
        for _ in range(self.DEPTH):
            self._free.put(bytearray(min(self.BUFFER, max(self.size, 1))))
        self._stopped = False

    def start(self) -> None:
        threading.Thread(target=self._read, name="blob-read", daemon=True).start()
        threading.Thread(target=self._write, name="blob-write", daemon=True).start()

    def cancel(self) -> None:
        """From the loop: the source is interrupted and the file thrown away (``ended`` follows)."""
        self._stopped = True
        self._full.put(_CANCEL)
        self.source.interrupt()

    def _read(self) -> None:
        received = 0
        try:
            while received < self.size and not self._stopped:
                buffer = self._free.get()
                if buffer is None:
                    return  # the writer stopped
                n = self._fill(memoryview(buffer), self.size - received)
                received += n
                self._full.put((buffer, n))
            self._full.put(_END)
        except BaseException as e:  # handed to the writer, which ends the download with it
            self._full.put(e)
        finally:
            self.source.close()

    def _fill(self, view: memoryview, left: int) -> int:
        n = self.source.readinto(view[:min(len(view), left)], self.WAKE_SECONDS)
        if n == 0:
            raise EOFError(f"the source ended {left} bytes short of {self.size}")
        return n

    def _write(self) -> None:
        untold, since = 0, 0.0  # bytes on disk the loop has not heard of, since when
        try:
            while (item := self._next(untold, since)) is not _END:
                if item is None:  # WAKE_SECONDS since the first untold byte
                    self._tell(self.written, untold)
                    untold = 0
                    continue
                if item is _CANCEL or self._stopped:
                    raise asyncio.CancelledError()
                if isinstance(item, BaseException):
                    raise item
                buffer, n = item
                self.writer.write(memoryview(buffer)[:n])
                self._free.put(buffer)
                if not untold:
                    since = time.monotonic()
                untold += n
                if untold >= self.TELL_BYTES:
                    self._tell(self.written, untold)
                    untold = 0
            if untold:
                self._tell(self.written, untold)
            self._tell(self.ended, self.writer.finish(), None)
        except BaseException as e:
            self._stopped = True
            self.source.interrupt()
            self._free.put(None)
            self.writer.abort()
            self._tell(self.ended, False, e)

    def _next(self, untold: int, since: float) -> object:
        """The next item from the reader; None when bytes are untold and WAKE_SECONDS passed
        since the first of them was written, before another item came."""
        if not untold:
            return self._full.get()
        left = since + self.WAKE_SECONDS - time.monotonic()
        try:
            return self._full.get(timeout=left) if left > 0 else None
        except queue.Empty:
            return None

    def _tell(self, callback: Callable, *args: object) -> None:
        try:
            self.loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            pass  # the loop is closed (shutdown): the file is thrown away all the same
