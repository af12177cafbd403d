"""Faults upstream: the client gets a registry error (or its blob after one
retry), quickly; nothing partial stays in the cache; the mirror keeps serving
(checked around every test by conftest.keeps_serving).  Faults are injected
with the test upstream's fault switches and always cleared in ``finally``."""

from __future__ import annotations

import hashlib
import socket
import threading
import time

import httpx
import pytest

from tests.support.images import sha256_digest

from .helpers import (INDEX_ACCEPT, SERVICE, UPSTREAM_TIMEOUT, anonymous_token, assert_registry_error,
                      cache_blob_path, fresh_image, part_files, wait_until)

# hub_upstream_timeout=3: an answer must come well within this
TIMELY = 10.0


def blob_url(mirror, repo: str, digest: str) -> str:
    return f"{mirror.url}/v2/{repo}/blobs/{digest}"


def assert_not_cached(cache_dir, digest: str, wait: float = 5.0) -> None:
    assert wait_until(lambda: part_files(cache_dir) == [], wait), f"partial downloads left: {part_files(cache_dir)}"
    assert not cache_blob_path(cache_dir, digest).exists(), f"{digest} committed to the cache"


def pull_blob(mirror, repo: str, digest: str, token: str, timeout: float = 60) -> httpx.Response:
    r = httpx.get(blob_url(mirror, repo, digest), headers={"Authorization": f"Bearer {token}"},
                  timeout=timeout, follow_redirects=True)
    return r


def cdn_records(upstream, digest: str, min_count: int = 0, timeout: float = 5.0) -> list[dict]:
    hexd = digest.split(":", 1)[1]
    deadline = time.monotonic() + timeout
    while True:
        recs = [r for r in upstream.cdn_requests() if hexd in r.get("path", "")]
        if len(recs) >= min_count or time.monotonic() >= deadline:
            return recs
        time.sleep(0.1)


def edge_blob_gets(upstream, digest: str) -> list[dict]:
    return [e for e in upstream.edge_requests() if e["method"] == "GET" and e["path"].endswith(f"/blobs/{digest}")]


# ---------------------------------------------------------------- CDN


def test_cdn_cuts_the_blob_mid_transfer(mirror, upstream, cache_dir, tmp_path):
    image = fresh_image(upstream, tmp_path, "team/h-cut", size=4 * 1024 * 1024)
    digest, size = image["layer_digests"][0], image["layer_sizes"][0]
    token = anonymous_token(mirror.url, "team/h-cut")
    upstream.set_cdn_fault("cut", times=0, after=1024 * 1024)  # every attempt: a cut once is resumed
    try:
        received = 0
        error = None
        try:
            with httpx.stream("GET", blob_url(mirror, "team/h-cut", digest), timeout=30,
                              headers={"Authorization": f"Bearer {token}"}) as r:
                status = r.status_code
                for chunk in r.iter_raw():
                    received += len(chunk)
        except httpx.HTTPError as e:
            error = e
        assert error is not None or status >= 500 or received < size, \
            f"a cut transfer looked complete to the client (status {status}, {received} bytes)"
        assert received < size
    finally:
        upstream.clear_faults()
    assert_not_cached(cache_dir, digest)
    again = pull_blob(mirror, "team/h-cut", digest, token)
    assert again.status_code == 200 and sha256_digest(again.content) == digest


def test_cdn_403_expired_url_once_registry_asked_again(mirror, upstream, cache_dir, tmp_path):
    """Requirement: a signed URL refused once (expired) -> the mirror gets a new
    one from the registry, once, and the pull succeeds."""
    image = fresh_image(upstream, tmp_path, "team/h-expired")
    digest = image["layer_digests"][0]
    token = anonymous_token(mirror.url, "team/h-expired")
    probes_before = len(edge_blob_gets(upstream, digest))
    upstream.set_cdn_fault("status403", times=1)
    try:
        r = pull_blob(mirror, "team/h-expired", digest, token, timeout=30)
    finally:
        upstream.clear_faults()
    chain = [f"{h.status_code} {h.headers.get('location', '')}" for h in r.history]
    assert r.status_code == 200, f"{r.status_code} {r.text[:300]} after {chain}"
    assert sha256_digest(r.content) == digest
    probes = edge_blob_gets(upstream, digest)[probes_before:]
    assert len(probes) == 2, f"registry asked {len(probes)} times: {probes}"
    assert [c.get("status") for c in cdn_records(upstream, digest, min_count=2)] == [403, 200]
    assert wait_until(lambda: cache_blob_path(cache_dir, digest).exists(), 5), "the successful retry was not cached"


