"""May this client have this cached digest of this repository? Asked upstream, with its own token.

The cache holds bytes of many repositories, some private. A cached blob or
manifest goes to a client only after the upstream confirmed, with that
client's own token, that it may pull the repository (remembered for the
token's lifetime), and that the repository holds the digest. A HEAD is used,
which Docker Hub does not count against its pull rate limit.
"""

from __future__ import annotations

from enum import Enum

from ..mirror import Mirror
from ..pull import Pull
from ..cache.store import Store
from ..registry.errors import RegistryError
from .sourced import at_sources


class Access(Enum):
    GRANTED = "granted"
    STALE = "stale"  # the upstream is unavailable; confirmed recently enough to serve from the cache
    REFUSED = "refused"  # the upstream said no: the client gets the upstream's own answer, as if nothing were cached


def confirm(pull: Pull, mirror: Mirror, digest: str, member: bool = True) -> None:
    """The upstream just let this client read this digest of this repository; ``member``:
    remember that the repository holds it (for content the cache holds: a record per
    request for content it does not hold would only fill the disk)."""
    assert pull.route is not None
    confirm_for(mirror, pull.identity, pull.authorization, pull.upstream.base, pull.route.name, digest, member)


def confirm_for(mirror: Mirror, identity: str, authorization: str | None, upstream: str, repository: str,
                digest: str, member: bool = True) -> None:
    """``confirm`` for whoever asked with those credentials (a client, or a fetch ahead of it)."""
    cache = mirror.cache
    assert cache is not None
    cache.access.confirm(identity, authorization, upstream, repository)
    if member and cache.store.add_member(upstream, repository, digest) and cache.shared is not None:
        cache.shared.put_record_later(Store.member_record(upstream, repository, digest), b"")


def known(pull: Pull, mirror: Mirror, digest: str) -> bool:
    """Confirmed before, for this client's token, and the repository holds the digest."""
    cache = mirror.cache
    assert cache is not None and pull.route is not None
    upstream, repository = pull.upstream.base, pull.route.name
    return cache.access.allowed(pull.identity, upstream, repository) and cache.store.is_member(upstream, repository, digest)


def known_stale(pull: Pull, mirror: Mirror, digest: str) -> bool:
    cache = mirror.cache
    assert cache is not None and pull.route is not None
    upstream, repository = pull.upstream.base, pull.route.name
    return cache.access.allowed_stale(pull.identity, upstream, repository) and cache.store.is_member(
        upstream, repository, digest)


async def check(pull: Pull, mirror: Mirror, digest: str, path: str) -> Access:
    """Raises RegistryError when the upstream is unavailable and nothing was confirmed recently enough."""
    if known(pull, mirror, digest):
        return Access.GRANTED
    try:
        head = await at_sources(pull, mirror, lambda url, headers: mirror.client.fetch(
            "HEAD", url, headers, follow_redirects=False, purpose="access check: may this client read it"),
            lambda h: h.status, path)
    except RegistryError as failure:
        if await _known_stale_anywhere(pull, mirror, digest):
            return Access.STALE
        raise failure
    if 200 <= head.status < 400:
        confirm(pull, mirror, digest)
        return Access.GRANTED
    if (head.status == 429 or head.status >= 500) and await _known_stale_anywhere(pull, mirror, digest):
        return Access.STALE
    return Access.REFUSED


async def _known_stale_anywhere(pull: Pull, mirror: Mirror, digest: str) -> bool:
    """known_stale, with the repository's membership looked up in the shared bucket if need be
    (another process may have seen it)."""
    cache = mirror.cache
    upstream, repository = pull.upstream.base, pull.route.name
    if cache.shared is not None and not cache.store.is_member(upstream, repository, digest):
        if await cache.shared.record(Store.member_record(upstream, repository, digest)) is not None:
            cache.store.add_member(upstream, repository, digest)
    return known_stale(pull, mirror, digest)
