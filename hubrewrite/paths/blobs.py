"""Blob GET/HEAD: from the cache, or from the upstream's storage, never held in memory.

With a cache: a verified blob goes to a client its upstream confirmed; a blob
being downloaded is followed; otherwise, for a whole-blob GET, the registry is
asked for the blob with that client's token and, only if it has it for this
client, the request claims the download (a lock file: a digest the registry
does not have leaves nothing on disk), and the mirror fetches it from where
the registry redirects (its CDN, without any credential) into the cache while
every client follows the file. The
client's bytes come from the mirror's loopback server through mitmproxy, or
from the blob listener (a 307 to a signed URL there) when it is on.

Without a cache, and for parts and heads of uncached blobs, the registry's
redirect is followed by the client's own flow: mitmproxy streams the storage's
answer back, without the client's credentials.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlencode, urlsplit

from mitmproxy import http

from ..cache.bucket import BlobStat
from ..cache.digests import sha256_of_bytes
from ..cache.downloads import COMMITTED, FAILED, Download
from ..cache.serving import blob_headers
from ..clientconn import is_forward_proxy
from ..mirror import Mirror
from ..pull import RETRY_PARAM, Answer, Pull, Retarget, Transfer
from ..registry import headers as hdrs
from ..registry.errors import RegistryError
from ..registry.upstream import base_url
from ..responses import CACHE_HEADER, STALE_HEADERS, error_response, make_response
from ..upstream_client import REDIRECT_STATUSES, check_reachable, redirect_target
from . import bucket_blobs, relay, uncached
from .cache_access import Access, check, confirm
from .sourced import at_sources
from .origins import open_source, storage_error

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

    @property
    def direct(self) -> bool:
        return self.kept is None


async def serve(pull: Pull, mirror: Mirror) -> Answer:
    if mirror.cache is None:
        return await from_storage(pull, mirror)
    digest, shared = pull.route.reference, mirror.cache.shared
    whole_get = pull.method == "GET" and "range" not in pull.flow.request.headers
    await mirror.cache.ahead.settled(("blob", digest), mirror.settings.client.timeout)  # its download, if so
    for _ in range(3):
        local = await _verified(mirror, digest)
        if local or mirror.cache.downloads.progress(digest) is not None:
            return await _cached(pull, mirror, local)
        if shared is not None and (stat := await shared.blob(digest)) is not None:
            return await _cached(pull, mirror, False, stat)
        if not whole_get:
            break
        # the registry first: a digest it does not have (or will not give this client) costs no lock and no file
        probe = await _probe(pull, mirror)
        if probe.answer is not None:
            return probe.answer
        try:
            download = mirror.cache.downloads.claim(digest)
        except OSError:
            return await from_storage(pull, mirror, probe)  # no space or inode for its lock: not cached
        if download is None:
            continue
        if mirror.cache.store.has_blob(digest):
            download.give_up()  # committed by a download that ended while this request asked the registry
            continue
        try:
            if shared is not None and not await bucket_blobs.claim(mirror, digest):
                continue  # another process downloaded it: from the bucket now
            return await _download(pull, mirror, download, probe)
        finally:
            download.give_up()  # a no-op once it started
    return await from_storage(pull, mirror)


async def _verified(mirror: Mirror, digest: str) -> bool:
    store = mirror.cache.store
    return store.has_blob(digest) and await asyncio.to_thread(store.check_blob, digest)


async def _cached(pull: Pull, mirror: Mirror, local: bool, in_bucket: BlobStat | None = None) -> Answer:
    """A cached blob (on disk, being downloaded, or in the shared bucket), once the upstream
    lets this client have it."""
    try:
        access = await check(pull, mirror, pull.route.reference, pull.route.path())
    except RegistryError as e:
        return error_response(e)
    if access is Access.REFUSED:
        return await from_storage(pull, mirror)  # the upstream's own answer, as if nothing were cached
    state = "stale" if access is Access.STALE else "hit"
    if state == "hit" and pull.method == "GET" and mirror.cache.ahead.first_ask(pull.route.reference):
        state = "miss"  # downloaded ahead of this very request: its bytes came from upstream for it
    shared = mirror.cache.shared
    if shared is not None and shared.presign_seconds and _may_redirect(pull, mirror):
        stat = in_bucket or (await shared.blob(pull.route.reference) if local else None)
        if stat is not None and await shared.presignable(pull.route.reference, stat):
            return bucket_blobs.presigned(pull, mirror, _cache_headers(pull, state), stat)
    if in_bucket is not None:
        if pull.method == "HEAD":
            return make_response(200, _blob_head(pull, state), b"", in_bucket.size)
        download = await bucket_blobs.fill_local(pull, mirror, in_bucket)
        if download is None and mirror.cache.downloads.progress(pull.route.reference) is None:
            return await from_storage(pull, mirror)  # neither the bucket nor this disk can serve it now
        return await send_from_cache(pull, mirror, state, download)
    if local:
        mirror.metrics.tier_hits.labels("local").inc()
    pull.flow.comment += "; blob served from the cache" + (" (stale)" if state == "stale" else "")
    return await send_from_cache(pull, mirror, state)


def _may_redirect(pull: Pull, mirror: Mirror) -> bool:
    """May a cached blob be answered with a 307 to a signed URL (the listener's, the bucket's)?
    Not to a forward-proxy client (it reaches registries only), and not a HEAD while flows
    are recorded: the URL is a credential for minutes, and an answer without a body is sent
    after its record is written (debug/records.py); the mirror answers such a HEAD itself."""
    if is_forward_proxy(pull.flow.client_conn):
        return False
    return not (pull.method == "HEAD" and mirror.settings.records_flows)


def _cache_headers(pull: Pull, state: str) -> list[tuple[str, str]]:
    digest = pull.route.reference
    return [("Docker-Content-Digest", digest), *(STALE_HEADERS if state == "stale" else [(CACHE_HEADER, state)])]


def _blob_head(pull: Pull, state: str) -> list[tuple[str, str]]:
    head = [(k, v) for k, v in blob_headers(pull.route.reference) if k != "Docker-Content-Digest"]
    return head + _cache_headers(pull, state)


async def send_from_cache(pull: Pull, mirror: Mirror, state: str, download: Download | None = None) -> Answer:
    """Point the client at the cached (or arriving) bytes: the listener, or the loopback server;
    a small blob is answered with its bytes."""
    cache = mirror.cache
    digest = pull.route.reference
    headers = _cache_headers(pull, state)
    cache.store.touch(digest)
    size = cache.store.blob_size(digest)
    # answered here, even with the listener on: a redirect would cost the client a request more
    if pull.method == "HEAD" and size is not None and download is None:
        return make_response(200, _blob_head(pull, state), b"", size)
    if pull.method == "GET" and "range" not in pull.flow.request.headers:
        small = await _small_blob(mirror, digest, download)
        if isinstance(small, http.Response):
            return small
        if small is not None:
            pull.summary.source = "cache" if download is None and state != "miss" else "upstream"
            return make_response(200, _blob_head(pull, state), small)
    if cache.listener is not None and _may_redirect(pull, mirror):
        location = cache.listener.location(_listener_base(pull, mirror), digest)
        return make_response(307, [("Location", location), *headers])
    # "miss": the bytes came from upstream for this request (it started the download, or was the
    # first to ask for one made ahead of it)
    cached = download is None and size is not None and state != "miss"
    transfer = Transfer(digest, headers, "cache" if cached else "download", download)
    return Retarget(f"/blobs/{digest}", transfer, loopback=True)


async def _small_blob(mirror: Mirror, digest: str, download: Download | None) -> bytes | http.Response | None:
    """The verified bytes of a blob small enough to answer from memory (a config blob, once its
    download is complete), sparing the trip through the loopback server; an error if its download
    failed; None to stream it."""
    store = mirror.cache.store
    size = download.size if download is not None else store.blob_size(digest)
    if size is None or size > INLINE_LIMIT:
        return None
    if download is not None and await download.ended(mirror.settings.client.timeout) != COMMITTED:
        if download.state == FAILED:
            return error_response(RegistryError(502, "UNAVAILABLE", "the blob's download from upstream failed"))
        return None  # still running: followed
    try:
        body = store.blob_path(digest).read_bytes()
    except FileNotFoundError:
        return None  # evicted meanwhile: the loopback server answers
    return body if sha256_of_bytes(body) == digest else None


def _listener_base(pull: Pull, mirror: Mirror) -> str:
    """hub_blob_url, or the mirror's host as this client reached it with the listener's port."""
    cache = mirror.cache
    if cache.settings.blob_url:
        return cache.settings.blob_url
    scheme = "https" if mirror.tls is not None else "http"
    host = urlsplit(pull.view.mirror_url).hostname or "127.0.0.1"
    return base_url(scheme, host, cache.listener.server.port)


@dataclass
class Outcome:
    """What came of fetching a probed blob into the cache."""

    started: bool = False
    answer: http.Response | None = None  # not started: what a client is answered (the storage's error)


async def _download(pull: Pull, mirror: Mirror, download: Download, probe: Probe) -> Answer:
    """This client's request starts the blob's download: the registry's answer to its probe
    (with the client's token) is followed without credentials and fetched into the cache."""
    outcome = await start_download(mirror, download, probe, pull.headers, pull.upstream.base,
                                   lambda: _probe(pull, mirror))
    if not outcome.started:
        return outcome.answer or await from_storage(pull, mirror)  # not cached: no room, no length, no disk
    confirm(pull, mirror, download.digest)
    if mirror.cache.shared is not None:
        bucket_blobs.share_when_done(mirror, download)
    pull.flow.comment += f"; blob fetched into the cache from {urlsplit(probe.target).hostname}"
    return await send_from_cache(pull, mirror, "miss", download)


async def start_download(mirror: Mirror, download: Download, probe: Probe, headers: list[tuple[str, str]],
                         upstream: str, reprobe: Callable[[], Awaitable[Probe]], ahead: bool = False) -> Outcome:
    """Open the probe's target (without credentials unless it is the registry itself) and hand
    it to the download, with where it came from to resume it after a cut (``origins.py``)."""
    store = mirror.cache.store
    purpose = "blob download into the cache" + (", ahead of the client" if ahead else "")
    opened = await open_source(mirror, download.digest, probe, headers, reprobe, purpose)
    if isinstance(opened, http.Response):
        return Outcome(answer=opened)
    body, origin = opened
    if body.status != 200 or body.length is None or not store.has_room_for(body.length):
        body.close()
        return Outcome(answer=storage_error(download.digest, body.status, body.reason) if body.status != 200
                       else None)
    try:
        download.start(body, mirror.metrics.bytes_fetched.labels(upstream).inc, origin)
    except OSError as e:
        body.close()
        store.note_problem(e)
        return Outcome()
    return Outcome(started=True)


async def _probe(pull: Pull, mirror: Mirror) -> Probe:
    """At the first URL of the registry that answers (paths/sourced.py)."""
    return await at_sources(pull, mirror, lambda url, headers: probe_registry(
        mirror, pull.method, url, headers, lambda status, fields, body: relay.relayed(pull, mirror, status, fields, body)),
        lambda probe: probe.answer.status_code if probe.answer is not None else 200)


async def probe_registry(mirror: Mirror, method: str, url: str, headers: list[tuple[str, str]],
                         answer: Callable[[int, list[tuple[str, str]], bytes], http.Response],
                         purpose: str = "blob probe") -> Probe:
    """Ask the registry for the blob, following no redirect; ``answer`` makes what a client
    gets of any other answer (a refusal)."""
    try:
        response = await mirror.client.send(method, url, headers, purpose=purpose)
        try:
            location = response.headers.get("location")
            if response.status_code in REDIRECT_STATUSES and location:
                kept = [(k, v) for k, v in hdrs.decode_fields(response.headers.raw) if k.lower() in BLOB_HEADERS_KEPT]
                return Probe(redirect_target(url, location), kept)
            if 200 <= response.status_code < 300 and method == "GET":
                # the registry serves the blob itself: fetched again, streamed (a probe's body cannot be handed over)
                return Probe(url)
            body = b"" if method == "HEAD" else await mirror.client.read_body(response)
            return Probe(answer=answer(response.status_code, hdrs.decode_fields(response.headers.raw), body))
        finally:
            await mirror.client.release(response)  # a redirect's body read: its connection is reused
    except RegistryError as e:
        log.warning("%s blob %s: %s", method, urlsplit(url).path.rpartition("/")[2], e.message)
        return Probe(answer=error_response(e))


async def from_storage(pull: Pull, mirror: Mirror, probe: Probe | None = None) -> Answer:
    """The client's own flow fetches the blob from where the registry redirects
    (mitmproxy streams it), without the client's credentials; ``probe``: the registry's
    answer to this request, if it was asked already."""
    probe = probe or await _probe(pull, mirror)
    if probe.answer is not None:
        return probe.answer
    digest = pull.route.reference
    if mirror.cache is None and pull.method == "GET" and "range" not in pull.flow.request.headers:
        # the mirror's own transfer, resumed after a cut: the client sees one 200
        streamed = await uncached.stream(pull, mirror, probe, lambda: _probe(pull, mirror))
        if streamed is not None:
            return streamed
    if probe.direct:
        return Retarget(probe.target, Transfer(digest, [], "storage"), keep_credentials=True)  # the URL that answered
    kept = probe.kept
    if not any(name.lower() == "docker-content-digest" for name, _ in kept):
        # distribution's redirect does not carry it, the storage knows nothing of digests,
        # but clients (containerd) use it: the path names it.
        kept.append(("Docker-Content-Digest", digest))
    if mirror.cache is not None:
        confirm(pull, mirror, digest, member=False)  # nothing cached: no record of it either
        kept.append((CACHE_HEADER, "miss"))
    try:
        # mitmproxy would answer a failed connection with an HTML page: check first
        await check_reachable(probe.target, mirror.settings.client.timeout)
    except RegistryError as e:
        log.warning("blob %s: %s", digest, e.message)
        return error_response(e)
    pull.flow.comment += f"; blob streamed from {urlsplit(probe.target).hostname}"
    return Retarget(probe.target, Transfer(digest, kept, "storage", retry_location=_retry_location(pull)))


def _retry_location(pull: Pull) -> str | None:
    """The client's own request (its registry prefix, its ``ns``), marked as retried: once only."""
    if pull.retried:
        return None
    return pull.path + "?" + urlencode([*pull.client_query, (RETRY_PARAM, "1")])


def replace_storage_error(transfer: Transfer, response: http.Response) -> http.Response | None:
    """A storage's own error answer (XML, HTML) as registry JSON; an expired signed URL
    sends the client back to the mirror once, whose next request gets a fresh one."""
    status = response.status_code
    if transfer.source != "storage" or status < 300 or status == 416:
        return None  # 416: Range Not Satisfiable is the storage's honest answer
    if status == 403 and transfer.retry_location:
        return make_response(307, [("Location", transfer.retry_location)])
    return storage_error(transfer.digest, status, response.reason)