def test_cdn_403_every_time_is_an_error_not_a_loop(mirror, upstream, cache_dir, tmp_path):
    image = fresh_image(upstream, tmp_path, "team/h-denied")
    digest = image["layer_digests"][0]
    token = anonymous_token(mirror.url, "team/h-denied")
    upstream.set_cdn_fault("status403", times=0)
    try:
        start = time.monotonic()
        r = pull_blob(mirror, "team/h-denied", digest, token, timeout=30)
        elapsed = time.monotonic() - start
    finally:
        upstream.clear_faults()
    assert_registry_error(r, (502, 503, 504), "CDN refusing every signed URL")
    assert elapsed < TIMELY
    probes = edge_blob_gets(upstream, digest)
    assert 1 <= len(probes) <= 2, f"registry asked {len(probes)} times (retry at most once): {len(r.history)} redirects"
    assert_not_cached(cache_dir, digest)

def token_request(mirror, user_password: tuple[str, str] | None, method: str) -> tuple[httpx.Response | None, float]:
    start = time.monotonic()
    try:
        if method == "GET":
            r = httpx.get(f"{mirror.url}/token", params={"service": SERVICE, "scope": "repository:private/secret:pull"},
                          auth=user_password, timeout=TIMELY + 5)
        else:
            assert user_password
            r = httpx.post(f"{mirror.url}/token", timeout=TIMELY + 5, data={
                "grant_type": "password", "username": user_password[0], "password": user_password[1],
                "service": SERVICE, "client_id": "hardening", "scope": "repository:private/secret:pull"})
    except httpx.TimeoutException:
        r = None
    return r, time.monotonic() - start


@pytest.mark.parametrize("fault", ["status500", "hang", "close", "down"])
def test_token_service_failing(mirror, upstream, fault):
    alice = ("alice", upstream.users["alice"])
    if fault == "down":
        upstream.stop_service("token")
    else:
        upstream.set_token_fault(fault, times=0, **({"seconds": 20} if fault == "hang" else {}))
    try:
        results = {f"alice {m}": token_request(mirror, alice, m) for m in ("GET", "POST")}
        results["anonymous GET"] = token_request(mirror, None, "GET")
    finally:
        if fault == "down":
            upstream.start_service("token")
        upstream.clear_faults()
    problems = []
    for case, (r, elapsed) in results.items():
        if r is None:
            problems.append(f"{case}: no answer in {elapsed:.1f}s")
            continue
        if elapsed >= TIMELY:
            problems.append(f"{case}: answered after {elapsed:.1f}s")
        if case == "anonymous GET" and r.status_code == 200:
            # documented: with a cache, a client without credentials gets an offline token
            if r.headers.get("x-hub-cache") != "stale":
                problems.append(f"{case}: 200 without X-Hub-Cache: stale: {r.text[:200]}")
            continue
        try:
            assert_registry_error(r, (500, 502, 503, 504), case)
        except AssertionError as e:
            problems.append(str(e))
    assert not problems, f"token service {fault}:\n" + "\n".join(problems)
    # back up: a private pull works again
    r, _ = token_request(mirror, alice, "GET")
    assert r is not None and r.status_code == 200, r and r.text


# ---------------------------------------------------------------- registry


def manifest_get(mirror, repo: str, token: str, method: str = "GET", timeout: float = TIMELY + 5) -> httpx.Response:
    return httpx.request(method, f"{mirror.url}/v2/{repo}/manifests/1", timeout=timeout,
                         headers=[("Authorization", f"Bearer {token}")] + [("Accept", a) for a in INDEX_ACCEPT])


@pytest.mark.parametrize("fault", ["status500", "close"])
def test_registry_failing_on_manifests(mirror, upstream, tmp_path, fault):
    repo = f"team/h-{fault}"
    image = fresh_image(upstream, tmp_path, repo)
    token = anonymous_token(mirror.url, repo)
    upstream.set_edge_fault(fault, times=0, path_contains="/manifests/")
    try:
        get = manifest_get(mirror, repo, token)
        head = manifest_get(mirror, repo, token, "HEAD")
    finally:
        upstream.clear_faults()
    assert_registry_error(get, (500, 502, 503), f"registry {fault} on GET manifest")
    assert 500 <= head.status_code < 600, head
    ok = manifest_get(mirror, repo, token)
    assert ok.status_code == 200 and ok.headers["docker-content-digest"] == image["digest"]


