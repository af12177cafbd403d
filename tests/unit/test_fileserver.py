import asyncio
import hashlib

import httpx
import pytest

from hubrewrite.fileserver import FileServer, parse_range


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
    ],
)
def test_parse_range(value, expected):
    assert parse_range(value, 100) == expected


def test_serves_files_with_ranges_and_secret(tmp_path):
    data = bytes(range(256)) * 1000
    path = tmp_path / "blob"
    path.write_bytes(data)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    in_use: dict[str, int] = {}

    async def scenario():
        server = FileServer(lambda d: str(path) if d == digest else None, in_use)
        await server.start()
        try:
            async with httpx.AsyncClient() as client:
                whole = await client.get(server.url(digest))
                assert whole.status_code == 200 and whole.content == data
                assert whole.headers["docker-content-digest"] == digest
                part = await client.get(server.url(digest), headers={"Range": "bytes=1000-1999"})
                assert part.status_code == 206 and part.content == data[1000:2000]
                assert part.headers["content-range"] == f"bytes 1000-1999/{len(data)}"
                bad = await client.get(server.url(digest), headers={"Range": f"bytes={len(data)}-"})
                assert bad.status_code == 416
                head = await client.head(server.url(digest))
                assert head.headers["content-length"] == str(len(data))
                wrong_secret = server.url(digest).replace(server.secret, "0" * 32)
                assert (await client.get(wrong_secret)).status_code == 404
                assert (await client.get(server.url("sha256:" + "0" * 64))).status_code == 404
        finally:
            await server.stop()

    asyncio.run(scenario())
    assert in_use == {}
