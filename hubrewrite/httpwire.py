"""Requests as a client sends them on one connection, parsed by h11.

One request at a time: its head within a size and a time limit, then (if a
handler asks) its body read and thrown away. What the client sent after a
request (pipelined requests) waits, unparsed, for the next one. A body is
never taken for a request: the server closes a connection whose body nobody
read.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from urllib.parse import parse_qsl

import h11


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names; a repeated header keeps its first value
    has_body: bool = False


class HeadError(Exception):
    """No request: the connection is closed, with ``status`` (a head was started) or without a word."""

    def __init__(self, status: int | None, cause: str) -> None:
        super().__init__(cause)
        self.status = status
        self.cause = cause


class Incoming:
    def __init__(self, reader: asyncio.StreamReader, max_head_bytes: int, read_size: int) -> None:
        self.reader = reader
        self.max_head_bytes = max_head_bytes
        self.read_size = read_size
        self.unparsed = b""  # what came after the last request: the next one's start
        self.parser: h11.Connection | None = None  # the current request's
        self.body_read = True
        self.keep_alive = True
        self.requests = 0  # parsed so far on this connection

    async def next_request(self, deadline: float) -> Request | None:
        """The next request's head, due by ``deadline``; None when the client closed.
        HeadError: malformed, too large or not sent in time."""
        parser = self.parser = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_head_bytes)
        received, self.unparsed = self.unparsed, b""
        if received:  # (b"" would tell h11 the connection ended)
            parser.receive_data(received)
        try:
            async with asyncio.timeout_at(deadline):
                event = await self._head(parser, len(received))
        except TimeoutError:
            if parser.trailing_data[0]:
                raise HeadError(408, "request head not sent in time") from None
            raise HeadError(None, "idle connection closed" if self.requests else "nothing sent in time") from None
        except h11.RemoteProtocolError as e:
            if parser.trailing_data[1]:
                return None  # the client closed in the middle of a head: nobody to answer
            # 400 also where h11 suggests 501 (a transfer coding other than chunked), as the main port answers
            raise HeadError(431 if e.error_status_hint == 431 else 400, _cause(e)) from None
        if isinstance(event, h11.ConnectionClosed):
            return None
        return self._started(parser, event)

    async def _head(self, parser: h11.Connection, received: int):
        """The next event after a whole head (a Request), or the end of the connection."""
        event = parser.next_event()
        while event is h11.NEED_DATA:
            # never more than the limit is fed to the parser while it waits for a head's end
            room = self.max_head_bytes + 1 - received
            if room <= 0:
                raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
            data = await self.reader.read(min(self.read_size, room))
            received += len(data)
            parser.receive_data(data)
            event = parser.next_event()
        if isinstance(event, h11.Request) and received - len(parser.trailing_data[0]) > self.max_head_bytes:
            raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
        return event

    def _started(self, parser: h11.Connection, event: h11.Request) -> Request:
        self.requests += 1
        headers: dict[str, str] = {}
        for name, value in event.headers:
            headers.setdefault(name.decode("latin-1"), value.decode("latin-1"))
        # h11 checked both: chunked is the only coding, a length has at most 20 digits
        has_body = "transfer-encoding" in headers or int(headers.get("content-length", "0")) > 0
        target = event.target.decode("ascii")  # h11: visible ASCII only
        path, _, query = target.partition("?")
        request = Request(event.method.decode("ascii"), path, dict(parse_qsl(query)), headers, has_body)
        self.body_read = not has_body
        if not has_body:
            self._ended(parser, parser.next_event())
        return request

    async def discard_body(self) -> None:
        """Read the current request's body and throw it away."""
        parser = self.parser
        if self.body_read or parser is None:
            return
        event = parser.next_event()
        while not isinstance(event, h11.EndOfMessage):
            if event is h11.NEED_DATA:
                parser.receive_data(await self.reader.read(self.read_size))
            event = parser.next_event()  # Data: dropped
        self.body_read = True
        self._ended(parser, event)

    def _ended(self, parser: h11.Connection, event) -> None:
        # else Connection: close, HTTP/1.0, or a CONNECT or Upgrade (never switched to): this answer is the last
        self.keep_alive = isinstance(event, h11.EndOfMessage) and parser.their_state is h11.DONE
        self.unparsed = parser.trailing_data[0]


def _cause(e: h11.RemoteProtocolError) -> str:
    """A fixed text per kind (never the client's bytes: causes are logged, one line each a minute)."""
    return {431: "request head too large", 501: "unsupported transfer coding"}.get(e.error_status_hint,
                                                                                  "malformed request head")