def test_registry_429_passed_with_retry_after(mirror, upstream, tmp_path):
    repo = "team/h-429"
    image = fresh_image(upstream, tmp_path, repo)
    token = anonymous_token(mirror.url, repo)
    upstream.set_edge_fault("status429", times=0, path_contains="/manifests/")
    try:
        get = manifest_get(mirror, repo, token)
        head = manifest_get(mirror, repo, token, "HEAD")
    finally:
        upstream.clear_faults()
    error = assert_registry_error(get, (429,), "registry 429 on GET manifest")
    assert error["code"] == "TOOMANYREQUESTS", error
    assert get.headers.get("retry-after") == "7", dict(get.headers)
    assert head.status_code == 429 and head.headers.get("retry-after") == "7", dict(head.headers)
    ok = manifest_get(mirror, repo, token)
    assert ok.status_code == 200 and ok.headers["docker-content-digest"] == image["digest"]


@pytest.mark.parametrize("where", ["/manifests/", "/blobs/"])
def test_registry_that_never_answers_gives_504(mirror, upstream, cache_dir, tmp_path, where):
    repo = "team/h-hang" + where.strip("/")
    image = fresh_image(upstream, tmp_path, repo)
    token = anonymous_token(mirror.url, repo)
    digest = image["layer_digests"][0]
    url = f"{mirror.url}/v2/{repo}/manifests/1" if where == "/manifests/" else blob_url(mirror, repo, digest)
    upstream.set_edge_fault("hang", times=0, path_contains=where, seconds=20)
    result: dict = {}

    def hung_request():
        start = time.monotonic()
        try:
            result["r"] = httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=TIMELY + 5)
        except httpx.HTTPError as e:
            result["error"] = repr(e)
        result["elapsed"] = time.monotonic() - start

    try:
        t = threading.Thread(target=hung_request)
        t.start()
        time.sleep(0.5)
        # while that request waits on the upstream, others are served
        other = httpx.get(f"{mirror.url}/v2/", timeout=5)
        assert other.status_code == 401
        t.join(TIMELY + 10)
    finally:
        upstream.clear_faults()
    assert "r" in result, f"no answer: {result}"
    assert result["elapsed"] < TIMELY, f"answered after {result['elapsed']:.1f}s"
    assert result["elapsed"] >= UPSTREAM_TIMEOUT - 0.5, f"gave up after {result['elapsed']:.1f}s, before the timeout"
    assert_registry_error(result["r"], (504,), f"registry hang on {where}")
    assert_not_cached(cache_dir, digest)


# ---------------------------------------------------------------- the client goes away


def test_client_disconnects_mid_blob(mirror, upstream, cache_dir, tmp_path):
    size_wanted = 64 * 1024 * 1024
    image = fresh_image(upstream, tmp_path, "team/h-abandoned", size=size_wanted)
    digest, size = image["layer_digests"][0], image["layer_sizes"][0]
    token = anonymous_token(mirror.url, "team/h-abandoned")
    request = (f"GET /v2/team/h-abandoned/blobs/{digest} HTTP/1.1\r\nHost: {mirror.host}\r\n"
               f"Authorization: Bearer {token}\r\n\r\n").encode()
    received = 0
    with socket.create_connection(("127.0.0.1", mirror.port), timeout=15) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
        s.sendall(request)
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(65536)
        assert head.startswith(b"HTTP/1.1 200"), head[:300]
        received = len(head.partition(b"\r\n\r\n")[2])
        while received < 4 * 1024 * 1024:
            chunk = s.recv(1024 * 1024)
            assert chunk, "the mirror closed early"
            received += len(chunk)
        saw_part = bool(part_files(cache_dir))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST on close
    assert saw_part, "no download in tmp/ while the blob streamed: the test did not exercise the cache's download"
    # the download is the mirror's, not the client's: it goes on, is verified and committed
    assert wait_until(lambda: cache_blob_path(cache_dir, digest).exists(), 30), "the download stopped with its client"
    assert wait_until(lambda: part_files(cache_dir) == [], 5), f"partial file kept: {part_files(cache_dir)}"
    recs = cdn_records(upstream, digest, min_count=1, timeout=10)
    assert len(recs) == 1 and not recs[0].get("error") and recs[0].get("bytes") == size, recs
    # and the next client gets the whole blob from the cache: no second CDN request
    h = hashlib.sha256()
    start = time.monotonic()
    with httpx.stream("GET", blob_url(mirror, "team/h-abandoned", digest), timeout=30,
                      headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status_code == 200 and r.headers["x-hub-cache"] == "hit"
        for chunk in r.iter_bytes():
            h.update(chunk)
    assert "sha256:" + h.hexdigest() == digest
    assert time.monotonic() - start < 30
    assert len(cdn_records(upstream, digest)) == 1
