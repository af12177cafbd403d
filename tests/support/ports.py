"""Loopback ports for the servers and mirrors the tests start.

``free_port()`` is a port nobody listens on right now: bind it soon, or connect
to it to meet a refused connection.

The ports come from below the kernel's ephemeral range (32768-60999 by default,
where ``bind(0)`` and every connection's source port are taken from), so a
port handed out here is not taken by a connection in the moment before its
server binds it. Each pytest-xdist worker has a range of its own, so two
workers never hand out the same port (a port taken by a worker of the same run
was seen: "address already in use"); within a range the ports are handed out
in turn from a random start, so one process does not hand out one port twice
while its first server is still starting, and two processes outside xdist
(a benchmark beside a test run) seldom start at the same place.
"""

from __future__ import annotations

import itertools
import os
import random
import socket

FIRST_PORT = 12000
RANGE = 2000  # ports per process; ten ranges end at 32000, below the ephemeral range
_RANGES = 10


def _range_start() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1, ...; unset outside xdist
    slot = int(worker[2:]) % (_RANGES - 1) + 1 if worker[2:].isdigit() else 0
    return FIRST_PORT + slot * RANGE


_START = _range_start()
_TURN = itertools.count(random.randrange(RANGE))


def free_port(host: str = "127.0.0.1") -> int:
    for _ in range(RANGE):
        port = _START + next(_TURN) % RANGE
        if port_free(port, host):
            return port
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:  # the range is full
        s.bind((host, 0))
        return s.getsockname()[1]


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``port`` can be bound on ``host`` now (a fixed port a command needs, e.g. 5000)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
