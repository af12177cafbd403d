"""The blob listener (hub_blob_listen) and one download followed by every client.

A real mitmdump with the cache and the listener in front of the Docker-Hub-shaped
upstream: blob requests are answered with a 307 to a signed URL on the listener,
which serves the content-addressed file (whole, Range, HEAD) only for a valid
signature. An uncached blob is downloaded once by the mirror while every client
follows the file as it grows; a download that fails ends every follower's
transfer short and leaves nothing in the cache; a second mirror process on the
same cache directory follows the first one's download.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest

from tests.support.images import fresh_blob, sha256_digest
from tests.support.mirror import Mirror
from tests.support.ports import free_port
from tests.support.throttle import throttled_port

SERVICE = "registry.docker.io"


def token_for(mirror: Mirror, repo: str) -> str:
    r = httpx.get(f"{mirror.url}/token", params={"service": SERVICE, "scope": f"repository:{repo}:pull"}, timeout=15)
    assert r.status_code == 200, r.text
    return r.json()["token"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("listener-cache")


@pytest.fixture(scope="module")
def mirror(upstream, cache_dir, tmp_path_factory):
    options = {"hub_cache_dir": str(cache_dir), "hub_blob_listen": f"127.0.0.1:{free_port()}",
               "hub_upstream_timeout": "5"}
    with Mirror(tmp_path_factory.mktemp("listener-mirror"), upstream, options=options) as m:
        yield m


def redirect(mirror: Mirror, repo: str, digest: str, token: str, method: str = "GET") -> httpx.Response:
    r = httpx.request(method, f"{mirror.url}/v2/{repo}/blobs/{digest}", headers={"Authorization": f"Bearer {token}"},
                      timeout=30)
    assert r.status_code == 307, (r.status_code, r.text[:300])
    return r


def test_blob_is_redirected_to_a_signed_url_and_served_there(mirror, upstream, tmp_path):
    digest, size = fresh_blob(upstream, tmp_path, "team/l-basic", 3 * 1024 * 1024)
    token = token_for(mirror, "team/l-basic")
    first = redirect(mirror, "team/l-basic", digest, token)
    assert first.headers["x-hub-cache"] == "miss" and first.headers["docker-content-digest"] == digest
    location = first.headers["location"]
    assert urlsplit(location).port != mirror.port and "signature=" in location
    body = httpx.get(location, timeout=30)
    assert body.status_code == 200 and sha256_digest(body.content) == digest
    assert body.headers["content-length"] == str(size) and body.headers["docker-content-digest"] == digest
    assert body.headers["etag"] == f'"{digest}"'
    # warm: a hit, the same signed place; no new CDN request
    warm = redirect(mirror, "team/l-basic", digest, token)
    assert warm.headers["x-hub-cache"] == "hit"
    part = httpx.get(warm.headers["location"], headers={"Range": "bytes=1000-1999"}, timeout=30)
    assert part.status_code == 206 and part.content == body.content[1000:2000]
    assert part.headers["content-range"] == f"bytes 1000-1999/{size}"
    assert httpx.get(warm.headers["location"], headers={"Range": f"bytes={size}-"}).status_code == 416
    head = httpx.head(warm.headers["location"])
    assert head.status_code == 200 and head.headers["content-length"] == str(size) and head.content == b""
    # a HEAD is answered by the mirror itself, from what it knows: a redirect would cost a request more
    own = httpx.head(f"{mirror.url}/v2/team/l-basic/blobs/{digest}", headers={"Authorization": f"Bearer {token}"})
    assert own.status_code == 200 and own.headers["content-length"] == str(size) and own.content == b""
    assert own.headers["docker-content-digest"] == digest and own.headers["x-hub-cache"] == "hit"
    assert upstream.cdn_gets(digest) == 1
    # the signature appears in no log line
    assert parse_qs(urlsplit(location).query)["signature"][0] not in mirror.log_text()


def signed(location: str, **changes: str) -> str:
    parts = urlsplit(location)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()} | changes
    return parts._replace(query=urlencode(query)).geturl()


def test_bad_signatures_get_a_registry_error_and_no_bytes(mirror, upstream, cache_dir, tmp_path):
    from hubrewrite.cache.signing import BlobUrlSigner

    digest, _ = fresh_blob(upstream, tmp_path, "team/l-sig", 64 * 1024)
    other, _ = fresh_blob(upstream, tmp_path, "team/l-sig2", 64 * 1024)
    token = token_for(mirror, "team/l-sig")
    location = redirect(mirror, "team/l-sig", digest, token).headers["location"]
    assert httpx.get(location).status_code == 200
    query = parse_qs(urlsplit(location).query)
    expires, signature = query["expires"][0], query["signature"][0]
    own_key = (cache_dir / "secret").read_text().strip().encode()
    expired = int(time.time()) - 10
    other_location = redirect(mirror, "team/l-sig2", other, token_for(mirror, "team/l-sig2")).headers["location"]
    cases = {
        "tampered": signed(location, signature=("0" if signature[0] != "0" else "1") + signature[1:]),
        "expired": signed(location, expires=str(expired),
                          signature=BlobUrlSigner(own_key)._mac(digest, expired)),
        "another digest's signature": signed(location, signature=parse_qs(urlsplit(other_location).query)["signature"][0]),
        "another secret": signed(location, signature=BlobUrlSigner(b"x" * 64)._mac(digest, int(expires))),
        "no signature": location.split("?")[0],
        "expiry moved": signed(location, expires=str(int(expires) + 3600)),
    }
    for case, url in cases.items():
        r = httpx.get(url)
        assert r.status_code == 403, (case, r.status_code)
        assert r.json()["errors"][0]["code"] == "DENIED", case
        assert len(r.content) < 500, case
    listener = f"{urlsplit(location).scheme}://{urlsplit(location).netloc}"
    for path, status in (("/", 404), ("/etc/passwd", 404), ("/blobs/sha256:" + "0" * 64, 403),
                         ("/blobs/../secret", 404)):
        r = httpx.get(listener + path)
        assert r.status_code == status, (path, r.status_code)
        assert r.json()["errors"]
    assert httpx.put(location, content=b"x").status_code == 405


def follow(location: str, results: dict, name: str, delay: float = 0, rate: int | None = None,
           for_seconds: float | None = None) -> None:
    """A client on the listener: when its first byte came, how much it got, how it ended.
    ``rate``: reads that many bytes a second; ``for_seconds``: leaves after that long."""
    time.sleep(delay)
    started = time.monotonic()
    got, first = bytearray(), None
    try:
        with httpx.stream("GET", location, timeout=60) as r:
            for chunk in r.iter_raw(65536):
                if first is None:
                    first = time.monotonic() - started
                got += chunk
                if rate:
                    time.sleep(len(chunk) / rate)
                if for_seconds is not None and time.monotonic() - started > for_seconds:
                    break
        results[name] = {"status": r.status_code, "bytes": bytes(got), "first": first,
                         "done": time.monotonic() - started, "error": None}
    except httpx.HTTPError as e:
        results[name] = {"status": None, "bytes": bytes(got), "first": first, "done": None, "error": e}


def test_followers_of_a_download_cut_by_the_cdn_all_fail_and_nothing_is_cached(mirror, upstream, cache_dir, tmp_path):
    digest, size = fresh_blob(upstream, tmp_path, "team/l-cut", 24 * 1024 * 1024)
    token = token_for(mirror, "team/l-cut")
    upstream.set_cdn_fault("cut", times=0, after=6 * 1024 * 1024)  # every attempt: a cut once is resumed
    results: dict = {}
    try:
        with throttled_port(int(urlsplit(upstream.cdn_url).port), 5):  # the cut comes after every client followed
            locations = [redirect(mirror, "team/l-cut", digest, token).headers["location"] for _ in range(3)]
            threads = [threading.Thread(target=follow, args=(loc, results, f"c{i}")) for i, loc in enumerate(locations)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(90)
    finally:
        upstream.clear_faults()
    for name, r in results.items():
        assert len(r["bytes"]) < size, f"{name} got a complete-looking transfer"
        assert sha256_digest(r["bytes"]) != digest
    blob = cache_dir / "blobs" / "sha256" / digest[7:9] / digest[7:]
    assert not blob.exists() and not list((cache_dir / "tmp").glob("*.download"))
    # and the next pull downloads it again, whole
    again = httpx.get(redirect(mirror, "team/l-cut", digest, token).headers["location"], timeout=60)
    assert again.status_code == 200 and sha256_digest(again.content) == digest


def test_one_download_streamed_to_every_client_as_it_arrives(mirror, upstream, tmp_path):
    """A throttled CDN, 4 clients 0.3 s apart: one CDN request, everyone's first byte at
    once, the last client done about when the first is; a slow follower and one that leaves
    change nothing for the others."""
    digest, size = fresh_blob(upstream, tmp_path, "team/l-follow", 48 * 1024 * 1024)
    token = token_for(mirror, "team/l-follow")
    results: dict = {}
    with throttled_port(int(urlsplit(upstream.cdn_url).port), 24):
        location = redirect(mirror, "team/l-follow", digest, token).headers["location"]
        threads = [threading.Thread(target=follow, args=(location, results, f"c{i}", 0.3 * i)) for i in range(4)]
        threads.append(threading.Thread(target=follow, args=(location, results, "slow", 0.1, 2 * 1024 * 1024, 3.0)))
        leaver = threading.Thread(target=_leave_early, args=(location,))
        for t in [*threads, leaver]:
            t.start()
        for t in [*threads, leaver]:
            t.join(120)
    fast = [results[f"c{i}"] for i in range(4)]
    assert all(r["status"] == 200 and sha256_digest(r["bytes"]) == digest for r in fast), [r["error"] for r in fast]
    assert all(r["first"] < 2.0 for r in fast), [r["first"] for r in fast]
    total = [0.3 * i + r["done"] for i, r in enumerate(fast)]
    assert max(total) <= 1.15 * total[0] + 0.5, total
    assert upstream.cdn_gets(digest) == 1
    slow = results["slow"]  # still reading, or done right, never wrong
    assert slow["bytes"] == _prefix_of(slow["bytes"], fast[0]["bytes"])


def _leave_early(location: str) -> None:
    with httpx.stream("GET", location, timeout=60) as r:
        for _ in r.iter_raw(65536):
            break  # gone after the first chunk


def _prefix_of(got: bytes, whole: bytes) -> bytes:
    return whole[: len(got)]


def test_a_second_process_follows_the_first_ones_download(mirror, upstream, cache_dir, tmp_path):
    digest, size = fresh_blob(upstream, tmp_path, "team/l-shared", 32 * 1024 * 1024)
    options = {"hub_cache_dir": str(cache_dir), "hub_blob_listen": f"127.0.0.1:{free_port()}"}
    with Mirror(tmp_path / "second", upstream, options=options, name="second") as second:
        results: dict = {}
        with throttled_port(int(urlsplit(upstream.cdn_url).port), 24):
            first_location = redirect(mirror, "team/l-shared", digest, token_for(mirror, "team/l-shared")).headers["location"]
            t1 = threading.Thread(target=follow, args=(first_location, results, "first"))
            t1.start()
            time.sleep(0.5)  # the first process's download is under way
            r2 = redirect(second, "team/l-shared", digest, token_for(second, "team/l-shared"))
            t2 = threading.Thread(target=follow, args=(r2.headers["location"], results, "second"))
            t2.start()
            t1.join(120)
            t2.join(120)
    assert results["first"]["status"] == results["second"]["status"] == 200
    assert sha256_digest(results["second"]["bytes"]) == digest == sha256_digest(results["first"]["bytes"])
    assert results["second"]["first"] < 2.0
    assert upstream.cdn_gets(digest) == 1


def test_an_https_mirror_has_an_https_listener_with_its_certificate(upstream, tmp_path):
    import ssl

    from tests.support.certs import make_ca_and_server_cert

    certs = make_ca_and_server_cert(tmp_path / "certs")
    trust = ssl.create_default_context(cafile=str(certs["ca"]))
    digest, _ = fresh_blob(upstream, tmp_path, "team/l-tls", 2 * 1024 * 1024)
    options = {"hub_cache_dir": str(tmp_path / "cache"), "hub_blob_listen": f"127.0.0.1:{free_port()}"}
    with Mirror(tmp_path / "m", upstream, tls=(certs["pem"], "*"), options=options) as m:
        token = httpx.get(f"{m.url}/token", params={"service": SERVICE, "scope": "repository:team/l-tls:pull"},
                          verify=trust).json()["token"]
        r = httpx.get(f"{m.url}/v2/team/l-tls/blobs/{digest}", headers={"Authorization": f"Bearer {token}"},
                      verify=trust, follow_redirects=True, timeout=30)
        assert r.status_code == 200 and sha256_digest(r.content) == digest
        assert [h.status_code for h in r.history] == [307]
        assert r.url.scheme == "https" and r.url.port != m.port  # the listener, same certificate
        # cached now: the whole blob, and a Range across a block boundary (TLS reads 1 MiB per block)
        again = httpx.get(str(r.url), verify=trust, timeout=30)
        assert again.status_code == 200 and again.content == r.content
        start, end = (1 << 20) - 5000, (1 << 20) + 70_000
        part = httpx.get(str(r.url), headers={"Range": f"bytes={start}-{end}"}, verify=trust, timeout=30)
        assert part.status_code == 206 and part.content == r.content[start : end + 1]
