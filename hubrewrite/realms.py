"""Where each upstream's token service is: learned from the upstream's own challenges.

Token requests go only to a realm an upstream announced itself, never to a URL
a client names.
"""

from __future__ import annotations

import time

from .registry.challenge import bearer_realm
from .registry.upstream import Upstream
from .upstream_client import UpstreamClient


BASE_ANSWER_SECONDS = 600.0  # how long an upstream's answer to an anonymous /v2/ is given again


class Realms:
    def __init__(self) -> None:
        self._learned: dict[str, tuple[str, str | None]] = {}  # upstream base URL -> (realm, service)
        # upstream base URL -> (when, status, fields, body) of its last 401 to an anonymous /v2/
        self._base: dict[str, tuple[float, int, list[tuple[str, str]], bytes]] = {}

    def remember_base(self, upstream: Upstream, status: int, fields: list[tuple[str, str]], body: bytes) -> None:
        """An upstream's answer to /v2/ without credentials: the same for every client (its
        challenge), so the next one is answered without a round trip to it."""
        if status == 401 and any(k.lower() == "www-authenticate" and bearer_realm(v) for k, v in fields):
            self._base[upstream.base] = (time.monotonic(), status, fields, body)

    def base_answer(self, upstream: Upstream) -> tuple[int, list[tuple[str, str]], bytes] | None:
        known = self._base.get(upstream.base)
        if known is None or time.monotonic() - known[0] > BASE_ANSWER_SECONDS:
            return None
        return known[1:]

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
