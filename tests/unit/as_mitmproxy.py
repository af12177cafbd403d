"""A flow's request sent to where the mirror pointed it, as mitmproxy sends it.

mitmproxy (``proxy/server.py`` ``open_connection``, ``proxy/layers/http``) opens the
connection, makes it the flow's ``server_conn`` with both its addresses, and only
then writes the request: the mirror's loopback server knows mitmproxy's requests by
that (``hubrewrite/loopback.py``). Here the same, on a real socket; the answer is read
with h11 and handed back as an ``httpx.Response`` (a body ended short raises
``httpx.RemoteProtocolError``, as httpx would).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import h11
import httpx
from mitmproxy import http

READ_SIZE = 1 << 16


class Exchange:
    """``async with Exchange(flow) as answer``: the answer's head is in; its body from ``chunks()``."""

    def __init__(self, flow: http.HTTPFlow) -> None:
        self.flow = flow
        self.h11 = h11.Connection(h11.CLIENT)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> Exchange:
        request = self.flow.request
        self._reader, self._writer = await asyncio.open_connection(request.host, request.port)
        conn = self.flow.server_conn
        conn.peername = self._writer.get_extra_info("peername")
        conn.sockname = self._writer.get_extra_info("sockname")
        conn.address = (request.host, request.port)
        headers = [(k, v) for k, v in request.headers.items(multi=True) if k.lower() != "host"]
        body = request.raw_content or b""
        if body and "content-length" not in request.headers and "transfer-encoding" not in request.headers:
            headers.append(("Content-Length", str(len(body))))
        out = self.h11.send(h11.Request(method=request.method, target=request.path,
                                        headers=[("Host", f"{request.host}:{request.port}"), *headers]))
        out += self.h11.send(h11.Data(data=body)) if body else b""
        out += self.h11.send(h11.EndOfMessage())
        self._writer.write(out)
        await self._writer.drain()
        event = await self._next()
        if not isinstance(event, h11.Response):
            raise httpx.RemoteProtocolError(f"no answer: {event!r}")
        self.status, self.headers = event.status_code, list(event.headers)
        return self

    async def __aexit__(self, *exc) -> None:
        assert self._writer is not None
        self._writer.close()

    async def chunks(self) -> AsyncIterator[bytes]:
        while isinstance(event := await self._next(), h11.Data):
            yield bytes(event.data)

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    async def _next(self):
        assert self._reader is not None
        while (event := self.h11.next_event()) is h11.NEED_DATA:
            self.h11.receive_data(await self._reader.read(READ_SIZE))
        if event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
            raise httpx.RemoteProtocolError("the connection ended before the answer did")
        return event

    async def answer(self) -> httpx.Response:
        try:
            body = await self.read()
        except h11.RemoteProtocolError as e:
            raise httpx.RemoteProtocolError(str(e)) from e
        return httpx.Response(self.status, headers=self.headers, content=body)


async def fetch(flow: http.HTTPFlow) -> httpx.Response:
    """The whole answer to the flow's request, fetched as mitmproxy would."""
    try:
        async with Exchange(flow) as exchange:
            return await exchange.answer()
    except (h11.RemoteProtocolError, ConnectionError) as e:
        raise httpx.RemoteProtocolError(str(e)) from e
