"""One module per request path, each turning a ``ClientRequest`` into one answer:
a response, or a ``Retarget`` mitmproxy streams. Each gets what it works with
(``parts.py``), made here from the mirror's running parts."""

from __future__ import annotations

from ..mirror import Mirror
from ..client_request import Answer, ClientRequest, RequestKind, Retarget
from ..registry.names import RouteKind
from ..responses import PREFLIGHT_HEADERS, make_response
from . import ahead, blobs, manifests, pages, relay, token_endpoint
from .parts import CacheParts, PageParts, TokenParts, Upstreams


async def serve(request: ClientRequest, mirror: Mirror) -> Answer:
    if request.kind is RequestKind.PREFLIGHT:
        return make_response(204, PREFLIGHT_HEADERS)
    if request.kind is RequestKind.PAGE:
        return await pages.serve(request, page_parts_of(mirror))
    upstreams = upstreams_of(mirror)
    if request.kind is RequestKind.TOKEN:
        return await token_endpoint.serve(request, token_parts_of(mirror, upstreams))
    route = request.route
    if request.method not in ("GET", "HEAD"):
        # a push the operator allowed: the registry itself gets it, body streamed
        return Retarget(request.url, keep_credentials=True)
    cache = cache_parts_of(mirror)
    if route.kind is RouteKind.BLOB:
        return await blobs.serve(request, upstreams, cache, mirror.loopback)
    if route.kind is RouteKind.MANIFEST and cache is not None:
        answer = await manifests.serve(request, upstreams, cache)
        ahead.after_manifest(request, upstreams, cache, answer)
        return answer
    return await relay.serve(request, upstreams)


def upstreams_of(mirror: Mirror) -> Upstreams:
    return Upstreams(mirror.client, mirror.realms, mirror.ratelimits, mirror.settings.client.timeout,
                     mirror.cache is not None, mirror.sources, mirror.source_tokens,
                     mirror.settings.upstream_credentials, mirror.metrics)


def cache_parts_of(mirror: Mirror) -> CacheParts | None:
    cache = mirror.cache
    if cache is None:
        return None
    return CacheParts(cache.tiers, cache.ahead, mirror.metrics, cache.listener, cache.settings.blob_url,
                      mirror.tls is not None, mirror.settings.records_flows, cache.settings.fetch_ahead,
                      mirror.settings.rules)


def token_parts_of(mirror: Mirror, upstreams: Upstreams) -> TokenParts:
    s = mirror.settings
    return TokenParts(upstreams, mirror.issued, s.accounts, s.rules, s.allow_push,
                      mirror.cache.access if mirror.cache is not None else None)


def page_parts_of(mirror: Mirror) -> PageParts:
    s, cache = mirror.settings, mirror.cache
    return PageParts(mirror.metrics, mirror.ratelimits, s.metrics_auth, s.accounts, mirror.issued, s.cache,
                     cache.store if cache is not None else None, cache.shared if cache is not None else None,
                     mirror.prefetch.facts if mirror.prefetch is not None else dict, mirror.sources)
