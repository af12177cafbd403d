"""The gates a request passes when its head arrives, before any byte of it goes anywhere.

``admit`` classifies a flow (preflight, the mirror's pages, the token
endpoint, the registry API), routes it to one registry of the table, and
applies every decision the mirror makes about it: the API grammar, the
operator's allow/deny rules, mirror accounts, the method, and whether a body
may come with it. What passes becomes a ``ClientRequest``; what does not gets its
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
from .client_request import RETRY_PARAM, ClientView, ClientRequest, RequestKind, RequestSummary
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
) -> tuple[ClientRequest, http.Response | None]:
    """The request as the mirror serves it, and the refusal it gets if any."""
    request = _new_request(flow, mirror, served, fixed)
    try:
        _classify(request)
        if request.kind is RequestKind.API:
            _route(request)
            refusal = await _api_gates(request, mirror)
            if refusal is not None:
                return request, refusal
        _body_gate(request)
    except RegistryError as e:
        return request, error_response(e)
    return request, None


def _new_request(flow: http.HTTPFlow, mirror: Mirror, served: Registries, fixed: Upstream | None) -> ClientRequest:
    home = fixed or served.default_upstream
    mirror_url = _mirror_url(flow, mirror)
    view = ClientView(mirror_url, _token_url(mirror_url, served, home))
    request = ClientRequest(flow, RequestKind.API, flow.request.path.partition("?")[0], served, fixed, home, view,
                            RequestSummary(upstream=home.base))
    request.client_query = list(flow.request.query.items(multi=True))
    request.client_authorization = hdrs.value_of(hdrs.decode_fields(flow.request.headers.fields), "authorization")
    return request


def _classify(request: ClientRequest) -> None:
    sent, path, summary = request.flow.request, request.path, request.summary
    if sent.headers.get("upgrade", "").strip().lower() == "h2c":
        ignore_h2c_upgrade(sent)
    if "upgrade" in sent.headers:
        raise RegistryError(400, "UNSUPPORTED", "protocol upgrades are not served by this mirror")
    if sent.method == "OPTIONS":
        request.kind = RequestKind.PREFLIGHT
    elif path in PAGES:
        request.kind = summary.kind = RequestKind.PAGE
        if sent.method not in READ_METHODS:
            raise RegistryError(405, "UNSUPPORTED", f"method {sent.method} is not supported here")
    elif path == TOKEN_PATH or path.startswith(TOKEN_PATH + "/"):
        request.kind = summary.kind = RequestKind.TOKEN
        if sent.method not in ("GET", "POST"):
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


def _route(request: ClientRequest) -> None:
    """Which registry and repository a /v2/ request is for, as the upstream names it."""
    route = parse_route(request.path)
    served = request.registries
    by_ns = served.by_ns([v for k, v in request.client_query if k == "ns"])
    if request.fixed is not None and by_ns not in (None, request.fixed):
        raise RegistryError(404, "NAME_UNKNOWN", f"this host serves {request.fixed.name}, not {by_ns.name}")
    chosen = by_ns or request.fixed
    if route.name:
        routed = served.route(chosen, route.name)
        upstream, prefix, route = routed.upstream, routed.client_prefix, Route(route.kind, routed.name, route.reference)
    else:
        upstream, prefix = chosen or served.default_upstream, ""
    request.upstream, request.route = upstream, route
    request.view = ClientView(request.view.mirror_url, _token_url(request.view.mirror_url, served, upstream), prefix)
    kept = [(k, v) for k, v in request.client_query if k not in ("ns", RETRY_PARAM)]
    request.query = "?" + urlencode(kept) if kept else ""
    request.retried = any(k == RETRY_PARAM for k, _ in request.client_query)
    request.summary.upstream, request.summary.kind, request.summary.repo, request.summary.ref = (
        upstream.base, route.kind, route.name, route.reference)
    # mitmweb shows the listener's target as the request's host: say where it really went
    request.flow.comment = f"hub: {upstream.name} {route.name or route.kind.value} at {upstream.base}"


async def _api_gates(request: ClientRequest, mirror: Mirror) -> http.Response | None:
    """Rules, accounts and methods of a /v2/ request. A refusal that is not an
    error (the sign-in challenge) is returned; errors are raised."""
    settings, route, method = mirror.settings, request.route, request.method
    assert route is not None
    if route.name and not settings.rules.permits(request.upstream.name, route.name):
        raise RegistryError(403, "DENIED", f"repository {request.client_name(route.name)} is not served by this mirror")
    fields = hdrs.decode_fields(request.flow.request.headers.fields)
    request.authorization = request.client_authorization
    bearer = bearer_token(request.authorization)
    if is_sealed(bearer):
        # the mirror's own token: what goes upstream is the upstream's token inside, if any. One
        # that does not open (expired, a refresh token, its user removed or the password
        # changed, another mirror's user) goes nowhere: the client is sent to sign in again
        sealed = mirror.issued.open(bearer, settings.accounts)
        if sealed is None:
            return await _sign_in_challenge(request, mirror)
        request.user = sealed.user
        request.authorization = f"Bearer {sealed.upstream_token}" if sealed.upstream_token else None
    if settings.accounts is not None and request.user is None:
        return await _sign_in_challenge(request, mirror)
    request.identity = client_identity(request.authorization)
    request.headers = hdrs.without(hdrs.upstream_request_headers(fields), ["authorization"])
    if request.authorization:
        request.headers.append(("Authorization", request.authorization))
    if method in WRITE_METHODS and not settings.allow_push:
        raise RegistryError(405, "UNSUPPORTED", "this mirror is read-only")
    if method not in READ_METHODS + WRITE_METHODS:
        raise RegistryError(405, "UNSUPPORTED", f"method {method} is not supported")
    return None


async def _sign_in_challenge(request: ClientRequest, mirror: Mirror) -> http.Response:
    """A /v2/ request without a token of the mirror's that opens (with mirror accounts:
    issued to one of its users): to the mirror's token endpoint."""
    service = None
    try:
        source = mirror.sources.of(request.upstream).next_source() or request.upstream
        learned = await mirror.realms.discover(source, mirror.client)
        service = learned[1] if learned else None
    except RegistryError:
        pass  # the challenge still tells the client where to sign in
    params = {"realm": request.view.token_url, "service": service or "hub-rewrite"}
    if request.route and request.route.name:
        params["scope"] = f"repository:{request.client_name(request.route.name)}:pull"
    if mirror.settings.accounts is None:
        return bearer_challenge(params, "token expired or not issued by this mirror")
    return bearer_challenge(params, "sign in to the mirror (docker login)")


def _body_gate(request: ClientRequest) -> None:
    """Registry reads have no body: a body where none belongs is refused. A token
    form must say how long it is, and be short."""
    sent = request.flow.request
    if request.kind is RequestKind.TOKEN and sent.method == "POST":
        length = sent.headers.get("content-length", "").strip()
        if "transfer-encoding" in sent.headers or not length.isdigit():
            raise RegistryError(411, "UNSUPPORTED", "a token request's form needs a Content-Length")
        if int(length) > MAX_FORM_BYTES:
            raise RegistryError(413, "UNSUPPORTED", "token request form too large")
    elif request.kind is RequestKind.API and request.method in WRITE_METHODS:
        return  # a push the operator allowed: its body is streamed upstream
    elif carries_body(sent):
        raise RegistryError(400, "UNSUPPORTED", f"a {sent.method} request here must not carry a body")


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
