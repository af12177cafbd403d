"""The gates a request passes when its head arrives, before any byte of it goes anywhere.

``admit`` classifies a flow (preflight, the mirror's pages, the token
endpoint, the registry API), routes it to one registry of the table, and
applies every decision the mirror makes about it: the API grammar, the
operator's allow/deny rules, mirror accounts, the method, and whether a body
may come with it. What passes becomes a ``Pull``; what does not gets its
registry error. It runs in mitmproxy's ``requestheaders`` hook: a body that
mitmproxy starts to stream right after the head can only follow a decision.
"""

from __future__ import annotations

from urllib.parse import urlencode

from mitmproxy import http

from .access.accounts import bearer_token
from .access.confirmations import client_identity
from .access.issued import is_sealed
from .clientconn import is_forward_proxy, public_url_of, reverse_target
from .mirror import Mirror
from .pull import RETRY_PARAM, ClientView, Pull, RequestKind, RequestSummary
from .registry import headers as hdrs
from .registry.errors import RegistryError
from .registry.names import Route, parse_route
from .registry.registries import Registries
from .registry.tokens import MAX_FORM_BYTES
from .registry.upstream import Upstream
from .responses import bearer_challenge, error_response

TOKEN_PATH = "/token"
PAGES = ("/", "/_hub/metrics", "/_hub/health")
READ_METHODS = ("GET", "HEAD")
WRITE_METHODS = ("PUT", "POST", "PATCH", "DELETE")


def place_of(flow: http.HTTPFlow, registries: Registries) -> tuple[Registries, Upstream | None] | None:
    """The registries a flow may reach, and the one already fixed by the host name the
    client used or the host it asked the proxy for; None: not a flow the mirror serves."""
    target = reverse_target(flow)
    if target is not None:
        served = registries.with_default(target)
        # keep_host_header (mitm.conf) leaves the client's Host for the host map
        mapped = served.for_client_host(flow.request.host_header) or served.for_client_host(flow.client_conn.sni)
        return served, mapped
    if is_forward_proxy(flow.client_conn):
        asked = registries.for_proxy_target(flow.request.host, flow.request.port)
        return (registries, asked) if asked is not None else None
    return None


def carries_body(request: http.Request) -> bool:
    length = request.headers.get("content-length", "").strip()
    return "transfer-encoding" in request.headers or length not in ("", "0")


async def admit(
    flow: http.HTTPFlow, mirror: Mirror, served: Registries, fixed: Upstream | None
) -> tuple[Pull, http.Response | None]:
    """The request as the mirror serves it, and the refusal it gets if any."""
    pull = _new_pull(flow, mirror, served, fixed)
    try:
        _classify(pull)
        if pull.kind is RequestKind.API:
            _route(pull)
            refusal = await _api_gates(pull, mirror)
            if refusal is not None:
                return pull, refusal
        _body_gate(pull)
    except RegistryError as e:
        return pull, error_response(e)
    return pull, None


def _new_pull(flow: http.HTTPFlow, mirror: Mirror, served: Registries, fixed: Upstream | None) -> Pull:
    home = fixed or served.default_upstream
    mirror_url = _mirror_url(flow, mirror)
    view = ClientView(mirror_url, _token_url(mirror_url, served, home))
    pull = Pull(flow, RequestKind.API, flow.request.path.partition("?")[0], served, fixed, home, view,
                RequestSummary(upstream=home.base, kind="other"))
    pull.client_query = list(flow.request.query.items(multi=True))
    pull.client_authorization = hdrs.value_of(hdrs.decode_fields(flow.request.headers.fields), "authorization")
    return pull


def _classify(pull: Pull) -> None:
    request, path, summary = pull.flow.request, pull.path, pull.summary
    if request.headers.get("upgrade", "").strip().lower() == "h2c":
        ignore_h2c_upgrade(request)
    if "upgrade" in request.headers:
        raise RegistryError(400, "UNSUPPORTED", "protocol upgrades are not served by this mirror")
    if request.method == "OPTIONS":
        pull.kind = RequestKind.PREFLIGHT
    elif path in PAGES:
        pull.kind, summary.kind = RequestKind.PAGE, "page"
        if request.method not in READ_METHODS:
            raise RegistryError(405, "UNSUPPORTED", f"method {request.method} is not supported here")
    elif path == TOKEN_PATH or path.startswith(TOKEN_PATH + "/"):
        pull.kind, summary.kind = RequestKind.TOKEN, "token"
        if request.method not in ("GET", "POST"):
            raise RegistryError(405, "UNSUPPORTED", "token requests are GET or POST")


def ignore_h2c_upgrade(request: http.Request) -> None:
    """An offer to switch a plain-HTTP connection to HTTP/2 (``curl --http2``): mitmproxy
    speaks HTTP/2 over TLS only, and RFC 9110 §7.8 lets a server ignore an Upgrade header
    and answer in HTTP/1.1. Its headers go (as mitmproxy's disable_h2c addon drops them,
    but before the mirror decides on the request, which would refuse an upgrade)."""
    request.headers.pop("upgrade", None)
    request.headers.pop("http2-settings", None)
    options = [t.strip() for t in request.headers.get("connection", "").split(",")]
    kept = [t for t in options if t and t.lower() not in ("upgrade", "http2-settings")]
    if kept:
        request.headers["connection"] = ", ".join(kept)  # "close" still closes
    else:
        request.headers.pop("connection", None)


