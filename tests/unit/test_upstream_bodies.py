"""The downloads' own HTTP/1.1 client (hubrewrite/upstream_bodies.py), against a loopback server
written with raw sockets, so that each test decides what the upstream does: keep-alive,
a close while idle, a stall, chunked answers, TLS with a trusted or another CA."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from collections.abc import Callable

import pytest

from hubrewrite.upstream_bodies import BodyError, BodyFetcher, Interrupter, in_thread
from tests.support.certs import TestCA, make_ca_and_server_cert

BODY = bytes(range(256)) * 4096  # 1 MiB


class Server:
    """Accepts connections; ``answer(conn, request_head)`` serves each request of a connection
    (return False to close it). Records every request head and counts connections."""

    def __init__(self, answer: Callable[[socket.socket, bytes], bool], tls: ssl.SSLContext | None = None) -> None:
        self.answer, self.tls = answer, tls
        self.heads: list[bytes] = []
        self.connections = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            self.open.append(conn)
            buffered = b""
            while True:
                while b"\r\n\r\n" not in buffered:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffered += data
                head, _, buffered = buffered.partition(b"\r\n\r\n")
                self.heads.append(head)
                if not self.answer(conn, head):
                    return
        except (OSError, ssl.SSLError):
            pass
        finally:
            conn.close()

    def url(self, path: str = "/blob", scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.sock.close()


def whole(conn: socket.socket, head: bytes) -> bool:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY)
    return True


def read_all(body, flush_after: float = 0.02) -> bytes:
    out, buffer = bytearray(), bytearray(1 << 20)
    view = memoryview(buffer)
    while n := body.readinto(view, flush_after):
        out += view[:n]
    return bytes(out)


def fetcher(timeout: float = 5.0, connections: int = 4, tls: ssl.SSLContext | None = None) -> BodyFetcher:
    return BodyFetcher(tls or ssl.create_default_context(), timeout, connections)


def test_a_body_read_whole_leaves_its_connection_for_the_next_download():
    server = Server(whole)
    f = fetcher()
    try:
        for _ in range(3):
            body = f.open(server.url(), [("User-Agent", "skopeo"), ("Accept-Encoding", "gzip")], Interrupter())
            assert body.status == 200 and body.length == len(BODY)
            assert read_all(body) == BODY
            body.close()
        assert server.connections == 1 and len(server.heads) == 3
        head = server.heads[0].decode()
        assert "accept-encoding" not in head.lower()  # the blob's own bytes, never compressed
        assert "skopeo" in head and f"host: 127.0.0.1:{server.port}" in head.lower()
    finally:
        f.close()
        server.close()


def test_a_body_left_unread_closes_its_connection():
    server = Server(whole)
    f = fetcher()
    try:
        body = f.open(server.url(), [], Interrupter())
        body.close()
        read_all_body = f.open(server.url(), [], Interrupter())
        assert read_all(read_all_body) == BODY
        assert server.connections == 2
    finally:
        f.close()
        server.close()


def test_a_pooled_connection_the_upstream_closed_is_replaced_without_failing_the_request():
    served = []

    def once_per_connection(conn: socket.socket, head: bytes) -> bool:
        served.append(head)
        whole(conn, head)
        return False  # closes after one answer, without saying so (no Connection: close)

    server = Server(once_per_connection)
    f = fetcher()
    try:
        for _ in range(3):
            body = f.open(server.url(), [], Interrupter())
            assert read_all(body) == BODY
            body.close()
            time.sleep(0.05)
        assert server.connections == 3 and len(served) == 3
    finally:
        f.close()
        server.close()


def test_start_asks_for_the_rest_and_userinfo_never_leaves():
    def ranged(conn: socket.socket, head: bytes) -> bool:
        conn.sendall(b"HTTP/1.1 206 Partial Content\r\nContent-Length: 10\r\nContent-Range: bytes 5-14/15\r\n\r\n"
                     + b"x" * 10)
        return True

    server = Server(ranged)
    f = fetcher()
    try:
        body = f.open(f"http://user:secret@127.0.0.1:{server.port}/blob?sig=1", [], Interrupter(), start=5)
        assert body.status == 206 and read_all(body) == b"x" * 10
        head = server.heads[0].decode().lower()
        assert head.startswith("get /blob?sig=1 http/1.1") and "range: bytes=5-" in head
        assert "secret" not in head and "authorization" not in head
    finally:
        f.close()
        server.close()


def test_slow_bytes_are_handed_on_within_flush_after_and_a_silent_upstream_times_out():
    def trickle(conn: socket.socket, head: bytes) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n" + b"a" * 1000)
        time.sleep(2)  # then silent: longer than the client timeout
        return False

    server = Server(trickle)
    f = fetcher(timeout=0.5)
    try:
        body = f.open(server.url(), [], Interrupter())
        view = memoryview(bytearray(1 << 20))
        started = time.monotonic()
        assert body.readinto(view, 0.02) == 1000 and time.monotonic() - started < 0.3
        with pytest.raises(TimeoutError):
            body.readinto(view, 0.02)
        assert 0.4 < time.monotonic() - started < 1.5
        body.close()
    finally:
        f.close()
        server.close()


def head_then_silence(seconds: float):
    """A server's answer: a head promising 5000 bytes, then nothing for ``seconds``, then a close."""
    def stall(conn: socket.socket, head: bytes) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n")
        time.sleep(seconds)
        return False
    return stall


