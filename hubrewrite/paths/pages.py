"""The mirror's own pages: the status page (``/``), ``/_hub/health`` and ``/_hub/metrics``."""

from __future__ import annotations

import asyncio
import secrets

from mitmproxy import connection, http
from mitmproxy.utils import human

from ..access.accounts import sign_in
from ..clientconn import is_forward_proxy
from ..client_request import ClientRequest
from ..registry.errors import RegistryError
from ..registry.upstream import host_for_url
from ..responses import error_response, json_response, make_response
from ..observe.status_page import RegistrySources, StatusFacts, status_page
from ..sources import describe_stale
from .parts import PageParts

METRICS_PATH = "/_hub/metrics"
HEALTH_PATH = "/_hub/health"


async def serve(request: ClientRequest, parts: PageParts) -> http.Response:
    if request.path == METRICS_PATH and parts.metrics_auth and not await _signed_in(request, parts):
        return error_response(RegistryError(401, "UNAUTHORIZED", "the metrics need a mirror account"),
                              [("WWW-Authenticate", 'Basic realm="hub-rewrite metrics"')])
    cache_bytes = None
    if parts.store is not None:
        cache_bytes = await asyncio.to_thread(parts.store.total_bytes)
        parts.metrics.cache_bytes.set(cache_bytes)
        parts.metrics.cache_writable.set(0 if parts.store.problem else 1)
    parts.metrics.note_sources(parts.sources.lists.values())
    if request.path == METRICS_PATH:
        body, content_type = parts.metrics.exposition()
        return make_response(200, [("Content-Type", content_type)], body)
    if request.path == HEALTH_PATH:
        ok, details = await asyncio.to_thread(health, parts)
        shared = parts.shared
        if shared is not None:
            reachable, text = await shared.health()
            # the mirror goes on with its local tier and the upstream: degraded, not down
            details["store"] = text if reachable else f"unreachable: {text}"
            if not reachable:
                details.update(status="degraded", serving="from the local tier and the upstream")
        return json_response(200 if ok else 503, {"status": "ok" if ok else "unavailable"} | details)
    served, cache = request.registries, parts.cache_settings
    # the registry names without one go to on this host: the default, or the one the host name
    # or the proxy target fixed (a forward proxy's table need not hold the default registry)
    home = request.upstream
    body = status_page(StatusFacts(
        mirror_url=request.view.mirror_url,
        upstream=home.base,
        registry_name=home.name,
        registry_names=sorted(served.table),
        cache_dir=str(cache.directory) if cache else "",
        cache_bytes=cache_bytes,
        cache_limit=_size_text(cache.max_bytes) if cache else "0",
        hit_rate=parts.metrics.hit_rate(),
        ratelimits=parts.ratelimits.by_upstream(),
        requests_served=sum(s.value for m in parts.metrics.requests.collect() for s in m.samples
                            if s.name.endswith("_total")),
        store=parts.shared.describe() if parts.shared else "",
        proxy_url=_proxy_url(request.flow.client_conn) if is_forward_proxy(request.flow.client_conn) else "",
        **parts.prefetch_facts(),
        sources=[RegistrySources(s.name, s.state(), s.unreachable_since, describe_stale(s.stale_served))
                 for s in parts.sources.lists.values()],
    ))
    return make_response(200, [("Content-Type", "text/html; charset=utf-8")], body)


def _proxy_url(client: connection.Client) -> str:
    """The proxy's address as this client reached it: what it sets as its proxy."""
    host, port = client.sockname[:2]
    return f"http://{host_for_url(host)}:{port}"


async def _signed_in(request: ClientRequest, parts: PageParts) -> bool:
    """Basic credentials of a mirror account (the mirror part of the password)."""
    assert parts.accounts is not None
    try:
        await sign_in(parts.accounts, parts.issued, request.client_authorization, None)
    except RegistryError:
        return False
    return True


def health(parts: PageParts) -> tuple[bool, dict]:
    """The cache (if any) writable. A full disk is not a failure: the mirror serves
    without caching, and says so. Blocking: run in a thread."""
    details: dict = {"client": True, "cache": "off"}
    store = parts.store
    if store is None:
        return True, details
    probe = store.tmp / f"health.{secrets.token_hex(4)}"
    try:
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        store.note_problem(e)
        if store.problem != "disk full":
            details["cache"] = f"not writable: {store.problem}"
            return False, details
    if store.problem == "disk full":
        details.update(status="degraded", cache="full", serving="without caching")
    else:
        details["cache"] = "writable"
    return True, details


def _size_text(size: int) -> str:
    return human.pretty_size(size) if size else "no limit"
