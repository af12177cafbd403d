"""Who may be served what from the cache.

The cache holds bytes of many repositories, some private. A cached blob or
manifest goes to a client only after the upstream confirmed, with that
client's own token, that it may pull the repository (remembered for the
token's lifetime), and that the repository holds the digest. With the
upstream down, repositories confirmed within the stale window still count,
and for clients without credentials only repositories seen pulled anonymously.
"""

from __future__ import annotations

import hashlib
import time

from ..registry import jwt
from ..util.bounded_dict import BoundedDict

ANONYMOUS = "anonymous"


def client_identity(authorization: str | None) -> str:
    """A stable, non-secret name for the credentials a request carries."""
    if not authorization:
        return ANONYMOUS
    return hashlib.sha256(authorization.encode("latin-1", "replace")).hexdigest()


def token_lifetime(authorization: str | None, default: float, now: float) -> float:
    """Seconds a bearer token stays valid, from its JWT ``exp`` when readable."""
    if not authorization or not authorization.lower().startswith("bearer "):
        return default
    token = jwt.decode(authorization[7:])
    exp = token.expires_at if token is not None else None
    if exp is None:
        return default
    return max(0.0, min(exp - now, 3600.0))


class AccessMemory:
    def __init__(self, default_ttl: float, stale_seconds: float, expired_grace: float = 0.0) -> None:
        self.default_ttl = default_ttl
        self.stale_seconds = stale_seconds
        # an expired token still opens private content in stale mode for this long (hub_cache_stale_grace)
        self.expired_grace = expired_grace
        # (identity, upstream, repository) -> (valid until, confirmed at)
        self._grants = BoundedDict()
        # (upstream, repository) -> last time an anonymous client was allowed
        self._public = BoundedDict()
        # identities of tokens the mirror handed out to clients without credentials
        self._anonymous_tokens = BoundedDict()

    def note_anonymous_token(self, token: str) -> None:
        self._anonymous_tokens.put(client_identity(f"Bearer {token}"), True)

    def is_anonymous(self, identity: str) -> bool:
        return identity == ANONYMOUS or identity in self._anonymous_tokens

    def confirm(self, identity: str, authorization: str | None, upstream: str, repository: str) -> None:
        """The upstream just let this client read this repository."""
        now = time.time()
        ttl = token_lifetime(authorization, self.default_ttl, now)
        self._grants.put((identity, upstream, repository), (now + ttl, now))
        if self.is_anonymous(identity):
            self._public.put((upstream, repository), now)

    def allowed(self, identity: str, upstream: str, repository: str) -> bool:
        grant = self._grants.get((identity, upstream, repository))
        return grant is not None and grant[0] > time.time()

    def allowed_stale(self, identity: str, upstream: str, repository: str) -> bool:
        """With the upstream unavailable: a confirmation within the stale window
        suffices, while the token it was made with has not expired (plus the grace)."""
        now = time.time()
        grant = self._grants.get((identity, upstream, repository))
        if grant is not None and now - grant[1] <= self.stale_seconds and now < grant[0] + self.expired_grace:
            return True
        # what an anonymous client could pull, any client may
        seen = self._public.get((upstream, repository))
        return seen is not None and now - seen <= self.stale_seconds
