"""May this client have this cached digest of this repository? Asked upstream, with its own token.

The cache holds bytes of many repositories, some private. A cached blob or
manifest goes to a client only after the upstream confirmed, with that
client's own token, that it may pull the repository (remembered for the
token's lifetime, by the cache: ``TieredCache.confirm``), and that the
repository holds the digest. A HEAD is used, which Docker Hub does not count
against its pull rate limit.
"""

from __future__ import annotations

from enum import Enum

from ..cache.tiers import TieredCache
from ..client_request import ClientRequest
from ..registry.errors import RegistryError
from ..sources import is_failure
from .parts import Upstreams
from .sourced import at_sources


class Access(Enum):
    GRANTED = "granted"
    STALE = "stale"  # the upstream is unavailable; confirmed recently enough to serve from the cache
    REFUSED = "refused"  # the upstream said no: the client gets the upstream's own answer, as if nothing were cached


async def check(request: ClientRequest, upstreams: Upstreams, tiers: TieredCache, digest: str, path: str) -> Access:
    """Raises RegistryError when the upstream is unavailable and nothing was confirmed recently enough."""
    asker = request.asker
    if tiers.known(asker, digest):
        return Access.GRANTED
    try:
        head = await at_sources(request, upstreams, lambda url, headers: upstreams.client.fetch(
            "HEAD", url, headers, follow_redirects=False, purpose="access check: may this client read it"),
            lambda h: h.status, path)
    except RegistryError as failure:
        if await tiers.known_stale_anywhere(asker, digest):
            return Access.STALE
        raise failure
    if 200 <= head.status < 400:
        tiers.confirm(asker, digest)
        return Access.GRANTED
    if is_failure(head.status) and await tiers.known_stale_anywhere(asker, digest):
        return Access.STALE
    return Access.REFUSED
