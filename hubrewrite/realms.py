"""Where each upstream's token service is: learned from the upstream's own challenges.

Token requests go only to a realm an upstream announced itself, never to a URL
a client names.
"""

from __future__ import annotations

from .registry.challenge import bearer_realm
from .registry.upstream import Upstream
from .upstream_client import UpstreamClient


class Realms:
    def __init__(self) -> None:
        self._learned: dict[str, tuple[str, str | None]] = {}  # upstream base URL -> (realm, service)

    def learn(self, upstream: Upstream, fields: list[tuple[str, str]]) -> None:
        for name, value in fields:
            if name.lower() == "www-authenticate" and (found := bearer_realm(value)) is not None:
                self._learned[upstream.base] = found

    def known(self, upstream: Upstream) -> tuple[str, str | None] | None:
        return self._learned.get(upstream.base)

    async def discover(self, upstream: Upstream, client: UpstreamClient) -> tuple[str, str | None] | None:
        """(realm, service), asking the upstream's /v2/ once if no challenge was seen yet.
        None: the upstream does not use token authentication. Raises RegistryError."""
        if upstream.base not in self._learned:
            fetched = await client.fetch("GET", upstream.url("/v2/"), [], follow_redirects=False,
                                         purpose="realm discovery: where is its token service")
            self.learn(upstream, fetched.headers)
        return self._learned.get(upstream.base)
