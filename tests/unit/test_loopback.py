"""The mirror's loopback server: cached blobs with ranges, downloads followed as they grow,
prepared answers after a drained body; each only to the request of the flow the mirror
pointed there, on the connection mitmproxy opened for it, once (``as_mitmproxy.py``):
never to another connection with the same request, as a record of the flow shows it."""

import asyncio
import hashlib
import threading

import httpx
import pytest

from hubrewrite.cache.blobwriter import BlobWriter
from hubrewrite.cache.downloads import Downloads
from hubrewrite.cache.serving import BlobSender, parse_range
from hubrewrite.cache.store import Store
from hubrewrite.loopback import Loopback
from hubrewrite.responses import make_response
from mitmproxy import http
from mitmproxy.test import tflow

from .as_mitmproxy import Exchange, fetch
from .fed_upstream import FedUpstream
from .inproxy import running_proxy


@pytest.mark.parametrize(
    "value,expected",
    [
        (None, None),
        ("bytes=0-9", (0, 9)),
        ("bytes=10-", (10, 99)),
        ("bytes=-10", (90, 99)),
        ("bytes=90-200", (90, 99)),
        ("bytes=100-", "invalid"),
        ("bytes=5-2", "invalid"),
        ("bytes=-0", "invalid"),
        ("items=0-1", None),
        ("bytes=0-1,5-6", None),
        ("bytes=٠-٩", None),  # digits of another script: not a Range this reads
        ("bytes=" + "9" * 5000 + "-", "invalid"),  # any length: beyond the file, never parsed
        ("bytes=10-" + "9" * 5000, (10, 99)),
        ("bytes=-" + "9" * 5000, (0, 99)),
    ],
)
def test_parse_range(value, expected):
    assert parse_range(value, 100) == expected


