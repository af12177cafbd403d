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

from ..mirror import Mirror
from ..pull import Answer, Transfer, Pull, Retarget
from ..cache.store import Store
from ..registry.errors import RegistryError
from ..registry.mediatypes import accept_key, asks_for, same_answer
from ..responses import API_VERSION_HEADER, CACHE_HEADER, SOURCE_HEADER, STALE_HEADERS, error_response, make_response
from . import relay
from .cache_access import confirm, known, known_stale
from .sourced import at_sources, resolved_by

log = logging.getLogger("hub_rewrite")

# larger cached manifests are streamed from the loopback server, not copied into memory per client
INLINE_LIMIT = 64 * 1024


async def serve(pull: Pull, mirror: Mirror) -> Answer:
    route = pull.route
    if route.is_digest:  # being fetched ahead of this client (paths/ahead.py): that fetch's answer
        await mirror.cache.ahead.settled(("manifest", route.reference), mirror.settings.client.timeout)
    if route.is_digest and known(pull, mirror, route.reference):
        cached = await _from_cache(pull, mirror, route.reference, "hit")
        if cached is not None:
            return cached
    if pull.method == "GET" and not _cached_anything(pull, mirror):
        fetched = await _fetched(pull, mirror)  # no HEAD could spare this GET: one round trip, not two
        if fetched.status_code != 200:
            return fetched
        return _said_by(pull, fetched, fetched.headers.get("docker-content-digest", ""))
    try:
        head = await at_sources(pull, mirror, lambda url, headers: mirror.client.fetch(
            "HEAD", url, headers, purpose=f"tag resolution (HEAD) at {urlsplit(url).netloc}"), lambda h: h.status)
    except RegistryError as failure:
        return await _stale(pull, mirror) or error_response(failure)
    digest = head.header("docker-content-digest")
    if head.status == 200 and digest and digest.startswith("sha256:"):
        return _said_by(pull, await _resolved(pull, mirror, head, digest), digest)
    if head.status == 429 or head.status >= 500:
        stale = await _stale(pull, mirror)
        if stale is not None:
            return stale
    return await relay.serve(pull, mirror)  # a refusal or an unusual answer: the upstream's own


def _said_by(pull: Pull, answer: Answer, digest: str) -> Answer:
    """Which URL of the registry resolved the reference (paths/sourced.py)."""
    if isinstance(answer, Retarget):
        if answer.transfer is not None and not any(k == SOURCE_HEADER for k, _ in answer.transfer.headers):
            answer.transfer.headers.append((SOURCE_HEADER, resolved_by(pull, digest)))
    elif SOURCE_HEADER not in answer.headers:
        answer.headers[SOURCE_HEADER] = resolved_by(pull, digest)
    return answer


def _cached_anything(pull: Pull, mirror: Mirror) -> bool:
    """Could the cache answer for this reference, so that a HEAD might spare the GET (and
    the stale mode have something to serve)? A shared bucket is only asked after the HEAD."""
    store, route = mirror.cache.store, pull.route
    if mirror.cache.shared is not None:
        return True
    if route.is_digest:
        return store.has_manifest(route.reference)
    return bool(store.tag_entries(pull.upstream.base, route.name, route.reference))


async def _resolved(pull: Pull, mirror: Mirror, head, digest: str) -> Answer:
    """The upstream named the digest this client gets: serve it from the cache, or fetch and keep it."""
    mirror.ratelimits.note(pull.upstream.base, head.headers)
    _remember(pull, mirror, digest, head.header("content-type") or "")
    if pull.method == "HEAD":
        answer = relay.relayed(pull, mirror, head.status, head.headers, b"")
        answer.headers[CACHE_HEADER] = "hit" if mirror.cache.store.has_manifest(digest) else "miss"
        return answer
    cached = await _from_cache(pull, mirror, digest, "hit")
    if cached is not None:
        return cached
    return await _fetched(pull, mirror, digest)


