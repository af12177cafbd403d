"""What clients may make the mirror hold open, and the log of what went beyond.

Every connection costs open files, and a process out of files fails
everywhere at once (no client, upstream or cache file can be opened). The
mirror raises its soft open-file limit to the hard one at start and shares
what is left, after its own files and the upstream side, between its client
ports: the main port (``guard.py``) and the blob listener (``httpserver.py``).
With the listener on, each port gets the same number of connections, so a
flood on one leaves the other its share; beyond its share a port closes new
connections at once.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections import Counter
from collections.abc import Callable

from .settings import Limits, Settings
from .upstream_client import MAX_UPSTREAM_CONNECTIONS

log = logging.getLogger("hub_rewrite")

REPORT_EVERY = 60.0  # seconds between two log lines about closed connections
# a main-port connection: the client's, mitmproxy's onward connection (upstream, CDN or the
# loopback server), the loopback server's end of it and the file it sends
MAIN_PORT_FILES = 4
LISTENER_FILES = 2  # a blob listener connection: the client's and the file it sends
# the process's own files (logs, cache, listening sockets, mitmweb), and a burst of accepted
# sockets not yet refused (asyncio accepts up to mitmproxy's listen backlog, 100, at a time)
OWN_FILES = 64 + 100
# the upstream side: the mirror's connections to upstreams, each a download at most, which
# holds its file and its lock
UPSTREAM_FILES = MAX_UPSTREAM_CONNECTIONS * 3
MIN_CONNECTIONS = 16  # what a port gets whatever the limit says


class FileBudget:
    """The open-file limit, raised once, and each port's share of it."""

    def __init__(self, settings_of: Callable[[], Settings]) -> None:
        self.settings_of = settings_of
        self.file_limit = raise_file_limit()

    def limits(self) -> Limits:
        return self.settings_of().limits

    def listener_on(self) -> bool:
        cache = self.settings_of().cache
        return cache is not None and cache.blob_listen is not None

    def connections(self) -> int:
        """How many connections each port may hold: hub_max_connections, and what the files allow."""
        per_connection = MAIN_PORT_FILES + (LISTENER_FILES if self.listener_on() else 0)
        allowed = (self.file_limit - OWN_FILES - UPSTREAM_FILES) // per_connection
        return min(self.limits().max_connections, max(MIN_CONNECTIONS, allowed))


def raise_file_limit() -> int:
    """Open files: the soft limit raised to the hard one (every connection needs a few)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


class ClosedLog:
    """One log line per cause and minute about connections closed for going beyond a limit:
    a cause is logged when it first closes a connection; more of it within the minute make
    one line at the minute's end."""

    def __init__(self, who: str = "") -> None:
        self.who = who  # which port, when not the main one
        self.pending: Counter[str] = Counter()  # cause -> connections closed since it was last logged
        self.reported: dict[str, float] = {}  # cause -> when it was last logged

    def count(self, cause: str) -> None:
        now = time.monotonic()
        last = self.reported.get(cause)
        if last is None or now - last >= REPORT_EVERY:
            log.warning("hub_rewrite: %sclosed a client connection: %s", self.who, cause)
            self.reported[cause] = now
            return
        if not self.pending[cause]:
            asyncio.get_running_loop().call_later(last + REPORT_EVERY - now, self._report, cause)
        self.pending[cause] += 1

    def _report(self, cause: str) -> None:
        log.warning("hub_rewrite: %sclosed %d more client connection(s) within a minute: %s",
                    self.who, self.pending.pop(cause, 0), cause)
        self.reported[cause] = time.monotonic()
