"""The mirror's own pages: the status page (``/``), ``/_hub/health`` and ``/_hub/metrics``."""

from __future__ import annotations

import asyncio
import secrets

from mitmproxy import connection, http
from mitmproxy.utils import human

from ..access.accounts import sign_in
from ..clientconn import is_forward_proxy
from ..mirror import Mirror
from ..pull import Pull
from ..registry.errors import RegistryError
from ..registry.upstream import host_for_url
from ..responses import error_response, json_response, make_response
from ..observe.status_page import RegistrySources, StatusFacts, status_page
from ..sources import describe_stale

METRICS_PATH = "/_hub/metrics"
HEALTH_PATH = "/_hub/health"


async def serve(pull: Pull, mirror: Mirror) -> http.Response:
    if pull.path == METRICS_PATH and mirror.settings.metrics_auth and not await _signed_in(pull, mirror):
        return error_response(RegistryError(401, "UNAUTHORIZED", "the metrics need a mirror account"),
                              [("WWW-Authenticate", 'Basic realm="hub-rewrite metrics"')])
    cache_bytes = None
    if mirror.cache is not None:
        cache_bytes = await asyncio.to_thread(mirror.cache.store.total_bytes)
        mirror.metrics.cache_bytes.set(cache_bytes)
        mirror.metrics.cache_writable.set(0 if mirror.cache.store.problem else 1)
    mirror.metrics.note_sources(mirror.sources.lists.values())
    if pull.path == METRICS_PATH:
        body, content_type = mirror.metrics.exposition()
        return make_response(200, [("Content-Type", content_type)], body)
    if pull.path == HEALTH_PATH:
        ok, details = await asyncio.to_thread(health, mirror)
        shared = mirror.cache.shared if mirror.cache else None
        if shared is not None:
            reachable, text = await shared.health()
            # the mirror goes on with its local tier and the upstream: degraded, not down
            details["store"] = text if reachable else f"unreachable: {text}"
            if not reachable:
                details.update(status="degraded", serving="from the local tier and the upstream")
        return json_response(200 if ok else 503, {"status": "ok" if ok else "unavailable"} | details)
    served, cache = pull.registries, mirror.settings.cache
    # the registry names without one go to on this host: the default, or the one the host name
    # or the proxy target fixed (a forward proxy's table need not hold the default registry)
    home = pull.upstream
    body = status_page(StatusFacts(
        mirror_url=pull.view.mirror_url,
        upstream=home.base,
        registry_name=home.name,
        registry_names=sorted(served.table),
        cache_dir=str(cache.directory) if cache else "",
        cache_bytes=cache_bytes,
        cache_limit=_size_text(cache.max_bytes) if cache else "0",
        hit_rate=mirror.metrics.hit_rate(),
        ratelimits=mirror.ratelimits.by_upstream(),
        requests_served=sum(s.value for m in mirror.metrics.requests.collect() for s in m.samples
                            if s.name.endswith("_total")),
        store=mirror.cache.shared.describe() if mirror.cache and mirror.cache.shared else "",
        proxy_url=_proxy_url(pull.flow.client_conn) if is_forward_proxy(pull.flow.client_conn) else "",
        **(mirror.prefetch.facts() if mirror.prefetch is not None else {}),
        sources=[RegistrySources(s.name, s.state(), s.unreachable_since, describe_stale(s.stale_served))
                 for s in mirror.sources.lists.values()],
    ))
    return make_response(200, [("Content-Type", "text/html; charset=utf-8")], body)


def _proxy_url(client: connection.Client) -> str:
    """The proxy's address as this client reached it: what it sets as its proxy."""
    host, port = client.sockname[:2]
    return f"http://{host_for_url(host)}:{port}"


async def _signed_in(pull: Pull, mirror: Mirror) -> bool:
    """Basic credentials of a mirror account (the mirror part of the password)."""
    assert mirror.settings.accounts is not None
    try:
        await sign_in(mirror.settings.accounts, mirror.issued, pull.client_authorization, None)
    except RegistryError:
        return False
    return True


def health(mirror: Mirror) -> tuple[bool, dict]:
    """The cache (if any) writable. A full disk is not a failure: the mirror serves
    without caching, and says so. Blocking: run in a thread."""
    details: dict = {"client": True, "cache": "off"}
    if mirror.cache is None:
        return True, details
    store = mirror.cache.store
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