async def _fetched(pull: Pull, mirror: Mirror, digest: str | None = None) -> Answer:
    """The manifest from upstream, kept if its bytes are the digest it was resolved to
    (or, not resolved before, the digest its answer names)."""
    answer = await relay.serve(pull, mirror)
    named = answer.headers.get("docker-content-digest", "")
    if answer.status_code == 200 and named.startswith("sha256:"):
        if digest is None and (not pull.route.is_digest or named == pull.route.reference):
            digest = named
            _remember(pull, mirror, digest, answer.headers.get("content-type", ""))
        if named == digest:
            # stored only if the bytes match the digest (a compressed answer does not)
            media_type, body = answer.headers.get("content-type", ""), answer.raw_content or b""
            shared = mirror.cache.shared
            if mirror.cache.store.put_manifest(digest, media_type, body) and shared is not None:
                shared.put_manifest_later(digest, media_type, body)
    answer.headers[CACHE_HEADER] = "miss"
    return answer


def _remember(pull: Pull, mirror: Mirror, digest: str, media_type: str) -> None:
    """The upstream let this client have ``digest``, and (for a tag) named it for this Accept."""
    store, route, shared = mirror.cache.store, pull.route, mirror.cache.shared
    confirm(pull, mirror, digest)
    accept = _accept(pull)
    # kept only for an Accept that asked for this type: an answer it did not ask for (schema1
    # for types the upstream did not recognize) says nothing about what the tag is for others
    if not route.is_digest and accept is not None and asks_for(accept, media_type):
        record = store.put_tag(pull.upstream.base, route.name, route.reference, accept, digest, media_type)
        if shared is not None and record:
            shared.put_record_later(Store.tag_record(pull.upstream.base, route.name, route.reference), record)


async def _stale(pull: Pull, mirror: Mirror) -> Answer | None:
    """A cached manifest for an unavailable upstream, within the stale window, for the same Accept."""
    store, access, route = mirror.cache.store, mirror.cache.access, pull.route
    digest = route.reference
    if not route.is_digest:
        key = _accept(pull)
        if key is None:
            return None  # an Accept too long to have been kept
        await _tag_record_from_bucket(pull, mirror)
        entries = store.tag_entries(pull.upstream.base, route.name, route.reference)
        fresh = [e for k, e in entries.items() if same_answer(k, e.media_type, key)
                 and time.time() - e.stored_at <= access.stale_seconds]
        if not fresh:
            return None  # never resolved for an Accept the upstream answers alike
        digest = max(fresh, key=lambda e: e.stored_at).digest
    if not known_stale(pull, mirror, digest):
        return None
    cached = await _from_cache(pull, mirror, digest, "stale")
    if cached is not None:
        log.warning("serving %s@%s from the cache: upstream unavailable", route.name, digest)
    return cached


async def _tag_record_from_bucket(pull: Pull, mirror: Mirror) -> None:
    """In stale mode, a tag this process never resolved may have been resolved by another one."""
    store, shared, route = mirror.cache.store, mirror.cache.shared, pull.route
    if shared is None or store.tag_entries(pull.upstream.base, route.name, route.reference):
        return
    record = await shared.record(Store.tag_record(pull.upstream.base, route.name, route.reference))
    if record is not None:
        store.merge_tag_record(pull.upstream.base, route.name, route.reference, record)


async def _from_cache(pull: Pull, mirror: Mirror, digest: str, state: str) -> Answer | None:
    store, shared = mirror.cache.store, mirror.cache.shared
    if not store.has_manifest(digest) and shared is not None:
        found = await shared.manifest(digest)  # verified by the store as it is read
        if found is not None:
            store.put_manifest(digest, *found)
    headers = [("Docker-Content-Digest", digest), ("ETag", f'"{digest}"'), API_VERSION_HEADER, (CACHE_HEADER, state)]
    if state == "stale":
        headers = [*headers[:3], *STALE_HEADERS]
    try:
        size = store.manifest_path(digest).stat().st_size
    except FileNotFoundError:
        return None
    store.touch_manifest(digest)
    if size > INLINE_LIMIT and pull.method == "GET":
        return Retarget(f"/manifests/{digest}", Transfer(digest, headers, "cache"), loopback=True)
    cached = store.get_manifest(digest)
    if cached is None:
        return None
    media_type, body = cached
    return make_response(200, [("Content-Type", media_type), *headers], body)


def _accept(pull: Pull) -> str | None:
    return accept_key(pull.flow.request.headers.get_all("accept"))
