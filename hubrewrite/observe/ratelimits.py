"""Docker Hub's pull allowance, as its ``ratelimit-*`` headers report it."""

from __future__ import annotations

import logging

from ..util.bounded_dict import BoundedDict
from ..registry.headers import value_of
from .metrics import Metrics

log = logging.getLogger("hub_rewrite")


class RateLimits:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._by_source = BoundedDict(10_000)  # (upstream, whom it counted) -> remaining
        self._latest: dict[str, str] = {}  # upstream -> the latest remaining, whoever was counted

    def note(self, upstream: str, fields: list[tuple[str, str]]) -> None:
        remaining = value_of(fields, "ratelimit-remaining")
        if remaining is None:
            return
        source = value_of(fields, "docker-ratelimit-source") or "-"
        count = remaining.split(";")[0].strip()
        if count.isdigit():
            self.metrics.ratelimit_remaining.labels(upstream).set(int(count))
        if self._by_source.get((upstream, source)) != remaining:
            # the operator's log may say whom the upstream counted; the public page does not
            log.info("rate limit at %s for %s: %s remaining", upstream, source if source != "-" else "this mirror", remaining)
        self._by_source.put((upstream, source), remaining)
        self._latest[upstream] = remaining

    def by_upstream(self) -> dict[str, str]:
        return dict(self._latest)
