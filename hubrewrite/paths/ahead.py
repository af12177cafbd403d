"""Fetching ahead of a client: once it got a manifest, what it asks for next goes into the cache.

An image manifest names its config and layers: each one not cached, nor being
downloaded, is asked of the registry with the client's own credentials and,
where the registry redirects, downloaded into the cache as the client's own
request would do it (``blobs.probe_registry``, ``blobs.start_download``), in
parallel, so that the client's requests find the blobs there or arriving. A
cached one this client was not confirmed for yet is confirmed (a ``HEAD`` with
its token) as its own request would. An index names one manifest per platform:
their layers are fetched only once a client asks for a platform's manifest (a
client wants one platform of ten), and the platform manifests themselves only
from registries that announce no pull rate limit (Docker Hub counts manifest
``GET``s; blobs and ``HEAD``s it does not).

The client's credentials open nothing its own requests would not: the same
repository (which the rules let it pull; checked again), the registry's answer
to the probe confirms access like the client's own request
(``cache_access.confirm_for``), and no credential goes to a storage host. A
client asking for something being fetched ahead waits for that fetch rather
than asking the upstream again (``blobs.serve``, ``manifests.serve``). The
bounds are in ``cache/ahead.py``; ``hub_fetch_ahead`` turns it off.
"""

from __future__ import annotations

from dataclasses import dataclass

from mitmproxy import http

from ..cache.ahead import Fetch
from ..cache.downloads import RUNNING
from ..mirror import Mirror
from ..pull import Answer, Pull, Retarget
from ..registry.contents import Descriptor, contents
from ..registry.errors import RegistryError
from ..registry.upstream import Upstream
from ..responses import make_response
from . import bucket_blobs
from .blobs import probe_registry, start_download
from .cache_access import confirm_for

KEPT_HEADERS = ("authorization", "user-agent")  # of the client's request, on the mirror's requests for it
HOLD_CHECK = 60.0  # seconds between two looks at a download a fetch holds its place for


@dataclass(frozen=True)
class Asker:
    """Whom a fetch ahead is made for, and where: as that client's manifest request was admitted."""

    upstream: Upstream
    repository: str
    headers: list[tuple[str, str]]
    identity: str
    authorization: str | None
    client: tuple[str, str]  # its credentials' identity and its address: the per-client bound
    source: Upstream | None = None  # the URL of the registry that answered the client (sources.py)

    def url(self, kind: str, digest: str) -> str:
        return (self.source or self.upstream).url(f"/v2/{self.repository}/{kind}/{digest}")


def after_manifest(pull: Pull, mirror: Mirror, answer: Answer) -> None:
    """A client's manifest GET was answered: fetch what that manifest names, ahead of it."""
    cache = mirror.cache
    if cache is None or not cache.settings.fetch_ahead or pull.method != "GET" or pull.route is None:
        return
    manifest = _manifest_of(mirror, answer)
    named = contents(*manifest) if manifest is not None else None
    if named is None or not mirror.settings.rules.permits(pull.upstream.name, pull.route.name):
        return
    headers = pull.source_headers if pull.source_headers is not None else pull.headers  # as that URL got them
    asker = Asker(pull.upstream, pull.route.name, [(k, v) for k, v in headers if k.lower() in KEPT_HEADERS],
                  pull.identity, pull.authorization, (pull.identity, (pull.flow.client_conn.peername or ('',))[0]),
                  pull.source)
    for blob in named.blobs:
        if not (cache.store.has_blob(blob.digest) and _known(asker, mirror, blob.digest)):
            cache.ahead.submit(("blob", blob.digest), asker.client, blob.size,
                               lambda fetch, digest=blob.digest: _blob(asker, mirror, digest, fetch))
    if pull.upstream.base in mirror.ratelimits.by_upstream():
        return  # it counts manifest GETs: only the client's own
    for entry in named.manifests:
        if not (cache.store.has_manifest(entry.digest) and _known(asker, mirror, entry.digest)):
            cache.ahead.submit(("manifest", entry.digest), asker.client, 0,
                               lambda fetch, entry=entry: _manifest(asker, mirror, entry, fetch))


def _manifest_of(mirror: Mirror, answer: Answer) -> tuple[bytes, str] | None:
    """The manifest a client was just sent: (body, media type)."""
    if isinstance(answer, http.Response):
        if answer.status_code != 200 or answer.headers.get("content-encoding"):
            return None
        return answer.raw_content or b"", answer.headers.get("content-type", "")
    if isinstance(answer, Retarget) and answer.transfer is not None and answer.transfer.source == "cache":
        cached = mirror.cache.store.get_manifest(answer.transfer.digest)  # a large one, streamed from the cache
        return (cached[1], cached[0]) if cached is not None else None
    return None


