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
(``TieredCache.confirm``), and no credential goes to a storage host. A
client asking for something being fetched ahead waits for that fetch rather
than asking the upstream again (``blobs.serve``, ``manifests.serve``). The
bounds are in ``cache/ahead.py``; ``hub_fetch_ahead`` turns it off.
"""

from __future__ import annotations

from dataclasses import dataclass

from mitmproxy import http

from ..cache.ahead import Fetch
from ..cache.downloads import DownloadState
from ..cache.tiers import Asker, Claimed, Local, Miss, TieredCache
from ..client_request import Answer, ClientRequest, Retarget, TransferSource
from ..registry.contents import Descriptor, contents
from ..registry.errors import RegistryError
from ..registry.upstream import Upstream
from ..responses import error_response, make_response
from .blobs import Probe, probe_registry, probe_status, start_download
from .parts import CacheParts, Upstreams
from .sourced import first_source

KEPT_HEADERS = ("authorization", "user-agent")  # of the client's request, on the mirror's requests for it
HOLD_CHECK = 60.0  # seconds between two looks at a download a fetch holds its place for


@dataclass(frozen=True)
class Fetcher:
    """Whom a fetch ahead is made for, and where: as that client's manifest request was admitted."""

    upstream: Upstream
    asker: Asker  # its identity and repository, as the cache knows them
    headers: list[tuple[str, str]]
    client: tuple[str, str]  # its credentials' identity and its address: the per-client bound
    source: Upstream | None = None  # the URL of the registry that answered the client (sources.py)

    def url(self, kind: str, digest: str) -> str:
        return (self.source or self.upstream).url(f"/v2/{self.asker.repository}/{kind}/{digest}")


def after_manifest(request: ClientRequest, upstreams: Upstreams, cache: CacheParts | None, answer: Answer) -> None:
    """A client's manifest GET was answered: fetch what that manifest names, ahead of it."""
    if cache is None or not cache.fetch_ahead or request.method != "GET" or request.route is None:
        return
    manifest = _manifest_of(cache.tiers, answer)
    named = contents(*manifest) if manifest is not None else None
    if named is None or not cache.rules.permits(request.upstream.name, request.route.name):
        return
    headers = request.source_headers if request.source_headers is not None else request.headers  # as that URL got them
    fetcher = Fetcher(request.upstream, request.asker, [(k, v) for k, v in headers if k.lower() in KEPT_HEADERS],
                      (request.identity, (request.flow.client_conn.peername or ('',))[0]), request.source)
    tiers, ahead = cache.tiers, cache.ahead
    for blob in named.blobs:
        if not (tiers.has_blob(blob.digest) and tiers.known(fetcher.asker, blob.digest)):
            ahead.submit(("blob", blob.digest), fetcher.client, blob.size,
                         lambda fetch, digest=blob.digest: _blob(fetcher, upstreams, cache, digest, fetch))
    if request.upstream.base in upstreams.ratelimits.by_upstream():
        return  # it counts manifest GETs: only the client's own
    for entry in named.manifests:
        if not (tiers.has_manifest(entry.digest) and tiers.known(fetcher.asker, entry.digest)):
            ahead.submit(("manifest", entry.digest), fetcher.client, 0,
                         lambda fetch, entry=entry: _manifest(fetcher, upstreams, cache, entry, fetch))


def _manifest_of(tiers: TieredCache, answer: Answer) -> tuple[bytes, str] | None:
    """The manifest a client was just sent: (body, media type)."""
    if isinstance(answer, http.Response):
        if answer.status_code != 200 or answer.headers.get("content-encoding"):
            return None
        return answer.raw_content or b"", answer.headers.get("content-type", "")
    if isinstance(answer, Retarget) and answer.transfer is not None and answer.transfer.source is TransferSource.CACHE:
        cached = tiers.manifest(answer.transfer.digest)  # a large one, streamed from the cache
        return (cached[1], cached[0]) if cached is not None else None
    return None


def _refused(status: int, fields: list[tuple[str, str]], body: bytes) -> http.Response:
    return make_response(status, [])  # not a redirect: the client will hear the registry's answer itself


