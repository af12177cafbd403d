"""A token is good at the URL whose token service issued it: what a request sent to another
URL of the same registry carries instead.

The mirror's ``/token`` asks the token service of the URL it would send requests to
(paths/token_endpoint.py) and notes here which URL that was, by the token's hash. When a
later request goes to another URL (the first one failed in between), a token the mirror
could have asked for itself (anonymously, or with the operator's server-side account for
that URL) is replaced by one the mirror asks that URL's own token service for, with the
same kind of credentials and the request's repository scope. A token the client got with
its own credentials is sent as it is: that URL answers 401 with a challenge, and the
client asks the mirror's ``/token`` again (which now asks the URL that answers).
Credentials go only to the token service a URL announced itself.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from .access.accounts import bearer_token
from .access.credentials import UpstreamCredentials
from .realms import Realms
from .registry import headers as hdrs
from .registry import tokens
from .registry.errors import RegistryError
from .registry.upstream import Upstream
from .upstream_client import UpstreamClient
from .util.bounded_dict import BoundedDict

MAX_ORIGINS = 50_000  # tokens remembered (their hashes): each lives minutes
MAX_LENT = 4_096  # tokens the mirror asked for itself, per (URL, scope, account)
SPARE_SECONDS = 10.0  # a token of the mirror's own is not used this close to its expiry


@dataclass(frozen=True)
class Origin:
    base: str  # the URL whose token service issued it
    lendable: bool  # asked for without the client's own credentials: the mirror may ask again


def _key(token: str) -> str:
    return hashlib.sha256(token.encode("latin-1", "replace")).hexdigest()


class SourceTokens:
    def __init__(self) -> None:
        self.origins: BoundedDict = BoundedDict(MAX_ORIGINS)  # token hash -> Origin
        self.lent: BoundedDict = BoundedDict(MAX_LENT)  # (base, scope, account) -> (token, usable until)

    def issued(self, grant_tokens: tuple[str, ...], source: Upstream, lendable: bool) -> None:
        for token in grant_tokens:
            self.origins.put(_key(token), Origin(source.base, lendable))

    def origin_of(self, headers: list[tuple[str, str]]) -> Origin | None:
        token = bearer_token(hdrs.value_of(headers, "authorization"))
        return self.origins.get(_key(token)) if token else None

    async def headers_at(self, source: Upstream, headers: list[tuple[str, str]], scope: str | None,
                         realms: Realms, client: UpstreamClient, credentials: UpstreamCredentials
                         ) -> list[tuple[str, str]]:
        """``headers`` as a request to ``source`` should carry them. Raises RegistryError."""
        origin = self.origin_of(headers)
        if origin is None or origin.base == source.base or not origin.lendable:
            return headers
        basic = credentials.basic_for_source(source)
        key = (source.base, scope or "", basic is not None)
        lent = self.lent.get(key)
        if lent is None or lent[1] <= time.monotonic():
            lent = await self._ask(source, scope, basic, realms, client)
            self.lent.put(key, lent)
        return [*hdrs.without(headers, ["authorization"]), ("Authorization", f"Bearer {lent[0]}")]

    @staticmethod
    async def _ask(source: Upstream, scope: str | None, basic: str | None, realms: Realms,
                   client: UpstreamClient) -> tuple[str, float]:
        learned = await realms.discover(source, client)
        if learned is None:
            raise RegistryError(502, "UNAVAILABLE", f"{source.base} announces no token service")
        realm, service = learned
        query = ([("service", service)] if service else []) + ([("scope", scope)] if scope else [])
        grant = await grant_of(client, realm, query, basic, f"token service of {source.base}",
                               f"token request for {source.base} (the client's token is another URL's)")
        return grant.tokens[0], time.monotonic() + max(0.0, grant.expires_in - SPARE_SECONDS)


async def grant_of(client: UpstreamClient, realm: str, query: list[tuple[str, str]], basic: str | None,
                   service_name: str, purpose: str) -> tokens.Grant:
    """A token the mirror asks a realm for itself, with the operator's ``basic`` or none: never
    following a redirect (the credentials go to this realm only). Raises RegistryError."""
    fetched = await client.fetch("GET", tokens.realm_url(realm, query), [("Authorization", basic)] if basic else [],
                                 follow_redirects=False, purpose=purpose)
    grant = tokens.parse_grant(fetched.body) if fetched.status == 200 else None
    if grant is None or not grant.tokens:
        raise RegistryError(502, "UNAVAILABLE", f"{service_name} answered {fetched.status}")
    return grant
