"""A blob body that survives cuts (hubrewrite/upstream_resume.py), read by a thread as a
download's reader does, against a real loopback HTTP server that cuts connections at chosen
bytes, refuses expired URLs with 403, or ignores Range."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from hubrewrite.registry.errors import RegistryError
from hubrewrite.upstream_bodies import BodyError, BodyFetcher, Interrupter, in_thread
from hubrewrite.upstream_resume import MAX_RESUMES, Origin, Resuming, Unresumable

BLOB = hashlib.sha256(b"seed").digest() * (3 * 1024 * 1024 // 32)  # 3 MiB
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()


class CuttingServer:
    """Serves BLOB at any path; ``cuts``: absolute blob positions, each cutting the first answer
    that crosses it (then closed); ``cut_every``: every answer cut after that many bytes;
    ``expired``: paths answered 403; ``ignore_range``: Range ignored (200, whole blob);
    ``bad_range``: a 206 for another range than the one asked."""

    def __init__(self) -> None:
        self.cuts: list[int] = []
        self.cut_every: int | None = None
        self.expired: set[str] = set()
        self.ignore_range = self.bad_range = False
        self.refuse_resumes = 0  # resumes answered 503 before one is served
        self.requests: list[tuple[str, str | None]] = []  # (path, Range)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                outer.answer(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def answer(self, h: BaseHTTPRequestHandler) -> None:
        asked = h.headers.get("Range")
        self.requests.append((h.path, asked))
        if h.path in self.expired:
            h.send_response(403)
            h.send_header("Content-Length", "7")
            h.end_headers()
            h.wfile.write(b"expired")
            return
        if asked and self.refuse_resumes:
            self.refuse_resumes -= 1
            h.send_response(503)
            h.send_header("Content-Length", "4")
            h.end_headers()
            h.wfile.write(b"busy")
            return
        start = int(asked[6:-1]) if asked and not self.ignore_range else 0
        h.send_response(206 if start else 200)
        if start:
            first = start + 1 if self.bad_range else start
            h.send_header("Content-Range", f"bytes {first}-{len(BLOB) - 1}/{len(BLOB)}")
        h.send_header("Content-Length", str(len(BLOB) - start))
        h.end_headers()
        end = len(BLOB)
        crossed = [c for c in self.cuts if start < c < end]
        if crossed:
            end = min(crossed)
            self.cuts.remove(end)
        if self.cut_every is not None:
            end = min(end, start + self.cut_every)
        h.wfile.write(BLOB[start:end])
        if end < len(BLOB):
            h.close_connection = True

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server():
    s = CuttingServer()
    yield s
    s.close()


async def read_through(url: str, server: CuttingServer, fresh: str | None = None) -> tuple[bytes, Resuming, list]:
    """Open ``url``, wrap it in Resuming and read it whole in a thread, as Copy does."""
    fetcher = BodyFetcher(ssl.create_default_context(), 5.0, 8)
    asked: list[tuple[str, str]] = []

    async def fetch(at: str, start: int):
        interrupter = Interrupter()
        return await in_thread(lambda: fetcher.open(at, [], interrupter, start), interrupter)

    async def next_url(failed: str, reason: str) -> str | None:
        asked.append((failed, reason))
        if reason != "expired":
            return failed
        if fresh is None:
            raise RegistryError(502, "UNAVAILABLE", "no fresh URL")
        return fresh

    reasons: list[str] = []
    origin = Origin(url, fetch, next_url, 5.0, reasons.append)
    source = Resuming(await fetch(url, 0), origin, DIGEST, asyncio.get_running_loop())

    def read_all() -> bytes:
        got, view = bytearray(), memoryview(bytearray(1 << 20))
        try:
            while len(got) < source.length:
                n = source.readinto(view, 0.02)
                if not n:
                    raise EOFError("ended short")
                got += view[:n]
        finally:
            source.close()
        return bytes(got)

    try:
        return await asyncio.to_thread(read_all), source, asked
    finally:
        fetcher.close()


def test_cuts_at_10_50_and_99_percent_are_resumed_from_the_byte_reached(server):
    size = len(BLOB)
    server.cuts = [size // 10, size // 2, size * 99 // 100]
    got, source, asked = asyncio.run(read_through(server.url + "/blob", server))
    assert got == BLOB and source.resumes == 3
    assert [r for _, r in server.requests] == [None, f"bytes={size // 10}-", f"bytes={size // 2}-",
                                              f"bytes={size * 99 // 100}-"]
    assert [reason for _, reason in asked] == ["interrupted"] * 3


def test_a_source_that_cuts_every_attempt_fails_after_a_bounded_number_of_resumes(server):
    server.cut_every = 100_000
    started = time.monotonic()
    with pytest.raises(BodyError, match=f"not resumed again after {MAX_RESUMES} resumes"):
        asyncio.run(read_through(server.url + "/blob", server))
    assert len(server.requests) == 1 + MAX_RESUMES
    assert time.monotonic() - started < 10  # each resume brought bytes: no back-off piled up


def test_an_expired_url_is_resumed_from_a_fresh_one(server):
    server.cuts = [len(BLOB) // 2]
    server.expired.add("/old")
    real_answer = server.answer

    def expire_after_first(h):  # the first answer goes out; then the URL has expired
        real_answer(h)
        server.expired.add("/signed")
    server.answer = expire_after_first
    got, source, asked = asyncio.run(read_through(server.url + "/signed", server, fresh=server.url + "/fresh"))
    assert got == BLOB
    assert [p for p, _ in server.requests] == ["/signed", "/signed", "/fresh"]
    assert server.requests[-1][1] == f"bytes={len(BLOB) // 2}-"
    assert [reason for _, reason in asked] == ["interrupted", "expired"]


def test_an_expired_url_without_a_fresh_one_ends_the_transfer(server):
    server.cuts = [len(BLOB) // 2]
    real_answer = server.answer

    def expire_after_first(h):
        real_answer(h)
        server.expired.add("/signed")
    server.answer = expire_after_first
    with pytest.raises(Unresumable, match="refused a fresh redirect"):
        asyncio.run(read_through(server.url + "/signed", server))
    assert len(server.requests) == 2  # no loop of attempts


def test_a_source_ignoring_range_is_read_past_the_bytes_already_had(server):
    server.cuts = [len(BLOB) // 3]
    server.ignore_range = True
    got, source, _ = asyncio.run(read_through(server.url + "/blob", server))
    assert got == BLOB and source.resumes == 1


def test_another_range_than_the_rest_of_the_blob_is_refused(server):
    server.cuts = [len(BLOB) // 3]
    server.bad_range = True
    with pytest.raises(Unresumable, match="not the rest of this blob"):
        asyncio.run(read_through(server.url + "/blob", server))


def test_resumes_refused_with_503_are_tried_again_after_a_growing_pause(server):
    server.cuts = [len(BLOB) // 2]
    server.refuse_resumes = 2
    started = time.monotonic()
    got, source, asked = asyncio.run(read_through(server.url + "/blob", server))
    took = time.monotonic() - started
    assert got == BLOB and source.resumes == 3
    assert [reason for _, reason in asked] == ["interrupted", "refused", "refused"]
    assert 1.5 <= took < 5  # at once after the cut, then 0.5 s, then 1 s
