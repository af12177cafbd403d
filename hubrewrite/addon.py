"""The mitmproxy addon: a Docker Hub mirror.

One request's story (reverse mode, ``--mode reverse:https://registry-1.docker.io``):

1. ``/token`` goes to the token service the upstream named in its own
   challenge, with the client's credentials and nothing the client chose.
2. ``/v2/...`` is checked against the API's grammar, gets the ``library/``
   rule, and write methods are refused unless pushing is allowed.
3. A blob GET/HEAD is probed upstream once without following; the redirect
   to the CDN is then followed *by this flow* (mitmproxy streams it) without
   the client's credentials.
4. Everything else small (manifests, tag lists, ``/v2/``) is fetched by the
   addon, so any failure becomes registry error JSON, and every
   ``WWW-Authenticate`` challenge is re-emitted with the mirror as realm.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlencode, urlsplit

from mitmproxy import ctx, exceptions, http, tls
from mitmproxy.proxy import mode_specs, server_hooks
from mitmproxy.utils import human
from prometheus_client import start_http_server as start_metrics_server

from . import challenge, conffile, names, registries, tokens
from . import headers as hdrs
from .access import AccessMemory, client_identity
from .accounts import (
    AccountsError,
    IssuedTokens,
    MirrorAccounts,
    SignInRefused,
    bearer_token,
    load_users,
    sign_in,
)
from .policy import CREDENTIALS_ENV_PREFIX, PolicyError, RepositoryRules, UpstreamCredentials
from .registries import DEFAULT_UPSTREAMS, Registries, Routed
from .observe import CountingStream, Metrics, health_body, pull_log_line, status_page
from .pullthrough import CachingStream, Download, PullThrough
from .store import Store
from .errors import error_response, make_response
from .upstream import UpstreamClient, UpstreamError, check_reachable, make_ssl_context, redirect_target
from .upstreams import Upstream, ip_of, is_forward_proxy, public_url_of, reverse_target, validate_public_url

log = logging.getLogger("hub_rewrite")
# httpx logs every request URL at INFO; signed CDN URLs and token queries stay
# out of the mirror's log (it writes its own lines).
logging.getLogger("httpx").setLevel(logging.WARNING)
logging.getLogger("httpcore").setLevel(logging.WARNING)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "mitm.conf"
TOKEN_PATH = "/token"
READ_METHODS = ("GET", "HEAD")
WRITE_METHODS = ("PUT", "POST", "PATCH", "DELETE")

CORS_HEADERS = [
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Expose-Headers", "*"),
]
PREFLIGHT_HEADERS = [
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Allow-Methods", "GET,POST,PUT,PATCH,TRACE,DELETE,HEAD,OPTIONS"),
    ("Access-Control-Allow-Headers", "*"),
    ("Access-Control-Max-Age", "1728000"),
]
# Headers of the registry's blob redirect that the client should still get
# with the CDN's answer (the CDN knows nothing about digests).
BLOB_HEADERS_KEPT = ("docker-content-digest", "docker-distribution-api-version")
# Options whose change means a new HTTP client.
CLIENT_OPTIONS = {
    "hub_upstream_timeout",
    "hub_max_buffered_body",
    "ssl_insecure",
    "ssl_verify_upstream_trusted_ca",
    "ssl_verify_upstream_trusted_confdir",
}

TABLE_OPTIONS = {"hub_upstreams", "hub_host_map", "hub_registry_name"}
CACHE_OPTIONS = {"hub_cache_dir", "hub_cache_max_size", "hub_cache_stale", "hub_cache_auth_ttl", "hub_upstream_timeout"}
CACHE_HEADER = "X-Hub-Cache"  # hit, miss or stale
RETRY_PARAM = "_hub_retry"
OWN_TOKEN_LIFETIME = 300.0  # seconds: tokens the mirror makes itself (own, offline)
STALE_WARNING = ("Warning", '110 hub-rewrite "Response is Stale"')

# flow.metadata keys
META_BLOB = "hub_blob"  # dict: set on a flow retargeted to stream a blob
META_STEP = "hub_step"  # dict: what a client request was, for its log line and metrics
META_VIEW = "hub_view"  # ClientView: how the client sees the registry it asked

# the mirror's own pages, outside the registry API
METRICS_PATH = "/_hub/metrics"
HEALTH_PATH = "/_hub/health"


@dataclass(frozen=True)
class ClientView:
    """What the client of one request sees: the token realm to advertise, and
    the registry prefix it wrote into repository names (path-prefix routing)."""

    token_url: str
    client_prefix: str = ""


class HubRewrite:
    def __init__(self) -> None:
        self.client: UpstreamClient | None = None
        # upstream base URL -> (token realm, service) learned from that upstream's challenge
        self.realms: dict[str, tuple[str, str | None]] = {}
        self.public_url = ""
        self.cache: PullThrough | None = None
        # (upstream, rate-limit source) -> latest ratelimit-remaining the upstream sent
        self.ratelimits: dict[tuple[str, str], str] = {}
        self.metrics = Metrics()
        self.registries = Registries({}, "docker.io")
        self.accounts: MirrorAccounts | None = None
        self.issued = IssuedTokens()
        self.rules = RepositoryRules()
        self.upstream_credentials = UpstreamCredentials()
        self.metrics_server = None  # (server, thread) of the loopback metrics listener

    # ---- options -------------------------------------------------------

    def load(self, loader) -> None:
        loader.add_option(
            "hub_config",
            str,
            str(DEFAULT_CONFIG),
            """
            YAML file of options (same keys as --set) applied at startup.
            Precedence: defaults < this file < command line. Empty: none.
            """,
        )
        loader.add_option(
            "hub_public_url",
            str,
            "",
            """
            The mirror's URL as clients reach it (e.g. https://mirror.example.com);
            token realms in auth challenges point here. Empty: derived from each
            client's connection (TLS server name or local address and port).
            """,
        )
        loader.add_option(
            "hub_official_prefix",
            str,
            "library",
            """
            Namespace of official images on the upstream: a one-segment name such
            as "nginx" becomes "library/nginx" in paths and token scopes. Empty: off.
            """,
        )
        loader.add_option(
            "hub_registry_name",
            str,
            "docker.io",
            """
            The default registry: requests that name no registry (by ?ns=, host
            name or path prefix) go to it, and the official-image prefix applies
            to it. In reverse mode the listener's target is its API.
            """,
        )
        loader.add_option(
            "hub_upstreams",
            Sequence[str],
            list(DEFAULT_UPSTREAMS),
            """
            The registries this mirror serves: "name" (API at https://name) or
            "name=URL" (e.g. docker.io=https://registry-1.docker.io). Nothing
            outside this table is contacted on a client's behalf.
            """,
        )
        loader.add_option(
            "hub_host_map",
            Sequence[str],
            [],
            """
            Client-facing host names that select a registry, as
            "host=registry" (e.g. ghcr.mirror.example=ghcr.io), matched against
            the request's Host header or TLS server name.
            """,
        )
        loader.add_option(
            "hub_proxy_passthrough",
            bool,
            True,
            """
            Forward-proxy (regular) mode: pass traffic for hosts outside
            hub_upstreams through untouched (TLS not intercepted), for clients on
            private or loopback addresses (any client with proxyauth set).
            Off: refuse it for everyone.
            """,
        )
        loader.add_option(
            "hub_users_file",
            str,
            "",
            """
            Mirror accounts: htpasswd-style file of "user:hash" lines (bcrypt or
            argon2; python -m hubrewrite.accounts USER prints one). When set,
            /v2/ needs a token from the mirror's /token, which checks Basic
            credentials "user" / "password[:upstream-user:upstream-password]".
            """,
        )
        loader.add_option(
            "hub_allow",
            Sequence[str],
            [],
            """
            If set, only repositories matching one of these patterns on
            "registry/repository" are served (e.g. docker.io/library/*); others get DENIED.
            """,
        )
        loader.add_option(
            "hub_deny",
            Sequence[str],
            [],
            'Repositories matching any of these "registry/repository" patterns get DENIED.',
        )
        loader.add_option(
            "hub_upstream_credentials",
            str,
            "",
            f"""
            File of the operator's upstream accounts, "<registry> <user> <password>"
            per line (also from {CREDENTIALS_ENV_PREFIX}<REGISTRY>=user:password
            in the environment, e.g. {CREDENTIALS_ENV_PREFIX}DOCKER_IO). Used for
            token requests of clients that bring no upstream credentials.
            """,
        )
        loader.add_option(
            "hub_allow_push",
            bool,
            False,
            """
            Pass PUT/POST/PATCH/DELETE under /v2/ to the upstream. Off: the mirror
            is read-only and answers them with 405 UNSUPPORTED.
            """,
        )
        loader.add_option(
            "hub_upstream_timeout",
            int,
            30,
            "Seconds to wait for the upstream to connect or send data before answering 504.",
        )
        loader.add_option(
            "hub_max_buffered_body",
            int,
            16 * 1024 * 1024,
            """
            Largest non-blob answer (manifest, tag list, token, error) the mirror
            buffers, in bytes; larger ones get 502. Blobs are always streamed.
            """,
        )

        loader.add_option(
            "hub_cache_dir",
            str,
            "",
            """
            Directory of the pull-through cache (blobs and manifests, verified by
            digest; several mirror processes may share it). Empty: no cache.
            """,
        )
        loader.add_option(
            "hub_cache_max_size",
            str,
            "20g",
            """
            Size limit of cached blobs (e.g. 500m, 20g); least recently used
            blobs are evicted beyond it. 0: no limit.
            """,
        )
        loader.add_option(
            "hub_cache_stale",
            int,
            3600,
            """
            Seconds for which cached content is still served while the upstream
            is unreachable or answers 429/5xx (marked with a Warning header).
            """,
        )
        loader.add_option(
            "hub_cache_auth_ttl",
            int,
            60,
            """
            Seconds a client's upstream-confirmed access to a repository is
            remembered when its token's lifetime cannot be read.
            """,
        )
        loader.add_option(
            "hub_metrics_listen",
            str,
            "",
            """
            Also serve the metrics on this loopback address (e.g. 127.0.0.1:9464),
            for a local Prometheus. Empty: only at /_hub/metrics on the mirror.
            """,
        )
        loader.add_option(
            "hub_metrics_auth",
            bool,
            False,
            """
            /_hub/metrics on the mirror needs a mirror account (Basic auth,
            hub_users_file). The loopback metrics listener is not affected.
            """,
        )

    def apply_config_file(self) -> None:
        path_option = ctx.options.hub_config
        if not path_option:
            return
        path = Path(path_option).expanduser()
        if not path.exists():
            if path == DEFAULT_CONFIG:
                return  # no file next to the addon: defaults and command line only
            raise exceptions.OptionsError(f"hub_config: {path} does not exist")
        data = conffile.read_config(path)
        try:
            ctx.options.update(**conffile.options_to_apply(ctx.options, data, str(path)))
        except (TypeError, ValueError) as e:
            raise exceptions.OptionsError(f"{path}: {e}") from e
        log.info("hub_rewrite: options loaded from %s", path)

    def configure(self, updated: set[str]) -> None:
        if "hub_config" in updated:
            # Here, not in load(): command-line --set values of addon options are
            # applied only after load(), and they must win over the file.
            try:
                self.apply_config_file()
            except exceptions.OptionsError as e:
                # A mirror running with half its configuration is worse than none:
                # an error logged at startup makes mitmdump exit with status 1
                # (its errorcheck addon); should that check have passed already,
                # the mirror stops anyway, a moment later.
                log.error("hub_rewrite: %s; stopping", e)
                _stop_later(getattr(ctx, "master", None))
                raise
        if "hub_public_url" in updated:
            value = ctx.options.hub_public_url
            try:
                self.public_url = validate_public_url(value) if value else ""
            except ValueError as e:
                raise exceptions.OptionsError(f"hub_public_url {value!r}: {e}") from e
        if "hub_official_prefix" in updated:
            prefix = ctx.options.hub_official_prefix
            if prefix and not names.NAME_RE.fullmatch(prefix):
                raise exceptions.OptionsError(f"hub_official_prefix {prefix!r} is not a repository namespace")
        if "hub_upstream_timeout" in updated and ctx.options.hub_upstream_timeout < 1:
            raise exceptions.OptionsError("hub_upstream_timeout must be at least 1 second")
        if "hub_max_buffered_body" in updated and ctx.options.hub_max_buffered_body < 65536:
            raise exceptions.OptionsError("hub_max_buffered_body must be at least 65536 bytes")
        if "mode" in updated:
            for spec in ctx.options.mode:
                mode = mode_specs.ProxyMode.parse(spec)
                if isinstance(mode, mode_specs.ReverseMode) and mode.scheme not in ("http", "https"):
                    raise exceptions.OptionsError(
                        f"hub_rewrite serves registries over http or https, not {mode.scheme!r} ({spec})"
                    )
        if updated & TABLE_OPTIONS:
            self.registries = self._read_table()
        if "hub_users_file" in updated:
            path = ctx.options.hub_users_file
            try:
                self.accounts = MirrorAccounts(load_users(Path(path).expanduser())) if path else None
            except AccountsError as e:
                raise exceptions.OptionsError(f"hub_users_file: {e}") from e
            self.issued = IssuedTokens()
        if updated & {"hub_allow", "hub_deny"}:
            try:
                self.rules = RepositoryRules.parse(ctx.options.hub_allow, ctx.options.hub_deny)
            except PolicyError as e:
                raise exceptions.OptionsError(f"hub_allow/hub_deny: {e}") from e
        if updated & ({"hub_upstream_credentials"} | TABLE_OPTIONS):
            try:
                self.upstream_credentials = UpstreamCredentials.load(
                    ctx.options.hub_upstream_credentials, set(self.registries.table) | {self.registries.default}
                )
            except PolicyError as e:
                raise exceptions.OptionsError(f"hub_upstream_credentials: {e}") from e
            if self.upstream_credentials.registries():
                log.info("hub_rewrite: server-side upstream credentials for %s", ", ".join(self.upstream_credentials.registries()))
        if ctx.options.hub_metrics_auth and self.accounts is None:
            raise exceptions.OptionsError("hub_metrics_auth needs mirror accounts (hub_users_file)")
        if "hub_metrics_listen" in updated:
            self._replace_metrics_listener()
        if updated & CLIENT_OPTIONS or self.client is None:
            self._replace_client()
        if updated & CACHE_OPTIONS:
            self._replace_cache()

    def _read_table(self) -> Registries:
        default = ctx.options.hub_registry_name.lower()
        if not names.REGISTRY_HOST_RE.fullmatch(default):
            raise exceptions.OptionsError(f"hub_registry_name {default!r} is not a registry host name")
        try:
            table = registries.parse_table(ctx.options.hub_upstreams)
            host_map = registries.parse_host_map(ctx.options.hub_host_map, set(table))
        except registries.TableError as e:
            raise exceptions.OptionsError(f"hub_upstreams/hub_host_map: {e}") from e
        return Registries(table, default, host_map)

    def _replace_metrics_listener(self) -> None:
        self._stop_metrics_listener()
        value = ctx.options.hub_metrics_listen
        if not value:
            return
        host, port = _loopback_address(value)
        try:
            self.metrics_server = start_metrics_server(port, host, self.metrics.registry)
        except OSError as e:
            raise exceptions.OptionsError(f"hub_metrics_listen {value}: {e.strerror}") from e
        log.info("hub_rewrite: metrics also at http://%s:%d/metrics", host, port)

    def _stop_metrics_listener(self) -> None:
        if self.metrics_server is not None:
            server, _thread = self.metrics_server
            server.shutdown()
            server.server_close()
            self.metrics_server = None

    def _replace_client(self) -> None:
        old = self.client
        self.client = UpstreamClient(
            make_ssl_context(
                ctx.options.ssl_insecure,
                ctx.options.ssl_verify_upstream_trusted_ca,
                ctx.options.ssl_verify_upstream_trusted_confdir,
            ),
            timeout=ctx.options.hub_upstream_timeout,
            max_body=ctx.options.hub_max_buffered_body,
            on_answer=self._observe_upstream,
        )
        if old is not None:
            _close_later(old)

    def _replace_cache(self) -> None:
        directory = ctx.options.hub_cache_dir
        if self.cache is not None:
            _close_later(self.cache.fileserver)
            self.cache = None
        if not directory:
            return
        try:
            max_bytes = human.parse_size(ctx.options.hub_cache_max_size) or 0
        except ValueError as e:
            raise exceptions.OptionsError(f"hub_cache_max_size: {e}") from e
        if ctx.options.hub_cache_stale < 0 or ctx.options.hub_cache_auth_ttl < 1:
            raise exceptions.OptionsError("hub_cache_stale must be >= 0 and hub_cache_auth_ttl >= 1")
        try:
            store = Store(Path(directory).expanduser(), max_bytes)
        except OSError as e:
            raise exceptions.OptionsError(f"hub_cache_dir {directory}: {e.strerror}") from e
        access = AccessMemory(ctx.options.hub_cache_auth_ttl, ctx.options.hub_cache_stale)
        # a waiting client gives up on another's download after this long
        wait_timeout = max(600, 20 * ctx.options.hub_upstream_timeout)
        store.on_evict = lambda digests: self.metrics.cache_evictions.inc(len(digests))
        self.cache = PullThrough(store, access, wait_timeout)
        log.info("hub_rewrite: caching in %s (limit %s)", directory, ctx.options.hub_cache_max_size)

    async def done(self) -> None:
        self._stop_metrics_listener()
        if self.cache is not None:
            await self.cache.fileserver.stop()
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    # ---- hooks ---------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # A push allowed through streams its (possibly huge) request body.
        if flow.request.method in WRITE_METHODS and ctx.options.hub_allow_push and self.place_of(flow):
            flow.request.stream = True

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        place = self.place_of(flow)
        if place is None:
            if is_forward_proxy(flow) and not may_pass_through(flow.client_conn):
                flow.response = _not_in_table()
            return  # forward-proxy traffic for other hosts passes untouched
        try:
            response = await self.answer(flow, *place)
        except Exception:
            # A bug must never let the request through unchecked.
            log.exception("hub_rewrite: internal error on %s %s", flow.request.method, flow.request.path.partition("?")[0])
            response = error_response(500, "UNKNOWN", "internal error in the mirror")
        if response is not None:
            _add_headers(response, CORS_HEADERS)
            flow.response = response

    def place_of(self, flow: http.HTTPFlow) -> tuple[Registries, Upstream | None] | None:
        """The registries a flow may reach, and the one already fixed by the
        host name the client used; None: not a flow the mirror serves."""
        target = reverse_target(flow)
        if target is not None:
            served = self.registries.with_default(target)
            # keep_host_header (mitm.conf) leaves the client's Host for the host map
            mapped = served.for_client_host(flow.request.host_header) or served.for_client_host(flow.client_conn.sni)
            return served, mapped
        if is_forward_proxy(flow):
            asked = self.registries.for_proxy_target(flow.request.host, flow.request.port)
            return (self.registries, asked) if asked is not None else None
        return None

    # ---- forward-proxy mode: only registries are intercepted -------------

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        """TLS to a host outside the table is passed through, not intercepted:
        the client needs to trust mitmproxy's CA only for registries."""
        if not is_forward_proxy(data.context.client) or not may_pass_through(data.context.client):
            return  # intercepted: its requests are refused unless for a registry
        address = data.context.server.address
        port = address[1] if address else 443
        asked = [data.client_hello.sni, address[0] if address else None]
        if not any(host and self.registries.for_proxy_target(host, port) for host in asked):
            data.ignore_connection = True

    def http_connect(self, flow: http.HTTPFlow) -> None:
        if may_pass_through(flow.client_conn):
            return
        if self.registries.for_proxy_target(flow.request.host, flow.request.port) is None:
            flow.response = _not_in_table()

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        # keep_host_header (mitm.conf) leaves the reverse target's TLS server
        # name unset, and mitmproxy would then send the client's (the mirror's
        # own name) upstream.
        if isinstance(data.client.proxy_mode, mode_specs.ReverseMode) and data.server.sni is None and data.server.address:
            data.server.sni = data.server.address[0]

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        blob = flow.metadata.get(META_BLOB)
        if blob is None or flow.response is None:
            return
        response = flow.response
        download: Download | None = blob.get("download")
        if download is not None and response.status_code != 200:
            download.abort()  # only a whole, successful answer can fill the cache
        if 200 <= response.status_code < 300:
            # The bytes go to the client as they arrive: blobs can be many GB.
            served = self._count_served(flow, "cache" if download is None and blob.get("cached") else "upstream")
            if download is not None and response.status_code == 200:
                response.stream = CachingStream(flow, download, _cache_outcome(blob["digest"]), served)
            else:
                response.stream = CountingStream(served)
            self.metrics.in_flight.inc()
            blob["in_flight"] = True
            for name, value in blob["headers"]:
                if name.lower() not in response.headers:
                    response.headers[name] = value
            _add_headers(response, CORS_HEADERS)
        # error answers are small: left buffered for response() to replace

    def response(self, flow: http.HTTPFlow) -> None:
        self.replace_storage_error(flow)
        self.finish_step(flow)

    def replace_storage_error(self, flow: http.HTTPFlow) -> None:
        blob = flow.metadata.get(META_BLOB)
        if blob is None or flow.response is None:
            return
        if blob.get("download") is not None:
            blob["download"].abort()  # no-op when the stream already committed it
        if flow.response.status_code < 300:
            return
        status = flow.response.status_code
        if status == 416:
            return  # Range Not Satisfiable is the storage's honest answer
        log.warning("blob %s: storage at %s answered %d", blob["digest"], flow.request.host, status)
        if status == 403 and "client_path" in blob and not blob["retried"]:
            # A signed URL that expired (or was refused): send the client back to
            # the mirror once; its next request probes the registry for a new one.
            location = f"{blob['client_path']}?{RETRY_PARAM}=1"
            flow.response = make_response(307, [("Location", location), ("Content-Length", "0")], b"")
            return
        if status == 404:
            flow.response = error_response(404, "BLOB_UNKNOWN", "blob unknown to registry storage")
        else:
            flow.response = error_response(
                502, "UNAVAILABLE", f"blob storage answered {status} {flow.response.reason}"
            )
        _add_headers(flow.response, CORS_HEADERS)

    def error(self, flow: http.HTTPFlow) -> None:
        blob = flow.metadata.get(META_BLOB)
        if blob is None:
            self.finish_step(flow)
            return
        if blob.get("download") is not None:
            # truncated, aborted by either side, or killed on a digest mismatch
            blob["download"].abort()
        if flow.error:
            log.warning("blob %s transfer from %s failed: %s", blob["digest"], flow.request.host, flow.error.msg)
        self.finish_step(flow)

    # ---- the mirror's answers ----------------------------------------

    async def answer(self, flow: http.HTTPFlow, served: Registries, fixed: Upstream | None) -> http.Response | None:
        """Answer a client request, or retarget the flow and return None."""
        request = flow.request
        method = request.method
        path = request.path.partition("?")[0]

        home = fixed or served.table.get(served.default)
        flow.metadata[META_STEP] = {"start": time.time(), "upstream": home.base if home else "-", "kind": "other", "repo": "", "ref": ""}
        if method == "OPTIONS":
            return make_response(204, PREFLIGHT_HEADERS, b"")
        if path in ("/", METRICS_PATH, HEALTH_PATH) and method in READ_METHODS:
            return await self.own_page(flow, served, path)
        if path == TOKEN_PATH or path.startswith(TOKEN_PATH + "/"):
            flow.metadata[META_STEP]["kind"] = "token"
            return await self.token(flow, served, fixed, path)
        try:
            route = names.parse_route(path)
            by_ns = served.by_ns(request.query.get_all("ns"))
            if fixed is not None and by_ns not in (None, fixed):
                raise names.RouteError(404, "NAME_UNKNOWN", f"this host serves {fixed.name}, not {by_ns.name}")
            routed = served.route(by_ns or fixed, route.name) if route.name else Routed(by_ns or fixed or served.default_upstream, "")
        except names.RouteError as e:
            return error_response(e.status, e.code, e.message)
        upstream = routed.upstream
        route = replace(route, name=routed.name)
        if upstream.name == ctx.options.hub_registry_name.lower():
            route = names.with_official_prefix(route, ctx.options.hub_official_prefix)
        flow.metadata[META_VIEW] = ClientView(self.token_url(flow, served, upstream), routed.client_prefix)
        # mitmweb shows the listener's target as the request's host: say where it really went
        flow.comment = f"hub: {upstream.name} {route.name or route.kind.value} at {upstream.base}"
        flow.metadata[META_STEP].update(upstream=upstream.base, kind=route.kind.value, repo=route.name, ref=route.reference)
        path_and_query = route.path() + self.served_query(request)

        if route.name and not self.rules.permits(upstream.name, route.name):
            log.info("refused %s/%s: not allowed by hub_allow/hub_deny", upstream.name, route.name)
            return error_response(403, "DENIED", f"repository {routed.client_name(route.name)} is not served by this mirror")
        if self.accounts is not None:
            refusal = await self.sign_in_required(flow, upstream, route, routed.client_prefix)
            if refusal is not None:
                return refusal
            if self.issued.is_own(bearer_token(request.headers.get("authorization"))):
                del request.headers["authorization"]  # the mirror's own token means nothing upstream
        if method in WRITE_METHODS:
            if not ctx.options.hub_allow_push:
                return error_response(
                    405, "UNSUPPORTED", "this mirror is read-only", extra_headers=[("Allow", "GET, HEAD")]
                )
            request.url = upstream.url(path_and_query)
            return None  # mitmproxy forwards it, body streamed
        if method not in READ_METHODS:
            return error_response(405, "UNSUPPORTED", f"method {method} is not supported")
        if route.kind is names.Kind.BLOB:
            return await self.blob(flow, upstream, route, path_and_query)
        if route.kind is names.Kind.MANIFEST and self.cache is not None:
            return await self.cached_manifest(flow, upstream, route, path_and_query)
        return await self.relay(flow, upstream, path_and_query)

    def served_query(self, request: http.Request) -> str:
        """The query to forward, without the mirror's own parameters.

        ``ns`` (containerd) chose the registry and is not sent upstream.
        ``_hub_retry`` marks a blob request the mirror sent back to itself
        after the storage refused a signed URL.
        """
        kept = [(k, v) for k, v in request.query.items(multi=True) if k not in ("ns", RETRY_PARAM)]
        return "?" + urlencode(kept) if kept else ""

    def mirror_url(self, flow: http.HTTPFlow) -> str:
        """The mirror's URL as this client reaches it (no trailing slash)."""
        if is_forward_proxy(flow):
            # the client believes it talks to the registry host itself
            return f"{flow.request.scheme}://{flow.request.host_header or flow.request.pretty_host}"
        return self.public_url or public_url_of(flow.client_conn)

    def token_url(self, flow: http.HTTPFlow, served: Registries, upstream: Upstream) -> str:
        """The realm advertised for an upstream: /token for the default registry, /token/<registry> otherwise."""
        base = self.mirror_url(flow) + TOKEN_PATH
        return base if upstream.name == served.default else f"{base}/{upstream.name}"

    async def sign_in_required(
        self, flow: http.HTTPFlow, upstream: Upstream, route: names.Route, client_prefix: str
    ) -> http.Response | None:
        """Mirror accounts: a /v2/ request needs a token the mirror issued to a user."""
        if self.issued.user_of(bearer_token(flow.request.headers.get("authorization"))) is not None:
            return None
        service = None
        try:
            await self.learned_realm(upstream)
            service = self.realms.get(upstream.base, (None, None))[1]
        except UpstreamError:
            pass  # the challenge still tells the client where to sign in
        params = {"realm": flow.metadata[META_VIEW].token_url, "service": service or "hub-rewrite"}
        if route.name:
            params["scope"] = f"repository:{client_prefix}{route.name}:pull"
        return _bearer_challenge(params, "sign in to the mirror (docker login)",
                                 [("Docker-Distribution-API-Version", "registry/2.0")],
                                 with_body=flow.request.method != "HEAD")

    async def relay(self, flow: http.HTTPFlow, upstream: Upstream, path_and_query: str) -> http.Response:
        """A small exchange made by the mirror itself, redirects followed."""
        assert self.client is not None
        url = upstream.url(path_and_query)
        try:
            fetched = await self.client.fetch(
                flow.request.method, url, hdrs.upstream_request_headers(_fields(flow.request.headers))
            )
        except UpstreamError as e:
            log.warning("%s %s: %s", flow.request.method, path_and_query.partition("?")[0], e.message)
            if e.status in (502, 503, 504) and (path_and_query.startswith("/v2/?") or path_and_query == "/v2/"):
                challenge_answer = self.offline_challenge(flow, upstream)
                if challenge_answer is not None:
                    return challenge_answer
            return error_response(e.status, e.code, e.message)
        if fetched.redirected_to:
            flow.comment += f"; followed upstream redirect to {fetched.redirected_to}"
        return self.relayed_response(flow, upstream, fetched.status, fetched.headers, fetched.body)

    async def blob(
        self, flow: http.HTTPFlow, upstream: Upstream, route: names.Route, path_and_query: str
    ) -> http.Response | None:
        """Serve from the cache, or probe the registry once and stream the blob
        from wherever it redirects (filling the cache on the way)."""
        assert self.client is not None
        download: Download | None = None
        if self.cache is not None:
            handled, answer, download = await self.blob_from_cache(flow, upstream, route)
            if handled:
                return answer
        try:
            answer = await self.blob_from_upstream(flow, upstream, route, path_and_query, download)
        except BaseException:
            if download is not None:
                download.abort()
            raise
        if answer is not None and download is not None:
            download.abort()
        return answer

    async def blob_from_upstream(
        self,
        flow: http.HTTPFlow,
        upstream: Upstream,
        route: names.Route,
        path_and_query: str,
        download: Download | None,
    ) -> http.Response | None:
        request = flow.request
        url = upstream.url(path_and_query)
        client_headers = _fields(request.headers)
        try:
            async with self.client.open(
                request.method, url, hdrs.upstream_request_headers(client_headers)
            ) as probe:
                location = probe.headers.get("location")
                if probe.status_code in (301, 302, 303, 307, 308) and location:
                    target = redirect_target(url, location)
                    kept = [(k, v) for k, v in hdrs.decode_fields(probe.headers.raw) if k.lower() in BLOB_HEADERS_KEPT]
                elif 200 <= probe.status_code < 300 and request.method == "GET":
                    # The registry serves the blob itself: let mitmproxy fetch it
                    # again so that it streams (a probe's body cannot be handed over).
                    target, kept = None, []
                else:
                    body = b"" if request.method == "HEAD" else await self.client.read_body(probe)
                    fields = hdrs.decode_fields(probe.headers.raw)
                    return self.relayed_response(flow, upstream, probe.status_code, fields, body)
        except UpstreamError as e:
            log.warning("%s blob %s: %s", request.method, route.reference, e.message)
            return error_response(e.status, e.code, e.message)

        if not any(name.lower() == "docker-content-digest" for name, _ in kept):
            # distribution's redirect does not carry it, the CDN knows nothing
            # of digests, but clients (containerd) use it: the path names it.
            kept.append(("Docker-Content-Digest", route.reference))
        if self.cache is not None:
            self.confirm_access(flow, upstream, route.name, route.reference)
            kept.append((CACHE_HEADER, "miss"))
        flow.metadata[META_BLOB] = {
            "digest": route.reference,
            "headers": kept,
            "download": download,
            # for sending the client back to the mirror once if the storage refuses the signed URL
            "client_path": route.path(),
            "retried": RETRY_PARAM in request.query,
        }
        if target is None:
            request.url = url
            return None
        try:
            await check_reachable(target, ctx.options.hub_upstream_timeout)
        except UpstreamError as e:
            log.warning("blob %s: %s", route.reference, e.message)
            flow.metadata.pop(META_BLOB, None)
            return error_response(e.status, e.code, e.message)  # blob() releases the download
        # Retarget this flow: mitmproxy opens the connection to the CDN after
        # this hook and streams its answer back. The client's credentials are
        # for the registry only (and storage services reject them with 400).
        for name in hdrs.CREDENTIAL_HEADERS:
            request.headers.pop(name, None)
        request.url = target
        flow.comment += f"; blob streamed from {urlsplit(target).hostname}"
        return None

    # ---- the pull-through cache ----------------------------------------

    async def blob_from_cache(
        self, flow: http.HTTPFlow, upstream: Upstream, route: names.Route
    ) -> tuple[bool, http.Response | None, Download | None]:
        """(handled, answer, download): served from the cache, or who fetches it upstream.

        Only a whole-blob GET may become the blob's download; a client asking
        for a blob someone else is downloading waits for it, then is served
        from disk: one upstream fetch per digest.
        """
        assert self.cache is not None
        digest = route.reference
        whole_get = flow.request.method == "GET" and "range" not in flow.request.headers
        for _ in range(3):
            if await self.cache.verified_blob(digest):
                return True, await self.serve_cached_blob(flow, upstream, route), None
            if not whole_get:
                break
            download = self.cache.lead(digest)
            if download is not None:
                return False, None, download
            await self.cache.wait_for(digest)
        return False, None, None

    async def serve_cached_blob(self, flow: http.HTTPFlow, upstream: Upstream, route: names.Route) -> http.Response | None:
        """Retarget the flow to the cache's file server, once this client may have the blob."""
        assert self.cache is not None and self.client is not None
        request = flow.request
        digest = route.reference
        refusal, stale = await self.check_access(flow, upstream, route.name, digest, route.path())
        if refusal is not None:
            return refusal
        await self.cache.fileserver.start()
        self.cache.store.touch(digest)
        headers = [("Docker-Content-Digest", digest), (CACHE_HEADER, "stale" if stale else "hit")]
        if stale:
            headers.append(STALE_WARNING)
        flow.metadata[META_BLOB] = {"digest": digest, "headers": headers, "download": None, "cached": True}
        for name in hdrs.CREDENTIAL_HEADERS:
            request.headers.pop(name, None)
        request.url = self.cache.fileserver.url(digest)
        flow.comment += "; blob served from the cache" + (" (stale)" if stale else "")
        return None

    async def check_access(
        self, flow: http.HTTPFlow, upstream: Upstream, repository: str, digest: str, path: str
    ) -> tuple[http.Response | None, bool]:
        """(refusal, stale): may this client have this digest of this repository?

        Known if the upstream confirmed it for this client's token and this
        repository holds the digest; otherwise asked with a HEAD (which Docker
        Hub does not count against the rate limit) carrying the client's token.
        """
        assert self.cache is not None and self.client is not None
        access, store = self.cache.access, self.cache.store
        identity = client_identity(flow.request.headers.get("authorization"))
        if access.allowed(identity, upstream.base, repository) and store.is_member(upstream.base, repository, digest):
            return None, False
        failure: UpstreamError | None = None
        try:
            head = await self.client.fetch(
                "HEAD", upstream.url(path), hdrs.upstream_request_headers(_fields(flow.request.headers)),
                follow_redirects=False,
            )
        except UpstreamError as e:
            head, failure = None, e
        if head is not None and 200 <= head.status < 400:
            self.confirm_access(flow, upstream, repository, digest)
            return None, False
        unavailable = head is None or head.status == 429 or head.status >= 500
        if unavailable and access.allowed_stale(identity, upstream.base, repository) and store.is_member(
            upstream.base, repository, digest
        ):
            return None, True
        if head is None:
            assert failure is not None
            return error_response(failure.status, failure.code, failure.message), False
        return self.refusal_from_head(flow, upstream, head.status, head.headers), False

    def refusal_from_head(
        self, flow: http.HTTPFlow, upstream: Upstream, status: int, fields: list[tuple[str, str]]
    ) -> http.Response:
        """The upstream's answer to a HEAD, with a registry error body for a GET."""
        code = {401: "UNAUTHORIZED", 403: "DENIED", 404: "NAME_UNKNOWN", 429: "TOOMANYREQUESTS"}.get(status, "UNAVAILABLE")
        body = b""
        if flow.request.method != "HEAD":
            body = json.dumps({"errors": [{"code": code, "message": f"upstream answered {status}"}]}).encode()
        fields = hdrs.without(fields, ["content-type", "content-length", "docker-content-digest", "etag"])
        response = self.relayed_response(flow, upstream, status, fields + [("Content-Type", "application/json")], body)
        return response

    def confirm_access(self, flow: http.HTTPFlow, upstream: Upstream, repository: str, digest: str) -> None:
        """The upstream just let this client read this digest of this repository."""
        assert self.cache is not None
        authorization = flow.request.headers.get("authorization")
        self.cache.access.confirm(client_identity(authorization), authorization, upstream.base, repository)
        self.cache.store.add_member(upstream.base, repository, digest)

    async def cached_manifest(
        self, flow: http.HTTPFlow, upstream: Upstream, route: names.Route, path_and_query: str
    ) -> http.Response:
        """Manifests from the cache by digest; a tag resolved with an upstream HEAD.

        HEAD requests do not count against Docker Hub's pull rate limit; a
        cached manifest is then served without any upstream GET.
        """
        assert self.cache is not None and self.client is not None
        store, access = self.cache.store, self.cache.access
        request = flow.request
        identity = client_identity(request.headers.get("authorization"))
        # one tag answers with an index, a manifest or a legacy schema depending on Accept
        accept = "\n".join(request.headers.get_all("accept"))
        if route.is_digest and access.allowed(identity, upstream.base, route.name) and store.is_member(
            upstream.base, route.name, route.reference
        ):
            cached = store.get_manifest(route.reference)
            if cached is not None:
                return self.manifest_answer(flow, route.reference, cached, "hit")

        headers = hdrs.upstream_request_headers(_fields(request.headers))
        url = upstream.url(path_and_query)
        failure: UpstreamError | None = None
        try:
            head = await self.client.fetch("HEAD", url, headers)
        except UpstreamError as e:
            head, failure = None, e
        digest = head.header("docker-content-digest") if head is not None else None
        if head is not None and head.status == 200 and digest and digest.startswith("sha256:"):
            self.note_ratelimit(upstream, head.headers)
            self.confirm_access(flow, upstream, route.name, digest)
            if not route.is_digest:
                store.put_tag(upstream.base, route.name, route.reference, accept, digest, head.header("content-type") or "")
            if request.method == "HEAD":
                answer = self.relayed_response(flow, upstream, head.status, head.headers, b"")
                answer.headers[CACHE_HEADER] = "hit" if store.has_manifest(digest) else "miss"
                return answer
            cached = store.get_manifest(digest)
            if cached is not None:
                return self.manifest_answer(flow, digest, cached, "hit")
            answer = await self.relay(flow, upstream, path_and_query)
            if answer.status_code == 200 and answer.headers.get("docker-content-digest") == digest:
                # stored only if the bytes match the digest (a compressed answer does not)
                store.put_manifest(digest, answer.headers.get("content-type", ""), answer.raw_content or b"")
            answer.headers[CACHE_HEADER] = "miss"
            return answer
        if head is None or head.status == 429 or head.status >= 500:
            stale = self.stale_manifest(flow, upstream, route, identity, accept)
            if stale is not None:
                return stale
            if head is None:
                assert failure is not None
                return error_response(failure.status, failure.code, failure.message)
        # a refusal or an unusual answer: the client gets the upstream's own
        return await self.relay(flow, upstream, path_and_query)

    def stale_manifest(
        self, flow: http.HTTPFlow, upstream: Upstream, route: names.Route, identity: str, accept: str
    ) -> http.Response | None:
        """A cached manifest for an unavailable upstream, within the stale window."""
        assert self.cache is not None
        store, access = self.cache.store, self.cache.access
        if route.is_digest:
            digest = route.reference
        else:
            entry = store.get_tag(upstream.base, route.name, route.reference, accept)
            if entry is None or time.time() - entry.stored_at > access.stale_seconds:
                return None
            digest = entry.digest
        if not (store.is_member(upstream.base, route.name, digest) and access.allowed_stale(identity, upstream.base, route.name)):
            return None
        cached = store.get_manifest(digest)
        if cached is None:
            return None
        log.warning("serving %s@%s from the cache: upstream unavailable", route.name, digest)
        return self.manifest_answer(flow, digest, cached, "stale")

    def manifest_answer(self, flow: http.HTTPFlow, digest: str, cached: tuple[str, bytes], state: str) -> http.Response:
        media_type, body = cached
        headers = [
            ("Content-Type", media_type),
            ("Docker-Content-Digest", digest),
            ("ETag", f'"{digest}"'),
            ("Content-Length", str(len(body))),
            ("Docker-Distribution-API-Version", "registry/2.0"),
            (CACHE_HEADER, state),
        ]
        if state == "stale":
            headers.append(STALE_WARNING)
        return make_response(200, headers, b"" if flow.request.method == "HEAD" else body)

    def offline_challenge(self, flow: http.HTTPFlow, upstream: Upstream) -> http.Response | None:
        """/v2/ while the upstream is unreachable: the challenge it sent before, so
        clients go on to /token and to cached content."""
        if self.cache is None or upstream.base not in self.realms:
            return None
        _, service = self.realms[upstream.base]
        params = {"realm": flow.metadata[META_VIEW].token_url} | ({"service": service} if service else {})
        return _bearer_challenge(params, "authentication required", [(CACHE_HEADER, "stale"), STALE_WARNING])

    def own_token(self, user: str) -> http.Response:
        """Mirror accounts in front of an upstream without token auth: the
        mirror's own token, which opens the mirror and is never sent upstream."""
        token = "hub-rewrite." + secrets.token_urlsafe(24)
        self.issued.issue(token, user, OWN_TOKEN_LIFETIME, own=True)
        return _token_answer(token, OWN_TOKEN_LIFETIME)

    def offline_token(self, user: str | None = None) -> http.Response:
        """A token for a client without credentials while the token service is down.

        It is the mirror's own, worthless upstream, and opens only what
        anonymous clients were seen to pull within the stale window.
        """
        assert self.cache is not None
        token = "hub-rewrite-offline." + secrets.token_urlsafe(24)
        self.cache.access.note_anonymous_token(token)
        if user is not None:
            self.issued.issue(token, user, OWN_TOKEN_LIFETIME)
        return _token_answer(token, OWN_TOKEN_LIFETIME, [(CACHE_HEADER, "stale"), STALE_WARNING])

    def note_anonymous_grant(self, body: bytes) -> None:
        """Tokens handed to clients without credentials mark what anyone may pull."""
        assert self.cache is not None
        try:
            grant = json.loads(body)
        except ValueError:
            return
        if not isinstance(grant, dict):
            return
        for key in ("token", "access_token"):
            if isinstance(grant.get(key), str):
                self.cache.access.note_anonymous_token(grant[key])

    def note_ratelimit(self, upstream: Upstream, fields: list[tuple[str, str]]) -> None:
        """Keep the latest Docker Hub pull allowance per upstream identity."""
        remaining = source = None
        for name, value in fields:
            if name.lower() == "ratelimit-remaining":
                remaining = value
            elif name.lower() == "docker-ratelimit-source":
                source = value
        if remaining is None:
            return
        key = (upstream.base, source or "-")
        count = remaining.split(";")[0].strip()
        if count.isdigit():
            self.metrics.ratelimit_remaining.labels(upstream.base, source or "-").set(int(count))
        if self.ratelimits.get(key) != remaining:
            log.info("rate limit at %s for %s: %s remaining", upstream.base, source or "this mirror", remaining)
        self.ratelimits[key] = remaining

    # ---- observability -----------------------------------------------------

    async def own_page(self, flow: http.HTTPFlow, served: Registries, path: str) -> http.Response:
        """The status page, metrics and health: the mirror's own, not the registry's."""
        flow.metadata[META_STEP]["kind"] = "page"
        if path == METRICS_PATH and ctx.options.hub_metrics_auth and not await self.signed_in_basic(flow):
            return error_response(401, "UNAUTHORIZED", "the metrics need a mirror account",
                                  extra_headers=[("WWW-Authenticate", 'Basic realm="hub-rewrite metrics"')])
        cache_bytes = None
        if self.cache is not None:
            cache_bytes = await asyncio.to_thread(self.cache.store.total_bytes)
            self.metrics.cache_bytes.set(cache_bytes)
        if path == METRICS_PATH:
            body, content_type = self.metrics.exposition()
            return make_response(200, [("Content-Type", content_type), ("Content-Length", str(len(body)))], body)
        if path == HEALTH_PATH:
            ok, details = await asyncio.to_thread(self.health_details)
            body = health_body(ok, details)
            return make_response(200 if ok else 503, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))], body)
        body = status_page(
            self.mirror_url(flow),
            served.default_upstream.base,
            served.default,
            sorted(served.table),
            ctx.options.hub_cache_dir,
            cache_bytes,
            ctx.options.hub_cache_max_size,
            self.metrics.hit_rate(),
            self.ratelimits,
            sum(s.value for m in self.metrics.requests.collect() for s in m.samples if s.name.endswith("_total")),
        )
        return make_response(200, [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(body)))], body)

    async def signed_in_basic(self, flow: http.HTTPFlow) -> bool:
        """Basic credentials of a mirror account (the mirror part of the password)."""
        if self.accounts is None:
            return False
        try:
            await sign_in(self.accounts, self.issued, flow.request.headers.get("authorization"), None)
        except SignInRefused:
            return False
        return True

    def health_details(self) -> tuple[bool, dict]:
        """Configured, and the cache (if any) writable. Blocking: run in a thread."""
        details: dict = {"client": self.client is not None, "cache": "off"}
        ok = self.client is not None
        if self.cache is not None:
            probe = self.cache.store.tmp / f"health.{secrets.token_hex(4)}"
            try:
                probe.write_bytes(b"ok")
                probe.unlink()
                details["cache"] = "writable"
            except OSError as e:
                details["cache"] = f"not writable: {e.strerror}"
                ok = False
        return ok, details

    def _observe_upstream(self, host: str, seconds: float) -> None:
        self.metrics.upstream_latency.labels(host).observe(seconds)

    def _count_served(self, flow: http.HTTPFlow, source: str):
        step = flow.metadata.setdefault(META_STEP, {})
        step["streamed"] = 0
        served = self.metrics.bytes_served.labels(source)
        fetched = self.metrics.bytes_fetched.labels(step.get("upstream", "-")) if source == "upstream" else None

        def on_bytes(n: int) -> None:
            step["streamed"] += n
            served.inc(n)
            if fetched is not None:
                fetched.inc(n)
        return on_bytes

    def finish_step(self, flow: http.HTTPFlow) -> None:
        """One log line and the metrics of a finished client request."""
        step = flow.metadata.get(META_STEP)
        if step is None or step.get("done"):
            return
        step["done"] = True
        blob = flow.metadata.get(META_BLOB)
        if blob is not None and blob.pop("in_flight", False):
            self.metrics.in_flight.dec()
        response = flow.response
        status: int | str = response.status_code if response is not None and not flow.error else "error"
        cache_state = response.headers.get(CACHE_HEADER, "") if response is not None else ""
        if "streamed" in step:
            size = step["streamed"]
        else:
            size = len(response.raw_content or b"") if response is not None else 0
            if size:
                self.metrics.bytes_served.labels("mirror").inc(size)
        self.metrics.requests.labels(step["upstream"], step["kind"], str(status)).inc()
        if cache_state in ("hit", "miss", "stale") and step["kind"] in ("blob", "manifest"):
            self.metrics.cache_requests.labels(step["kind"], cache_state).inc()
        if step["kind"] == "page":
            return
        log.info(pull_log_line(
            flow.client_conn.peername[0] if flow.client_conn.peername else "-",
            step["upstream"], flow.request.method, step["kind"], step["repo"], step["ref"],
            status, size, time.time() - step["start"], cache_state,
        ))

    async def token(self, flow: http.HTTPFlow, served: Registries, fixed: Upstream | None, path: str) -> http.Response:
        """Forward a token request to the realm learned from the upstream it is for.

        The client's upstream credentials go to that realm only; with mirror
        accounts on, the mirror part of them is checked here and kept back.
        """
        assert self.client is not None
        request = flow.request
        if request.method not in ("GET", "POST"):
            return error_response(405, "UNSUPPORTED", "token requests are GET or POST")
        try:
            query = list(request.query.items(multi=True))
            form = tokens.parse_form(request.raw_content or b"") if request.method == "POST" else None
            named = path[len(TOKEN_PATH) + 1:]
            upstream = served.for_token(fixed, named or None, tokens.scope_names(query + (form or [])))
        except tokens.TokenRequestError as e:
            return error_response(400, "UNSUPPORTED", f"malformed token request: {e}")
        except names.RouteError as e:
            return error_response(e.status, e.code, e.message)
        flow.metadata[META_STEP]["upstream"] = upstream.base
        client_fields = _fields(request.headers)
        authorization = next((v for k, v in client_fields if k.lower() == "authorization"), None)
        user = None
        if self.accounts is not None:
            try:
                user, authorization, form = await sign_in(self.accounts, self.issued, authorization, form)
            except SignInRefused as e:
                if e.user:
                    log.warning("mirror sign-in refused for user %r: %s", e.user[:64], e.message)
                return error_response(401, "UNAUTHORIZED", e.message,
                                      extra_headers=[("WWW-Authenticate", 'Basic realm="hub-rewrite"')])
        try:
            realm = await self.learned_realm(upstream)
        except UpstreamError as e:
            return error_response(e.status, e.code, f"cannot reach the upstream registry: {e.message}")
        if realm is None:
            if user is not None:
                return self.own_token(user)
            return error_response(404, "UNSUPPORTED", "the upstream registry does not use token authentication")

        query, form = self.upstream_token_fields(served, upstream, query, form)
        method = request.method
        if method == "POST" and form is not None and not tokens.carries_credentials(form):
            # a password grant whose password was only the mirror's: ask anonymously
            method, query, form = "GET", query + [(k, v) for k, v in form if k in ("service", "scope", "client_id")], None
        anonymous = authorization is None and not tokens.carries_credentials(form)
        if anonymous:
            authorization = self.upstream_credentials.basic_for(upstream.name)
        headers = hdrs.without(tokens.token_request_headers(client_fields), ["authorization", "content-type"])
        if authorization:
            headers.append(("Authorization", authorization))
        body = None
        if form is not None:
            body = tokens.encode_form(form)
            headers.append(("Content-Type", tokens.FORM_TYPE))
        as_anonymous = anonymous and authorization is None
        try:
            # Not following redirects: the credentials go to this realm only.
            fetched = await self.client.fetch(
                method, tokens.realm_url(realm, query), headers, content=body, follow_redirects=False
            )
        except UpstreamError as e:
            log.warning("token request to %s: %s", urlsplit(realm).hostname, e.message)
            if self.cache is not None and as_anonymous:
                return self.offline_token(user)
            return error_response(e.status, e.code, f"token service: {e.message}")
        if fetched.status >= 500:
            log.warning("token request to %s: answered %d", urlsplit(realm).hostname, fetched.status)
            if self.cache is not None and as_anonymous:
                return self.offline_token(user)
            return error_response(502, "UNAVAILABLE", f"token service answered {fetched.status}")
        answer = fetched.body
        if fetched.status == 200:
            if self.cache is not None and as_anonymous:
                self.note_anonymous_grant(answer)
            if user is not None:
                answer = self.issued.issue_grant(user, answer)
        answer_headers = hdrs.without(hdrs.end_to_end(fetched.headers), ["set-cookie", "location"])
        return make_response(fetched.status, _with_length(answer_headers, answer, request.method), answer)

    def upstream_token_fields(
        self, served: Registries, upstream: Upstream, query: list[tuple[str, str]], form: list[tuple[str, str]] | None
    ) -> tuple[list[tuple[str, str]], list[tuple[str, str]] | None]:
        """A token request's query and form as the upstream's token service
        must see them: its repository names, its service, permitted scopes only."""
        to_upstream = served.scope_map(upstream, ctx.options.hub_registry_name.lower(), ctx.options.hub_official_prefix)

        def scope_map(scope: str) -> str:
            # No token for a repository the rules refuse: with server-side
            # credentials it would carry the operator's rights out of the mirror.
            mapped = to_upstream(scope)
            name = names.scope_name(mapped)
            return mapped if name is None or self.rules.permits(upstream.name, name) else ""

        # the client may have taken the service from another registry's challenge (path prefix)
        service = self.realms[upstream.base][1]
        query = tokens.rewrite_query(query, scope_map)
        if service:
            query = [(k, service if k == "service" else v) for k, v in query]
        if form is not None:
            form = tokens.rewrite_form(form, scope_map)
            if service:
                form = [(k, service if k == "service" else v) for k, v in form]
        return query, form

    async def learned_realm(self, upstream: Upstream) -> str | None:
        """The upstream's token realm; asks its /v2/ once if no challenge was seen yet."""
        if upstream.base not in self.realms:
            assert self.client is not None
            fetched = await self.client.fetch("GET", upstream.url("/v2/"), [], follow_redirects=False)
            self.learn_challenges(upstream, fetched.headers)
        learned = self.realms.get(upstream.base)
        return learned[0] if learned else None

    def learn_challenges(self, upstream: Upstream, fields: list[tuple[str, str]]) -> None:
        for name, value in fields:
            if name.lower() != "www-authenticate":
                continue
            try:
                parsed = challenge.parse_challenges(value)
            except challenge.ChallengeError:
                continue
            for c in parsed:
                realm = c.get("realm")
                if c.is_bearer and realm and urlsplit(realm).scheme in ("http", "https"):
                    self.realms[upstream.base] = (realm, c.get("service"))

    def relayed_response(
        self,
        flow: http.HTTPFlow,
        upstream: Upstream,
        status: int,
        fields: list[tuple[str, str]],
        body: bytes,
    ) -> http.Response:
        """An upstream answer as the client should see it."""
        self.learn_challenges(upstream, fields)
        self.note_ratelimit(upstream, fields)
        view: ClientView = flow.metadata[META_VIEW]
        out: list[tuple[str, str]] = []
        for name, value in hdrs.end_to_end(fields):
            if name.lower() == "www-authenticate":
                value = _rewrite_challenge(value, view)
            elif name.lower() in ("set-cookie", "location"):
                continue  # the client only ever talks to the mirror
            out.append((name, value))
        return make_response(status, _with_length(out, body, flow.request.method), body)


def _rewrite_challenge(value: str, view: ClientView) -> str:
    """Point every Bearer realm at the mirror; scopes name repositories as the
    client does (with its registry prefix); service and error stay."""
    try:
        parsed = challenge.parse_challenges(value)
    except challenge.ChallengeError:
        return value
    rewritten = []
    for c in parsed:
        if c.is_bearer and c.get("realm"):
            c = c.with_param("realm", view.token_url)
            scope = c.get("scope")
            if scope and view.client_prefix:
                client_scope = " ".join(names.map_scope(s, lambda n: view.client_prefix + n) for s in scope.split(" "))
                c = c.with_param("scope", client_scope)
        rewritten.append(c)
    return challenge.format_challenges(rewritten)


def _fields(headers: http.Headers) -> list[tuple[str, str]]:
    return hdrs.decode_fields(headers.fields)


def _with_length(fields: list[tuple[str, str]], body: bytes, method: str) -> list[tuple[str, str]]:
    """Frame a buffered body: its length, unless this answers a HEAD (keep the GET's)."""
    if method == "HEAD":
        return fields
    return hdrs.without(fields, ["content-length"]) + [("Content-Length", str(len(body)))]


def _add_headers(response: http.Response, fields: list[tuple[str, str]]) -> None:
    for name, value in fields:
        if name not in response.headers:
            response.headers[name] = value


def _close_later(closable) -> None:
    """Close an UpstreamClient (aclose) or FileServer (stop) replaced by a new configuration."""
    closer = getattr(closable, "aclose", None) or closable.stop
    try:
        asyncio.get_running_loop().create_task(closer())
    except RuntimeError:
        pass  # no loop (tests, shutdown): garbage collected


def _cache_outcome(digest: str):
    def outcome(committed: bool, size: int) -> None:
        if committed:
            log.info("cached blob %s (%d bytes)", digest, size)
        else:
            log.error("blob %s from upstream does not match its digest: discarded, transfer aborted", digest)
    return outcome


def _bearer_challenge(
    params: dict[str, str], message: str, extra_headers: list[tuple[str, str]], with_body: bool = True
) -> http.Response:
    """401 UNAUTHORIZED pointing the client at the mirror's token endpoint."""
    body = json.dumps({"errors": [{"code": "UNAUTHORIZED", "message": message}]}).encode()
    return make_response(401, [
        ("WWW-Authenticate", challenge.Challenge("Bearer", params).format()),
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        *extra_headers,
    ], body if with_body else b"")


def _token_answer(token: str, lifetime: float, extra_headers: list[tuple[str, str]] = ()) -> http.Response:
    """A token the mirror made itself, shaped like a token service's answer."""
    body = json.dumps({"token": token, "access_token": token, "expires_in": int(lifetime),
                       "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode()
    return make_response(200, [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                               *extra_headers], body)


def _not_in_table() -> http.Response:
    return error_response(403, "DENIED", "this proxy only serves the registries in its table")


def _loopback_address(value: str) -> tuple[str, int]:
    """hub_metrics_listen: a loopback host and a port (metrics are for a local scraper)."""
    host, _, port = value.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        number = int(port)
    except ValueError:
        loopback, number = False, -1
    if not loopback or not 0 < number < 65536:
        raise exceptions.OptionsError(f"hub_metrics_listen {value!r}: expected a loopback host:port, e.g. 127.0.0.1:9464")
    return host, number


def _stop_later(master, delay: float = 2.0) -> None:
    if master is None or not hasattr(master, "shutdown"):
        return
    try:
        asyncio.get_running_loop().call_later(delay, master.shutdown)
    except RuntimeError:
        pass  # no loop (tests): nothing is serving


def may_pass_through(client) -> bool:
    """May this forward-proxy client reach hosts outside the table?

    Only with hub_proxy_passthrough, and only from a private or loopback
    address unless mitmproxy's proxyauth guards the proxy: mitm.conf turns
    block_global off for the mirror, and a proxy that passes anything for
    anyone on the internet is an open proxy.
    """
    if not ctx.options.hub_proxy_passthrough:
        return False
    if getattr(ctx.options, "proxyauth", None):
        return True
    address = ip_of(client.peername[0]) if client.peername else None
    return address is not None and not address.is_global
