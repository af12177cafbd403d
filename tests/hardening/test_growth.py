"""Unbounded growth (issue 9, item 12).

(a) 2,000 requests for one tag, each with an ``Accept`` of its own (unknown
types and q-params mixed with real manifest types): the tag's record in the
cache stays small, with few entries, because it is keyed by the manifest types
named, not by the header's spelling.

(b) A cached manifest of ~4 MB (an OCI image manifest padded with an
annotation; distribution 2.8 refuses manifests above 4 MiB) asked by 200
clients at once, none of them reading for a while: the mirror's peak memory
stays far below one copy per client, and every client gets the right bytes.
"""

from __future__ import annotations

import json
import random
import secrets
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.support.images import OCI_MANIFEST, Pusher, canonical_json, sha256_digest

from .helpers import INDEX_ACCEPT, anonymous_token, fresh_image

REAL_TYPES = [
    *INDEX_ACCEPT,
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/vnd.docker.distribution.manifest.v1+json",
]
ACCEPT_REQUESTS = 400  # the issue saw 1,608 variants grow one record to 6.8 MB; 400 already would without a bound
MAX_RECORD_BYTES = 10_000
MAX_RECORD_ENTRIES = 20

CLIENTS = 200
MANIFEST_SIZE = 4_000_000
MAX_PEAK_RSS = 300 * 1024 * 1024
SILENT_FOR = 2.0  # seconds the clients read nothing


def random_accept(rng: random.Random) -> str:
    """The image's own type, some other manifest types and unknown ones, shuffled, some with q-params."""
    parts = [OCI_MANIFEST] + rng.sample(REAL_TYPES, rng.randint(0, len(REAL_TYPES)))
    parts += [f"application/x-{secrets.token_hex(6)}+json" for _ in range(rng.randint(1, 3))]
    rng.shuffle(parts)
    return ", ".join(p if rng.random() < 0.5 else f"{p};q=0.{rng.randint(1, 9)}" for p in parts)


def tag_records(cache_dir: Path) -> dict[Path, float]:
    return {p: p.stat().st_mtime for p in (cache_dir / "tags").glob("*.json")}


def test_distinct_accept_values_keep_the_tag_record_small(mirror, upstream, cache_dir, tmp_path):
    image = fresh_image(upstream, tmp_path, "team/accept-growth")
    token = anonymous_token(mirror.url, "team/accept-growth")
    before = tag_records(cache_dir)
    rng = random.Random(9)
    accepts = {random_accept(rng) for _ in range(ACCEPT_REQUESTS)}
    assert len(accepts) == ACCEPT_REQUESTS

    def ask(chunk: list[str]) -> list[str]:
        """One keep-alive connection (raw: a client library costs more CPU than the mirror)."""
        wrong = []
        with socket.create_connection(("127.0.0.1", mirror.port), timeout=30) as s:
            for accept in chunk:
                s.sendall(f"HEAD /v2/team/accept-growth/manifests/1 HTTP/1.1\r\nHost: {mirror.host}\r\n"
                          f"Authorization: Bearer {token}\r\nAccept: {accept}\r\n\r\n".encode())
                head = read_head(s)
                if not head.startswith(b"HTTP/1.1 200") or f"docker-content-digest: {image['digest']}".encode() \
                        not in head.lower():
                    wrong.append(f"{accept!r}: {head[:300]!r}")
        return wrong

    values = sorted(accepts)
    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        wrong = [w for ws in pool.map(ask, [values[i::8] for i in range(8)]) for w in ws]
    took = time.monotonic() - started
    assert not wrong, f"{len(wrong)} wrong answers, e.g. {wrong[:3]}"

    changed = [p for p, mtime in tag_records(cache_dir).items() if before.get(p) != mtime]
    assert len(changed) == 1, f"{len(changed)} tag records written for one tag"
    record = changed[0]
    size, entries = record.stat().st_size, len(json.loads(record.read_text()))
    print(f"\n{ACCEPT_REQUESTS} Accept values in {took:.1f} s: tag record {size} bytes, {entries} entries")
    assert size < MAX_RECORD_BYTES, f"tag record grew to {size} bytes ({entries} entries)"
    assert entries <= MAX_RECORD_ENTRIES, f"{entries} entries in one tag record"


def push_big_manifest(upstream, tmp_path, repo: str) -> tuple[str, bytes]:
    """An OCI image manifest of ~MANIFEST_SIZE bytes (a padding annotation) at ``repo:big``."""
    image = fresh_image(upstream, tmp_path, repo)
    manifest = json.loads(image["manifest_bytes"])
    manifest["annotations"] = {"org.example.padding": "x" * MANIFEST_SIZE}
    body = canonical_json(manifest)
    with Pusher(upstream) as p:
        return p.push_manifest(repo, "big", body, OCI_MANIFEST), body


def read_head(sock: socket.socket) -> bytes:
    """The whole answer to a HEAD (nothing follows it: the client waits for each answer)."""
    data = b""
    while not data.endswith(b"\r\n\r\n"):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before the head's end: {data[:300]!r}")
        data += chunk
    return data


def read_answer(sock: socket.socket) -> tuple[bytes, bytes]:
    """(head, body) of one HTTP/1.1 answer with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before the head: {data[:300]!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lengths = [line.split(b":", 1)[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
    assert lengths, f"no Content-Length: {head[:500]!r}"
    length = int(lengths[0])
    parts = [body]
    received = len(body)
    while received < length:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        parts.append(chunk)
        received += len(chunk)
    return head, b"".join(parts)


def test_a_big_cached_manifest_to_many_clients_at_once_is_not_copied_per_client(mirror, upstream, tmp_path):
    digest, body = push_big_manifest(upstream, tmp_path, "team/big-manifest")
    token = anonymous_token(mirror.url, "team/big-manifest")
    request = (f"GET /v2/team/big-manifest/manifests/big HTTP/1.1\r\nHost: {mirror.host}\r\n"
               f"Authorization: Bearer {token}\r\nAccept: {', '.join(INDEX_ACCEPT)}\r\n"
               "Connection: close\r\n\r\n").encode()
    first = httpx.get(f"{mirror.url}/v2/team/big-manifest/manifests/big", timeout=30,
                      headers=[("Authorization", f"Bearer {token}")] + [("Accept", a) for a in INDEX_ACCEPT])
    assert first.status_code == 200 and sha256_digest(first.content) == digest, first.text[:300]
    assert len(body) >= MANIFEST_SIZE

    mirror.reset_peak_rss()
    baseline = mirror.peak_rss()
    sockets = []
    try:
        for _ in range(CLIENTS):
            s = socket.socket()
            s.settimeout(60)
            s.connect(("127.0.0.1", mirror.port))
            s.sendall(request)
            sockets.append(s)
        time.sleep(SILENT_FOR)
        wrong = []
        for s in sockets:
            head, got = read_answer(s)
            if not head.startswith(b"HTTP/1.1 200") or sha256_digest(got) != digest:
                wrong.append(f"{head.split(b'\r\n', 1)[0]!r}, {len(got)} bytes")
    finally:
        for s in sockets:
            s.close()
    peak = mirror.peak_rss()
    print(f"\n{CLIENTS} clients x {len(body) / 1e6:.1f} MB manifest: peak RSS {peak / 1e6:.0f} MB "
          f"(baseline {baseline / 1e6:.0f} MB)")
    assert not wrong, f"{len(wrong)} clients got a wrong answer, e.g. {wrong[:3]}"
    assert peak < MAX_PEAK_RSS, f"peak RSS {peak / 1e6:.0f} MB for {CLIENTS} clients of a {len(body) / 1e6:.1f} MB manifest"
