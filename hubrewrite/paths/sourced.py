"""A client's request at the first URL of its registry that answers (hubrewrite/sources.py).

The paths ask the registry through ``at_sources``: it tries the registry's URLs in
order, with the headers each should get (hubrewrite/source_tokens.py), marks the ones
that fail, and notes on the ``ClientRequest`` which URL answered and with what headers,
for what the same request asks next (the challenge relayed, the fetches ahead of it).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ..client_request import ClientRequest
from ..registry.upstream import Upstream
from ..sources import first_answer
from .parts import Upstreams

log = logging.getLogger("hub_rewrite")

T = TypeVar("T")


async def at_sources(request: ClientRequest, upstreams: Upstreams,
                     call: Callable[[str, list[tuple[str, str]]], Awaitable[T]],
                     status_of: Callable[[T], int] = lambda answer: 200, path: str | None = None) -> T:
    """``call(url, headers)`` for this request (``path``: another one of its repository) at the
    first URL that answers. Raises RegistryError when none does."""
    where = path if path is not None else request.route.path() + request.query
    name = request.route.name if request.route is not None else ""
    source, headers, answer = await first_source(upstreams, request.upstream, name, request.headers, where, call,
                                                  status_of)
    request.source, request.source_headers = source, headers
    return answer


async def first_source(upstreams: Upstreams, upstream: Upstream, repository: str, headers: list[tuple[str, str]],
                       path: str, call: Callable[[str, list[tuple[str, str]]], Awaitable[T]],
                       status_of: Callable[[T], int]) -> tuple[Upstream, list[tuple[str, str]], T]:
    """``call`` at ``path`` of the first URL of ``upstream`` that answers, with ``headers`` as that
    URL should get them (its own token, for ``repository``): (that URL, those headers, its answer),
    also for whoever asks without a client's request (a fetch ahead). Raises RegistryError."""
    scope = f"repository:{repository}:pull" if repository else None

    async def attempt(source: Upstream) -> tuple[list[tuple[str, str]], T]:
        sent = await upstreams.source_tokens.headers_at(source, headers, scope, upstreams.realms, upstreams.client,
                                                        upstreams.credentials)
        return sent, await call(source.url(path), sent)

    source, (sent, answer) = await first_answer(upstreams.sources.of(upstream), attempt,
                                                lambda answered: status_of(answered[1]))
    return source, sent, answer


def answering(request: ClientRequest) -> Upstream:
    """The URL that answered this request, else the registry's first."""
    return request.source or request.upstream


def resolved_by(request: ClientRequest, digest: str) -> str:
    """The URL that resolved this manifest request, logged for a tag: a secondary mirror may lag
    behind, so which one answered matters (the answer's X-Hub-Source, the flow's comment)."""
    source = answering(request).base
    if len(request.upstream.bases) == 1:
        return source  # the registry's only URL: nothing to tell
    if request.route is not None and not request.route.is_digest:
        log.info("tag %s:%s of %s resolved to %s by %s", request.route.name, request.route.reference,
                 request.upstream.name, digest or "(no digest)", source)
    request.flow.comment += f"; resolved by {source}"
    return source
