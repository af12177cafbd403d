"""One image of the prefetch list into the cache, through the mirror's own fetch path.

The reference is resolved with a ``HEAD`` (Docker Hub does not count it against
the pull limit); a manifest the cache (or the shared bucket) holds is not asked
for again, so an unchanged tag costs one ``HEAD`` per check. New manifests are
fetched by digest and kept only if their bytes match it; an index's platform
manifests are those the list names (all of them when it names none); the blobs
go into the cache as a fetch ahead of a client does it (``paths/ahead.fetch_for``:
the registry's redirect followed without credentials, one download per blob
among the processes of a bucket), a few at a time. What the upstream let the
mirror's token read is remembered as a client's pull would be (``TieredCache.confirm``),
and the tag's answer for the Accept used here.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..access.confirmations import client_identity
from ..cache.tiers import Asker
from ..mirror import Mirror
from ..paths import cache_parts_of, upstreams_of
from ..paths.ahead import Fetcher, fetch_for
from ..registry.contents import contents
from ..registry.errors import RegistryError
from ..registry.mediatypes import accept_key, asks_for
from ..upstream_client import Fetched
from .listfile import Image
from .tokens import ServerTokens

# what a multi-platform client accepts: an index where the tag is one
ACCEPT = ", ".join([
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
])
PARALLEL = 3  # blob downloads of one image at once
WAIT_FOR_OTHERS = 600.0  # seconds to wait for a download someone else started


class Problem(Exception):
    """Why an image is not warm: the cause, as logged (once) and shown."""


@dataclass
class Progress:
    """One image as the status page and the metrics show it."""

    state: str = "waiting"  # waiting, checking, warm, failed, refused
    digest: str = ""
    blobs: int = 0
    cached: int = 0
    checked_at: float | None = None
    problem: str = ""


@dataclass
class Work:
    """What one check of one image works with."""

    image: Image
    mirror: Mirror
    tokens: ServerTokens
    progress: Progress
    count: Callable[[str], None]  # an upstream request of this kind

    def url(self, kind: str, reference: str) -> str:
        return self.image.upstream.url(f"/v2/{self.image.repository}/{kind}/{reference}")

    async def authorization(self) -> str | None:
        try:
            return await self.tokens.authorization(self.image.upstream, self.image.repository)
        except RegistryError as e:
            raise Problem(f"token: {e.message}") from None

    async def ask(self, kind: str, method: str, url: str, accept: str) -> tuple[Fetched, str | None]:
        """One request with the mirror's own token: (its answer, the Authorization it went with)."""
        authorization = await self.authorization()
        headers = [("Accept", accept)] + ([("Authorization", authorization)] if authorization else [])
        self.count(kind)
        try:
            fetched = await self.mirror.client.fetch(method, url, headers, purpose=f"prefetch: {kind}")
        except RegistryError as e:
            raise Problem(e.message) from None
        self.mirror.ratelimits.note(self.image.upstream.base, fetched.headers)
        return fetched, authorization

    def asker(self, authorization: str | None) -> Asker:
        return Asker(self.image.upstream.base, self.image.repository, client_identity(authorization), authorization)

    def confirm(self, authorization: str | None, digest: str) -> None:
        self.mirror.cache.tiers.confirm(self.asker(authorization), digest)


async def warm(work: Work) -> None:
    """Check the image and bring what is new into the cache. Raises Problem."""
    image, progress = work.image, work.progress
    head, authorization = await work.ask("tag check", "HEAD", work.url("manifests", image.reference), ACCEPT)
    digest = head.header("docker-content-digest")
    if head.status != 200 or not digest or not digest.startswith("sha256:"):
        raise Problem(f"the registry answered {head.status} to HEAD {image.repository}:{image.reference}")
    progress.digest = digest
    work.confirm(authorization, digest)
    body, media_type = await _manifest(work, digest, head.header("content-type") or ACCEPT)
    if ":" not in image.reference:
        _remember_tag(work, digest, media_type)
    named = contents(body, media_type)
    if named is None:
        raise Problem(f"{digest} is not an image manifest or index ({media_type})")
    blobs = {d.digest: d for d in named.blobs}
    for entry in _platform_entries(work, body, named.manifests):
        child, child_type = await _manifest(work, entry.digest, entry.media_type or ACCEPT)
        found = contents(child, child_type)
        blobs.update({d.digest: d for d in found.blobs} if found else {})
    progress.blobs, progress.cached = len(blobs), 0
    await _blobs(work, list(blobs))


