"""Several URLs for one registry: which one a request goes to, and which are backing off.

``hub_upstreams`` may list a registry's URLs in order of preference
(``docker.io=https://registry-1.docker.io,https://mirror.example.org``). A request
goes to the first URL that is healthy; one that fails (no connection, TLS, a
timeout, 429 or 5xx) is skipped for a back-off period (doubling with each failure
in a row, up to 8 times ``hub_source_backoff``) and tried again once it is over.
Every decision is made before the client got a byte of the answer. With every
URL backing off, the one whose back-off ends first is still tried (a registry
with a single URL is asked every time, as before).

With every URL of a registry failing, the registry is *unreachable*: the time it
became so is kept, with what the cache served meanwhile (the status page and the
metrics say both; the paths answer from the cache, stale mode), and the first URL
that answers again ends it.

Each URL is an ``Upstream`` of its own (same registry name, its own base URL), so
what is learned per URL (its token service, its last challenge) stays its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TypeVar
from urllib.parse import urlsplit

from .registry.errors import RegistryError
from .registry.upstream import Upstream

log = logging.getLogger("hub_rewrite")

T = TypeVar("T")

MAX_BACKOFF_FACTOR = 8  # a URL failing again and again is tried at least this often (times the back-off)
UNAVAILABLE_STATUSES = frozenset({502, 503, 504})  # a RegistryError of the mirror's client: no usable answer


def is_failure(status: int) -> bool:
    """An answer that says the URL cannot serve now (a refusal or a 404 is an answer)."""
    return status == 429 or status >= 500


def source_of(upstream: Upstream, base: str) -> Upstream:
    """One URL of a registry as an Upstream of its own."""
    parts = urlsplit(base)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return replace(upstream, scheme=parts.scheme, host=parts.hostname or "", port=port, others=())


@dataclass
class Health:
    """What is known of one URL."""

    failures: int = 0  # in a row
    retry_at: float = 0.0  # monotonic: skipped before it
    last_error: str = ""
    failing_since: float | None = None  # wall clock, of the first failure in a row


@dataclass
class SourceList:
    """One registry's URLs in order of preference, and their health."""

    upstream: Upstream  # the registry (its first URL names it in the cache)
    backoff: float
    clock: Callable[[], float] = time.monotonic
    sources: tuple[Upstream, ...] = ()
    health: dict[str, Health] = field(default_factory=dict)  # base URL -> its health
    unreachable_since: float | None = None  # wall clock: every URL failing since then
    stale_served: dict[str, int] = field(default_factory=dict)  # kind -> answers from the cache while unreachable

    def __post_init__(self) -> None:
        self.sources = tuple(source_of(self.upstream, base) for base in self.upstream.bases)
        self.health = {source.base: Health() for source in self.sources}

    @property
    def name(self) -> str:
        return self.upstream.name

    def candidates(self) -> list[Upstream]:
        """The URLs to try now, in order: those not backing off; with every one backing off, the one
        whose back-off ends first (a request is never refused untried: a registry with one URL
        is asked every time, as is the first URL that comes back)."""
        now = self.clock()
        ready = [source for source in self.sources if self.health[source.base].retry_at <= now]
        return ready or [min(self.sources, key=lambda source: self.health[source.base].retry_at)]

    def next_source(self, tried: tuple[str, ...] | list[str] = ()) -> Upstream | None:
        """The next URL to try, given the base URLs tried already for this request (None: no more)."""
        return next((source for source in self.candidates() if source.base not in tried), None)

    def failed(self, source: Upstream, reason: str) -> None:
        health = self.health[source.base]
        health.failures += 1
        wait = self.backoff * min(2 ** (health.failures - 1), MAX_BACKOFF_FACTOR)
        health.retry_at, health.last_error = self.clock() + wait, reason
        if health.failing_since is None:
            health.failing_since = time.time()
        log.warning("upstream %s: %s failed (%s); skipped for %.0fs", self.name, source.base, reason, wait)
        if self.unreachable_since is None and all(h.failures for h in self.health.values()):
            self.unreachable_since, self.stale_served = time.time(), {}
            log.warning("upstream %s: unreachable (every URL failed); serving what the cache holds", self.name)

    def answered(self, source: Upstream) -> None:
        health = self.health[source.base]
        if health.failures:
            log.info("upstream %s: %s answers again", self.name, source.base)
            self.health[source.base] = Health()
        if self.unreachable_since is not None:
            log.info("upstream %s: reachable again after %.0fs (served from the cache meanwhile: %s)", self.name,
                     time.time() - self.unreachable_since, describe_stale(self.stale_served))
            self.unreachable_since = None

    def note_stale(self, kind: str) -> None:
        if self.unreachable_since is not None:
            self.stale_served[kind] = self.stale_served.get(kind, 0) + 1

    def state(self) -> list[tuple[str, bool, float, str]]:
        """(base URL, healthy, seconds until it is tried again, last error) per URL, in order."""
        now = self.clock()
        return [(base, not h.failures, max(0.0, h.retry_at - now), h.last_error) for base, h in self.health.items()]


def describe_stale(served: dict[str, int]) -> str:
    return ", ".join(f"{count} {kind}{'s' if count != 1 else ''}" for kind, count in sorted(served.items())) or "nothing"


class Sources:
    """Every registry's SourceList, by registry name and URLs; made once per upstream table."""

    def __init__(self, table: dict[str, Upstream], backoff: float, clock: Callable[[], float] = time.monotonic):
        self.backoff, self.clock = backoff, clock
        self.lists = {(u.name, u.bases): SourceList(u, backoff, clock) for u in table.values()}

    def of(self, upstream: Upstream) -> SourceList:
        key = (upstream.name, upstream.bases)
        found = self.lists.get(key)
        if found is None:  # a registry only the listener's target names (reverse mode, not in the table)
            found = self.lists[key] = SourceList(upstream, self.backoff, self.clock)
        return found

    def note_stale(self, upstream_base: str, kind: str) -> None:
        """An answer from the cache because the registry (named by its first URL) is unreachable."""
        for sources in self.lists.values():
            if sources.upstream.base == upstream_base:
                sources.note_stale(kind)

    def kept_from(self, old: Sources) -> Sources:
        """What was learned of registries whose URLs are listed as before."""
        for key in self.lists:
            if key in old.lists:
                self.lists[key] = old.lists[key]
                self.lists[key].backoff = self.backoff
        return self


async def first_answer(sources: SourceList, attempt: Callable[[Upstream], Awaitable[T]],
                       status_of: Callable[[T], int] = lambda answer: 200) -> tuple[Upstream, T]:
    """``attempt`` at the registry's URLs in order until one answers; the failing ones are
    marked. The last URL's failing answer is returned as it is (the caller's stale mode
    decides); raises RegistryError when the last URL tried gave no answer (with every URL backing
    off, the one whose back-off ends first is still tried)."""
    candidates = sources.candidates()  # never empty: a registry has its first URL
    for number, source in enumerate(candidates, 1):
        last = number == len(candidates)
        try:
            answer = await attempt(source)
        except RegistryError as e:
            if e.status not in UNAVAILABLE_STATUSES:
                raise
            sources.failed(source, e.message)
            if last:
                raise
            continue
        status = status_of(answer)
        if not is_failure(status):
            sources.answered(source)
            return source, answer
        sources.failed(source, f"answered {status}")
        if last:
            return source, answer
    raise AssertionError("unreachable")
