"""One loopback server per mirror process (issue 9, item 14).

A blob is cached through the module's mirror; a second mirror process is
started on the same cache and, right after the image's tag, gets 20 requests
for the blob at once (cache hits, served through the loopback server).  The
new mitmdump then listens on at most one TCP port besides its proxy port:
concurrent first hits must not each start a loopback listener.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import httpx

from tests.support.mirror import Mirror
from tests.support.images import sha256_digest

from .helpers import (INDEX_ACCEPT, UPSTREAM_TIMEOUT, RawResponse, anonymous_token, cache_blob_path, fresh_image, get,
                      parse_response)

PARALLEL = 20
LISTEN = "0A"  # TCP state in /proc/net/tcp


def read_until_closed(sock: socket.socket) -> RawResponse:
    """The answer to a ``Connection: close`` request."""
    chunks = []
    while chunk := sock.recv(1 << 16):
        chunks.append(chunk)
    return parse_response(b"".join(chunks))


def listening_ports(pid: int) -> set[int]:
    """The TCP ports (IPv4 and IPv6) a process listens on: /proc/<pid>/net/tcp* by the inodes of its fds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == LISTEN and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_concurrent_first_hits_start_one_loopback_server(mirror, upstream, cache_dir, tmp_path):
    image = fresh_image(upstream, tmp_path, "team/loopback-once")
    layer = image["layer_digests"][0]
    url = f"/v2/team/loopback-once/blobs/{layer}"
    token = anonymous_token(mirror.url, "team/loopback-once")
    r = httpx.get(mirror.url + url, headers={"Authorization": f"Bearer {token}"}, timeout=30, follow_redirects=True)
    assert r.status_code == 200 and cache_blob_path(cache_dir, layer).exists(), r.text[:300]

    options = {"hub_cache_dir": str(cache_dir), "hub_upstream_timeout": str(UPSTREAM_TIMEOUT)}
    with Mirror(tmp_path / "fresh-mirror", upstream, options=options) as fresh:
        # the tag first, as a client does: the upstream confirms this token's access to the
        # repository, so the blob requests are answered from the cache at once, all together
        r = httpx.get(f"{fresh.url}/v2/team/loopback-once/manifests/1", headers=[
            ("Authorization", f"Bearer {token}"), *(("Accept", a) for a in INDEX_ACCEPT)], timeout=30)
        assert r.status_code == 200 and r.headers.get("docker-content-digest") == image["digest"], r.text[:300]
        before = listening_ports(fresh.proc.pid)
        # connected first, then the requests sent back to back: they arrive together
        request = get(url, fresh.port, f"Authorization: Bearer {token}")
        sockets = [socket.create_connection(("127.0.0.1", fresh.port), timeout=30) for _ in range(PARALLEL)]
        try:
            for s in sockets:
                s.sendall(request)
            answers = [read_until_closed(s) for s in sockets]
        finally:
            for s in sockets:
                s.close()
        results = [f"{a.status} {a.header('x-hub-cache')} {sha256_digest(a.body) == layer}" for a in answers]
        after = listening_ports(fresh.proc.pid)
        log = fresh.log_text()
    assert results == ["200 hit True"] * PARALLEL, results
    print(f"\nlistening before: {sorted(before)}, after {PARALLEL} parallel hits: {sorted(after)}")
    assert fresh.port in before and before <= after
    loopback = after - {fresh.port}
    assert len(loopback) <= 1, f"{len(loopback)} loopback listeners after {PARALLEL} parallel first hits"
    assert "Traceback" not in log