def _known(asker: Asker, mirror: Mirror, digest: str) -> bool:
    cache = mirror.cache
    return (cache.access.allowed(asker.identity, asker.upstream.base, asker.repository)
            and cache.store.is_member(asker.upstream.base, asker.repository, digest))


def _refused(status: int, fields: list[tuple[str, str]], body: bytes) -> http.Response:
    return make_response(status, [])  # not a redirect: the client will hear the registry's answer itself


async def _blob(asker: Asker, mirror: Mirror, digest: str, fetch: Fetch) -> None:
    cache = mirror.cache
    if cache.store.has_blob(digest) or cache.downloads.progress(digest) is not None:
        if cache.store.has_blob(digest) and not _known(asker, mirror, digest):
            await _confirm(asker, mirror, "blobs", digest)
        return
    if cache.shared is not None and await cache.shared.blob(digest) is not None:
        return  # the client's request reads it from the bucket

    async def probe():
        mirror.metrics.ahead_requests.labels("blob probe").inc()
        return await probe_registry(mirror, "GET", asker.url("blobs", digest), asker.headers, _refused,
                                    purpose="blob probe, ahead of the client")

    found = await probe()
    download = cache.downloads.claim(digest) if found.answer is None else None
    if download is None:
        return  # refused, unknown or failing (the client hears it itself), or someone downloads it
    locked = None
    try:
        if cache.store.has_blob(digest):
            return
        if cache.shared is not None and (locked := await cache.shared.lock(digest)) is False:
            return  # another process downloads it: the client's request waits for the bucket
        mirror.metrics.ahead_requests.labels("blob download").inc()
        if not (await start_download(mirror, download, found, asker.headers, asker.upstream.base, probe,
                                     ahead=True)).started:
            if locked:
                cache.shared.unlock_later(digest)
            return
        cache.ahead.downloaded(digest)
        confirm_for(mirror, asker.identity, asker.authorization, asker.upstream.base, asker.repository, digest)
        if cache.shared is not None:
            bucket_blobs.share_when_done(mirror, download)
    finally:
        download.give_up()  # a no-op once started
        fetch.settled.set()  # a client asking for it now follows the download
    while await download.ended(HOLD_CHECK) == RUNNING:
        pass  # its place is held until it is done: the bound is on downloads, not on probes


async def _manifest(asker: Asker, mirror: Mirror, entry: Descriptor, fetch: Fetch) -> None:
    cache, digest = mirror.cache, entry.digest
    headers = [*asker.headers, ("Accept", entry.media_type)] if entry.media_type else asker.headers
    if cache.store.has_manifest(digest):
        await _confirm(asker, mirror, "manifests", digest, headers)
        return
    mirror.metrics.ahead_requests.labels("manifest").inc()
    try:
        fetched = await mirror.client.fetch("GET", asker.url("manifests", digest), headers,
                                            purpose="manifest fetched ahead of the client")
    except RegistryError:
        return
    mirror.ratelimits.note(asker.upstream.base, fetched.headers)
    media_type = fetched.header("content-type") or entry.media_type
    if fetched.status == 200 and cache.store.put_manifest(digest, media_type, fetched.body):  # verified
        confirm_for(mirror, asker.identity, asker.authorization, asker.upstream.base, asker.repository, digest)
        if cache.shared is not None:
            cache.shared.put_manifest_later(digest, media_type, fetched.body)


async def _confirm(asker: Asker, mirror: Mirror, kind: str, digest: str,
                   headers: list[tuple[str, str]] | None = None) -> None:
    """The HEAD a client's request for cached content would make first (cache_access.check)."""
    mirror.metrics.ahead_requests.labels("access check").inc()
    try:
        head = await mirror.client.fetch("HEAD", asker.url(kind, digest), headers or asker.headers,
                                         follow_redirects=False, purpose="access check ahead of the client")
    except RegistryError:
        return
    if 200 <= head.status < 400:
        confirm_for(mirror, asker.identity, asker.authorization, asker.upstream.base, asker.repository, digest)


async def fetch_for(asker: Asker, mirror: Mirror, digest: str) -> None:
    """One blob into the cache as a fetch ahead does it, for nobody's request (``prefetch/``):
    back once its download has ended; the first client asking for it later gets a hit."""
    await _blob(asker, mirror, digest, Fetch())
    mirror.cache.ahead.first_ask(digest)
