"""The cache as one object: its tiers in their order, written once.

A blob is looked for on this process's disk (verified), then in a download in
progress (here, or by another process on this disk), then in the bucket every
process shares (``hub_store_url``); what none of them has is fetched from the
upstream by the request paths (``paths/blobs.py``, which alone talk to
registries), into this cache, once: ``claim_blob`` makes the asker the one
downloader, here and among the processes sharing the bucket. Manifests and
records (a tag's lookups, a repository's membership) are looked for nearest
first and kept in the nearer tiers once found farther; what is kept is written
through to every tier. Both stores implement ``tier.Tier``, so a new tier
takes its place in ``tiers`` and these orders hold for it.

Cached content goes to a client only once the upstream confirmed that client
may read that repository, and that the repository holds the digest; those
confirmations (``AccessMemory``, the membership records) are kept here too, by
the asker's identity. Nothing here knows a flow, a client request or the mirror.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from ..access.confirmations import AccessMemory
from ..observe.metrics import Metrics
from ..upstream_resume import Origin
from .blobwriter import Source
from .digests import sha256_of_bytes
from .downloads import Download, DownloadState, Downloads
from .shared import SharedStore
from .store import Store, TagEntry
from .tier import BlobStat, Tier

log = logging.getLogger("hub_rewrite")

WAIT_FOR_OTHERS = 600.0  # seconds a request waits for another process's download to reach the bucket
KEEP_LOCK_EVERY = 30.0  # seconds between two refreshes of a download's lock in the bucket
CLAIM_ATTEMPTS = 3  # a claim lost to a download that then failed is tried again, this often

T = TypeVar("T")


@dataclass(frozen=True)
class Asker:
    """Who asks for cached content, and of which repository: what access is remembered by."""

    upstream: str  # the registry's base URL
    repository: str  # as the upstream names it
    identity: str  # the client's credentials (access/confirmations.client_identity)
    authorization: str | None = None  # its token, whose lifetime a confirmation lasts


# ---- what a blob lookup finds -------------------------------------------------

@dataclass(frozen=True)
class Local:
    """Verified on this disk."""

    size: int


@dataclass(frozen=True)
class Following:
    """Being downloaded into this disk (here, or by another process): clients follow the file."""


@dataclass(frozen=True)
class InBucket:
    """In the shared bucket, not on this disk."""

    stat: BlobStat


@dataclass(frozen=True)
class Miss:
    """In no tier: the upstream has it, or not."""


@dataclass(frozen=True)
class Claimed:
    """In no tier, and the asker is now its one downloader: it starts ``download`` (then
    ``publish_when_done``) or lets the claim go with ``release``."""

    download: Download
    bucket_locked: bool = False  # the other processes sharing the bucket wait for this download


@dataclass(frozen=True)
class NoRoom:
    """In no tier, and this disk cannot take even a download's lock file (no space or inode)."""


Found = Local | Following | InBucket
BlobLookup = Found | Miss


