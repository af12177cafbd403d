"""A small HTTP file server on a loopback port, inside mitmproxy's event loop.

mitmproxy buffers any response an addon makes, so a cached blob cannot be
answered from a hook without holding it in memory. Instead the addon retargets
the flow to this server, and mitmproxy streams its answer like any upstream's.
It serves only cached blobs, only to requests carrying a per-process secret,
with ``Range`` support, via sendfile.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
from collections.abc import Callable

log = logging.getLogger("hub_rewrite")

MAX_HEAD = 16384
_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")


def parse_range(value: str | None, size: int) -> tuple[int, int] | None | str:
    """A single byte range -> (start, end inclusive); None: whole body; "invalid": 416."""
    if not value:
        return None
    m = _RANGE_RE.fullmatch(value.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None  # RFC 9110: an unparseable Range is ignored
    first, last = m.group(1), m.group(2)
    if first:
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
        if start >= size or (last and int(last) < start):
            return "invalid"
        return start, end
    suffix = int(last)
    if suffix == 0 or size == 0:
        return "invalid"
    return max(size - suffix, 0), size - 1


class FileServer:
    def __init__(self, resolve: Callable[[str], str | None], in_use: dict[str, int]) -> None:
        """resolve: digest -> path of a servable file (or None)."""
        self.resolve = resolve
        self.in_use = in_use
        self.secret = secrets.token_hex(16)
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self) -> None:
        if self.server is None:
            self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    def url(self, digest: str) -> str:
        return f"http://127.0.0.1:{self.port}/{self.secret}/blobs/{digest}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await self._one_request(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except Exception:
            log.exception("cache file server error")
        finally:
            writer.close()

    async def _one_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        if len(head) > MAX_HEAD:
            return False
        lines = head.decode("latin-1").split("\r\n")
        try:
            method, target, _ = lines[0].split(" ", 2)
        except ValueError:
            return False
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        keep_alive = headers.get("connection", "").lower() != "close"

        parts = target.split("/")
        digest = parts[3] if len(parts) == 4 and parts[1] == self.secret and parts[2] == "blobs" else ""
        path = self.resolve(digest) if digest else None
        if method not in ("GET", "HEAD") or path is None:
            await self._send_head(writer, 404, [("Content-Length", "0")])
            return keep_alive

        self.in_use[digest] = self.in_use.get(digest, 0) + 1
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                wanted = parse_range(headers.get("range"), size)
                common = [
                    ("Content-Type", "application/octet-stream"),
                    ("Docker-Content-Digest", digest),
                    ("ETag", f'"{digest}"'),
                    ("Accept-Ranges", "bytes"),
                ]
                if wanted == "invalid":
                    await self._send_head(writer, 416, [("Content-Range", f"bytes */{size}"), ("Content-Length", "0")])
                    return keep_alive
                if wanted is None:
                    status, start, count = 200, 0, size
                    extra = []
                else:
                    start, end = wanted
                    status, count = 206, end - start + 1
                    extra = [("Content-Range", f"bytes {start}-{end}/{size}")]
                await self._send_head(writer, status, common + extra + [("Content-Length", str(count))])
                if method == "GET" and count:
                    await writer.drain()
                    await asyncio.get_running_loop().sendfile(writer.transport, f, start, count)
        finally:
            self.in_use[digest] -= 1
            if not self.in_use[digest]:
                del self.in_use[digest]
        return keep_alive

    @staticmethod
    async def _send_head(writer: asyncio.StreamWriter, status: int, headers: list[tuple[str, str]]) -> None:
        reason = {200: "OK", 206: "Partial Content", 404: "Not Found", 416: "Range Not Satisfiable"}[status]
        lines = [f"HTTP/1.1 {status} {reason}"] + [f"{k}: {v}" for k, v in headers]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await writer.drain()
