"""The mirror's loopback server: cached blobs with ranges, downloads followed as they grow,
prepared answers after a drained body (no key needed: their ids are random and used once),
and no blob or manifest for a request without the key."""

import asyncio
import hashlib
import threading

import httpx
import pytest

from hubrewrite.cache.blobwriter import BlobWriter
from hubrewrite.cache.downloads import Downloads
from hubrewrite.cache.serving import BlobSender, parse_range
from hubrewrite.cache.store import Store
from hubrewrite.loopback import KEY_HEADER, Loopback
from hubrewrite.responses import make_response

from .fed_upstream import FedUpstream


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


def loopback_with(store: Store) -> Loopback:
    loopback = Loopback()
    loopback.store = store
    loopback.blobs = BlobSender(store, Downloads(store))
    return loopback


def test_serves_files_with_ranges_and_the_key(tmp_path):
    data = bytes(range(256)) * 1000
    store = Store(tmp_path, 0)
    digest = committed(store, data)

    async def scenario():
        loopback = loopback_with(store)
        await loopback.start()
        key = {KEY_HEADER: loopback.key}
        url = loopback.url(f"/blobs/{digest}")
        try:
            async with httpx.AsyncClient() as client:
                whole = await client.get(url, headers=key)
                assert whole.status_code == 200 and whole.content == data
                assert whole.headers["docker-content-digest"] == digest
                part = await client.get(url, headers={**key, "Range": "bytes=1000-1999"})
                assert part.status_code == 206 and part.content == data[1000:2000]
                assert part.headers["content-range"] == f"bytes 1000-1999/{len(data)}"
                bad = await client.get(url, headers={**key, "Range": f"bytes={len(data)}-"})
                assert bad.status_code == 416
                head = await client.head(url, headers=key)
                assert head.headers["content-length"] == str(len(data))
                assert (await client.get(url, headers={KEY_HEADER: "0" * 32})).status_code == 403
                assert (await client.get(url)).status_code == 403
                unknown = await client.get(loopback.url("/blobs/sha256:" + "0" * 64), headers=key)
                assert unknown.status_code == 404
        finally:
            await loopback.stop()

    asyncio.run(scenario())
    assert store.in_use == {}


def test_prepared_answer_after_the_body_is_drained(tmp_path):
    async def scenario():
        loopback = loopback_with(Store(tmp_path, 0))
        await loopback.start()
        try:
            answer = make_response(403, [("Content-Type", "application/json")], b'{"errors":[]}')

            from mitmproxy.test import tflow

            flow = tflow.tflow()
            flow.request.headers[KEY_HEADER] = loopback.key
            loopback.park(flow, answer)
            # the key is for blobs and manifests: a parked flow, which mitmweb shows at once, has none
            assert KEY_HEADER not in flow.request.headers
            async with httpx.AsyncClient() as client:
                body = b"x" * (3 << 20)
                r = await client.post(flow.request.url, content=body)
                assert r.status_code == 403 and r.content == b'{"errors":[]}'
                again = await client.get(flow.request.url)  # used once
                assert again.status_code == 400 and b"must not carry a body" in again.content

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
            async with httpx.AsyncClient() as client:
                async with client.stream("GET", loopback.url(f"/blobs/{digest}"), headers={KEY_HEADER: loopback.key}) as r:
                    assert r.headers["content-length"] == str(len(data))
                    received = bytearray()
                    stream = r.aiter_raw()
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
            async with httpx.AsyncClient() as client:
                r = await client.get(loopback.url(f"/blobs/{digest}"), headers={KEY_HEADER: loopback.key})
            assert r.status_code == 502 and r.json()["errors"][0]["code"] == "UNAVAILABLE"
            await upstream.queue.put(None)
            await download.task
            assert not store.has_blob(digest)
        finally:
            await loopback.stop()

    asyncio.run(scenario())
