"""mitmproxy's proxy server in the test's own process, for the seams that reach into it.

The installed mitmproxy's own ``Proxyserver``, ``NextLayer`` and ``TlsConfig``
addons, on a master that runs hooks as mitmdump's does (eager tasks), listening
on a free loopback port in reverse mode to a small HTTP/1.1 upstream; the
tests' addons come first, as ``-s`` scripts do. Clients are real sockets
(plain, TLS, or HTTP/2 over TLS with the ``h2`` package).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.events
from mitmproxy.addons import next_layer, proxyserver, tlsconfig
from mitmproxy.test import taddons
from mitmproxy.utils import asyncio_utils

UPSTREAM_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


@dataclass
class Proxy:
    address: tuple[str, int]
    master: object


async def _upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers one request and closes."""
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(UPSTREAM_ANSWER)
        await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def running_proxy(confdir, *addons, **options) -> AsyncIterator[Proxy]:
    """A proxy server with ``addons`` before mitmproxy's own (``options`` on top)."""
    upstream = await asyncio.start_server(_upstream, "127.0.0.1", 0)
    upstream_port = upstream.sockets[0].getsockname()[1]
    server = proxyserver.Proxyserver()
    with asyncio_utils.set_eager_task_factory(), \
            taddons.context(*addons, server, next_layer.NextLayer(), tlsconfig.TlsConfig()) as tctx:
        tctx.configure(server, listen_host="127.0.0.1", listen_port=0, confdir=str(confdir),
                       mode=[f"reverse:http://127.0.0.1:{upstream_port}"], **options)
        server.running()
        assert await server.setup_servers(), "the proxy server did not start"
        try:
            yield Proxy(server.listen_addrs()[0][:2], tctx.master)
        finally:
            await server.servers.update([])
            upstream.close()
            for handler in list(server.connections.values()):
                if handler.client in handler.transports:
                    handler.close_connection(handler.client)
            await asyncio.sleep(0.05)


def client_tls(alpn: list[str] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the proxy's certificate is made by its test CA
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


async def read_until_closed(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    """All the proxy sends until it closes the connection."""
    received = b""
    async with asyncio.timeout(timeout):
        while chunk := await reader.read(65536):
            received += chunk
    return received


class H2Client:
    """HTTP/2 over TLS to the proxy, frame by frame."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()

    @classmethod
    async def connect(cls, address: tuple[str, int]) -> H2Client:
        reader, writer = await asyncio.open_connection(*address, ssl=client_tls(["h2"]), server_hostname="127.0.0.1")
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2", "the proxy did not choose h2"
        return cls(reader, writer)

    def open_streams(self, count: int, path: str = "/") -> list[int]:
        """``count`` GET streams, each a HEADERS frame ending it, written at once."""
        ids = []
        for _ in range(count):
            stream_id = self.conn.get_next_available_stream_id()
            self.conn.send_headers(stream_id, [(":method", "GET"), (":scheme", "https"),
                                               (":authority", "mirror.test"), (":path", path)], end_stream=True)
            ids.append(stream_id)
        self.writer.write(self.conn.data_to_send())
        return ids

    async def _read_until(self, done, timeout: float) -> list[h2.events.Event]:
        """The proxy's frames as events, until ``done(events)``, the close or the timeout."""
        seen: list[h2.events.Event] = []
        with contextlib.suppress(TimeoutError, OSError):
            async with asyncio.timeout(timeout):
                while not done(seen) and (data := await self.reader.read(65536)):
                    seen += self.conn.receive_data(data)
                    if not self.writer.is_closing():
                        self.writer.write(self.conn.data_to_send())
        return seen

    async def resets(self, count: int, timeout: float = 5.0) -> dict[int, int]:
        """Stream id -> the error code of its reset, for the first ``count`` resets."""
        seen = await self._read_until(lambda s: sum(isinstance(e, h2.events.StreamReset) for e in s) >= count,
                                      timeout)
        return {e.stream_id: e.error_code for e in seen if isinstance(e, h2.events.StreamReset)}

    async def server_settings(self, timeout: float = 5.0):
        """The SETTINGS the proxy announced."""
        await self._read_until(lambda s: any(isinstance(e, h2.events.RemoteSettingsChanged) for e in s), timeout)
        return self.conn.remote_settings

    def close(self) -> None:
        self.writer.close()


class KeptRecords(logging.Handler):
    """The records of one logger, at every level."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.DEBUG)
        self.logger = logging.getLogger(name)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> KeptRecords:
        self.level_before = self.logger.level
        # an addon of an earlier test in this process may have left its filter on the logger
        # (connection_log's PerConnectionLines): the records are kept as mitmproxy makes them
        self.filters_before = list(self.logger.filters)
        for f in self.filters_before:
            self.logger.removeFilter(f)
        self.logger.addHandler(self)
        self.logger.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level_before)
        for f in self.filters_before:
            self.logger.addFilter(f)
