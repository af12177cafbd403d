"""Where a blob's bytes come from, for the mirror's own transfers (a download into the cache,
a stream without one): the registry's answer to a probe, opened without credentials unless
it is the registry itself, asked again once when the storage refuses the URL (403: a signed
URL that expired), and handed on with an ``upstream_resume.Origin`` so that a transfer cut in
the middle resumes from the same URL or a fresh redirect, asked with the same credentials
(the token of the client the transfer was started for).

Several URLs per registry (item 1 of issue 20) will give ``Origin`` the next URL when a source
is down; for now it knows the redirect and how to get a fresh one.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from mitmproxy import http

from ..registry import headers as hdrs
from ..registry.errors import RegistryError
from ..responses import error_response
from ..upstream_bodies import Body
from ..upstream_resume import Origin
from .parts import Upstreams

if TYPE_CHECKING:
    from .blobs import Probe

log = logging.getLogger("hub_rewrite")

Reprobe = Callable[[], Awaitable["Probe"]]


async def open_source(upstreams: Upstreams, digest: str, probe: Probe, headers: list[tuple[str, str]], reprobe: Reprobe,
                      purpose: str) -> tuple[Body, Origin] | http.Response:
    """The probe's target opened (its answer's head in, whatever its status), or what the client
    is answered: the error that kept it from opening, the registry's refusal of a fresh URL."""
    for attempt in (1, 2):
        sent = headers if probe.direct else hdrs.without_credentials(headers)
        try:
            body = await upstreams.client.open_body(probe.target, sent, purpose=purpose)
        except RegistryError as e:
            return error_response(e)
        if body.status == 403 and attempt == 1:
            body.close()
            log.warning("blob %s: storage at %s answered 403; asking the registry again", digest,
                        urlsplit(probe.target).hostname)
            probe = await reprobe()
            if probe.answer is not None:
                return probe.answer
            continue
        break
    return body, origin_of(upstreams, probe, sent, reprobe, purpose)


def origin_of(upstreams: Upstreams, probe: Probe, sent: list[tuple[str, str]], reprobe: Reprobe, purpose: str) -> Origin:
    async def fetch(url: str, start: int) -> Body:
        return await upstreams.client.open_body(url, sent, purpose=f"{purpose}, resumed from byte {start}", start=start)

    async def next_url(failed: str, reason: str) -> str | None:
        return await next_source(probe, failed, reason, reprobe)

    return Origin(probe.target, fetch, next_url, upstreams.timeout,
                  lambda reason: upstreams.metrics.download_resumes.labels(reason).inc())


async def next_source(probe: Probe, failed: str, reason: str, reprobe: Reprobe) -> str | None:
    """Where a transfer cut in the middle goes on: the one place that chooses the next source.
    ``failed``: the URL the last attempt used; ``reason``: "interrupted" (the connection broke or
    went silent), "refused" (a 5xx or 429), "expired" (a 403). Today: the same URL, or after a 403
    a fresh redirect from the registry (a registry serving the blob itself has none: None).
    Several URLs per registry extend it here: the next healthy URL when the source is down."""
    if reason != "expired":
        return failed
    if probe.direct:
        return None
    again = await reprobe()
    if again.answer is not None:
        raise RegistryError(502, "UNAVAILABLE", f"the registry answered {again.answer.status_code}")
    return again.target


def storage_error(digest: str, status: int, reason: str) -> http.Response:
    log.warning("blob %s: storage answered %d", digest, status)
    if status == 404:
        return error_response(RegistryError(404, "BLOB_UNKNOWN", "blob unknown to registry storage"))
    return error_response(RegistryError(502, "UNAVAILABLE", f"blob storage answered {status} {reason}"))
