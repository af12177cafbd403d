"""Blob GET/HEAD: from the cache, or from the upstream's storage, never held in memory.

With a cache, ``cache/tiers.py`` says where the blob is (this disk, a download
in progress, the shared bucket, or nowhere); this module turns that into an
answer. A cached blob goes to a client its upstream confirmed; a blob being
downloaded is followed; otherwise, for a whole-blob GET, the registry is asked
for the blob with that client's token and, only if it has it for this client,
the request claims the download (``TieredCache.claim_blob``: a lock file, and
one in the bucket; a digest the registry does not have leaves nothing on
disk), and the mirror fetches it from where the registry redirects (its CDN,
without any credential) into the cache while every client follows the file.
The client's bytes come from the mirror's loopback server through mitmproxy,
from the blob listener (a 307 to a signed URL there) when it is on, or from
the bucket itself (a presigned URL, ``hub_store_presign``).

Without a cache, a whole blob GET is the mirror's own transfer from the
registry's redirect (``uncached.py``: resumed after a cut, checked against the
digest); for parts and heads of uncached blobs, the registry's redirect is
followed by the client's own flow: mitmproxy streams the storage's answer back,
without the client's credentials.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlencode, urlsplit

from mitmproxy import http

from ..cache.downloads import Download, DownloadState
from ..cache.serving import blob_headers
from ..cache.tiers import Claimed, Found, InBucket, Local, Miss, NoRoom
from ..clientconn import is_forward_proxy
from ..loopback import Loopback
from ..client_request import RETRY_PARAM, Answer, ClientRequest, Retarget, Transfer, TransferSource
from ..registry import headers as hdrs
from ..registry.errors import RegistryError
from ..registry.upstream import Upstream, base_url
from ..responses import CACHE_HEADER, STALE_HEADERS, error_response, make_response
from ..sources import SourceList
from ..upstream_client import REDIRECT_STATUSES, check_reachable, redirect_target
from . import relay, uncached
from .cache_access import Access, check
from .origins import open_source, storage_error
from .parts import CacheParts, Upstreams
from .sourced import at_sources

log = logging.getLogger("hub_rewrite")

# Headers of the registry's blob redirect that the client should still get
# with the storage's answer (the storage knows nothing about digests).
BLOB_HEADERS_KEPT = ("docker-content-digest", "docker-distribution-api-version")
# blobs up to this size are answered from memory, like small manifests
INLINE_LIMIT = 64 * 1024


@dataclass
class Probe:
    """The registry's answer to a blob request: where the bytes are, or its own answer."""

    target: str | None = None  # the storage URL it redirected to, or the registry's own URL (200)
    kept: list[tuple[str, str]] | None = None
    answer: http.Response | None = None
    # the URL of the registry that gave it, among the registry's URLs (sources.py): a source refusing a
    # resumed transfer is that URL's failure (paths/origins.next_source); None: asked at one URL only
    source: Upstream | None = None
    urls: SourceList | None = None

    @property
    def direct(self) -> bool:
        return self.kept is None


async def serve(request: ClientRequest, upstreams: Upstreams, cache: CacheParts | None, loopback: Loopback) -> Answer:
    if cache is None:
        return await _uncached(request, upstreams, loopback)
    digest, tiers = request.route.reference, cache.tiers
    await cache.ahead.settled(("blob", digest), upstreams.timeout)  # its download, if so
    found = await tiers.find_blob(digest)
    if isinstance(found, Miss) and _whole_get(request):
        # the registry first: a digest it does not have (or will not give this client) costs no lock and no file
        probe = await _probe(request, upstreams)
        if probe.answer is not None:
            return probe.answer
        found = await tiers.claim_blob(digest)
        if isinstance(found, Claimed):
            try:
                return await _download(request, upstreams, cache, found.download, probe)
            finally:
                tiers.release(found)  # a no-op once it started
        if isinstance(found, NoRoom):
            return await from_storage(request, upstreams, cache, probe)  # no space or inode for its lock: not cached
    if isinstance(found, Miss):
        return await from_storage(request, upstreams, cache)
    return await _cached(request, upstreams, cache, found)


