"""The blob listener under attack (issue 17): a real mitmdump with the cache and
the listener, limited to 1,024 open files as many VPS images are (``prlimit``,
soft and hard, so the mirror cannot raise it), short head and stall timeouts,
and a cached 32 MiB blob with signed URLs to it."""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from tests.support.images import sha256_digest
from tests.support.mirror import Mirror
from tests.support.ports import free_port

from .helpers import SERVICE, UPSTREAM_TIMEOUT, fresh_image

FILE_LIMIT = 1024
HEAD_TIMEOUT = 3  # hub_head_timeout
STALL_TIMEOUT = 5  # tcp_timeout: an answer left unread this long
BLOB_SIZE = 32 << 20  # more than the socket buffers hold: a client that stops reading stalls the answer
REPO = "team/listener-abuse"


def listener_mirror(workdir: Path, upstream, cache_dir: Path, tls: tuple[Path, str] | None = None) -> Mirror:
    """A mirror (not started) with the blob listener, at most FILE_LIMIT open files."""
    port = free_port()
    options = {"hub_cache_dir": str(cache_dir), "hub_upstream_timeout": str(UPSTREAM_TIMEOUT),
               "hub_blob_listen": f"127.0.0.1:{port}", "hub_head_timeout": str(HEAD_TIMEOUT),
               "tcp_timeout": str(STALL_TIMEOUT)}
    m = Mirror(workdir, upstream, options=options, tls=tls)
    m.argv = ["prlimit", f"--nofile={FILE_LIMIT}:{FILE_LIMIT}", "--", *m.argv]  # prlimit execs: same pid
    m.listener_port = port
    return m


@dataclass
class CachedBlob:
    mirror: Mirror
    digest: str
    data: bytes
    token: str
    verify: ssl.SSLContext | bool = True

    def target(self) -> str:
        """A freshly signed listener URL's path and query, as the mirror redirects to it."""
        r = httpx.get(f"{self.mirror.url}/v2/{REPO}/blobs/{self.digest}", timeout=15, verify=self.verify,
                      headers={"Authorization": f"Bearer {self.token}"})
        assert r.status_code == 307, (r.status_code, r.text[:300])
        location = urlsplit(r.headers["location"])
        assert location.port == self.mirror.listener_port, location
        return f"{location.path}?{location.query}"


    def main_port_serves(self) -> str:
        """'' if the mirror's main port answers /v2/ and redirects a blob request to the listener, else why not."""
        try:
            r = httpx.get(f"{self.mirror.url}/v2/", timeout=15, verify=self.verify)
            if r.status_code != 401:
                return f"GET /v2/ -> {r.status_code}"
            self.target()
        except (httpx.HTTPError, AssertionError) as e:
            return f"{type(e).__name__}: {e}"
        return ""

    def url(self, target: str) -> str:
        return f"{self.mirror.scheme}://127.0.0.1:{self.mirror.listener_port}{target}"


def cached_blob(mirror: Mirror, upstream, tmp_path: Path, verify: ssl.SSLContext | bool = True) -> CachedBlob:
    """A fresh image's 32 MiB layer, pulled through ``mirror`` once (so it is cached)."""
    image = fresh_image(upstream, tmp_path, REPO, size=BLOB_SIZE)
    r = httpx.get(f"{mirror.url}/token", params={"service": SERVICE, "scope": f"repository:{REPO}:pull"},
                  verify=verify, timeout=15)
    assert r.status_code == 200, r.text
    blob = CachedBlob(mirror, image["layer_digests"][0], b"", r.json()["token"], verify)
    r = httpx.get(blob.url(blob.target()), timeout=60, verify=verify)
    assert r.status_code == 200 and sha256_digest(r.content) == blob.digest, r.status_code
    blob.data = r.content
    return blob


def request(target: str, *headers: str, method: str = "GET") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def connect(port: int, tls: ssl.SSLContext | None = None, timeout: float = 10) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return tls.wrap_socket(sock, server_hostname="127.0.0.1") if tls else sock


def ended(sock: socket.socket, wait: float = 0.0) -> tuple[bool, bytes]:
    """(whether the server closed this connection within ``wait`` seconds, what it sent first)."""
    sock.settimeout(max(wait, 0.01))
    got = b""
    deadline = time.monotonic() + wait
    while True:
        try:
            chunk = sock.recv(65536)
        except (socket.timeout, ssl.SSLWantReadError):
            if time.monotonic() >= deadline:
                return False, got
            continue
        except OSError:  # reset, or a TLS close without close_notify
            return True, got
        if not chunk:
            return True, got
        got += chunk


def close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        try:
            s.close()
        except OSError:
            pass