def _route(pull: Pull) -> None:
    """Which registry and repository a /v2/ request is for, as the upstream names it."""
    route = parse_route(pull.path)
    served = pull.registries
    by_ns = served.by_ns([v for k, v in pull.client_query if k == "ns"])
    if pull.fixed is not None and by_ns not in (None, pull.fixed):
        raise RegistryError(404, "NAME_UNKNOWN", f"this host serves {pull.fixed.name}, not {by_ns.name}")
    chosen = by_ns or pull.fixed
    if route.name:
        routed = served.route(chosen, route.name)
        upstream, prefix, route = routed.upstream, routed.client_prefix, Route(route.kind, routed.name, route.reference)
    else:
        upstream, prefix = chosen or served.default_upstream, ""
    pull.upstream, pull.route = upstream, route
    pull.view = ClientView(pull.view.mirror_url, _token_url(pull.view.mirror_url, served, upstream), prefix)
    kept = [(k, v) for k, v in pull.client_query if k not in ("ns", RETRY_PARAM)]
    pull.query = "?" + urlencode(kept) if kept else ""
    pull.retried = any(k == RETRY_PARAM for k, _ in pull.client_query)
    pull.summary.upstream, pull.summary.kind, pull.summary.repo, pull.summary.ref = (
        upstream.base, route.kind.value, route.name, route.reference)
    # mitmweb shows the listener's target as the request's host: say where it really went
    pull.flow.comment = f"hub: {upstream.name} {route.name or route.kind.value} at {upstream.base}"


async def _api_gates(pull: Pull, mirror: Mirror) -> http.Response | None:
    """Rules, accounts and methods of a /v2/ request. A refusal that is not an
    error (the sign-in challenge) is returned; errors are raised."""
    settings, route, method = mirror.settings, pull.route, pull.method
    assert route is not None
    if route.name and not settings.rules.permits(pull.upstream.name, route.name):
        raise RegistryError(403, "DENIED", f"repository {pull.client_name(route.name)} is not served by this mirror")
    fields = hdrs.decode_fields(pull.flow.request.headers.fields)
    pull.authorization = pull.client_authorization
    bearer = bearer_token(pull.authorization)
    if is_sealed(bearer):
        # the mirror's own token: what goes upstream is the upstream's token inside, if any. One
        # that does not open (expired, a refresh token, its user removed or the password
        # changed, another mirror's user) goes nowhere: the client is sent to sign in again
        sealed = mirror.issued.open(bearer, settings.accounts)
        if sealed is None:
            return await _sign_in_challenge(pull, mirror)
        pull.user = sealed.user
        pull.authorization = f"Bearer {sealed.upstream_token}" if sealed.upstream_token else None
    if settings.accounts is not None and pull.user is None:
        return await _sign_in_challenge(pull, mirror)
    pull.identity = client_identity(pull.authorization)
    pull.headers = hdrs.without(hdrs.upstream_request_headers(fields), ["authorization"])
    if pull.authorization:
        pull.headers.append(("Authorization", pull.authorization))
    if method in WRITE_METHODS and not settings.allow_push:
        raise RegistryError(405, "UNSUPPORTED", "this mirror is read-only")
    if method not in READ_METHODS + WRITE_METHODS:
        raise RegistryError(405, "UNSUPPORTED", f"method {method} is not supported")
    return None


async def _sign_in_challenge(pull: Pull, mirror: Mirror) -> http.Response:
    """A /v2/ request without a token of the mirror's that opens (with mirror accounts:
    issued to one of its users): to the mirror's token endpoint."""
    service = None
    try:
        source = mirror.sources.of(pull.upstream).next_source() or pull.upstream
        learned = await mirror.realms.discover(source, mirror.client)
        service = learned[1] if learned else None
    except RegistryError:
        pass  # the challenge still tells the client where to sign in
    params = {"realm": pull.view.token_url, "service": service or "hub-rewrite"}
    if pull.route and pull.route.name:
        params["scope"] = f"repository:{pull.client_name(pull.route.name)}:pull"
    if mirror.settings.accounts is None:
        return bearer_challenge(params, "token expired or not issued by this mirror")
    return bearer_challenge(params, "sign in to the mirror (docker login)")


def _body_gate(pull: Pull) -> None:
    """Registry reads have no body: a body where none belongs is refused. A token
    form must say how long it is, and be short."""
    request = pull.flow.request
    if pull.kind is RequestKind.TOKEN and request.method == "POST":
        length = request.headers.get("content-length", "").strip()
        if "transfer-encoding" in request.headers or not length.isdigit():
            raise RegistryError(411, "UNSUPPORTED", "a token request's form needs a Content-Length")
        if int(length) > MAX_FORM_BYTES:
            raise RegistryError(413, "UNSUPPORTED", "token request form too large")
    elif pull.kind is RequestKind.API and pull.method in WRITE_METHODS:
        return  # a push the operator allowed: its body is streamed upstream
    elif carries_body(request):
        raise RegistryError(400, "UNSUPPORTED", f"a {request.method} request here must not carry a body")


def _mirror_url(flow: http.HTTPFlow, mirror: Mirror) -> str:
    """The mirror's URL as this client reaches it (no trailing slash)."""
    if is_forward_proxy(flow.client_conn):
        # the client believes it talks to the registry host itself
        return f"{flow.request.scheme}://{flow.request.host_header or flow.request.pretty_host}"
    return mirror.settings.public_url or public_url_of(flow.client_conn)


def _token_url(mirror_url: str, served: Registries, upstream: Upstream) -> str:
    """The realm advertised for an upstream: /token for the default registry, /token/<registry> otherwise."""
    base = mirror_url + TOKEN_PATH
    return base if upstream.name == served.default else f"{base}/{upstream.name}"