async def _cached(request: ClientRequest, upstreams: Upstreams, cache: CacheParts, found: Found) -> Answer:
    """A cached blob (on disk, being downloaded, or in the shared bucket), once the upstream
    lets this client have it."""
    digest = request.route.reference
    try:
        access = await check(request, upstreams, cache.tiers, digest, request.route.path())
    except RegistryError as e:
        return error_response(e)
    if access is Access.REFUSED:
        return await from_storage(request, upstreams, cache)  # the upstream's own answer, as if nothing were cached
    state = "stale" if access is Access.STALE else "hit"
    if state == "hit" and request.method == "GET" and cache.ahead.first_ask(digest):
        state = "miss"  # downloaded ahead of this very request: its bytes came from upstream for it
    if _may_redirect(request, cache) and (url := await cache.tiers.presigned_url(digest, found)) is not None:
        request.flow.comment += "; blob sent to a presigned URL of the shared bucket"
        return make_response(307, [("Location", url), *_cache_headers(request, state)])
    if isinstance(found, InBucket):
        if request.method == "HEAD":
            return make_response(200, _blob_head(request, state), b"", found.stat.size)
        download = await cache.tiers.fill_from_bucket(digest, found.stat)
        if download is None and not cache.tiers.being_fetched(digest):
            return await from_storage(request, upstreams, cache)  # neither the bucket nor this disk can serve it now
        if download is not None:
            request.flow.comment += "; blob read from the shared bucket into the cache"
        return await send_from_cache(request, upstreams, cache, state, download)
    if isinstance(found, Local):
        cache.metrics.tier_hits.labels("local").inc()
    request.flow.comment += "; blob served from the cache" + (" (stale)" if state == "stale" else "")
    return await send_from_cache(request, upstreams, cache, state)


async def _uncached(request: ClientRequest, upstreams: Upstreams, loopback: Loopback) -> Answer:
    """Without a cache: a whole blob GET is the mirror's own transfer, resumed after a cut (the
    client sees one 200); a part, a HEAD, a source without a length go the client's own way."""
    probe = await _probe(request, upstreams)
    if probe.answer is not None:
        return probe.answer
    if _whole_get(request):
        streamed = await uncached.stream(request, upstreams, loopback, probe, lambda: _probe(request, upstreams))
        if streamed is not None:
            return streamed
    return await from_storage(request, upstreams, probe=probe)


def _whole_get(request: ClientRequest) -> bool:
    """A GET of the whole blob: what the mirror may download, stream itself or answer from memory."""
    return request.method == "GET" and "range" not in request.flow.request.headers


def _may_redirect(request: ClientRequest, cache: CacheParts) -> bool:
    """May a cached blob be answered with a 307 to a signed URL (the listener's, the bucket's)?
    Not to a forward-proxy client (it reaches registries only), and not a HEAD while flows
    are recorded: the URL is a credential for minutes, and an answer without a body is sent
    after its record is written (debug/records.py); the mirror answers such a HEAD itself."""
    if is_forward_proxy(request.flow.client_conn):
        return False
    return not (request.method == "HEAD" and cache.records_flows)


def _cache_headers(request: ClientRequest, state: str) -> list[tuple[str, str]]:
    digest = request.route.reference
    return [("Docker-Content-Digest", digest), *(STALE_HEADERS if state == "stale" else [(CACHE_HEADER, state)])]


def _blob_head(request: ClientRequest, state: str) -> list[tuple[str, str]]:
    head = [(k, v) for k, v in blob_headers(request.route.reference) if k != "Docker-Content-Digest"]
    return head + _cache_headers(request, state)


