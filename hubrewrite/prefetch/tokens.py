"""The mirror's own tokens for prefetching: from the realm the upstream announced, with the
operator's server-side credentials for that registry (``hub_upstream_credentials``) or none.

A client's credentials never serve here: nobody asked for these images. A token
got without credentials is noted as anonymous, so that what it was let to read
counts as public (``AccessMemory``), as a client's anonymous pull would.
"""

from __future__ import annotations

import time

from ..access.confirmations import AccessMemory
from ..access.credentials import UpstreamCredentials
from ..realms import Realms
from ..registry.upstream import Upstream
from ..source_tokens import grant_of
from ..upstream_client import UpstreamClient

RENEW_BEFORE = 60.0  # seconds before its expiry a token is replaced


class ServerTokens:
    def __init__(self, client: UpstreamClient, realms: Realms, credentials: UpstreamCredentials,
                 access: AccessMemory, on_request=lambda: None) -> None:
        self.client, self.realms, self.credentials, self.access = client, realms, credentials, access
        self.on_request = on_request  # counts each token request
        self._tokens: dict[tuple[str, str], tuple[str | None, float]] = {}  # -> (Authorization, valid until)

    async def authorization(self, upstream: Upstream, repository: str) -> str | None:
        """The Authorization for pulling ``repository``; None where the upstream wants no token.
        Raises RegistryError (the token service unreachable or refusing)."""
        key = (upstream.base, repository)
        known = self._tokens.get(key)
        if known is not None and known[1] - RENEW_BEFORE > time.monotonic():
            return known[0]
        learned = await self.realms.discover(upstream, self.client)
        if learned is None:
            self._tokens[key] = (None, time.monotonic() + 3600)
            return None
        realm, service = learned
        query = [("scope", f"repository:{repository}:pull")] + ([("service", service)] if service else [])
        basic = self.credentials.basic_for(upstream.name)
        self.on_request()
        grant = await grant_of(self.client, realm, query, basic, "token service", "token request for prefetching")
        if basic is None:
            self.access.note_anonymous_token(grant.tokens[0])
        authorization = f"Bearer {grant.tokens[0]}"
        self._tokens[key] = (authorization, time.monotonic() + grant.expires_in)
        return authorization
