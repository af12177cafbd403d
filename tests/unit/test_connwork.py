"""connwork.ConnectionWork: turns per client connection, and the close of a connection that holds
more requests than it may have streams open. tests/hardening/test_http2.py runs it against a real
HTTP/2 client resetting 20,000 streams."""

from __future__ import annotations

import asyncio

from mitmproxy.connection import ConnectionState
from mitmproxy.test import tflow

from hubrewrite.connwork import ACTIVE, MAX_HELD, ConnectionWork
from hubrewrite.h2streams import body_disagrees_with_length


def work_and_log():
    closed, causes = [], []

    def close(client):
        client.state = ConnectionState.CLOSED  # as mitmproxy's handler does
        closed.append(client)

    return ConnectionWork(close, causes.append), closed, causes


def test_a_connection_works_on_active_requests_at_once_the_others_wait_their_turn():
    async def scenario():
        work, _, _ = work_and_log()
        client = tflow.tclient_conn()
        release = asyncio.Event()
        started: list[int] = []

        async def request(i: int) -> bool:
            async with work.turn(client) as ours:
                if ours:
                    started.append(i)
                    await release.wait()
                return ours

        tasks = [asyncio.create_task(request(i)) for i in range(ACTIVE + 3)]
        await asyncio.sleep(0.01)
        assert started == list(range(ACTIVE))
        release.set()
        assert all(await asyncio.gather(*tasks))
        assert started == list(range(ACTIVE + 3))  # in the order they came
        assert work.connections == {}  # nothing kept for an idle connection

    asyncio.run(scenario())


def test_requests_waiting_when_the_connection_goes_never_start():
    async def scenario():
        work, _, _ = work_and_log()
        client = tflow.tclient_conn()
        release = asyncio.Event()

        async def request() -> bool:
            async with work.turn(client) as ours:
                if ours:
                    await release.wait()
                return ours

        tasks = [asyncio.create_task(request()) for _ in range(ACTIVE + 5)]
        await asyncio.sleep(0.01)
        client.state = ConnectionState.CLOSED
        work.disconnected(client)
        release.set()
        results = await asyncio.gather(*tasks)
        assert results == [True] * ACTIVE + [False] * 5
        async with work.turn(client) as ours:
            assert not ours  # a hook that comes late for a closed connection
        assert work.connections == {}

    asyncio.run(scenario())


def test_a_request_cancelled_while_waiting_takes_no_turn():
    async def scenario():
        work, _, _ = work_and_log()
        client = tflow.tclient_conn()
        release = asyncio.Event()

        async def request() -> bool:
            async with work.turn(client) as ours:
                await release.wait()
                return ours

        busy = [asyncio.create_task(request()) for _ in range(ACTIVE)]
        waiting = asyncio.create_task(request())
        await asyncio.sleep(0.01)
        waiting.cancel()
        await asyncio.sleep(0.01)
        release.set()
        assert all(await asyncio.gather(*busy))
        assert work.connections == {}

    asyncio.run(scenario())


def test_more_requests_held_than_streams_allowed_close_the_connection():
    work, closed, causes = work_and_log()
    flows = [tflow.tflow() for _ in range(MAX_HELD + 5)]
    client = flows[0].client_conn
    for f in flows:
        f.client_conn = client
    admitted = [work.arrived(f) for f in flows]
    assert admitted == [True] * MAX_HELD + [False] * 5
    assert closed == [client] and len(causes) == 1 and "reset" in causes[0]
    for f in flows:
        work.finished(f)
    assert work.connections == {}
    other = tflow.tflow()  # another connection is not concerned
    assert work.arrived(other)
    work.finished(other)
    assert work.connections == {}


def test_an_http2_body_shorter_or_longer_than_its_content_length():
    def request(version: str, content: bytes, *lengths: str):
        flow = tflow.tflow()
        flow.request.http_version = version
        flow.request.headers.pop("content-length", None)
        for length in lengths:
            flow.request.headers.add("content-length", length)
        flow.request.raw_content = content
        return flow.request

    assert body_disagrees_with_length(request("HTTP/2.0", b"", "5"))
    assert body_disagrees_with_length(request("HTTP/2.0", b"123456", "5"))
    assert not body_disagrees_with_length(request("HTTP/2.0", b"12345", "5"))
    assert not body_disagrees_with_length(request("HTTP/2.0", b""))  # no content-length: nothing to check
    assert not body_disagrees_with_length(request("HTTP/1.1", b"", "5"))  # HTTP/1 framing is mitmproxy's
    streamed = request("HTTP/2.0", b"", "5")
    streamed.stream = True  # h2 checks a streamed body's DATA frames itself
    assert not body_disagrees_with_length(streamed)