async def send_from_cache(request: ClientRequest, upstreams: Upstreams, cache: CacheParts, state: str,
                          download: Download | None = None) -> Answer:
    """Point the client at the cached (or arriving) bytes: the listener, or the loopback server;
    a small blob is answered with its bytes."""
    digest = request.route.reference
    headers = _cache_headers(request, state)
    size = cache.tiers.use_blob(digest)
    # answered here, even with the listener on: a redirect would cost the client a request more
    if request.method == "HEAD" and size is not None and download is None:
        return make_response(200, _blob_head(request, state), b"", size)
    if _whole_get(request):
        small = await _small_blob(cache, upstreams.timeout, digest, size if download is None else download.size,
                                  download)
        if isinstance(small, http.Response):
            return small
        if small is not None:
            request.summary.source = "cache" if download is None and state != "miss" else "upstream"
            return make_response(200, _blob_head(request, state), small)
    if cache.listener is not None and _may_redirect(request, cache):
        location = cache.listener.location(_listener_base(request, cache), digest)
        return make_response(307, [("Location", location), *headers])
    # "miss": the bytes came from upstream for this request (it started the download, or was the
    # first to ask for one made ahead of it)
    cached = download is None and size is not None and state != "miss"
    transfer = Transfer(digest, headers, TransferSource.CACHE if cached else TransferSource.DOWNLOAD, download)
    return Retarget(f"/blobs/{digest}", transfer, loopback=True)


async def _small_blob(cache: CacheParts, timeout: float, digest: str, size: int | None,
                      download: Download | None) -> bytes | http.Response | None:
    """The verified bytes of a blob small enough to answer from memory (a config blob, once its
    download is complete), sparing the trip through the loopback server; an error if its download
    failed; None to stream it."""
    if size is None or size > INLINE_LIMIT:
        return None
    if download is not None and await download.ended(timeout) is not DownloadState.COMMITTED:
        if download.state is DownloadState.FAILED:
            return error_response(RegistryError(502, "UNAVAILABLE", "the blob's download from upstream failed"))
        return None  # still running: followed
    return cache.tiers.small_blob(digest)  # None: evicted meanwhile, the loopback server answers


def _listener_base(request: ClientRequest, cache: CacheParts) -> str:
    """hub_blob_url, or the mirror's host as this client reached it with the listener's port."""
    if cache.blob_url:
        return cache.blob_url
    scheme = "https" if cache.tls else "http"
    host = urlsplit(request.view.mirror_url).hostname or "127.0.0.1"
    return base_url(scheme, host, cache.listener.server.port)


@dataclass
class Outcome:
    """What came of fetching a probed blob into the cache."""

    started: bool = False
    answer: http.Response | None = None  # not started: what a client is answered (the storage's error)


async def _download(request: ClientRequest, upstreams: Upstreams, cache: CacheParts, download: Download,
                    probe: Probe) -> Answer:
    """This client's request starts the blob's download: the registry's answer to its probe
    (with the client's token) is followed without credentials and fetched into the cache."""
    outcome = await start_download(upstreams, cache, download, probe, request.headers, request.upstream.base,
                                   lambda: _probe(request, upstreams))
    if not outcome.started:
        # not cached: no room, no length, no disk
        return outcome.answer or await from_storage(request, upstreams, cache)
    cache.tiers.confirm(request.asker, download.digest)
    cache.tiers.publish_when_done(download)
    request.flow.comment += f"; blob fetched into the cache from {urlsplit(probe.target).hostname}"
    return await send_from_cache(request, upstreams, cache, "miss", download)


async def start_download(upstreams: Upstreams, cache: CacheParts, download: Download, probe: Probe,
                         headers: list[tuple[str, str]], upstream: str, reprobe: Callable[[], Awaitable[Probe]],
                         ahead: bool = False) -> Outcome:
    """Open the probe's target (without credentials unless it is the registry itself) and hand
    it to the download, with where it came from to resume it after a cut (``origins.py``)."""
    purpose = "blob download into the cache" + (", ahead of the client" if ahead else "")
    opened = await open_source(upstreams, download.digest, probe, headers, reprobe, purpose)
    if isinstance(opened, http.Response):
        return Outcome(answer=opened)
    body, origin = opened
    if body.status != 200 or body.length is None or not cache.tiers.has_room_for(body.length):
        body.close()
        return Outcome(answer=storage_error(download.digest, body.status, body.reason) if body.status != 200
                       else None)
    if not cache.tiers.start(download, body, cache.metrics.bytes_fetched.labels(upstream).inc, origin):
        body.close()
        return Outcome()
    return Outcome(started=True)