def committed(store: Store, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    writer = store.new_writer(digest)
    writer.write(data)
    assert writer.finish()
    return digest


def pointed(loopback: Loopback, path: str, method: str = "GET", **headers: str) -> http.HTTPFlow:
    """A client flow the mirror pointed at ``path`` on its loopback server."""
    flow = tflow.tflow()
    flow.request = http.Request.make(method, "http://hub.test/v2/", headers=headers)
    loopback.point_here(flow, path)
    return flow


async def replayed(flow: http.HTTPFlow) -> httpx.Response:
    """The flow's request as a record shows it, sent by someone else (another connection)."""
    async with httpx.AsyncClient() as client:
        return await client.request(flow.request.method, flow.request.url,
                                    headers=[(k, v) for k, v in flow.request.headers.items(multi=True)])


def loopback_with(store: Store) -> Loopback:
    loopback = Loopback()
    loopback.store = store
    loopback.blobs = BlobSender(store, Downloads(store))
    return loopback


def test_serves_files_with_ranges_to_the_flows_pointed_there_only(tmp_path):
    data = bytes(range(256)) * 1000
    store = Store(tmp_path, 0)
    digest = committed(store, data)

    async def scenario():
        loopback = loopback_with(store)
        await loopback.start()
        path = f"/blobs/{digest}"
        try:
            whole = await fetch(pointed(loopback, path))
            assert whole.status_code == 200 and whole.content == data
            assert whole.headers["docker-content-digest"] == digest
            part = await fetch(pointed(loopback, path, Range="bytes=1000-1999"))
            assert part.status_code == 206 and part.content == data[1000:2000]
            assert part.headers["content-range"] == f"bytes 1000-1999/{len(data)}"
            bad = await fetch(pointed(loopback, path, Range=f"bytes={len(data)}-"))
            assert bad.status_code == 416
            head = await fetch(pointed(loopback, path, "HEAD"))
            assert head.headers["content-length"] == str(len(data))
            unknown = await fetch(pointed(loopback, "/blobs/sha256:" + "0" * 64))
            assert unknown.status_code == 404

            flow = pointed(loopback, path)
            assert (await replayed(flow)).status_code == 403  # what mitmweb shows, sent by someone else
            async with httpx.AsyncClient() as client:
                assert (await client.get(loopback.url(path))).status_code == 403
            taken = await fetch(flow)  # the flow's own request still gets it
            assert taken.status_code == 200 and taken.content == data
            assert (await fetch(flow)).status_code == 403  # once
            assert (await fetch(pointed(loopback, f"/manifests/{digest}"))).status_code == 404
            wrong_path = pointed(loopback, f"/blobs/{digest}")
            wrong_path.request.path = "/manifests/" + digest  # not where the mirror pointed it
            assert (await fetch(wrong_path)).status_code == 403
            forgotten = pointed(loopback, path)
            loopback.forget(forgotten)
            assert (await fetch(forgotten)).status_code == 403
        finally:
            await loopback.stop()

    asyncio.run(scenario())
    assert store.in_use == {}


def test_prepared_answer_after_the_body_is_drained(tmp_path):
    async def scenario():
        loopback = loopback_with(Store(tmp_path, 0))
        await loopback.start()
        try:
            answer = make_response(401, [("Content-Type", "application/json")], b'{"errors":[]}')
            flow = tflow.tflow()
            flow.request = http.Request.make("POST", "http://hub.test/token", b"x" * (3 << 20))
            loopback.park(flow, answer)
            async with httpx.AsyncClient() as client:
                assert (await client.post(flow.request.url, content=b"y")).status_code == 403  # not the flow's
                r = await fetch(flow)
                assert r.status_code == 401 and r.content == b'{"errors":[]}'
                assert (await fetch(flow)).status_code == 403  # used once

                async def chunks():
                    for _ in range(8):
                        yield b"y" * 100_000
                parked = await client.post(loopback.url("/answers/parked"), content=chunks())
                assert parked.status_code == 400 and b"must not carry a body" in parked.content
        finally:
            await loopback.stop()

    asyncio.run(scenario())


def test_a_download_is_followed_as_it_grows_and_its_last_byte_waits_for_verification(tmp_path):
    data = bytes(range(256)) * 4096  # 1 MiB
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    store = Store(tmp_path, 0)
    verify = threading.Event()

    class HeldVerification(BlobWriter):
        def finish(self) -> bool:
            verify.wait(10)
            return super().finish()

    store.new_writer = lambda digest: HeldVerification(store, digest)

    async def scenario():
        loopback = loopback_with(store)
        downloads = loopback.blobs.downloads
        await loopback.start()
        try:
            download = downloads.claim(digest)
            upstream = FedUpstream(len(data))
            download.start(upstream, lambda n: None)
            async with Exchange(pointed(loopback, f"/blobs/{digest}")) as r:
                assert dict(r.headers)[b"content-length"] == str(len(data)).encode()
                received = bytearray()
                stream = r.chunks()
                await upstream.queue.put(data[:600_000])
                while len(received) < 600_000:
                    received += await anext(stream)
                await upstream.queue.put(data[600_000:])
                while len(received) < len(data) - 1:
                    received += await anext(stream)
                await asyncio.sleep(0.2)
                assert len(received) == len(data) - 1  # held back: not verified yet
                verify.set()
                async for chunk in stream:
                    received += chunk
                assert bytes(received) == data
            await download.task
            assert store.has_blob(digest)
        finally:
            await loopback.stop()

    asyncio.run(scenario())


def test_a_follower_arriving_as_a_failed_download_removes_its_file_gets_a_registry_error(tmp_path):
    """The download's file can go (a mismatch or a failure) a moment before the download is marked
    ended: a client arriving in that moment gets a 502 in the registry's format, never a traceback."""
    data = b"x" * 100_000
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    store = Store(tmp_path, 0)

    async def scenario():
        loopback = loopback_with(store)
        await loopback.start()
        try:
            download = loopback.blobs.downloads.claim(digest)
            upstream = FedUpstream(len(data))
            download.start(upstream, lambda n: None)
            store.download_path(digest).unlink()
            r = await fetch(pointed(loopback, f"/blobs/{digest}"))
            assert r.status_code == 502 and r.json()["errors"][0]["code"] == "UNAVAILABLE"
            await upstream.queue.put(None)
            await download.task
            assert not store.has_blob(digest)
        finally:
            await loopback.stop()

    asyncio.run(scenario())


class PointsAtLoopback:
    """What the mirror's addon does with a cached blob's flow in the ``request`` hook."""

    def __init__(self, loopback: Loopback, path: str) -> None:
        self.loopback, self.path = loopback, path
        self.flows: list[http.HTTPFlow] = []

    def request(self, flow: http.HTTPFlow) -> None:
        self.loopback.point_here(flow, self.path)
        self.flows.append(flow)


def test_mitmproxy_sends_a_pointed_flow_on_the_connection_it_made_the_flows(tmp_path):
    """The seam the loopback server stands on: mitmproxy's own proxy server (``inproxy.py``)
    makes a connection the flow's ``server_conn``, both addresses set, before it writes the
    request; twice on one client connection (the second reuses the loopback connection)."""
    data = b"blob" * 50_000
    store = Store(tmp_path / "store", 0)
    digest = committed(store, data)
    request = f"GET /v2/library/x/blobs/{digest} HTTP/1.1\r\nHost: hub.test\r\n\r\n".encode()

    async def scenario():
        loopback = loopback_with(store)
        await loopback.start()
        pointer = PointsAtLoopback(loopback, f"/blobs/{digest}")
        try:
            async with running_proxy(tmp_path / "confdir", pointer) as proxy:
                reader, writer = await asyncio.open_connection(*proxy.address)
                for _ in range(2):
                    writer.write(request)
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                    assert head.startswith(b"HTTP/1.1 200"), head
                    assert await asyncio.wait_for(reader.readexactly(len(data)), 10) == data
                writer.close()
        finally:
            await loopback.stop()
        assert not loopback.pointed  # each taken
        first, second = pointer.flows
        assert first.server_conn is second.server_conn and first.server_conn.sockname[0] == "127.0.0.1"

    asyncio.run(scenario())
