"""The seams inside mitmproxy's proxy server (mitmseams/connections.py, layers.py, http2.py,
logs.py's per-connection lines), each driven through the installed mitmproxy's own proxy
server with real client sockets (tests/unit/inproxy.py): a failure names the seam."""

from __future__ import annotations

import asyncio
import logging
import ssl

import h2.errors
import h2.events
import pytest
from mitmproxy import addons as mitmproxy_addons
from mitmproxy.addons import next_layer, script

from hubrewrite.mitmseams import connections, http2, layers, logs
from hubrewrite.mitmseams.layers import CloseClient
from tests.unit.inproxy import H2Client, KeptRecords, client_tls, read_until_closed, running_proxy
from tests.unit.seamcheck import seam


@pytest.fixture(scope="module")
def confdir(tmp_path_factory):
    return tmp_path_factory.mktemp("confdir")  # the proxy's CA, made once


class Clients:
    """Keeps every client connection the proxy reports."""

    def __init__(self) -> None:
        self.clients = []

    def client_connected(self, client) -> None:
        self.clients.append(client)


async def until(condition, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def test_a_client_connection_is_found_and_closed(confdir):
    async def scenario():
        seen = Clients()
        async with running_proxy(confdir, seen) as proxy:
            reader, writer = await asyncio.open_connection(*proxy.address)
            await until(lambda: seen.clients)
            client = seen.clients[0]
            with seam("connections.handler_of"):
                handler = connections.handler_of(client)
                assert handler is not None and handler.client is client
            with seam("connections.close_client"):
                assert connections.close_client(client)
                assert await read_until_closed(reader) == b""
                await until(lambda: connections.handler_of(client) is None)
                assert not connections.close_client(client)
            writer.close()

    asyncio.run(scenario())


class Watch:
    """A HeadWatch that records what its layer shows it and says what the test wants."""

    def __init__(self, refuse_beyond: int | None = None, close_at_tick: int | None = None) -> None:
        self.closed = False
        self.parsed = False
        self.sizes: list[int] = []
        self.ticks = 0
        self.refuse_beyond = refuse_beyond
        self.close_at_tick = close_at_tick

    def watching(self) -> bool:
        return not self.parsed

    def check_every(self) -> float:
        return 0.05

    def received(self, size: int) -> CloseClient | None:
        self.sizes.append(size)
        if self.refuse_beyond is not None and sum(self.sizes) > self.refuse_beyond:
            self.closed = True
            return CloseClient(b"HTTP/1.1 431 Too Large\r\nContent-Length: 0\r\n\r\n")
        return None

    def head_parsed(self) -> None:
        self.parsed = True

    def timer_fired(self) -> CloseClient | None:
        self.ticks += 1
        if self.ticks == self.close_at_tick:
            self.closed = True
            return CloseClient()
        return None


class WatchHeads:
    """Puts each new Watch of the test on the next client connection's first layer."""

    def __init__(self, *watches: Watch) -> None:
        self.watches = list(watches)

    def next_layer(self, nextlayer) -> None:
        if nextlayer.layer is None and self.watches:
            if layers.watch_heads(nextlayer, self.watches[0]):
                self.watches.pop(0)


def test_a_head_layer_sees_the_heads_bytes_and_closes_when_told(confdir):
    counted, refusing, idle = Watch(), Watch(refuse_beyond=20), Watch(close_at_tick=3)

    async def scenario():
        async with running_proxy(confdir, WatchHeads(counted, refusing, idle)) as proxy:
            reader, writer = await asyncio.open_connection(*proxy.address)
            writer.write(b"GET / HTTP/1.1\r\n")
            await until(lambda: counted.sizes)
            writer.write(b"Host: mirror.test\r\n\r\n")
            answer = await read_until_closed(reader)  # the upstream's, which closes
            assert counted.parsed and sum(counted.sizes) == len(b"GET / HTTP/1.1\r\nHost: mirror.test\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok")

            reader, writer = await asyncio.open_connection(*proxy.address)
            writer.write(b"GET /a-long-path-beyond-the-limit HTTP/1.1\r\n")
            assert await read_until_closed(reader) == b"HTTP/1.1 431 Too Large\r\nContent-Length: 0\r\n\r\n"

            reader, writer = await asyncio.open_connection(*proxy.address)
            writer.write(b"G")
            assert await read_until_closed(reader) == b""
            assert idle.ticks == 3

    with seam("layers.watch_heads, layers.HeadLayer (decide_now, the HTTP layer's head hooks, wakeups)"):
        asyncio.run(scenario())


def test_scripts_see_next_layer_before_mitmproxys_nextlayer_addon():
    order = [type(a) for a in mitmproxy_addons.default_addons()]
    with seam("layers.decide_now (the order of mitmproxy's default addons)"):
        assert order.index(script.ScriptLoader) < order.index(next_layer.NextLayer)


class ResetMalformed:
    def request(self, flow) -> None:
        if flow.request.path == "/malformed":
            http2.reset_as_malformed(flow)
        flow.kill()


def test_a_stream_reset_as_malformed_gets_protocol_error(confdir):
    async def scenario():
        async with running_proxy(confdir, ResetMalformed()) as proxy:
            client = await H2Client.connect(proxy.address)
            malformed = client.open_streams(1, path="/malformed")[0]
            killed = client.open_streams(1, path="/killed")[0]
            resets = await client.resets(2)
            client.close()
            return {malformed: resets.get(malformed), killed: resets.get(killed)}, malformed, killed

    with seam("http2.reset_as_malformed (HttpLayer.streams/connections, Http2Server.h2_conn)"):
        codes, malformed, killed = asyncio.run(scenario())
        assert codes[malformed] == h2.errors.ErrorCodes.PROTOCOL_ERROR
        assert codes[killed] == h2.errors.ErrorCodes.INTERNAL_ERROR  # what a kill alone sends


def test_the_http2_server_announces_the_streams_the_mirror_counts_on(confdir):
    async def scenario():
        async with running_proxy(confdir) as proxy:
            client = await H2Client.connect(proxy.address)
            settings = await client.server_settings()
            client.close()
            return settings

    with seam("http2.MAX_CONCURRENT_STREAMS"):
        assert asyncio.run(scenario()).max_concurrent_streams == http2.MAX_CONCURRENT_STREAMS


class CloseOnFirstRequest:
    """Counts requests and closes their connection at the first, as connwork.py does at the 201st."""

    def __init__(self, piece: int | None) -> None:
        self.piece = piece
        self.requests = 0

    def next_layer(self, nextlayer) -> None:
        if self.piece is not None:
            if nextlayer.layer is None:
                layers.decide_now(nextlayer)
            http2.read_in_pieces(nextlayer, self.piece)

    def requestheaders(self, flow) -> None:
        self.requests += 1
        if self.requests == 1:
            connections.close_client(flow.client_conn)


def requests_parsed_after_a_close(confdir, piece: int | None, streams: int = 60) -> int:
    addon = CloseOnFirstRequest(piece)

    async def scenario():
        async with running_proxy(confdir, addon) as proxy:
            client = await H2Client.connect(proxy.address)
            client.open_streams(streams)
            await client.resets(streams, timeout=2.0)
            client.close()

    asyncio.run(scenario())
    return addon.requests


def test_http2_data_read_in_pieces_stops_at_the_close(confdir):
    with seam("http2.read_in_pieces, http2.ReadInPieces"):
        assert requests_parsed_after_a_close(confdir, piece=64) <= 8  # the first piece's streams
    with seam("http2.ReadInPieces (why: mitmproxy parses all of one read before it looks at the connection)"):
        assert requests_parsed_after_a_close(confdir, piece=None) == 60


def test_the_proxy_servers_per_connection_lines(confdir):
    class Refuse:
        def client_connected(self, client) -> None:
            if refuse_next:
                client.error = "refused by the test"

    refuse_next = False

    async def scenario():
        nonlocal refuse_next
        async with running_proxy(confdir, Refuse(), tcp_timeout=1) as proxy:
            reader, writer = await asyncio.open_connection(*proxy.address)  # connect, forwarded, disconnect
            writer.write(b"GET / HTTP/1.1\r\nHost: mirror.test\r\n\r\n")
            await read_until_closed(reader)
            reader, writer = await asyncio.open_connection(*proxy.address)
            writer.write(b"GET / HTTP/1.1\r\nHost")  # a head left unfinished
            await asyncio.sleep(0.1)
            writer.close()
            reader, writer = await asyncio.open_connection(*proxy.address)  # idle beyond tcp_timeout
            await read_until_closed(reader)
            await tls_handshake_left(proxy.address)
            refuse_next = True
            reader, writer = await asyncio.open_connection(*proxy.address)
            await read_until_closed(reader)
            await asyncio.sleep(0.1)

    with KeptRecords(logs.SERVER_LOGGER) as kept:
        asyncio.run(scenario())
    with seam("logs.SERVER_LOGGER, logs.PER_CONNECTION"):
        info = [r.getMessage() for r in kept.records if r.levelno == logging.INFO]
        missing = [text for text in logs.PER_CONNECTION if not any(m.startswith(text) for m in info)]
        assert missing == [], f"no INFO line starts so; mitmproxy logged: {sorted(set(info))}"
    with seam("logs.client_of"):
        assert all(logs.client_of(r)[0] == "127.0.0.1" for r in kept.records if r.getMessage() == "client connect")


async def tls_handshake_left(address: tuple[str, int]) -> None:
    """Sends a ClientHello, reads the proxy's answer, and leaves."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_tls().wrap_bio(incoming, outgoing, server_hostname="mirror.test")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    reader, writer = await asyncio.open_connection(*address)
    writer.write(outgoing.read())
    await reader.read(65536)  # the ServerHello
    writer.close()
    await asyncio.sleep(0.1)