class TieredCache:
    def __init__(self, store: Store, downloads: Downloads, access: AccessMemory, metrics: Metrics,
                 shared: SharedStore | None = None) -> None:
        self.store = store
        self.downloads = downloads
        self.access = access
        self.metrics = metrics
        self.shared = shared
        self.tiers: tuple[Tier, ...] = (store,) if shared is None else (store, shared)

    # ---- blobs ------------------------------------------------------------------

    async def find_blob(self, digest: str) -> BlobLookup:
        """Where the blob is, nearest first."""
        stat = await self.store.blob(digest)
        if stat is not None:
            return Local(stat.size)
        if self.downloads.progress(digest) is not None:
            return Following()
        if self.shared is not None and (stat := await self.shared.blob(digest)) is not None:
            return InBucket(stat)
        return Miss()

    def has_blob(self, digest: str) -> bool:
        """On this disk (not verified yet)."""
        return self.store.has_blob(digest)

    def being_fetched(self, digest: str) -> bool:
        return self.downloads.progress(digest) is not None

    async def claim_blob(self, digest: str, wait_for_others: bool = True) -> Found | Miss | Claimed | NoRoom:
        """Become the one downloader of a blob no tier has, or find where it went meanwhile
        (someone here claimed it first; another process downloaded it into the bucket, waited
        for unless ``wait_for_others`` is False: then a Miss)."""
        for _ in range(CLAIM_ATTEMPTS):
            try:
                download = self.downloads.claim(digest)
            except OSError:
                return NoRoom()  # no space or inode for its lock: not cached
            if download is not None and self.store.has_blob(digest):
                download.give_up()  # committed by a download that ended meanwhile
                download = None
            if download is not None:
                locked = await self._lock_in_bucket(digest, wait_for_others)
                if locked is not None:
                    return Claimed(download, locked)
                download.give_up()
                if not wait_for_others:
                    return Miss()
            found = await self.find_blob(digest)
            if not isinstance(found, Miss):
                return found
        return Miss()

    async def _lock_in_bucket(self, digest: str, wait_for_others: bool) -> bool | None:
        """True: the bucket's download lock is held; False: no bucket, or it is failing (download
        here, without the other processes); None: another process downloads it (waited for)."""
        if self.shared is None:
            return False
        taken = await self.shared.lock(digest)
        if taken is None:
            return False
        if taken:
            return True
        if wait_for_others:
            log.info("blob %s is being downloaded by another mirror process: waiting for the bucket", digest)
            await self.shared.wait_for(digest, WAIT_FOR_OTHERS)
        return None

    def release(self, claimed: Claimed) -> None:
        """A claimed download that was not started: its locks go (no-op once started)."""
        if claimed.download.state is DownloadState.STARTING and claimed.bucket_locked:
            self.shared.unlock_later(claimed.download.digest)
        claimed.download.give_up()

    def publish_when_done(self, download: Download) -> None:
        """A started download from upstream goes up to the bucket once verified; its bucket lock
        is kept while it runs, then let go."""
        if self.shared is not None:
            _publish_when_done(self.shared, self.store, download)

    async def fill_from_bucket(self, digest: str, stat: BlobStat) -> Download | None:
        """Read a blob from the bucket into this disk (clients follow it, verified like any
        download); None: it cannot be now (already being read here: follow that one)."""
        try:
            download = self.downloads.claim(digest)
        except OSError:
            return None  # no space or inode for its lock
        if download is None:
            return None
        source = await self.shared.open(digest) if self.store.has_room_for(stat.size) else None
        if source is None:
            download.give_up()
            return None
        if not self.start(download, source, lambda n: None):
            await asyncio.to_thread(source.close)
            download.give_up()
            return None
        download.when_ended(lambda d: _read_ended(self.shared, d, source.etag))
        self.metrics.tier_hits.labels("shared").inc()
        return download

    def has_room_for(self, size: int | None) -> bool:
        return self.store.has_room_for(size)

    def start(self, download: Download, source: Source, on_bytes: Callable[[int], None],
              origin: Origin | None = None) -> bool:
        """Hand a claimed download its source (``origin``: where it resumes after a cut); False: its
        file cannot be created (noted: the disk's problem shows in health and metrics)."""
        try:
            download.start(source, on_bytes, origin)
        except OSError as e:
            self.store.note_problem(e)
            return False
        return True

    def use_blob(self, digest: str) -> int | None:
        """The blob's size on this disk, marked as just used; None: not (or no longer) there."""
        self.store.touch(digest)
        return self.store.blob_size(digest)

    def small_blob(self, digest: str) -> bytes | None:
        """The bytes of a (small) blob on this disk, if they are still its digest's."""
        try:
            body = self.store.blob_path(digest).read_bytes()
        except FileNotFoundError:
            return None  # evicted meanwhile
        return body if sha256_of_bytes(body) == digest else None

    async def presigned_url(self, digest: str, found: Found) -> str | None:
        """A URL of the bucket's object a client may be sent to (``hub_store_presign``), if the
        object is one this process may hand out unread."""
        shared = self.shared
        if shared is None or not shared.presign_seconds or isinstance(found, Following):
            return None
        stat = found.stat if isinstance(found, InBucket) else await shared.blob(digest)
        if stat is None or not await shared.presignable(digest, stat):
            return None
        self.metrics.tier_hits.labels("shared").inc()
        return shared.presigned(digest, stat)

    # ---- manifests ---------------------------------------------------------------

    def has_manifest(self, digest: str) -> bool:
        return self.store.has_manifest(digest)

    async def manifest_here(self, digest: str) -> int | None:
        """The manifest's size on this disk, brought from a farther tier if need be (and marked
        as just used); None: in no tier."""
        if not self.store.has_manifest(digest):
            await self._first(lambda tier: tier.manifest(digest), lambda tier, found: tier.put_manifest(digest, *found),
                              start=1)
        size = self.store.manifest_size(digest)
        if size is not None:
            self.store.touch_manifest(digest)
        return size

    def manifest(self, digest: str) -> tuple[str, bytes] | None:
        """(media type, bytes) from this disk, verified."""
        return self.store.get_manifest(digest)

    def keep_manifest(self, digest: str, media_type: str, body: bytes) -> bool:
        """Kept in every tier if its bytes are the digest; False: not kept."""
        return all(tier.put_manifest(digest, media_type, body) for tier in self.tiers)

    # ---- tags: which digest a tag named, for each Accept ---------------------------

    def keep_tag(self, upstream: str, repository: str, tag: str, accept: str, digest: str, media_type: str) -> None:
        record = self.store.put_tag(upstream, repository, tag, accept, digest, media_type)
        if record:
            for tier in self.tiers[1:]:
                tier.put_record(Store.tag_record(upstream, repository, tag), record)

    async def tag_entries_anywhere(self, upstream: str, repository: str, tag: str) -> dict[str, TagEntry]:
        """A tag this process never resolved may have been resolved by another one (stale mode)."""
        if not self.store.tag_entries(upstream, repository, tag):
            await self._record(Store.tag_record(upstream, repository, tag))
        return self.store.tag_entries(upstream, repository, tag)

    def has_anything_for(self, upstream: str, repository: str, reference: str, is_digest: bool) -> bool:
        """Could a tier answer for this reference (so that a HEAD upstream might spare a GET)?
        A bucket is only asked once the digest is known."""
        if self.shared is not None:
            return True
        if is_digest:
            return self.store.has_manifest(reference)
        return bool(self.store.tag_entries(upstream, repository, reference))

    # ---- who may read what -----------------------------------------------------------

    @property
    def stale_seconds(self) -> float:
        return self.access.stale_seconds

    def confirm(self, asker: Asker, digest: str, member: bool = True) -> None:
        """The upstream just let this asker read this digest of this repository; ``member``:
        remember that the repository holds it (for content a tier holds: a record per request
        for content none holds would only fill the disk)."""
        self.access.confirm(asker.identity, asker.authorization, asker.upstream, asker.repository)
        if member:
            key = Store.member_record(asker.upstream, asker.repository, digest)
            for tier in self.tiers:
                if not tier.put_record(key, b""):
                    break

    def known(self, asker: Asker, digest: str) -> bool:
        """Confirmed before, for this asker's token, and the repository holds the digest."""
        return (self.access.allowed(asker.identity, asker.upstream, asker.repository)
                and self.store.is_member(asker.upstream, asker.repository, digest))

    def known_stale(self, asker: Asker, digest: str) -> bool:
        """Confirmed within the stale window (the upstream is unavailable), and held by the repository."""
        return (self.access.allowed_stale(asker.identity, asker.upstream, asker.repository)
                and self.store.is_member(asker.upstream, asker.repository, digest))

    async def known_stale_anywhere(self, asker: Asker, digest: str) -> bool:
        """``known_stale``, with the repository's membership looked up in every tier (another
        process may have seen it)."""
        if not self.store.is_member(asker.upstream, asker.repository, digest):
            await self._record(Store.member_record(asker.upstream, asker.repository, digest))
        return self.known_stale(asker, digest)

    # ---- the order, written once -------------------------------------------------------

    async def _record(self, key: str) -> bytes | None:
        return await self._first(lambda tier: tier.record(key), lambda tier, found: tier.put_record(key, found))

    async def _first(self, read: Callable[[Tier], Awaitable[T | None]], keep: Callable[[Tier, T], object],
                     start: int = 0) -> T | None:
        """What the nearest tier from ``start`` on has, kept in the tiers nearer than it."""
        for i in range(start, len(self.tiers)):
            found = await read(self.tiers[i])
            if found is not None:
                for nearer in self.tiers[:i]:
                    keep(nearer, found)
                return found
        return None


def _read_ended(shared: SharedStore, download: Download, etag: str) -> None:
    """A wrong object is removed; a right one, read whole and verified, may be handed out (presigned)."""
    if download.mismatch:
        shared.forget(download.digest)
    elif download.state is DownloadState.COMMITTED:
        shared.verified_read(download.digest, etag)


def _publish_when_done(shared: SharedStore, store: Store, download: Download) -> None:
    """Keep the bucket lock while the download runs; once verified, upload, then let go."""
    digest = download.digest

    async def keep_lock() -> None:
        # wakes when the download ends, not KEEP_LOCK_EVERY later: shutdown waits for this task
        while await download.ended(KEEP_LOCK_EVERY) is DownloadState.RUNNING:
            await shared.keep_lock(digest)

    async def publish() -> None:
        with store.keeping(digest):  # not evicted while it goes up
            try:
                await shared.upload(digest, store.blob_path(digest))
            finally:
                shared.unlock_later(digest)

    def ended(d: Download) -> None:
        if d.state is DownloadState.COMMITTED:
            shared.later(publish())
        else:
            shared.unlock_later(digest)

    shared.later(keep_lock())
    download.when_ended(ended)
