"""Issue 17, item 11: a connection flood makes a few log lines, not a few per connection.

1,500 slowloris connections (a request head started and trickled, never
finished) against a real mitmdump: the guard closes them after
hub_head_timeout (408) or refuses those beyond hub_max_connections, and says
so once per cause and minute. mitmproxy's own lines about each connection
("client connect", "client disconnect", "Client closed connection before
completing request headers", ...) appear only at debug verbosity (``-v``),
where the same flood's connections are all still told.
"""

from __future__ import annotations

import re
import socket
import time

import pytest

from tests.support.mirror import Mirror

from .helpers import UPSTREAM_TIMEOUT

HEAD_TIMEOUT = 3
MAX_CONNECTIONS = 500
FLOOD = 1500
# mitmproxy's lines about one connection: "[time][client address] message"
PER_CONNECTION = re.compile(r"^\[[^]]*\]\[[^]]*\] (client connect|client disconnect|client kill connection|"
                            r"Client closed connection before completing request headers)")


@pytest.fixture(scope="module")
def mirror(upstream, cache_dir, tmp_path_factory):
    options = {"hub_cache_dir": str(cache_dir), "hub_upstream_timeout": str(UPSTREAM_TIMEOUT),
               "hub_head_timeout": str(HEAD_TIMEOUT), "hub_max_connections": str(MAX_CONNECTIONS)}
    with Mirror(tmp_path_factory.mktemp("connection-log-mirror"), upstream, options=options) as m:
        yield m


def slowloris(port: int, count: int) -> None:
    """``count`` connections that start a request head and trickle it until the mirror closes them."""
    socks = []
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.setblocking(False)
            try:
                s.send(b"GET /v2/ HTTP/1.1\r\nHost: mirror\r\n")
            except OSError:
                pass  # refused at once: beyond the connection limit
            socks.append(s)
        for _ in range(HEAD_TIMEOUT * 2 + 1):
            time.sleep(1)
            for s in socks:
                try:
                    s.send(b"X-Slow: 1\r\n")
                except OSError:
                    pass  # closed by the mirror: expected
    finally:
        for s in socks:
            s.close()
    time.sleep(1)  # the last closes reach the mirror


def per_connection_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if PER_CONNECTION.match(line)]


def test_a_slowloris_flood_logs_one_line_per_cause(mirror):
    start = len(mirror.log_text())
    slowloris(mirror.port, FLOOD)
    log = mirror.log_text()[start:]
    lines = log.splitlines()
    assert per_connection_lines(log) == [], \
        f"{len(per_connection_lines(log))} per-connection lines, e.g. {per_connection_lines(log)[:3]}"
    assert sum("request head not sent in time" in line for line in lines) == 1, lines
    assert sum("too many connections" in line for line in lines) == 1, lines
    assert len(lines) <= 5, f"{len(lines)} log lines for one flood:\n" + "\n".join(lines[:20])


def test_at_debug_verbosity_each_connection_is_told(upstream, tmp_path):
    with Mirror(tmp_path / "m", upstream, options={"hub_head_timeout": str(HEAD_TIMEOUT)},
                extra_args=["-v"]) as verbose:
        start = len(verbose.log_text())
        slowloris(verbose.port, 20)
        lines = per_connection_lines(verbose.log_text()[start:])
    assert sum(line.endswith("] client connect") for line in lines) == 20, lines
    assert sum(line.endswith("] client disconnect") for line in lines) == 20, lines
