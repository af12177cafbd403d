"""One upstream download per blob, followed by every client that asks for it meanwhile.

The first client to ask for an uncached blob claims its download (a lock in
this process and, through ``flock`` on the shared cache directory, across
mirror processes). The mirror then fetches the blob itself, without any
client's credentials, into ``tmp/<hex>.download``; every client asking for the
blob meanwhile, the first one included, is sent what has reached the disk so
far and follows the file as it grows (``Progress``). The last byte is held
back until the whole blob matches its digest, so a download that fails or does
not match ends every follower's transfer short: a failed transfer, never a
complete-looking wrong blob. A slow follower slows nobody, and a follower that
leaves does not stop the download.

The bytes never pass through the event loop: a download reads its source and
hashes and writes it in two threads of its own (``blobwriter.Copy``), and the
loop hears of bytes on disk seldom (``Copy.TELL_BYTES``, or ``Copy.WAKE_SECONDS``
after the first untold one: ``_on_disk``), and each time wakes the followers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from enum import Enum
from pathlib import Path

from ..util.bounded_dict import BoundedDict
from ..registry.errors import RegistryError
from ..upstream_resume import Origin, Resuming
from .bucket_errors import BucketError
from .blobwriter import Copy, Source
from .store import Store

log = logging.getLogger("hub_rewrite")

FAILED_LATELY_SECONDS = 30.0
POLL_SECONDS = 0.05  # how often a follower of another process's download looks at the file


class DownloadState(Enum):
    """Where one download is: claimed, fetching, done and verified, or given up."""

    STARTING = "starting"  # claimed; its source not handed over yet
    RUNNING = "running"
    COMMITTED = "committed"  # all of it on disk, verified, under its final name
    FAILED = "failed"  # or given up before it started

    @property
    def over(self) -> bool:
        return self in (DownloadState.COMMITTED, DownloadState.FAILED)


class Download:
    """This process's download of one blob: its state, for the followers."""

    def __init__(self, downloads: Downloads, digest: str, lock_fd: int) -> None:
        self.downloads = downloads
        self.digest = digest
        self.lock_fd = lock_fd
        self.path = downloads.store.download_path(digest)
        self.size: int | None = None
        self.written = 0
        self.state = DownloadState.STARTING
        self.mismatch = False  # all the bytes came, and they were not the blob
        self._changed = asyncio.Event()
        self._ended: list[Callable[[Download], None]] = []
        self.task: asyncio.Task | None = None
        self.resuming: Resuming | None = None  # the upstream answer, resumed after a cut

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()


    async def changed(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            pass

    async def ended(self, timeout: float) -> DownloadState:
        """The state once committed or failed, or when ``timeout`` is up."""
        deadline = time.monotonic() + timeout
        while not self.state.over and (left := deadline - time.monotonic()) > 0:
            await self.changed(left)
        return self.state

    def when_ended(self, callback: Callable[[Download], None]) -> None:
        """``callback(download)`` once it is committed or failed (the shared store uploads, or forgets)."""
        self._ended.append(callback)

    def start(self, source: Source, on_bytes: Callable[[int], None], origin: Origin | None = None) -> None:
        """Take over a source (an upstream answer with its length, or a bucket object) and fetch
        it into the store, in threads of its own (``blobwriter.Copy``); with ``origin`` (where an
        upstream answer came from), a cut answer is resumed from the byte it reached
        (``upstream_resume``). Raises OSError if the file cannot be created (the claim then fails)."""
        self.size = source.length
        writer = self.downloads.store.new_writer(self.digest)
        os.pwrite(self.lock_fd, str(self.size).encode(), 0)  # followers in other processes read it there
        self.state = DownloadState.RUNNING
        loop = asyncio.get_running_loop()
        if origin is not None:
            source = self.resuming = Resuming(source, origin, self.digest, loop)
        ended: asyncio.Future[tuple[bool, BaseException | None]] = loop.create_future()
        copy = Copy(source, writer, loop, lambda n: self._on_disk(n, on_bytes),
                    lambda committed, error: ended.done() or ended.set_result((committed, error)))
        copy.start()
        self.task = loop.create_task(self._fetch(copy, ended))
        self._notify()

    def give_up(self) -> None:
        """The claim was not used (the registry refused, the disk is full, ...); no-op once started."""
        if self.state is DownloadState.STARTING:
            self._end(DownloadState.FAILED)

    async def _fetch(self, copy: Copy, ended: asyncio.Future) -> None:
        started = time.monotonic()
        try:
            committed, error = await asyncio.shield(ended)
            if error is not None:
                self._log_failure(error)
            self._finished(committed, time.monotonic() - started)
        except asyncio.CancelledError:
            copy.cancel()  # shutdown: the threads stop and throw the file away, before the lock goes
            await ended
            raise
        finally:
            self._end(DownloadState.FAILED)  # no-op once ended; cancelled, the followers (and the locks) are let go

    def _log_failure(self, error: BaseException) -> None:
        if isinstance(error, (OSError, EOFError, RegistryError, BucketError)):
            log.warning("blob %s: download failed after %d bytes: %s", self.digest, self.written,
                        getattr(error, "message", None) or str(error) or type(error).__name__)
        elif not isinstance(error, asyncio.CancelledError):
            # a bug must not leave the download (and every follower) waiting forever
            log.error("blob %s: download failed", self.digest, exc_info=error)

    def _finished(self, committed: bool, seconds: float) -> None:
        if committed:
            resumed = self.resuming.resumes if self.resuming is not None else 0
            log.info("cached blob %s (%d bytes, %.1f s%s)", self.digest, self.written, seconds,
                     f", resumed {resumed} times" if resumed else "")
        elif self.written == self.size:
            self.mismatch = True
            log.error("blob %s from its source does not match its digest: discarded, transfers aborted", self.digest)
        self._end(DownloadState.COMMITTED if committed else DownloadState.FAILED)

    def _on_disk(self, n: int, on_bytes: Callable[[int], None]) -> None:
        """Each wake costs every follower a send: ``Copy`` tells of bytes on disk seldom already
        (per TELL_BYTES, or WAKE_SECONDS after the first untold one), so each tell wakes them."""
        self.written += n
        on_bytes(n)
        self._notify()

    def _end(self, state: DownloadState) -> None:
        if self.state.over:
            return
        if state is DownloadState.FAILED and self.state is DownloadState.RUNNING:
            self.downloads.failed.put(self.digest, time.monotonic())
        self.state = state
        self.downloads.store.release_download_lock(self.digest, self.lock_fd)
        self.downloads.running.pop(self.digest, None)
        self._notify()
        for callback in self._ended:
            callback(self)


class Downloads:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.running: dict[str, Download] = {}  # digest -> this process's download
        self.failed = BoundedDict(1000)  # digest -> when a download of it failed here

    def failed_lately(self, digest: str) -> bool:
        """A download of this blob failed here moments ago: a follower sent to it just too late
        is told so (502), not that the blob is unknown."""
        when = self.failed.get(digest)
        return when is not None and time.monotonic() - when < FAILED_LATELY_SECONDS

    def claim(self, digest: str) -> Download | None:
        """Become the downloader of a blob, or None if someone (here or in another process) is.
        Raises OSError when the lock file cannot be created (no space or inode left: serve
        without caching)."""
        if digest in self.running:
            return None
        fd = self.store.download_lock(digest)
        if fd is None:
            return None
        os.ftruncate(fd, 0)
        download = self.running[digest] = Download(self, digest, fd)
        return download

    def progress(self, digest: str) -> Progress | None:
        """How to follow a download of this blob in progress here or in another process."""
        download = self.running.get(digest)
        if download is not None:
            return LocalProgress(download)
        if self.store.download_locked(digest):
            return ForeignProgress(self.store, digest)
        return None

    async def close(self) -> None:
        """Cancel the downloads running here, and wait until each has let its file and lock go."""
        tasks = [d.task for d in list(self.running.values()) if d.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Progress:
    """A download as a follower sees it."""

    path: Path

    async def size(self, timeout: float) -> int | None:
        """The blob's size once the download has started; None if it ended without starting."""
        raise NotImplementedError

    def readable(self) -> int:
        """Bytes a follower may send now: what reached the disk, all of it only once verified."""
        raise NotImplementedError

    def failed(self) -> bool:
        raise NotImplementedError

    async def wait(self) -> None:
        """Until more may be readable (or the download ended)."""
        raise NotImplementedError


class LocalProgress(Progress):
    def __init__(self, download: Download) -> None:
        self.download = download
        self.path = download.path

    async def size(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while self.download.state is DownloadState.STARTING and time.monotonic() < deadline:
            await self.download.changed(deadline - time.monotonic())
        return self.download.size

    def readable(self) -> int:
        d = self.download
        if d.state is DownloadState.COMMITTED:
            return d.written
        return max(0, min(d.written, (d.size or 0) - 1))

    def failed(self) -> bool:
        return self.download.state is DownloadState.FAILED

    async def wait(self) -> None:
        await self.download.changed(1.0)


class ForeignProgress(Progress):
    """Another mirror process's download, seen through the shared cache directory."""

    def __init__(self, store: Store, digest: str) -> None:
        self.store = store
        self.digest = digest
        self.path = store.download_path(digest)
        self._size: int | None = None

    async def size(self, timeout: float) -> int | None:
        lock = self.store.download_lock_path(self.digest)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.store.download_locked(self.digest):
                return None
            text = _read_text(lock)
            if text.isdigit():
                self._size = int(text)
                return self._size
            await asyncio.sleep(POLL_SECONDS)
        return None

    def _committed(self) -> bool:
        return self.store.blob_size(self.digest) == self._size

    def readable(self) -> int:
        if self._committed():
            return self._size or 0
        try:
            on_disk = self.path.stat().st_size
        except FileNotFoundError:
            on_disk = 0
        return max(0, min(on_disk, (self._size or 0) - 1))

    def failed(self) -> bool:
        return not self._committed() and not self.store.download_locked(self.digest)

    async def wait(self) -> None:
        await asyncio.sleep(POLL_SECONDS)


def _read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return ""