async def _blob(fetcher: Fetcher, upstreams: Upstreams, cache: CacheParts, digest: str, fetch: Fetch) -> None:
    tiers = cache.tiers
    found = await tiers.find_blob(digest)
    if isinstance(found, Local) and not tiers.known(fetcher.asker, digest):
        await _confirm(fetcher, upstreams, cache, "blobs", digest)
    if not isinstance(found, Miss):
        return  # cached, arriving, or in the bucket: the client's request reads it from there

    async def probe() -> Probe:
        cache.metrics.ahead_requests.labels("blob probe").inc()
        return await _probe(fetcher, upstreams, digest)

    found = await probe()
    # refused, unknown or failing (the client hears it itself), or someone downloads it: not claimed
    claimed = await tiers.claim_blob(digest, wait_for_others=False) if found.answer is None else None
    if not isinstance(claimed, Claimed):
        return
    try:
        cache.metrics.ahead_requests.labels("blob download").inc()
        if not (await start_download(upstreams, cache, claimed.download, found, fetcher.headers,
                                     fetcher.upstream.base, probe, ahead=True)).started:
            return
        cache.ahead.downloaded(digest)
        tiers.confirm(fetcher.asker, digest)
        tiers.publish_when_done(claimed.download)
    finally:
        tiers.release(claimed)  # a no-op once started
        fetch.settled.set()  # a client asking for it now follows the download
    while await claimed.download.ended(HOLD_CHECK) is DownloadState.RUNNING:
        pass  # its place is held until it is done: the bound is on downloads, not on probes


async def _manifest(fetcher: Fetcher, upstreams: Upstreams, cache: CacheParts, entry: Descriptor, fetch: Fetch) -> None:
    tiers, digest = cache.tiers, entry.digest
    headers = [*fetcher.headers, ("Accept", entry.media_type)] if entry.media_type else fetcher.headers
    if tiers.has_manifest(digest):
        await _confirm(fetcher, upstreams, cache, "manifests", digest, headers)
        return
    cache.metrics.ahead_requests.labels("manifest").inc()
    try:
        fetched = await upstreams.client.fetch("GET", fetcher.url("manifests", digest), headers,
                                               purpose="manifest fetched ahead of the client")
    except RegistryError:
        return
    upstreams.ratelimits.note(fetcher.upstream.base, fetched.headers)
    media_type = fetched.header("content-type") or entry.media_type
    if fetched.status == 200 and tiers.keep_manifest(digest, media_type, fetched.body):  # verified
        tiers.confirm(fetcher.asker, digest)


async def _probe(fetcher: Fetcher, upstreams: Upstreams, digest: str) -> Probe:
    """The registry's answer to the blob, at its first URL that answers, as the client's own probe
    (``blobs._probe``): a resume its storage refuses goes on at the next URL (``origins.next_source``)."""
    try:
        source, _, found = await first_source(
            upstreams, fetcher.upstream, fetcher.asker.repository, fetcher.headers,
            f"/v2/{fetcher.asker.repository}/blobs/{digest}",
            lambda url, headers: probe_registry(upstreams, "GET", url, headers, _refused,
                                                purpose="blob probe, ahead of the client"), probe_status)
    except RegistryError as e:
        return Probe(answer=error_response(e))
    found.source, found.urls = source, upstreams.sources.of(fetcher.upstream)
    return found


async def _confirm(fetcher: Fetcher, upstreams: Upstreams, cache: CacheParts, kind: str, digest: str,
                   headers: list[tuple[str, str]] | None = None) -> None:
    """The HEAD a client's request for cached content would make first (cache_access.check)."""
    cache.metrics.ahead_requests.labels("access check").inc()
    try:
        head = await upstreams.client.fetch("HEAD", fetcher.url(kind, digest), headers or fetcher.headers,
                                            follow_redirects=False, purpose="access check ahead of the client")
    except RegistryError:
        return
    if 200 <= head.status < 400:
        cache.tiers.confirm(fetcher.asker, digest)


async def fetch_for(fetcher: Fetcher, upstreams: Upstreams, cache: CacheParts, digest: str) -> None:
    """One blob into the cache as a fetch ahead does it, for nobody's request (``prefetch/``):
    back once its download has ended; the first client asking for it later gets a hit."""
    await _blob(fetcher, upstreams, cache, digest, Fetch())
    cache.ahead.first_ask(digest)
