"""Plumbing for the hardening suite: raw HTTP over a socket, a loopback
"evil" listener that records every connection it gets, and checks on
registry error bodies.  Only the tests in this package use it."""

from __future__ import annotations

import json
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field

import httpx

from tests.support.images import make_big_layer, push_image

INDEX_ACCEPT = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
]
SERVICE = "registry.docker.io"
UPSTREAM_TIMEOUT = 3  # the hardening mirrors' hub_upstream_timeout

# Which layer answered each bad request: printed in the terminal summary so
# the report can say whether mitmproxy or the addon refused it.
ANSWERS: list[dict] = []


# ---------------------------------------------------------------- raw HTTP


@dataclass
class RawResponse:
    status: int | None  # None: the connection closed without a status line
    reason: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    raw: bytes = b""
    elapsed: float = 0.0

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def json(self):
        return json.loads(self.body)

    @property
    def layer(self) -> str:
        """Who made this answer: the addon (registry JSON with its API header),
        mitmproxy itself (its HTML/text error pages), or the upstream."""
        if self.status is None:
            return "connection closed"
        server = self.header("server")
        if server and server.lower().startswith("mitmproxy"):
            return "mitmproxy itself"
        if server:
            return f"upstream relayed ({server.split()[0]})"
        if _is_registry_error(self.body):
            return "addon (registry JSON)"
        if self.status >= 400:
            return "mitmproxy (own error page)"
        return "normal answer"

    def short(self) -> str:
        return f"{self.status} {self.reason} {self.body[:300]!r}"


def _is_registry_error(body: bytes) -> bool:
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    return isinstance(doc, dict) and isinstance(doc.get("errors"), list) and bool(doc["errors"])


def raw_request(port: int, data: bytes, timeout: float = 15.0, host: str = "127.0.0.1") -> RawResponse:
    """Send ``data`` as is and read the answer until the server closes (or the
    body is complete).  No normalisation of any kind."""
    start = time.monotonic()
    with socket.create_connection((host, port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except OSError:
            pass  # the server may refuse before reading everything
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if _complete(b"".join(chunks)):
                break
    raw = b"".join(chunks)
    resp = parse_response(raw)
    resp.elapsed = time.monotonic() - start
    return resp


def _complete(raw: bytes) -> bool:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return False
    length = None
    chunked = False
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            try:
                length = int(v.strip())
            except ValueError:
                return False
        if k.strip().lower() == b"transfer-encoding" and b"chunked" in v.lower():
            chunked = True
    if chunked:
        return body.endswith(b"0\r\n\r\n")
    if length is not None:
        return len(body) >= length
    return False


def parse_response(raw: bytes) -> RawResponse:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not raw or not head.startswith(b"HTTP/"):
        return RawResponse(None, raw=raw)
    lines = head.split(b"\r\n")
    parts = lines[0].decode("latin-1").split(" ", 2)
    status = int(parts[1])
    reason = parts[2] if len(parts) > 2 else ""
    headers = []
    for line in lines[1:]:
        k, _, v = line.decode("latin-1").partition(":")
        headers.append((k.strip(), v.strip()))
    if any(k.lower() == "transfer-encoding" and "chunked" in v.lower() for k, v in headers):
        body = _dechunk(body)
    return RawResponse(status, reason, headers, body, raw)


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            break
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2:]
    return bytes(out)


def get(path: bytes | str, port: int, *headers: bytes | str, method: bytes = b"GET") -> bytes:
    """A raw HTTP/1.1 request with Host and Connection: close."""
    if isinstance(path, str):
        path = path.encode()
    lines = [method + b" " + path + b" HTTP/1.1", f"Host: 127.0.0.1:{port}".encode()]
    lines += [h.encode() if isinstance(h, str) else h for h in headers]
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


# ---------------------------------------------------------------- the evil host


class EvilListener:
    """A loopback TCP listener that records every accepted connection (and
    the first bytes it was sent), answering nothing.  Its address stands for
    a host of the client's choosing that the mirror must never contact."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.host = f"127.0.0.1:{self.port}"
        self.accepted: list[tuple[tuple, bytes]] = []
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="evil-listener", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, addr = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.settimeout(0.5)
            try:
                first = conn.recv(4096)
            except OSError:
                first = b""
            with self._lock:
                self.accepted.append((addr, first))
            conn.close()

    def connections(self) -> list[tuple[tuple, bytes]]:
        time.sleep(0.3)  # let a connection in flight be accepted and recorded
        with self._lock:
            return list(self.accepted)

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        self._thread.join(2)


# ---------------------------------------------------------------- checks


def assert_registry_error(resp: RawResponse | httpx.Response, statuses: tuple[int, ...], what: str = "") -> dict:
    """``{"errors":[{"code":..,"message":..}]}`` with one of ``statuses``."""
    if isinstance(resp, httpx.Response):
        status, body, text = resp.status_code, resp.content, f"{resp.status_code} {resp.content[:300]!r}"
    else:
        status, body, text = resp.status, resp.body, resp.short()
    assert status in statuses, f"{what}: expected one of {statuses}, got {text}"
    try:
        doc = json.loads(body)
    except ValueError:
        raise AssertionError(f"{what}: not registry error JSON: {text}") from None
    errors = doc.get("errors") if isinstance(doc, dict) else None
    assert isinstance(errors, list) and errors, f"{what}: no errors list: {text}"
    assert isinstance(errors[0].get("code"), str) and errors[0]["code"], f"{what}: no code: {text}"
    assert isinstance(errors[0].get("message"), str), f"{what}: no message: {text}"
    return errors[0]


def anonymous_token(mirror_url: str, repo: str) -> str:
    r = httpx.get(f"{mirror_url}/token", params={"service": SERVICE, "scope": f"repository:{repo}:pull"}, timeout=15)
    assert r.status_code == 200, r.text
    return r.json()["token"]


def cache_blob_path(cache_dir, digest: str):
    hexd = digest.split(":", 1)[1]
    return cache_dir / "blobs" / "sha256" / hexd[:2] / hexd


def part_files(cache_dir) -> list:
    """Downloads in progress (or left behind) in the cache."""
    return sorted((cache_dir / "tmp").glob("*.download")) if (cache_dir / "tmp").exists() else []


def wait_until(predicate, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def fresh_image(upstream, tmp_path, repo: str, size: int | None = None) -> dict:
    """Push a new image (a never-seen layer) to ``repo:1``; its info from push_image."""
    seed = secrets.token_hex(8)
    if size is None:
        layer = {"data.txt": f"{repo} {seed}\n" * 100}
    else:
        layer = tmp_path / f"{repo.replace('/', '_')}.tar"
        make_big_layer(layer, size, seed=seed)
    return push_image(upstream, repo, "1", [layer], media="oci")
