"""Manifests with the cache: by digest from the cache, a tag resolved with an upstream HEAD.

HEAD requests do not count against Docker Hub's pull rate limit; a cached
manifest is then served without any upstream GET. A reference nothing is
cached for is fetched with one GET straight away (a HEAD first would only
cost a round trip). A tag's answer depends on the manifest types the client's
Accept names as sent, so the cache keeps one lookup per Accept key
(registry/mediatypes.py), only for an answer of a type that Accept asked for,
and serves a stale one only where the upstream would answer alike.
"""

from __future__ import annotations

import logging
import time
from urllib.parse import urlsplit

from ..cache.tiers import TieredCache
from ..client_request import Answer, ClientRequest, Retarget, Transfer, TransferSource
from ..registry.errors import RegistryError
from ..registry.mediatypes import accept_key, asks_for, same_answer
from ..responses import API_VERSION_HEADER, CACHE_HEADER, SOURCE_HEADER, STALE_HEADERS, error_response, make_response
from ..sources import is_failure
from . import relay
from .parts import CacheParts, Upstreams
from .sourced import at_sources, resolved_by

log = logging.getLogger("hub_rewrite")

# larger cached manifests are streamed from the loopback server, not copied into memory per client
INLINE_LIMIT = 64 * 1024


async def serve(request: ClientRequest, upstreams: Upstreams, cache: CacheParts) -> Answer:
    route, tiers = request.route, cache.tiers
    if route.is_digest:  # being fetched ahead of this client (paths/ahead.py): that fetch's answer
        await cache.ahead.settled(("manifest", route.reference), upstreams.timeout)
    if route.is_digest and tiers.known(request.asker, route.reference):
        cached = await _from_cache(request, tiers, route.reference, "hit")
        if cached is not None:
            return cached
    if request.method == "GET" and not tiers.has_anything_for(request.upstream.base, route.name, route.reference,
                                                              route.is_digest):
        fetched = await _fetched(request, upstreams, tiers)  # no HEAD could spare this GET: one round trip, not two
        if fetched.status_code != 200:
            return fetched
        return _said_by(request, fetched, fetched.headers.get("docker-content-digest", ""))
    try:
        head = await at_sources(request, upstreams, lambda url, headers: upstreams.client.fetch(
            "HEAD", url, headers, purpose=f"tag resolution (HEAD) at {urlsplit(url).netloc}"), lambda h: h.status)
    except RegistryError as failure:
        return await _stale(request, tiers) or error_response(failure)
    digest = head.header("docker-content-digest")
    if head.status == 200 and digest and digest.startswith("sha256:"):
        return _said_by(request, await _resolved(request, upstreams, tiers, head, digest), digest)
    if is_failure(head.status):
        stale = await _stale(request, tiers)
        if stale is not None:
            return stale
    return await relay.serve(request, upstreams)  # a refusal or an unusual answer: the upstream's own


def _said_by(request: ClientRequest, answer: Answer, digest: str) -> Answer:
    """Which URL of the registry resolved the reference (paths/sourced.py)."""
    if isinstance(answer, Retarget):
        if answer.transfer is not None and not any(k == SOURCE_HEADER for k, _ in answer.transfer.headers):
            answer.transfer.headers.append((SOURCE_HEADER, resolved_by(request, digest)))
    elif SOURCE_HEADER not in answer.headers:
        answer.headers[SOURCE_HEADER] = resolved_by(request, digest)
    return answer


async def _resolved(request: ClientRequest, upstreams: Upstreams, tiers: TieredCache, head, digest: str) -> Answer:
    """The upstream named the digest this client gets: serve it from the cache, or fetch and keep it."""
    upstreams.ratelimits.note(request.upstream.base, head.headers)
    _remember(request, tiers, digest, head.header("content-type") or "")
    if request.method == "HEAD":
        answer = relay.relayed(request, upstreams, head.status, head.headers, b"")
        answer.headers[CACHE_HEADER] = "hit" if tiers.has_manifest(digest) else "miss"
        return answer
    cached = await _from_cache(request, tiers, digest, "hit")
    if cached is not None:
        return cached
    return await _fetched(request, upstreams, tiers, digest)


async def _fetched(request: ClientRequest, upstreams: Upstreams, tiers: TieredCache, digest: str | None = None) -> Answer:
    """The manifest from upstream, kept if its bytes are the digest it was resolved to
    (or, not resolved before, the digest its answer names)."""
    answer = await relay.serve(request, upstreams)
    named = answer.headers.get("docker-content-digest", "")
    if answer.status_code == 200 and named.startswith("sha256:"):
        if digest is None and (not request.route.is_digest or named == request.route.reference):
            digest = named
            _remember(request, tiers, digest, answer.headers.get("content-type", ""))
        if named == digest:
            # kept only if the bytes match the digest (a compressed answer does not)
            tiers.keep_manifest(digest, answer.headers.get("content-type", ""), answer.raw_content or b"")
    answer.headers[CACHE_HEADER] = "miss"
    return answer


def _remember(request: ClientRequest, tiers: TieredCache, digest: str, media_type: str) -> None:
    """The upstream let this client have ``digest``, and (for a tag) named it for this Accept."""
    route = request.route
    tiers.confirm(request.asker, digest)
    accept = _accept(request)
    # kept only for an Accept that asked for this type: an answer it did not ask for (schema1
    # for types the upstream did not recognize) says nothing about what the tag is for others
    if not route.is_digest and accept is not None and asks_for(accept, media_type):
        tiers.keep_tag(request.upstream.base, route.name, route.reference, accept, digest, media_type)


async def _stale(request: ClientRequest, tiers: TieredCache) -> Answer | None:
    """A cached manifest for an unavailable upstream, within the stale window, for the same Accept."""
    route = request.route
    digest = route.reference
    if not route.is_digest:
        key = _accept(request)
        if key is None:
            return None  # an Accept too long to have been kept
        entries = await tiers.tag_entries_anywhere(request.upstream.base, route.name, route.reference)
        fresh = [e for k, e in entries.items() if same_answer(k, e.media_type, key)
                 and time.time() - e.stored_at <= tiers.stale_seconds]
        if not fresh:
            return None  # never resolved for an Accept the upstream answers alike
        digest = max(fresh, key=lambda e: e.stored_at).digest
    if not tiers.known_stale(request.asker, digest):
        return None
    cached = await _from_cache(request, tiers, digest, "stale")
    if cached is not None:
        log.warning("serving %s@%s from the cache: upstream unavailable", route.name, digest)
    return cached


async def _from_cache(request: ClientRequest, tiers: TieredCache, digest: str, state: str) -> Answer | None:
    headers = [("Docker-Content-Digest", digest), ("ETag", f'"{digest}"'), API_VERSION_HEADER, (CACHE_HEADER, state)]
    if state == "stale":
        headers = [*headers[:3], *STALE_HEADERS]
    size = await tiers.manifest_here(digest)
    if size is None:
        return None
    if size > INLINE_LIMIT and request.method == "GET":
        return Retarget(f"/manifests/{digest}", Transfer(digest, headers, TransferSource.CACHE), loopback=True)
    cached = tiers.manifest(digest)
    if cached is None:
        return None
    media_type, body = cached
    return make_response(200, [("Content-Type", media_type), *headers], body)


def _accept(request: ClientRequest) -> str | None:
    return accept_key(request.flow.request.headers.get_all("accept"))
