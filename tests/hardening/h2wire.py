"""HTTP/2 on one client connection, frame by frame (the ``h2`` package over TLS): streams the
tests choose to make malformed, or to reset as soon as they are opened."""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions


class H2Client:
    def __init__(self, port: int, cafile: Path, host: str = "127.0.0.1", timeout: float = 15.0) -> None:
        context = ssl.create_default_context(cafile=str(cafile))
        context.set_alpn_protocols(["h2"])
        self.sock = context.wrap_socket(socket.create_connection((host, port), timeout=timeout), server_hostname=host)
        if self.sock.selected_alpn_protocol() != "h2":
            raise AssertionError(f"the server did not choose HTTP/2: {self.sock.selected_alpn_protocol()!r}")
        self.authority = f"{host}:{port}"
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.events: list[h2.events.Event] = []
        self.closed = False  # by the server
        self.flush()

    def __enter__(self) -> H2Client:
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(self, method: str, path: str, *headers: tuple[str, str], end_stream: bool = True,
                flush: bool = True) -> int:
        """Open a stream with a HEADERS frame (ending the stream unless told otherwise); its id."""
        stream_id = self.conn.get_next_available_stream_id()
        fields = [(":method", method), (":scheme", "https"), (":authority", self.authority), (":path", path),
                  *headers]
        self.conn.send_headers(stream_id, fields, end_stream=end_stream)
        if flush:
            self.flush()
        return stream_id

    def read(self, timeout: float) -> bool:
        """Take what the server sent within ``timeout`` seconds; False once it closed."""
        if self.closed:
            return False
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except (socket.timeout, BlockingIOError, ssl.SSLWantReadError):
            return True
        except OSError:
            data = b""
        if not data:
            self.closed = True
            return False
        try:
            self.events += self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            raise AssertionError(f"the server broke HTTP/2: {e}") from None
        self.flush()
        return True

    def wait_for(self, done, timeout: float) -> bool:
        """Read until ``done(self)`` holds or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while not done(self):
            left = deadline - time.monotonic()
            if left <= 0 or not self.read(min(left, 0.5)):
                return done(self)
        return True

    def ending(self, stream_id: int) -> h2.events.Event | None:
        """How a stream ended: its StreamReset or StreamEnded event, None if it has not."""
        return next((e for e in self.events if isinstance(e, (h2.events.StreamReset, h2.events.StreamEnded))
                     and e.stream_id == stream_id), None)

    def status(self, stream_id: int) -> int | None:
        response = next((e for e in self.events if isinstance(e, h2.events.ResponseReceived)
                         and e.stream_id == stream_id), None)
        return int(dict(response.headers)[b":status"]) if response else None

    def rapid_reset(self, path: str, count: int, batch: int = 100) -> float:
        """``count`` streams, each a GET whose HEADERS frame is followed at once by RST_STREAM
        (CANCEL), sent ``batch`` pairs at a time; the seconds it took (the server may close
        the connection meanwhile: then the rest is not sent)."""
        start = time.monotonic()
        for i in range(count):
            stream_id = self.request("GET", path, flush=False)
            self.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
            if i % batch == batch - 1 or i == count - 1:
                try:
                    self.flush()
                except OSError:
                    self.closed = True
                if self.closed or not self.read(0):
                    break
        return time.monotonic() - start
