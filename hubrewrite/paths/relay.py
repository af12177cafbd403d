"""Small exchanges relayed by the mirror itself (manifests, tag lists, ``/v2/``), and
how any upstream answer is shown to the client: every ``WWW-Authenticate``
challenge re-emitted with the mirror's token endpoint as realm, no cookie or
redirect of the upstream's, its rate-limit headers noted on the way.

Fetched by the addon's own client rather than forwarded by mitmproxy, so that
any failure becomes registry error JSON instead of a proxy's HTML page.
"""

from __future__ import annotations

import logging

from mitmproxy import http

from ..client_request import ClientRequest
from ..registry import headers as hdrs
from ..registry.challenge import point_at_mirror
from ..registry.errors import RegistryError
from ..registry.names import RouteKind
from ..responses import SOURCE_HEADER, STALE_HEADERS, bearer_challenge, error_response, make_response
from ..sources import UNAVAILABLE_STATUSES
from .parts import Upstreams
from .sourced import answering, at_sources, resolved_by

log = logging.getLogger("hub_rewrite")


async def serve(request: ClientRequest, upstreams: Upstreams) -> http.Response:
    """One small exchange made by the mirror itself, redirects followed."""
    anonymous_base = request.route is not None and request.route.kind is RouteKind.BASE and request.authorization is None
    first = upstreams.sources.of(request.upstream).next_source()
    if anonymous_base and first is not None and (known := upstreams.realms.base_answer(first)) is not None:
        status, fields, body = known
        request.source = first
        request.flow.comment += "; the upstream's challenge, as it answered moments ago"
        return relayed(request, upstreams, status, fields, b"" if request.method == "HEAD" else body)
    try:
        fetched = await at_sources(request, upstreams, lambda url, headers: upstreams.client.fetch(
            request.method, url, headers, purpose=f"{request.summary.label} request relayed"), lambda f: f.status)
    except RegistryError as e:
        log.warning("%s %s: %s", request.method, request.route.path() if request.route else request.path, e.message)
        if e.status in UNAVAILABLE_STATUSES and request.route is not None and request.route.kind is RouteKind.BASE:
            offline = offline_challenge(request, upstreams)
            if offline is not None:
                return offline
        return error_response(e)
    if fetched.redirected_to:
        request.flow.comment += f"; followed upstream redirect to {fetched.redirected_to}"
    if anonymous_base and request.method == "GET":
        upstreams.realms.remember_base(answering(request), fetched.status, fetched.headers, fetched.body)
    answer = relayed(request, upstreams, fetched.status, fetched.headers, fetched.body)
    if request.route is not None and request.route.kind is RouteKind.MANIFEST and fetched.status == 200:
        answer.headers[SOURCE_HEADER] = resolved_by(request, fetched.header("docker-content-digest") or "")
    return answer


def relayed(request: ClientRequest, upstreams: Upstreams, status: int, fields: list[tuple[str, str]], body: bytes) -> http.Response:
    """An upstream answer as the client should see it."""
    upstreams.realms.learn(answering(request), fields)
    upstreams.ratelimits.note(request.upstream.base, fields)
    out: list[tuple[str, str]] = []
    for name, value in hdrs.end_to_end(fields):
        if name.lower() == "www-authenticate":
            value = point_at_mirror(value, request.view.token_url, request.view.client_prefix)
        elif name.lower() in ("set-cookie", "location"):
            continue  # the client only ever talks to the mirror
        out.append((name, value))
    length = hdrs.value_of(fields, "content-length") if request.method == "HEAD" else None
    return make_response(status, out, body, int(length) if length and length.isdigit() else None)


def offline_challenge(request: ClientRequest, upstreams: Upstreams) -> http.Response | None:
    """/v2/ while the upstream is unreachable: the challenge it sent before, so
    clients go on to /token and to cached content."""
    learned = next(filter(None, (upstreams.realms.known(source)
                                 for source in upstreams.sources.of(request.upstream).sources)), None)
    if not upstreams.caching or learned is None:
        return None
    params = {"realm": request.view.token_url} | ({"service": learned[1]} if learned[1] else {})
    return bearer_challenge(params, "authentication required", STALE_HEADERS)
