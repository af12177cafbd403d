"""Blobs and the shared bucket (``hub_store_url``): what ``paths/blobs.py`` asks of it.

A blob in the bucket but not on this process's disk is either handed out as a
presigned URL of the object (``hub_store_presign``; only objects whose ETag
this process verified, or that a mark made with a key the bucket does not hold
vouches for: ``SharedStore.presignable``) or read into the local tier while
clients follow it, verified like any download (a wrong object is deleted, to
be fetched upstream again; a right one is remembered as verified). A blob downloaded from upstream goes up to the bucket once
verified, under a lock in the bucket that tells the other processes to wait
for it rather than download it too.
"""

from __future__ import annotations

import asyncio
import logging

from ..cache.bucket import BlobStat
from ..cache.downloads import Download, DownloadState
from ..cache.shared import SharedStore
from ..mirror import Mirror
from ..client_request import ClientRequest
from ..responses import make_response

log = logging.getLogger("hub_rewrite")

WAIT_FOR_OTHERS = 600.0  # seconds a request waits for another process's download to reach the bucket
KEEP_LOCK_EVERY = 30.0  # seconds between two refreshes of a download's lock in the bucket


def presigned(request: ClientRequest, mirror: Mirror, headers: list[tuple[str, str]], stat: BlobStat) -> object:
    """A 307 to the object itself (as checked: ``stat``): the object store sends the bytes."""
    shared = mirror.cache.shared
    mirror.metrics.tier_hits.labels("shared").inc()
    request.flow.comment += "; blob sent to a presigned URL of the shared bucket"
    return make_response(307, [("Location", shared.presigned(request.route.reference, stat)), *headers])


async def fill_local(request: ClientRequest, mirror: Mirror, stat: BlobStat) -> Download | None:
    """Read a blob from the bucket into the local tier (clients follow it); None: it cannot be."""
    cache, digest = mirror.cache, request.route.reference
    try:
        download = cache.downloads.claim(digest)
    except OSError:
        return None  # no space or inode for its lock
    if download is None:
        return None  # already being read (or downloaded) here: follow that one
    source = await cache.shared.open(digest) if cache.store.has_room_for(stat.size) else None
    if source is None:
        download.give_up()
        return None
    try:
        download.start(source, lambda n: None)
    except OSError as e:
        await asyncio.to_thread(source.close)
        download.give_up()
        cache.store.note_problem(e)
        return None
    download.when_ended(lambda d: _read_ended(cache.shared, d, source.etag))
    mirror.metrics.tier_hits.labels("shared").inc()
    request.flow.comment += "; blob read from the shared bucket into the cache"
    return download


def _read_ended(shared: SharedStore, download: Download, etag: str) -> None:
    """A wrong object is removed; a right one, read whole and verified, may be handed out (presigned)."""
    if download.mismatch:
        shared.forget(download.digest)
    elif download.state is DownloadState.COMMITTED:
        shared.verified_read(download.digest, etag)


async def claim(mirror: Mirror, digest: str) -> bool:
    """Become the one process that downloads this blob from upstream. False: another one
    did, and the blob is in the bucket now (or that process gave up: try again)."""
    shared = mirror.cache.shared
    taken = await shared.lock(digest)
    if taken is None:
        return True  # the bucket is failing: download here, without the other processes
    if taken:
        return True
    log.info("blob %s is being downloaded by another mirror process: waiting for the bucket", digest)
    await shared.wait_for(digest, WAIT_FOR_OTHERS)
    return False


def share_when_done(mirror: Mirror, download: Download) -> None:
    """Keep the bucket lock while the download runs; once verified, upload, then let go."""
    shared, store, digest = mirror.cache.shared, mirror.cache.store, download.digest

    async def keep_lock() -> None:
        # wakes when the download ends, not KEEP_LOCK_EVERY later: shutdown waits for this task
        while await download.ended(KEEP_LOCK_EVERY) is DownloadState.RUNNING:
            await shared.keep_lock(digest)

    async def publish() -> None:
        store.in_use[digest] = store.in_use.get(digest, 0) + 1  # not evicted while it goes up
        try:
            await shared.upload(digest, store.blob_path(digest))
        finally:
            store.in_use[digest] -= 1
            if not store.in_use[digest]:
                del store.in_use[digest]
            shared.unlock_later(digest)

    def ended(d: Download) -> None:
        if d.state is DownloadState.COMMITTED:
            shared.later(publish())
        else:
            shared.unlock_later(digest)

    shared.later(keep_lock())
    download.when_ended(ended)
