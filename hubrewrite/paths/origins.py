"""Where a blob's bytes come from, for the mirror's own transfers (a download into the cache,
a stream without one): the registry's answer to a probe, opened without credentials unless
it is the registry itself, asked again once when the storage refuses the URL (403: a signed
URL that expired), and handed on with an ``upstream_resume.Origin`` so that a transfer cut in
the middle resumes from the same URL or a fresh redirect, asked with the same credentials
(the token of the client the transfer was started for). For a registry with several URLs
(``sources.py``), a source refusing a resume (5xx, 429) is the failure of the registry URL
whose redirect it was: the next healthy URL gives a fresh redirect (``next_source``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
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
    return body, origin_of(upstreams, probe, headers, reprobe, purpose)


@dataclass
class CurrentProbe:
    """The registry's latest answer for one transfer (each fresh redirect replaces it), and how
    to ask the registry again (at its first URL not backing off: ``paths/sourced.at_sources``)."""

    probe: Probe
    reprobe: Reprobe


def origin_of(upstreams: Upstreams, probe: Probe, headers: list[tuple[str, str]], reprobe: Reprobe,
              purpose: str) -> Origin:
    """``headers``: the request's, sent as they are only to a registry serving the blob itself
    (with several URLs, the token of the one that answered first: another answers 401, the
    transfer ends cleanly)."""
    current = CurrentProbe(probe, reprobe)

    async def fetch(url: str, start: int) -> Body:
        sent = headers if current.probe.direct else hdrs.without_credentials(headers)
        return await upstreams.client.open_body(url, sent, purpose=f"{purpose}, resumed from byte {start}", start=start)

    async def next_url(failed: str, reason: str) -> str | None:
        return await next_source(current, failed, reason)

    return Origin(probe.target, fetch, next_url, upstreams.timeout,
                  lambda reason: upstreams.metrics.download_resumes.labels(reason).inc())


async def next_source(current: CurrentProbe, failed: str, reason: str) -> str | None:
    """Where a transfer cut in the middle goes on: the one place that chooses the next source.
    ``failed``: the URL the last attempt used; ``reason``: "interrupted" (the connection broke or
    went silent), "refused" (a 5xx or 429), "expired" (a 403). The same URL, but: after a 403 a
    fresh redirect from the registry (a registry serving the blob itself has none: None); a
    refusal, for a registry with several URLs, is the failure of the URL whose redirect it was
    (``SourceList.failed``: it backs off) and the next healthy URL gives a fresh redirect."""
    probe = current.probe
    if reason == "refused" and probe.urls is not None and probe.source is not None and len(probe.urls.sources) > 1:
        return await _elsewhere(current, failed)
    if reason != "expired":
        return failed
    if probe.direct:
        return None
    again = await current.reprobe()
    if again.answer is not None:
        raise RegistryError(502, "UNAVAILABLE", f"the registry answered {again.answer.status_code}")
    current.probe = again
    return again.target


async def _elsewhere(current: CurrentProbe, failed: str) -> str:
    """The source of ``current``'s registry URL refused a resume: that URL failed, a fresh redirect
    from the next one; where none gives one, the same source again (the resumes are bounded)."""
    probe = current.probe
    host = urlsplit(failed).hostname
    probe.urls.failed(probe.source, f"its storage at {host} refused a resumed transfer")
    try:
        again = await current.reprobe()
    except RegistryError as e:
        log.warning("upstream %s: no fresh redirect for a resumed transfer (%s); %s again", probe.urls.name,
                    e.message, host)
        return failed
    if again.answer is not None:
        log.warning("upstream %s: no fresh redirect for a resumed transfer (answered %d); %s again",
                    probe.urls.name, again.answer.status_code, host)
        return failed
    current.probe = again
    log.info("upstream %s: a transfer refused by %s goes on from the redirect of %s", probe.urls.name, host,
             again.source.base if again.source is not None else "the registry")
    return again.target


def storage_error(digest: str, status: int, reason: str) -> http.Response:
    log.warning("blob %s: storage answered %d", digest, status)
    if status == 404:
        return error_response(RegistryError(404, "BLOB_UNKNOWN", "blob unknown to registry storage"))
    return error_response(RegistryError(502, "UNAVAILABLE", f"blob storage answered {status} {reason}"))