async def _manifest(work: Work, digest: str, accept: str) -> tuple[bytes, str]:
    """(body, media type) of a manifest: from the cache, the bucket, or the registry by digest."""
    cache = work.mirror.cache
    # from this disk, or the bucket's kept on it (verified)
    cached = cache.tiers.manifest(digest) if await cache.tiers.manifest_here(digest) is not None else None
    if cached is None:
        fetched, authorization = await work.ask("manifest", "GET", work.url("manifests", digest), accept)
        media_type = fetched.header("content-type") or ""
        if fetched.status != 200:
            raise Problem(f"the registry answered {fetched.status} to GET of manifest {digest}")
        if not cache.tiers.keep_manifest(digest, media_type, fetched.body):
            raise Problem(f"manifest {digest} not stored: {cache.store.problem or 'its bytes do not match it'}")
        work.confirm(authorization, digest)
        cached = (media_type, fetched.body)
    return cached[1], cached[0]


def _remember_tag(work: Work, digest: str, media_type: str) -> None:
    """What the tag answers for this Accept, as a client's resolution would keep it (stale mode)."""
    cache, image = work.mirror.cache, work.image
    key = accept_key([ACCEPT])
    if key is None or not asks_for(key, media_type):
        return
    cache.tiers.keep_tag(image.upstream.base, image.repository, image.reference, key, digest, media_type)


def _platform_entries(work: Work, body: bytes, entries: list) -> list:
    """An index's platform manifests the list names (every one when it names none)."""
    wanted = work.image.platforms
    if not entries or not wanted:
        return entries
    platforms = {m.get("digest"): m.get("platform") for m in json.loads(body).get("manifests", [])
                 if isinstance(m, dict)}
    chosen = [e for e in entries if any(p.matches(platforms.get(e.digest)) for p in wanted)]
    if not chosen:
        raise Problem(f"the index names none of {', '.join(map(str, wanted))}")
    return chosen


async def _blobs(work: Work, digests: list[str]) -> None:
    """Every blob into the cache, PARALLEL at a time; Problem if some did not come."""
    slots = asyncio.Semaphore(PARALLEL)
    missing: list[str] = []

    async def one(digest: str) -> None:
        async with slots:
            if await _fetched(work, digest):
                work.progress.cached += 1
            else:
                missing.append(digest)

    await asyncio.gather(*(one(d) for d in digests))
    if missing:
        raise Problem(f"{len(missing)} of {len(digests)} blobs not cached (the first: {missing[0]})")


async def _fetched(work: Work, digest: str) -> bool:
    """Is the blob in the cache (or the bucket) once fetched, if need be?"""
    cache = work.mirror.cache
    authorization = await work.authorization()
    if not cache.tiers.has_blob(digest):
        work.count("blob")
        fetcher = Fetcher(work.image.upstream, work.asker(authorization),
                          [("Authorization", authorization)] if authorization else [], ("prefetch", ""))
        await fetch_for(fetcher, upstreams_of(work.mirror), cache_parts_of(work.mirror), digest)
    deadline = time.monotonic() + WAIT_FOR_OTHERS
    while cache.tiers.being_fetched(digest) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)  # a client's download of it, or another process's on a shared directory
    shared = cache.shared
    # another process's download of it, under its lock in the bucket: until it is there
    present = cache.tiers.has_blob(digest) or (shared is not None and (
        await shared.blob(digest) or await shared.wait_for(digest, WAIT_FOR_OTHERS)))
    if present:
        work.confirm(authorization, digest)  # the manifest this token read names it: the repository holds it
    return bool(present)
