"""The end of a client request: its log line and its metrics."""

from __future__ import annotations

import logging
import time

from ..client_request import ClientRequest, RequestKind
from ..registry.names import RouteKind
from ..responses import CACHE_HEADER
from ..sources import Sources
from .logline import pull_fields, pull_log_line
from .logformat import HUB_FIELDS
from .metrics import Metrics

log = logging.getLogger("hub_rewrite")


def finish(request: ClientRequest, metrics: Metrics, sources: Sources | None = None) -> None:
    """``sources``: told of answers from the cache while a registry is unreachable (the status page)."""
    summary, flow = request.summary, request.flow
    if summary.done:
        return
    summary.done = True
    if summary.in_flight:
        metrics.in_flight.dec()
    response = flow.response
    status: int | str = response.status_code if response is not None and not flow.error else "error"
    cache_state = response.headers.get(CACHE_HEADER, "") if response is not None else ""
    if summary.streamed is not None:
        size = summary.streamed
    else:
        size = len(response.raw_content or b"") if response is not None else 0
        if size:
            metrics.bytes_served.labels(summary.source).inc(size)
    metrics.requests.labels(summary.upstream, summary.label, str(status)).inc()
    if cache_state in ("hit", "miss", "stale") and summary.kind in (RouteKind.BLOB, RouteKind.MANIFEST):
        metrics.cache_requests.labels(summary.label, cache_state).inc()
        if cache_state == "stale" and sources is not None:
            metrics.stale_served.labels(summary.upstream, summary.label).inc()
            sources.note_stale(summary.upstream, summary.label)
    if summary.kind is RequestKind.PAGE:
        return
    facts = (flow.client_conn.peername[0] if flow.client_conn.peername else "-", summary.upstream,
             flow.request.method, summary.label, summary.repo, summary.ref, status, size,
             time.time() - summary.start, cache_state)
    log.info(pull_log_line(*facts), extra={HUB_FIELDS: pull_fields(*facts)})


def counting(request: ClientRequest, metrics: Metrics, source: str):
    """A byte counter for a streamed answer: the summary's size and the served-bytes metrics."""
    summary = request.summary
    summary.streamed = 0
    served = metrics.bytes_served.labels(source)

    def on_bytes(n: int) -> None:
        summary.streamed += n
        served.inc(n)

    return on_bytes