def test_interrupt_unblocks_a_read_at_once():
    server = Server(head_then_silence(5))
    f = fetcher(timeout=10)
    try:
        body = f.open(server.url(), [], Interrupter())
        threading.Timer(0.2, body.interrupt).start()
        started = time.monotonic()
        with pytest.raises(OSError):
            body.readinto(memoryview(bytearray(4096)), 0.02)
        assert time.monotonic() - started < 1.0
        body.close()
    finally:
        f.close()
        server.close()


def test_a_chunked_answer_has_no_length_and_an_early_close_is_an_error():
    answers = iter([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                    b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort"])

    def answer(conn: socket.socket, head: bytes) -> bool:
        conn.sendall(next(answers))
        return False

    server = Server(answer)
    f = fetcher()
    try:
        chunked = f.open(server.url(), [], Interrupter())
        assert chunked.status == 200 and chunked.length is None
        chunked.close()
        short = f.open(server.url(), [], Interrupter())
        with pytest.raises(BodyError):
            read_all(short)
        short.close()
    finally:
        f.close()
        server.close()


def test_tls_is_verified_with_the_mirrors_context(tmp_path):
    certs = make_ca_and_server_cert(tmp_path / "good")
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(certs["cert"], certs["key"])
    server = Server(whole, tls=served)
    trusting = fetcher(tls=ssl.create_default_context(cafile=str(certs["ca"])))
    other = TestCA(tmp_path / "other")
    distrusting = fetcher(tls=ssl.create_default_context(cafile=str(other.cert_path)))
    try:
        body = trusting.open(server.url(scheme="https"), [], Interrupter())
        assert read_all(body) == BODY
        body.close()
        with pytest.raises(ssl.SSLCertVerificationError):
            distrusting.open(server.url(scheme="https"), [], Interrupter())
    finally:
        trusting.close()
        distrusting.close()
        server.close()


def test_no_more_connections_than_the_limit():
    server = Server(head_then_silence(3))
    f = fetcher(timeout=0.3, connections=1)
    try:
        first = f.open(server.url(), [], Interrupter())
        with pytest.raises(BodyError):
            f.open(server.url(), [], Interrupter())  # no slot frees up within the timeout
        first.close()  # unread: closed, its slot free again
        f.open(server.url(), [], Interrupter()).close()
        assert server.connections == 2
    finally:
        f.close()
        server.close()


def test_an_open_cancelled_on_the_loop_interrupts_and_closes_what_comes():
    def slow_head(conn: socket.socket, head: bytes) -> bool:
        time.sleep(0.5)
        whole(conn, head)
        return True

    server = Server(slow_head)
    f = fetcher()

    async def scenario() -> None:
        interrupter = Interrupter()
        task = asyncio.ensure_future(in_thread(lambda: f.open(server.url(), [], interrupter), interrupter))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert interrupter.interrupted

    try:
        asyncio.run(scenario())
    finally:
        f.close()
        server.close()
