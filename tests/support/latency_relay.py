"""A TCP relay that puts a round-trip time between its clients and one target.

Run:  python -m tests.support.latency_relay --target 127.0.0.1:PORT --rtt-ms 50 \
          --ready-file R [--port 0] [--log L] [--window BYTES] [--no-connect-rtt]

This kernel has no ``netem`` qdisc, so latency is added in user space: every byte
is forwarded RTT/2 after it arrived, in each direction, in order. A TLS
connection passes through untouched (the relay never looks inside), so a client
that verifies the target's certificate for 127.0.0.1 accepts the relay's port.

* **Connection set-up.** The kernel completes the TCP handshake with the client
  at once; the relay charges it instead: nothing the client sends reaches the
  target before one RTT after the connection was accepted (plus RTT/2 on the
  way), as if the client had waited for the SYN-ACK. A connection that is
  opened and closed without data (a reachability probe) costs no time here,
  while on a real network it costs one RTT.
* **Back-pressure.** At most ``--window`` bytes (default 8 MiB) wait in each
  direction's delay line; beyond that the relay stops reading, so a slow reader
  slows the writer as TCP would. The window bounds the throughput to about
  window / (RTT/2), like a TCP window does.
* **Closing.** An EOF from one side is passed on after the delay as a
  half-close (``shutdown(SHUT_WR)``); the connection ends when both directions
  have ended. A reset or error on one side aborts both.

Events are appended to ``--log`` as JSON lines as they happen, each with ``ts``
and ``conn`` (the connection's number): ``open`` (accepted), ``first_data`` (the
client's first bytes: over TLS, the handshake begins), ``round_trip`` with
``start``/``end`` (Unix times, in the client's time) for each request-answer
exchange, and ``close`` with ``to_target``/``to_client`` (bytes) and ``error``
(if any). The first round trip of a connection is the TCP handshake; then each
flight of client data that follows an answer (or starts the connection) opens
one, and the first data the target sends after that flight reached it closes it
when it reaches the client. For strictly alternating protocols (a TLS handshake,
HTTP/1.1) that is exactly one round trip per TLS flight and per request; an
HTTP/2 client's flow-control frames during a download look like extra exchanges.
``summarize_round_trips`` turns the events of, say, one pull into counts and the
longest chain of sequential round trips (bench/README.md explains how it is used).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import time
from pathlib import Path
from typing import Any, Iterable

from tests.support.common import JsonLog, install_term_handler, watch_parent, write_ready_file

READ_SIZE = 256 << 10
DEFAULT_WINDOW = 8 << 20


class DelayLine:
    """One direction: read, hold each piece until it is due, write it, in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float, window: int,
                 not_before: float = 0.0, on_data=lambda arrived: None):
        self.reader, self.writer, self.delay, self.window = reader, writer, delay, window
        self.not_before = not_before  # monotonic time before which nothing is delivered
        self.on_data = on_data  # called with each piece's arrival time (monotonic)
        self.queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.queued = 0
        self.bytes = 0
        self.arrived = asyncio.Event()  # the reader added a piece
        self.drained = asyncio.Event()  # the writer took one

    async def _read(self) -> None:
        while True:
            while self.queued >= self.window:  # back-pressure: stop reading until the line drains
                self.drained.clear()
                await self.drained.wait()
            data = await self.reader.read(READ_SIZE)
            now = time.monotonic()
            self.queue.append((now, data or None))
            self.arrived.set()
            if not data:
                return
            self.queued += len(data)
            self.on_data(now)

    async def _write(self) -> None:
        while True:
            while not self.queue:
                self.arrived.clear()
                await self.arrived.wait()
            arrived, data = self.queue[0]
            wait = max(arrived + self.delay, self.not_before) - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self.queue.popleft()
            if data is None:
                if self.writer.can_write_eof():
                    self.writer.write_eof()
                return
            self.writer.write(data)
            await self.writer.drain()
            self.queued -= len(data)
            self.bytes += len(data)
            self.drained.set()

    async def run(self) -> None:
        """Until the EOF was passed on; raises on a reset or error of either socket."""
        await _all_or_none([self._read(), self._write()])


