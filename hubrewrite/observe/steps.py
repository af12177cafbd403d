"""The end of a client request: its log line and its metrics."""

from __future__ import annotations

import logging
import time

from ..pull import Pull
from ..responses import CACHE_HEADER
from .logline import pull_fields, pull_log_line
from .logformat import HUB_FIELDS
from .metrics import Metrics

log = logging.getLogger("hub_rewrite")


def finish(pull: Pull, metrics: Metrics) -> None:
    step, flow = pull.step, pull.flow
    if step.done:
        return
    step.done = True
    if step.in_flight:
        metrics.in_flight.dec()
    response = flow.response
    status: int | str = response.status_code if response is not None and not flow.error else "error"
    cache_state = response.headers.get(CACHE_HEADER, "") if response is not None else ""
    if step.streamed is not None:
        size = step.streamed
    else:
        size = len(response.raw_content or b"") if response is not None else 0
        if size:
            metrics.bytes_served.labels(step.source).inc(size)
    metrics.requests.labels(step.upstream, step.kind, str(status)).inc()
    if cache_state in ("hit", "miss", "stale") and step.kind in ("blob", "manifest"):
        metrics.cache_requests.labels(step.kind, cache_state).inc()
    if step.kind == "page":
        return
    facts = (flow.client_conn.peername[0] if flow.client_conn.peername else "-", step.upstream,
             flow.request.method, step.kind, step.repo, step.ref, status, size, time.time() - step.start, cache_state)
    log.info(pull_log_line(*facts), extra={HUB_FIELDS: pull_fields(*facts)})


def counting(pull: Pull, metrics: Metrics, source: str):
    """A byte counter for a streamed answer: the step's size and the served-bytes metrics."""
    step = pull.step
    step.streamed = 0
    served = metrics.bytes_served.labels(source)

    def on_bytes(n: int) -> None:
        step.streamed += n
        served.inc(n)

    return on_bytes
