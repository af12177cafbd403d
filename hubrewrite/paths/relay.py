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

from ..mirror import Mirror
from ..pull import Pull
from ..registry import headers as hdrs
from ..registry.challenge import point_at_mirror
from ..registry.errors import RegistryError
from ..registry.names import RouteKind
from ..responses import SOURCE_HEADER, STALE_HEADERS, bearer_challenge, error_response, make_response
from .sourced import answering, at_sources, resolved_by

log = logging.getLogger("hub_rewrite")


async def serve(pull: Pull, mirror: Mirror) -> http.Response:
    """One small exchange made by the mirror itself, redirects followed."""
    anonymous_base = pull.route is not None and pull.route.kind is RouteKind.BASE and pull.authorization is None
    first = mirror.sources.of(pull.upstream).next_source()
    if anonymous_base and first is not None and (known := mirror.realms.base_answer(first)) is not None:
        status, fields, body = known
        pull.source = first
        pull.flow.comment += "; the upstream's challenge, as it answered moments ago"
        return relayed(pull, mirror, status, fields, b"" if pull.method == "HEAD" else body)
    try:
        fetched = await at_sources(pull, mirror, lambda url, headers: mirror.client.fetch(
            pull.method, url, headers, purpose=f"{pull.summary.kind} request relayed"), lambda f: f.status)
    except RegistryError as e:
        log.warning("%s %s: %s", pull.method, pull.route.path() if pull.route else pull.path, e.message)
        if e.status in (502, 503, 504) and pull.route is not None and pull.route.kind is RouteKind.BASE:
            offline = offline_challenge(pull, mirror)
            if offline is not None:
                return offline
        return error_response(e)
    if fetched.redirected_to:
        pull.flow.comment += f"; followed upstream redirect to {fetched.redirected_to}"
    if anonymous_base and pull.method == "GET":
        mirror.realms.remember_base(answering(pull), fetched.status, fetched.headers, fetched.body)
    answer = relayed(pull, mirror, fetched.status, fetched.headers, fetched.body)
    if pull.route is not None and pull.route.kind is RouteKind.MANIFEST and fetched.status == 200:
        answer.headers[SOURCE_HEADER] = resolved_by(pull, fetched.header("docker-content-digest") or "")
    return answer


def relayed(pull: Pull, mirror: Mirror, status: int, fields: list[tuple[str, str]], body: bytes) -> http.Response:
    """An upstream answer as the client should see it."""
    mirror.realms.learn(answering(pull), fields)
    mirror.ratelimits.note(pull.upstream.base, fields)
    out: list[tuple[str, str]] = []
    for name, value in hdrs.end_to_end(fields):
        if name.lower() == "www-authenticate":
            value = point_at_mirror(value, pull.view.token_url, pull.view.client_prefix)
        elif name.lower() in ("set-cookie", "location"):
            continue  # the client only ever talks to the mirror
        out.append((name, value))
    length = hdrs.value_of(fields, "content-length") if pull.method == "HEAD" else None
    return make_response(status, out, body, int(length) if length and length.isdigit() else None)


def offline_challenge(pull: Pull, mirror: Mirror) -> http.Response | None:
    """/v2/ while the upstream is unreachable: the challenge it sent before, so
    clients go on to /token and to cached content."""
    learned = next(filter(None, (mirror.realms.known(source) for source in mirror.sources.of(pull.upstream).sources)),
                   None)
    if mirror.cache is None or learned is None:
        return None
    params = {"realm": pull.view.token_url} | ({"service": learned[1]} if learned[1] else {})
    return bearer_challenge(params, "authentication required", STALE_HEADERS)