async def _all_or_none(coroutines) -> None:
    """Run the coroutines together; the first to fail cancels the others and its error is raised."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()


class RoundTrips:
    """Request-answer exchanges of one connection, in the client's time (see the module doc);
    each is logged as it completes."""

    def __init__(self, delay: float, opened: float, connect_rtt: bool, emit):
        self.delay, self.opened, self.connect_rtt, self.emit = delay, opened, connect_rtt, emit
        self.earliest = opened + 2 * delay if connect_rtt else opened
        self.pending: float | None = None
        self.started = False

    def client_data(self, arrived: float) -> None:
        if not self.started:
            self.started = True
            self.emit("first_data")
            if self.connect_rtt:
                self.emit("round_trip", self.opened, self.earliest)
        if self.pending is None:
            self.pending = max(arrived, self.earliest)

    def target_data(self, arrived: float) -> None:
        # only data the target sent after the flight reached it answers it (not data that was
        # already on its way, as in a download the client keeps acknowledging)
        if self.pending is not None and arrived >= self.pending + self.delay:
            self.emit("round_trip", self.pending, arrived + self.delay)
            self.pending = None


class Relay:
    def __init__(self, target: tuple[str, int], rtt: float, window: int = DEFAULT_WINDOW,
                 connect_rtt: bool = True, log: JsonLog | None = None):
        self.target, self.delay, self.window = target, rtt / 2, window
        self.connect_rtt, self.log = connect_rtt, log or JsonLog(None)
        self.numbers = itertools.count(1)
        self.to_wall = time.time() - time.monotonic()  # monotonic -> Unix time, to line up with other logs

    def _emitter(self, conn: int):
        def emit(event: str, *interval: float, **more: Any) -> None:
            rec: dict[str, Any] = {"event": event, "conn": conn, **more}
            if interval:
                rec["start"], rec["end"] = (round(t + self.to_wall, 6) for t in interval)
            self.log.write(rec)
        return emit

    async def handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        emit = self._emitter(next(self.numbers))
        emit("open")
        trips = RoundTrips(self.delay, time.monotonic(), self.connect_rtt, emit)
        target_w, up, down, error = None, None, None, None
        try:
            target_r, target_w = await asyncio.open_connection(*self.target)
            up = DelayLine(client_r, target_w, self.delay, self.window,
                           not_before=trips.earliest + self.delay, on_data=trips.client_data)
            down = DelayLine(target_r, client_w, self.delay, self.window, on_data=trips.target_data)
            await _all_or_none([up.run(), down.run()])
        except (OSError, asyncio.IncompleteReadError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        finally:
            for w in (client_w, target_w):
                if w is not None:
                    w.transport.abort() if error else w.close()
        emit("close", to_target=up.bytes if up else 0, to_client=down.bytes if down else 0,
             **({"error": error} if error else {}))


def longest_chain(intervals: Iterable[tuple[float, float]], slack: float = 0.0) -> int:
    """The most intervals that follow one another, each starting after the previous ended
    (``slack`` seconds of overlap tolerated): the sequential round trips among them."""
    ends: list[tuple[float, int]] = []  # (end, chain length ending there)
    best = 0
    for start, end in sorted(intervals, key=lambda iv: iv[1]):
        before = max((n for e, n in ends if e <= start + slack), default=0)
        ends.append((end, before + 1))
        best = max(best, before + 1)
    return best


def summarize_round_trips(records: Iterable[dict[str, Any]], slack: float = 0.002) -> dict[str, int]:
    """What some relay log records (say, those written during one pull) tell: connections
    opened, TLS handshakes (connections whose client sent data: every relayed service is
    HTTPS), connections closed without any data (reachability probes), round trips, and
    sequential round trips (the longest chain of round trips each starting after the
    previous one was answered)."""
    recs = list(records)
    trips = [(r["start"], r["end"]) for r in recs if r.get("event") == "round_trip"]
    return {"connections": sum(1 for r in recs if r.get("event") == "open"),
            "tls_handshakes": sum(1 for r in recs if r.get("event") == "first_data"),
            "probes": sum(1 for r in recs if r.get("event") == "close" and not r["to_target"]),
            "round_trips": len(trips), "sequential_round_trips": longest_chain(trips, slack)}


async def _serve(args: argparse.Namespace) -> None:
    host, _, port = args.target.rpartition(":")
    relay = Relay((host, int(port)), args.rtt_ms / 1000, args.window, not args.no_connect_rtt, JsonLog(args.log))
    server = await asyncio.start_server(relay.handle, args.host, args.port, backlog=256)
    bound = server.sockets[0].getsockname()[1]
    if args.ready_file:
        write_ready_file(args.ready_file, port=bound, url=f"tcp://{args.host}:{bound}")
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="delaying TCP relay")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--target", required=True, help="host:port to relay to")
    ap.add_argument("--rtt-ms", type=float, required=True, help="round-trip time to add (each way: half)")
    ap.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="bytes held per direction at most")
    ap.add_argument("--no-connect-rtt", action="store_true", help="do not charge one RTT for connection set-up")
    ap.add_argument("--log", type=Path)
    ap.add_argument("--ready-file", type=Path)
    args = ap.parse_args(argv)
    install_term_handler()
    watch_parent()
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