async def _probe(request: ClientRequest, upstreams: Upstreams) -> Probe:
    """At the first URL of the registry that answers (paths/sourced.py)."""
    probe = await at_sources(request, upstreams, lambda url, headers: probe_registry(
        upstreams, request.method, url, headers,
        lambda status, fields, body: relay.relayed(request, upstreams, status, fields, body)), probe_status)
    probe.source, probe.urls = request.source, upstreams.sources.of(request.upstream)
    return probe


def probe_status(probe: Probe) -> int:
    """The registry's status as ``sources.first_answer`` judges a URL by: a redirect or the blob is 200."""
    return probe.answer.status_code if probe.answer is not None else 200


async def probe_registry(upstreams: Upstreams, method: str, url: str, headers: list[tuple[str, str]],
                         answer: Callable[[int, list[tuple[str, str]], bytes], http.Response],
                         purpose: str = "blob probe") -> Probe:
    """Ask the registry for the blob, following no redirect; ``answer`` makes what a client
    gets of any other answer (a refusal)."""
    client = upstreams.client
    try:
        response = await client.send(method, url, headers, purpose=purpose)
        try:
            location = response.headers.get("location")
            if response.status_code in REDIRECT_STATUSES and location:
                kept = [(k, v) for k, v in hdrs.decode_fields(response.headers.raw) if k.lower() in BLOB_HEADERS_KEPT]
                return Probe(redirect_target(url, location), kept)
            if 200 <= response.status_code < 300 and method == "GET":
                # the registry serves the blob itself: fetched again, streamed (a probe's body cannot be handed over)
                return Probe(url)
            body = b"" if method == "HEAD" else await client.read_body(response)
            return Probe(answer=answer(response.status_code, hdrs.decode_fields(response.headers.raw), body))
        finally:
            await client.release(response)  # a redirect's body read: its connection is reused
    except RegistryError as e:
        log.warning("%s blob %s: %s", method, urlsplit(url).path.rpartition("/")[2], e.message)
        return Probe(answer=error_response(e))


async def from_storage(request: ClientRequest, upstreams: Upstreams, cache: CacheParts | None = None,
                       probe: Probe | None = None) -> Answer:
    """The client's own flow fetches the blob from where the registry redirects
    (mitmproxy streams it), without the client's credentials; ``probe``: the registry's
    answer to this request, if it was asked already."""
    probe = probe or await _probe(request, upstreams)
    if probe.answer is not None:
        return probe.answer
    digest = request.route.reference
    if probe.direct:
        # the URL that answered
        return Retarget(probe.target, Transfer(digest, [], TransferSource.STORAGE), keep_credentials=True)
    kept = probe.kept
    if not any(name.lower() == "docker-content-digest" for name, _ in kept):
        # distribution's redirect does not carry it, the storage knows nothing of digests,
        # but clients (containerd) use it: the path names it.
        kept.append(("Docker-Content-Digest", digest))
    if cache is not None:
        cache.tiers.confirm(request.asker, digest, member=False)  # nothing cached: no record of it either
        kept.append((CACHE_HEADER, "miss"))
    try:
        # mitmproxy would answer a failed connection with an HTML page: check first
        await check_reachable(probe.target, upstreams.timeout)
    except RegistryError as e:
        log.warning("blob %s: %s", digest, e.message)
        return error_response(e)
    request.flow.comment += f"; blob streamed from {urlsplit(probe.target).hostname}"
    return Retarget(probe.target, Transfer(digest, kept, TransferSource.STORAGE, retry_location=_retry_location(request)))


def _retry_location(request: ClientRequest) -> str | None:
    """The client's own request (its registry prefix, its ``ns``), marked as retried: once only."""
    if request.retried:
        return None
    return request.path + "?" + urlencode([*request.client_query, (RETRY_PARAM, "1")])


def replace_storage_error(transfer: Transfer, response: http.Response) -> http.Response | None:
    """A storage's own error answer (XML, HTML) as registry JSON; an expired signed URL
    sends the client back to the mirror once, whose next request gets a fresh one."""
    status = response.status_code
    if transfer.source is not TransferSource.STORAGE or status < 300 or status == 416:
        return None  # 416: Range Not Satisfiable is the storage's honest answer
    if status == 403 and transfer.retry_location:
        return make_response(307, [("Location", transfer.retry_location)])
    return storage_error(transfer.digest, status, response.reason)
