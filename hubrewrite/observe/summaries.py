"""The end of a client request: its log line and its metrics."""

from __future__ import annotations

import logging
import time

from ..pull import Pull
from ..responses import CACHE_HEADER
from ..sources import Sources
from .logline import pull_fields, pull_log_line
from .logformat import HUB_FIELDS
from .metrics import Metrics

log = logging.getLogger("hub_rewrite")


def finish(pull: Pull, metrics: Metrics, sources: Sources | None = None) -> None:
    """``sources``: told of answers from the cache while a registry is unreachable (the status page)."""
    summary, flow = pull.summary, pull.flow
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
    metrics.requests.labels(summary.upstream, summary.kind, str(status)).inc()
    if cache_state in ("hit", "miss", "stale") and summary.kind in ("blob", "manifest"):
        metrics.cache_requests.labels(summary.kind, cache_state).inc()
        if cache_state == "stale" and sources is not None:
            metrics.stale_served.labels(summary.upstream, summary.kind).inc()
            sources.note_stale(summary.upstream, summary.kind)
    if summary.kind == "page":
        return
    facts = (flow.client_conn.peername[0] if flow.client_conn.peername else "-", summary.upstream,
             flow.request.method, summary.kind, summary.repo, summary.ref, status, size,
             time.time() - summary.start, cache_state)
    log.info(pull_log_line(*facts), extra={HUB_FIELDS: pull_fields(*facts)})


def counting(pull: Pull, metrics: Metrics, source: str):
    """A byte counter for a streamed answer: the summary's size and the served-bytes metrics."""
    summary = pull.summary
    summary.streamed = 0
    served = metrics.bytes_served.labels(source)

    def on_bytes(n: int) -> None:
        summary.streamed += n
        served.inc(n)

    return on_bytes
