"""The bucket behind the local cache directory (``hub_store_url``): what every mirror process shares.

The local directory stays the staging area and the first tier: a blob is
verified on local disk, then uploaded (multipart, streamed from the file). A
process missing a blob locally looks in the bucket (one HEAD) before going
upstream, and fills its local tier from it while its clients follow, or sends
them to a presigned URL of the object (``hub_store_presign``: only objects
whose ETag this process verified, or a mark made with a key the bucket does
not hold vouches for; see ``presignable``). Manifests, tag
records and repository membership are written through. A bucket that fails is
noted (health, metrics, one log line per problem) and the mirror goes on with
its local tier and the upstream.

boto3 is synchronous: every call runs in a thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from ..util.bounded_dict import BoundedDict
from ..observe.metrics import Metrics
from .bucket import BlobStream, Bucket
from .bucket_errors import BucketError
from .signing import BlobMarkSigner
from .tier import BlobStat

log = logging.getLogger("hub_rewrite")

KNOWN_FOR = 300.0  # seconds a blob found in the bucket is taken to still be there
HEALTH_FOR = 5.0  # seconds a reachability check stands
LOCK_TTL = 120.0  # seconds a download lock lasts unless refreshed (refreshed while downloading)
CLOSE_WAIT = 30.0  # seconds shutdown waits for uploads and other writes to the bucket


class BucketSource:
    """An object being read from the bucket, as a Download's threads read a source
    (``blobwriter.Source``): boto3 is synchronous, so it runs in the download's reading thread."""

    def __init__(self, stream: BlobStream) -> None:
        self.stream = stream
        self.length = stream.length
        self.etag = stream.etag  # of the object read: verified once the download commits
        self._chunks = iter(stream)
        self._pending = memoryview(b"")

    def readinto(self, view: memoryview, flush_after: float) -> int:
        if not self._pending:
            self._pending = memoryview(next(self._chunks, b""))
        n = min(len(view), len(self._pending))
        view[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def interrupt(self) -> None:
        try:
            self.stream.close()  # the reading thread's next read fails
        except Exception:  # noqa: BLE001 - whatever boto3 raises closing a stream in use
            pass

    def close(self) -> None:
        self.stream.close()


class SharedStore:
    def __init__(self, bucket: Bucket, presign_seconds: int, metrics: Metrics) -> None:
        self.bucket = bucket
        self.presign_seconds = presign_seconds  # 0: the mirror serves the bytes itself
        self.metrics = metrics
        self._known = BoundedDict(100_000)  # digest -> (BlobStat, when found)
        # digest -> the ETag of its object as this process verified it (uploaded it, read it
        # whole, or checked its mark): what may be handed out unread, while unchanged
        self._verified = BoundedDict(100_000)
        self._marks: BlobMarkSigner | None = None  # see use_mark_key
        self._health: tuple[float, bool, str] = (0.0, True, "not checked yet")
        self._problem: str | None = None
        self._background: set[asyncio.Task] = set()
        self._deleting: dict[str, asyncio.Task] = {}  # digest -> delete of a wrong object, still running

    async def _call(self, what: str, kind: str, function, *args):
        """A bucket call in a thread; None (and a noted problem) if the bucket fails."""
        try:
            result = await asyncio.to_thread(function, *args)
        except BucketError as e:
            self.metrics.store_errors.labels(what).inc()
            if str(e) != self._problem:
                log.warning("hub_rewrite: shared store: %s", e)
            self._problem = str(e)
            return None
        self.metrics.store_requests.labels(what, kind).inc()
        self._problem = None
        return result

    # ---- blobs -----------------------------------------------------------

    async def blob(self, digest: str) -> BlobStat | None:
        """The blob in the bucket (one HEAD, remembered for a while once found)."""
        known = self._known.get(digest)
        if known is not None and time.monotonic() - known[1] < KNOWN_FOR:
            return known[0]
        await self._deleted(digest)
        stat = await self._call("read", "blob-head", self.bucket.stat_blob, digest)
        if stat is not None:
            self._known.put(digest, (stat, time.monotonic()))
        return stat

    async def open(self, digest: str) -> BucketSource | None:
        stream = await self._call("read", "blob", self.bucket.open_blob, digest)
        return BucketSource(stream) if stream is not None else None

    def presigned(self, digest: str, stat: BlobStat) -> str:
        """Made locally (boto3 signs without asking the store): it cannot fail on the network.
        Where the bucket keeps versions, for the version checked only."""
        self.metrics.store_presigned.inc()
        return self.bucket.presigned_blob_url(digest, self.presign_seconds, stat.version)

    # ---- which objects may be handed out unread ----------------------------------

    def use_mark_key(self, key: bytes | None) -> None:
        """The key of the marks this process writes and trusts; None when the key is kept in the
        bucket itself: whoever can write to the bucket can read it and mark anything."""
        self._marks = None if key is None else BlobMarkSigner(key)

    async def presignable(self, digest: str, stat: BlobStat) -> bool:
        """May the object be handed out without reading it (a presigned URL)? Only if its ETag is
        one this process verified, or one a mark made with a key the bucket does not hold vouches
        for: a copy of the object's metadata onto other bytes has another ETag."""
        if stat.etag and self._verified.get(digest) == stat.etag:
            return True
        if self._marks is None or not stat.marked or not stat.etag:
            return False
        mark = await self._call("read", "blob-mark", self.bucket.get_blob_mark, digest)
        if mark is None or not self._marks.verify(digest, stat.size, stat.etag, mark):
            return False
        self._verified.put(digest, stat.etag)
        return True

    def verified_read(self, digest: str, etag: str) -> None:
        """This process read the whole object and it matched its digest."""
        if etag:
            self._verified.put(digest, etag)

    def forget(self, digest: str) -> None:
        """A blob the bucket was found to hold wrongly (it did not match): removed, looked up anew."""
        self._known.pop(digest, None)
        self._verified.pop(digest, None)
        if digest not in self._deleting:
            task = self.later(self._call("write", "blob-delete", self.bucket.delete_blob, digest))
            self._deleting[digest] = task
            task.add_done_callback(lambda _: self._deleting.pop(digest, None))

    async def _deleted(self, digest: str) -> None:
        # A lookup or an upload waits for the wrong object's delete: else a retry finds
        # it again, or the delete lands after the good upload and removes that.
        if (task := self._deleting.get(digest)) is not None:
            await asyncio.wait({task})

    async def upload(self, digest: str, path: Path) -> None:
        """A blob just verified on local disk goes up (unless a mirror stored it already), and is
        remembered (and marked) as verified with the ETag the store gave it."""
        stat = await self.blob(digest)
        if stat is not None and stat.marked:
            return  # an object without the mirror's metadata is replaced, not trusted
        try:
            stored = await self._call("write", "blob", self.bucket.upload_blob, digest, path)
        except (OSError, ValueError) as e:  # the local file went away, or changed: the next miss uploads it
            log.warning("hub_rewrite: blob %s not uploaded to the shared store: %s", digest, e)
            stored = None
        self._known.pop(digest, None)
        if stored is not None and stored.etag:
            self._verified.put(digest, stored.etag)
            if self._marks is not None:
                mark = self._marks.mark(digest, stored.size, stored.etag)
                await self._call("write", "blob-mark", self.bucket.put_blob_mark, digest, mark)

    # ---- manifests and records ---------------------------------------------------

    async def manifest(self, digest: str) -> tuple[str, bytes] | None:
        return await self._call("read", "manifest", self.bucket.get_manifest, digest)

    def put_manifest(self, digest: str, media_type: str, body: bytes) -> bool:
        """Written in the background (the bucket checks the digest too)."""
        self.later(self._call("write", "manifest", self.bucket.put_manifest, digest, media_type, body))
        return True

    async def record(self, key: str) -> bytes | None:
        return await self._call("read", "record", self.bucket.get_object, key)

    def put_record(self, key: str, body: bytes) -> bool:
        """Written in the background, over any older one."""
        self.later(self._call("write", "record", self.bucket.put_object, key, body))
        return True

    # ---- one download per blob across processes ---------------------------------

    async def lock(self, digest: str) -> bool | None:
        """Take the blob's download lock: True, False (another process has it), None (bucket failing)."""
        return await self._call("write", "lock", self.bucket.locks.try_lock, _lock_name(digest), LOCK_TTL)

    async def keep_lock(self, digest: str) -> None:
        await self._call("write", "lock", self.bucket.locks.refresh_lock, _lock_name(digest), LOCK_TTL)

    def unlock_later(self, digest: str) -> None:
        self.later(self._call("write", "lock", self.bucket.locks.release_lock, _lock_name(digest)))

    async def wait_for(self, digest: str, timeout: float) -> BlobStat | None:
        """Until another process's download of the blob is in the bucket (or its lock is gone)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stat = await self.blob(digest)
            if stat is not None:
                return stat
            if await self.lock(digest):  # the other process gave up: the lock is ours now
                self.unlock_later(digest)
                return None
            await asyncio.sleep(0.5)
        return None

    # ---- operations -----------------------------------------------------------

    async def health(self) -> tuple[bool, str]:
        checked, ok, text = self._health
        if time.monotonic() - checked > HEALTH_FOR:
            ok, text = await asyncio.to_thread(self.bucket.check_reachable)
            self._health = (time.monotonic(), ok, text)
        return ok, text

    def describe(self) -> str:
        config = self.bucket.config
        where = f"s3://{config.bucket}/{config.prefix}".rstrip("/")
        return where + (f", {self._problem}" if self._problem else "")

    def later(self, work) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def close(self) -> None:
        """After the background work, also what that work started meanwhile (an upload's unlock), up to CLOSE_WAIT."""
        deadline = time.monotonic() + CLOSE_WAIT
        while self._background and (left := deadline - time.monotonic()) > 0:
            await asyncio.wait(set(self._background), timeout=left)
        await asyncio.to_thread(self.bucket.close)


def _lock_name(digest: str) -> str:
    return "download-" + digest.replace(":", "-")
