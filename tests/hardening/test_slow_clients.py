"""A slow first client holds nobody back (issue 9, item 9).

The first client of an uncached 64 MiB blob reads at ~50 KB/s (a raw socket
with a small receive buffer, read slowly); a second client asking 0.5 s later
at full speed gets its first byte within 2 s and the whole blob in a few
seconds, long before the first.  The CDN is asked once, the blob ends up in
the cache, and the slow client, reading on, gets the right bytes.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time

import httpx
import pytest

from .helpers import anonymous_token, cache_blob_path, fresh_image, wait_until

BLOB_SIZE = 64 * 1024 * 1024
SLOW_RATE = 50_000  # bytes per second
FIRST_BYTE_WITHIN = 2.0
FAST_WITHIN = 10.0


class SlowReader(threading.Thread):
    """GET over a raw socket, read at SLOW_RATE until ``hurry`` is set, then at full speed."""

    def __init__(self, port: int, path: str, token: str) -> None:
        super().__init__(name="slow-reader", daemon=True)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
        self.sock.settimeout(30)
        self.sock.connect(("127.0.0.1", port))
        self.request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
                        "Connection: close\r\n\r\n").encode()
        self.hurry = threading.Event()
        self.head = b""
        self.received = 0
        self.hasher = hashlib.sha256()
        self.error: BaseException | None = None
        self.done_at: float | None = None

    def run(self) -> None:
        try:
            self._read()
        except BaseException as e:  # reported by the test
            self.error = e
        finally:
            self.sock.close()

    def _read(self) -> None:
        self.sock.sendall(self.request)
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"closed before the head: {buffer[:300]!r}")
            buffer += chunk
        self.head, _, body = buffer.partition(b"\r\n\r\n")
        self._take(body)
        length = self.content_length()
        started = time.monotonic()
        while self.received < length:
            if not self.hurry.is_set():
                ahead = self.received / SLOW_RATE - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(min(ahead, 0.1))
                    continue
            chunk = self.sock.recv(4096 if not self.hurry.is_set() else 1 << 20)
            if not chunk:
                break
            self._take(chunk)
        self.done_at = time.monotonic()

    def _take(self, chunk: bytes) -> None:
        self.hasher.update(chunk)
        self.received += len(chunk)

    def status(self) -> int:
        return int(self.head.split(b" ", 2)[1]) if self.head else 0

    def content_length(self) -> int:
        for line in self.head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                return int(value)
        raise AssertionError(f"no Content-Length in {self.head!r}")


def test_slow_first_client_holds_nobody_back(mirror, upstream, cache_dir, tmp_path):
    image = fresh_image(upstream, tmp_path, "team/slow-first", size=BLOB_SIZE)
    digest, size = image["layer_digests"][0], image["layer_sizes"][0]
    path = f"/v2/team/slow-first/blobs/{digest}"
    token = anonymous_token(mirror.url, "team/slow-first")

    slow = SlowReader(mirror.port, path, token)
    slow.start()
    try:
        time.sleep(0.5)
        start = time.monotonic()
        first_byte = None
        hasher, received = hashlib.sha256(), 0
        try:
            with httpx.stream("GET", mirror.url + path, headers={"Authorization": f"Bearer {token}"},
                              timeout=httpx.Timeout(FAST_WITHIN), follow_redirects=True) as r:
                assert r.status_code == 200, r.read()[:300]
                for chunk in r.iter_raw():
                    if first_byte is None:
                        first_byte = time.monotonic() - start
                        assert first_byte < FIRST_BYTE_WITHIN, \
                            f"second client's first byte after {first_byte:.1f} s, behind the slow one"
                    hasher.update(chunk)
                    received += len(chunk)
        except httpx.TimeoutException:
            pytest.fail(f"second client: nothing for {FAST_WITHIN} s ({received} bytes after "
                        f"{time.monotonic() - start:.1f} s), held back by the slow one")
        fast_took = time.monotonic() - start
        slow_had = slow.received
        assert received == size and "sha256:" + hasher.hexdigest() == digest, f"{received} of {size} bytes"
        assert fast_took < FAST_WITHIN, f"second client took {fast_took:.1f} s"
        assert slow.is_alive() and slow_had < size / 2, \
            f"the slow client was not slow ({slow_had} bytes when the fast one was done)"
        print(f"\nfast client: first byte {first_byte:.2f} s, {size >> 20} MiB in {fast_took:.2f} s; "
              f"slow client had {slow_had} bytes")
    finally:
        slow.hurry.set()  # the slow client reads the rest at full speed
        slow.join(60)
    assert slow.error is None, f"slow client: {slow.error!r}"
    assert slow.status() == 200 and slow.received == size, f"slow client: {slow.head[:200]!r} {slow.received} bytes"
    assert "sha256:" + slow.hasher.hexdigest() == digest, "slow client got wrong bytes"

    assert wait_until(lambda: cache_blob_path(cache_dir, digest).exists(), 10), "blob not cached"
    hexd = digest.split(":", 1)[1]
    cdn = [rec for rec in upstream.cdn_requests(min_count=1) if hexd in rec.get("path", "")]
    assert len(cdn) == 1, f"{len(cdn)} CDN requests for one blob"
