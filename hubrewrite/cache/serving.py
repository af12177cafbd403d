"""Blob bytes as the mirror's own servers send them: a verified cached file
(whole, a ``Range`` of it, or its head) with ``sendfile``, or a download in
progress, followed as the file grows."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from ..httpserver import Reply, Request
from .downloads import Downloads, Progress
from .store import Store

_RANGE_RE = re.compile(r"bytes=([0-9]*)-([0-9]*)")  # ASCII digits: int() reads any script's
# more digits than any file size has: such a number is read as "beyond the file", never parsed
MAX_DIGITS = 19
Counter = Callable[[str, int], None]
# a follower gives up on a download that has not started within this long
START_TIMEOUT = 60.0


def parse_range(value: str | None, size: int) -> tuple[int, int] | None | str:
    """A single byte range -> (start, end inclusive); None: whole body; "invalid": 416."""
    if not value:
        return None
    m = _RANGE_RE.fullmatch(value.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None  # RFC 9110: an unparseable Range is ignored
    first, last = m.group(1), m.group(2)
    if first:
        start = _number(first)
        end = min(_number(last), size - 1) if last else size - 1
        if start >= size or (last and _number(last) < start):
            return "invalid"
        return start, end
    suffix = _number(last)
    if suffix == 0 or size == 0:
        return "invalid"
    return max(size - suffix, 0), size - 1


def _number(digits: str) -> int:
    return int(digits) if len(digits) <= MAX_DIGITS else 1 << 64


def blob_headers(digest: str) -> list[tuple[str, str]]:
    return [
        ("Content-Type", "application/octet-stream"),
        ("Docker-Content-Digest", digest),
        ("ETag", f'"{digest}"'),
        ("Accept-Ranges", "bytes"),
    ]


class BlobSender:
    """Answers a request for one blob from the store or its download in progress."""

    def __init__(self, store: Store, downloads: Downloads) -> None:
        self.store = store
        self.downloads = downloads

    async def send(self, request: Request, reply: Reply, digest: str, counted: Counter = lambda source, n: None) -> None:
        """``counted(source, bytes)``: where the bytes sent are not counted by mitmproxy (the blob listener)."""
        with self.store.keeping(digest):
            progress = self.downloads.progress(digest)
            if progress is not None and request.headers.get("range"):
                # parts of a blob not yet verified are never sent: a Range waits for the whole
                size = await progress.size(START_TIMEOUT)
                while size is not None and not progress.failed() and progress.readable() < size:
                    await progress.wait()
                if size is None or progress.failed():
                    await reply.error(502, "UNAVAILABLE", "the blob's download from upstream failed", request.method)
                    return
                progress = None
            if progress is None:
                await self._send_cached(request, reply, digest, counted)
            else:
                await self._follow(request, reply, digest, progress, counted)

    async def _send_cached(self, request: Request, reply: Reply, digest: str, counted: Counter) -> None:
        if not await asyncio.to_thread(self.store.check_blob, digest):
            if self.downloads.failed_lately(digest):
                await reply.error(502, "UNAVAILABLE", "the blob's download from upstream failed", request.method)
            else:
                await reply.error(404, "BLOB_UNKNOWN", "blob unknown to the cache", request.method)
            return
        self.store.touch(digest)
        with open(self.store.blob_path(digest), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            wanted = parse_range(request.headers.get("range"), size)
            if wanted == "invalid":
                await reply.head(416, [("Content-Range", f"bytes */{size}"), ("Content-Length", "0")])
                return
            if wanted is None:
                status, start, count, extra = 200, 0, size, []
            else:
                start, end = wanted
                status, count = 206, end - start + 1
                extra = [("Content-Range", f"bytes {start}-{end}/{size}")]
            await reply.head(status, blob_headers(digest) + extra + [("Content-Length", str(count))])
            if request.method == "GET" and count:
                await reply.file(f, start, count)
                counted("cache", count)

    async def _follow(self, request: Request, reply: Reply, digest: str, progress: Progress, counted: Counter) -> None:
        """Send what the download has written so far, then more as it arrives."""
        size = await progress.size(START_TIMEOUT)
        if size is None:
            await reply.error(502, "UNAVAILABLE", "the blob's download from upstream did not start", request.method)
            return
        try:
            f = _open_either(progress.path, self.store.blob_path(digest))
        except FileNotFoundError:  # neither: the download failed (and its file went) just now
            await reply.error(502, "UNAVAILABLE", "the blob's download from upstream failed", request.method)
            return
        with f:
            await reply.head(200, blob_headers(digest) + [("Content-Length", str(size))])
            if request.method != "GET":
                return
            sent = 0
            while sent < size:
                readable = progress.readable()
                if readable > sent:
                    await reply.file(f, sent, readable - sent)
                    counted("upstream", readable - sent)
                    sent = readable
                elif progress.failed():
                    reply.abort()  # short of Content-Length: the client sees a failed transfer
                    return
                else:
                    await progress.wait()


def _open_either(download_path: Path, committed_path: Path) -> BinaryIO:
    """The download's file, or the committed blob if it was renamed into place meanwhile
    (an open file keeps its bytes across the rename). FileNotFoundError: neither."""
    try:
        return open(download_path, "rb")
    except FileNotFoundError:
        return open(committed_path, "rb")
