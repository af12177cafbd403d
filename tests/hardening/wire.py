"""HTTP/1.1 on one client connection, byte for byte: requests with bodies in any
framing (Content-Length, chunked, ``Expect: 100-continue``) and answers read one
at a time, so that a second answer on a keep-alive connection is read exactly
where the first one ended."""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

from .helpers import RawResponse

TWO_MIB = 2 << 20
CHUNK = 64 * 1024
FRAMINGS = ("content-length", "chunked", "expect-100")
NO_BODY_STATUSES = (204, 304)


class WireError(AssertionError):
    pass


class Conn:
    """One client connection. ``sock`` may come from anywhere (a network namespace)."""

    def __init__(self, sock: socket.socket, timeout: float = 15.0) -> None:
        self.sock = sock
        self.sock.settimeout(timeout)
        self.buf = b""

    @classmethod
    def to(cls, port: int, host: str = "127.0.0.1", source: str | None = None, timeout: float = 15.0) -> Conn:
        """A connection to host:port, from ``source`` (e.g. another loopback address) if given."""
        sock = socket.create_connection((host, port), timeout=timeout,
                                        source_address=(source, 0) if source else None)
        return cls(sock, timeout)

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def tunnel(self, target: str, cafile: Path) -> Conn:
        """Through a forward proxy: CONNECT ``target`` (host:port), then TLS inside the tunnel,
        trusting ``cafile`` (mitmproxy's CA). This connection speaks TLS from here on."""
        self.send(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        resp = self.read_response("CONNECT")
        if resp.status != 200 or self.buf:
            raise WireError(f"CONNECT {target}: {resp.short()}")
        context = ssl.create_default_context(cafile=str(cafile))
        timeout = self.sock.gettimeout()
        self.sock = context.wrap_socket(self.sock, server_hostname=target.rpartition(":")[0])
        self.sock.settimeout(timeout)
        return self

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise WireError(f"the server stopped reading: {e!r}") from None

    def _fill(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except (socket.timeout, ConnectionResetError, ssl.SSLEOFError):
            return False
        self.buf += data
        return bool(data)

    def _take_line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise WireError(f"connection ended inside a line: {self.buf[:200]!r}")
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise WireError(f"connection ended {n - len(self.buf)} bytes short of a body")
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def closed_by_server(self, wait: float = 0.5) -> bool:
        """Nothing more to read and the server closed (within ``wait`` seconds)."""
        if self.buf:
            return False
        self.sock.settimeout(wait)
        try:
            return self.sock.recv(1) == b""
        except socket.timeout:
            return False
        except OSError:
            return True

    def read_response(self, method: str = "GET") -> RawResponse:
        """The next answer: its head, then its body as its framing says (none for HEAD).

        Whatever the server sent after that stays in the buffer for the next call:
        a body sent with an answer to HEAD shows up there as a broken status line.
        """
        start = time.monotonic()
        while not self.buf:
            if not self._fill():
                return RawResponse(None, elapsed=time.monotonic() - start)
        status_line = self._take_line()
        parts = status_line.decode("latin-1").split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise WireError(f"not a status line: {status_line[:200]!r} (after the previous answer)")
        headers = []
        head = [status_line]
        while (line := self._take_line()) != b"":
            head.append(line)
            name, _, value = line.decode("latin-1").partition(":")
            headers.append((name.strip(), value.strip()))
        resp = RawResponse(int(parts[1]), parts[2] if len(parts) > 2 else "", headers)
        raw_head = b"\r\n".join(head) + b"\r\n\r\n"
        tunnel = method == "CONNECT" and 200 <= resp.status < 300  # what follows is the tunnel's
        if method == "HEAD" or tunnel or resp.status < 200 or resp.status in NO_BODY_STATUSES:
            body = b""
        elif "chunked" in (resp.header("transfer-encoding") or "").lower():
            body = self._read_chunked()
        elif resp.header("content-length") is not None:
            body = self._take(int(resp.header("content-length")))
        else:
            while self._fill():  # delimited by the server closing
                pass
            body, self.buf = self.buf, b""
        resp.body, resp.raw, resp.elapsed = body, raw_head + body, time.monotonic() - start
        return resp

    def _read_chunked(self) -> bytes:
        out = bytearray()
        while True:
            size = int(self._take_line().split(b";")[0], 16)
            if size == 0:
                while self._take_line() != b"":  # trailers
                    pass
                return bytes(out)
            out += self._take(size)
            self._take_line()

    def exchange(self, method: str, head: bytes, body: bytes = b"", framing: str = "content-length") -> RawResponse:
        """Send a request (``head``: request line and headers, without the framing headers
        and the blank line) with ``body`` framed as ``framing``; its final answer."""
        if framing == "chunked":
            self.send(head + b"Transfer-Encoding: chunked\r\n\r\n")
            for i in range(0, len(body), CHUNK):
                piece = body[i:i + CHUNK]
                self.send(b"%x\r\n" % len(piece) + piece + b"\r\n")
            self.send(b"0\r\n\r\n")
            return self.read_response(method)
        length = b"Content-Length: %d\r\n" % len(body)
        if framing == "expect-100":
            self.send(head + length + b"Expect: 100-continue\r\n\r\n")
            first = self.read_response(method)
            if first.status != 100:
                return first  # answered before the body: the client need not send it
            self.send(body)
            return self.read_response(method)
        if framing != "content-length":
            raise ValueError(f"unknown framing {framing!r}")
        self.send(head + length + b"\r\n" + body)
        return self.read_response(method)


def request_head(method: str, target: str, host: str, *headers: str) -> bytes:
    """Request line and headers, each line ending in CRLF, no blank line yet."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", *headers]
    return "".join(line + "\r\n" for line in lines).encode()


def send_with_body(conn: Conn, method: str, target: str, host: str, headers: list[str], body: bytes,
                   framing: str) -> RawResponse:
    """One request with a body, on ``conn``; its answer."""
    return conn.exchange(method, request_head(method, target, host, *headers), body, framing)
