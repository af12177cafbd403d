"""Downloads that survive a cut (issue 20 item 2), end to end: skopeo, containerd (ctr), podman
and HTTP clients -> mitmdump with the addon -> the HTTPS Docker-Hub-shaped upstream, whose CDN
(nginx in front of the Python CDN) cuts blob transfers: every blob once at 10%, 50% and 99%;
every attempt; or after a pause long enough for its signed URL to expire. With a cache (one
download, followed by every client; also behind the blob listener) and without one (each
client's own stream)."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.support.daemons import Containerd
from tests.support.images import fresh_blob, sha256_digest
from tests.support.mirror import Mirror
from tests.support.ports import free_port
from tests.support.throttle import throttled_port

from .test_clients import Podman, ctr_check, need
from .test_mirror import copy, sha256_file

CUTS = "0.1,0.5,0.99"


def token_for(mirror: Mirror, repo: str) -> str:
    r = httpx.get(f"{mirror.url}/token", params={"service": "registry.docker.io", "scope": f"repository:{repo}:pull"},
                  timeout=15)
    assert r.status_code == 200, r.text
    return r.json()["token"]


def fetch(mirror: Mirror, repo: str, digest: str, results: dict, name: str, delay: float = 0) -> None:
    """One client's GET of a blob, redirects followed: status, bytes, error, seconds."""
    time.sleep(delay)
    started, got = time.monotonic(), bytearray()
    try:
        with httpx.stream("GET", f"{mirror.url}/v2/{repo}/blobs/{digest}", follow_redirects=True, timeout=60,
                          headers={"Authorization": f"Bearer {token_for(mirror, repo)}"}) as r:
            for chunk in r.iter_raw(1 << 20):
                got += chunk
        results[name] = {"status": r.status_code, "bytes": bytes(got), "error": None,
                         "history": [h.status_code for h in r.history], "seconds": time.monotonic() - started}
    except httpx.HTTPError as e:
        results[name] = {"status": None, "bytes": bytes(got), "error": e, "seconds": time.monotonic() - started}


def several_clients(mirror: Mirror, repo: str, digest: str, count: int, apart: float = 0.3) -> dict:
    results: dict = {}
    threads = [threading.Thread(target=fetch, args=(mirror, repo, digest, results, f"c{i}", apart * i))
               for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == count, "a client hung"
    return results


def blob_gets(upstream, digest: str, min_count: int = 0) -> list[dict]:
    hexd = digest.split(":", 1)[1]
    deadline = time.monotonic() + 5
    while True:
        recs = [r for r in upstream.cdn_requests() if hexd in r.get("path", "") and r.get("method") == "GET"]
        if len(recs) >= min_count or time.monotonic() > deadline:
            return recs
        time.sleep(0.1)


def resumes(mirror: Mirror) -> dict[str, float]:
    text = httpx.get(f"{mirror.url}/_hub/metrics", timeout=10).text
    return {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("hub_download_resumes_total{")}


def cached(cache_dir: Path, digest: str) -> bool:
    return (cache_dir / "blobs" / "sha256" / digest[7:9] / digest[7:]).exists()


def nothing_left(cache_dir: Path, digest: str) -> bool:
    return not cached(cache_dir, digest) and not list((cache_dir / "tmp").glob("*.download"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("resume-cache")


@pytest.fixture(scope="module")
def mirror(upstream, cache_dir, tmp_path_factory):
    options = {"hub_cache_dir": str(cache_dir), "hub_upstream_timeout": "10"}
    with Mirror(tmp_path_factory.mktemp("resume-mirror"), upstream, options=options) as m:
        yield m


@pytest.fixture(scope="module")
def uncached_mirror(upstream, tmp_path_factory):
    with Mirror(tmp_path_factory.mktemp("resume-uncached"), upstream, options={"hub_upstream_timeout": "10"}) as m:
        yield m


@pytest.fixture
def cutting_cdn(upstream):
    """The CDN cuts every blob once at 10%, 50% and 99% of it."""
    upstream.set_cdn_fault("cutat", times=0, at=CUTS)
    yield upstream
    upstream.clear_faults()


def check_cut_three_times(upstream, digest: str, size: int, downloads: int = 1) -> None:
    """The CDN log: each download cut at 10, 50 and 99% and resumed from exactly there."""
    gets = blob_gets(upstream, digest, min_count=4 * downloads)
    assert len(gets) == 4 * downloads, gets
    assert sorted(r["range"] or "" for r in gets) == sorted(
        ["", f"bytes={size // 10}-", f"bytes={size // 2}-", f"bytes={size * 99 // 100}-"] * downloads)
    assert sum(r.get("fault") == "cutat" for r in gets) == 3 * downloads


def test_skopeo_pulls_through_a_cdn_cutting_every_blob_at_10_50_and_99_percent(mirror, cutting_cdn, cache_dir,
                                                                                tmp_path):
    upstream = cutting_cdn
    digest, size = fresh_blob(upstream, tmp_path, "team/r-skopeo", 8 * 1024 * 1024)
    before = resumes(mirror).get("interrupted", 0)
    pulled = copy(f"docker://{mirror.host}/team/r-skopeo:1", tmp_path / "pulled")
    assert pulled.returncode == 0, pulled.stderr
    assert sha256_file(tmp_path / "pulled" / digest[7:]) == digest
    check_cut_three_times(upstream, digest, size)
    assert cached(cache_dir, digest)
    assert resumes(mirror).get("interrupted", 0) - before >= 3  # the config blob is cut too
    assert f"resuming from byte {size // 2}" in mirror.log_text()
    assert "Traceback" not in mirror.log_text()


def test_several_clients_following_one_download_see_one_uninterrupted_transfer(mirror, cutting_cdn, cache_dir,
                                                                               tmp_path):
    upstream = cutting_cdn
    digest, size = fresh_blob(upstream, tmp_path, "team/r-follow", 24 * 1024 * 1024)
    with throttled_port(int(urlsplit(upstream.cdn_url).port), 10):  # every client joins before the cuts
        results = several_clients(mirror, "team/r-follow", digest, 4)
    for name, r in results.items():
        assert r["error"] is None and r["status"] == 200, (name, r)
        assert len(r["bytes"]) == size and sha256_digest(r["bytes"]) == digest, name
    check_cut_three_times(upstream, digest, size)  # one download, followed by all four
    assert cached(cache_dir, digest)


@pytest.fixture(scope="module")
def containerd(tmp_path_factory):
    need("containerd", "containerd")
    need("ctr", "containerd")
    with Containerd(tmp_path_factory.mktemp("resume-containerd")) as daemon:
        yield daemon


def ctr_pull(containerd: Containerd, mirror: Mirror, ref: str, digest: str) -> subprocess.CompletedProcess:
    """ctr pulls ``ref`` from the mirror; containerd commits a blob only under the digest it has
    (the layer listed in its content store is the verified one), and unpacks the image."""
    pulled = containerd.ctr("images", "pull", "--plain-http", ref)
    assert pulled.returncode == 0, pulled.stderr + mirror.log_text()[-3000:]
    check = ctr_check(containerd, ref)
    assert "complete" in check and check.split()[-1] == "true", check
    content = containerd.ctr("content", "ls", "-q")
    assert digest in content.stdout.split(), content.stdout
    return pulled


def podman_pull(podman: Podman, mirror: Mirror, ref: str, digest: str) -> subprocess.CompletedProcess:
    """podman pulls ``ref`` from the mirror; it verifies every blob's digest, and the layer (an
    uncompressed tar) is its own diff_id in the image's rootfs."""
    pulled = podman("pull", "--tls-verify=false", ref)
    assert pulled.returncode == 0, pulled.stderr + mirror.log_text()[-3000:]
    assert podman.inspect(ref)["RootFS"]["Layers"] == [digest]
    return pulled


@pytest.fixture
def podman(tmp_path):
    need("podman", "podman")
    client = Podman(tmp_path / "podman")
    try:
        yield client
    finally:
        client.close()


def check_resumed_into_the_cache(mirror: Mirror, cache_dir: Path, digest: str, size: int, before: float) -> None:
    assert cached(cache_dir, digest)
    assert sha256_file(cache_dir / "blobs" / "sha256" / digest[7:9] / digest[7:]) == digest
    assert resumes(mirror).get("interrupted", 0) - before >= 3
    assert f"resuming from byte {size // 2}" in mirror.log_text()
    assert "Traceback" not in mirror.log_text()


@pytest.fixture(scope="module")
def listener_mirror(upstream, tmp_path_factory):
    """The cache and the blob listener: each blob request is answered with a 307 to a signed URL on
    the listener, which the clients follow as they follow Docker Hub's CDN redirects."""
    work = tmp_path_factory.mktemp("resume-listener")
    options = {"hub_cache_dir": str(work / "cache"), "hub_blob_listen": f"127.0.0.1:{free_port()}",
               "hub_upstream_timeout": "10"}
    with Mirror(work, upstream, options=options) as m:
        yield m, work / "cache"


@pytest.fixture(params=["cache", "listener"])
def cached_mirror(request, mirror, cache_dir, listener_mirror) -> tuple[Mirror, Path, str]:
    """(mirror, its cache directory, a name for the variant's repositories)."""
    if request.param == "cache":
        return mirror, cache_dir, request.param
    return (*listener_mirror, request.param)


@pytest.mark.parametrize("client", ["containerd", "podman"])
def test_a_client_pulls_through_a_cdn_cutting_every_blob_at_10_50_and_99_percent(client, cached_mirror, cutting_cdn,
                                                                                 request, tmp_path):
    """containerd and podman check the layer against its digest themselves."""
    (mirror, cache, variant), upstream = cached_mirror, cutting_cdn
    repo = f"team/r-{client}-{variant}"
    digest, size = fresh_blob(upstream, tmp_path, repo, 4 * 1024 * 1024)
    before = resumes(mirror).get("interrupted", 0)
    pull = ctr_pull if client == "containerd" else podman_pull
    pull(request.getfixturevalue(client), mirror, f"{mirror.host}/{repo}:1", digest)
    check_cut_three_times(upstream, digest, size)
    check_resumed_into_the_cache(mirror, cache, digest, size, before)


def test_containerd_podman_and_skopeo_follow_one_cut_download(mirror, cutting_cdn, cache_dir, containerd, podman,
                                                               tmp_path):
    """Three real clients pull the same new image at once, the CDN slow enough that each asks for
    the layer before its download ends: one download, cut three times and resumed, followed by all
    three (one answer a cache miss, two hits that started before the miss ended)."""
    upstream = cutting_cdn
    repo = "team/r-together"
    digest, size = fresh_blob(upstream, tmp_path, repo, 12 * 1024 * 1024)
    ref = f"{mirror.host}/{repo}:1"
    before = resumes(mirror).get("interrupted", 0)
    failures: list[BaseException] = []

    def run(pull, *args) -> None:
        try:
            pull(*args)
        except BaseException as e:  # noqa: BLE001 - reported in the main thread
            failures.append(e)

    def skopeo_pull() -> None:
        pulled = copy(f"docker://{ref}", tmp_path / "skopeo")
        assert pulled.returncode == 0, pulled.stderr
        assert sha256_file(tmp_path / "skopeo" / digest[7:]) == digest

    threads = [threading.Thread(target=run, args=(ctr_pull, containerd, mirror, ref, digest)),
               threading.Thread(target=run, args=(podman_pull, podman, mirror, ref, digest)),
               threading.Thread(target=run, args=(skopeo_pull,))]
    with throttled_port(int(urlsplit(upstream.cdn_url).port), 4):  # about 3 s for the blob
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert not failures, failures
    check_cut_three_times(upstream, digest, size)  # one download for the three clients
    check_resumed_into_the_cache(mirror, cache_dir, digest, size, before)
    answers = blob_answers(mirror, repo, digest, size)
    assert sorted(cache for _, _, cache in answers) == ["hit", "hit", "miss"], answers
    download_done = next(end for _, end, cache in answers if cache == "miss")
    assert all(start < download_done for start, _, _ in answers), answers  # each followed it, none came after


ANSWER = re.compile(r"^\[(\d+):(\d+):([\d.]+)\] pull .* GET blob (\S+) status=200 bytes=(\d+) time=([\d.]+)s cache=(\w+)")


def blob_answers(mirror: Mirror, repo: str, digest: str, size: int) -> list[tuple[float, float, str]]:
    """The mirror's whole answers of a blob, from its access log: (start, end, cache) in seconds
    of the day (the log's clock; a test running across midnight would fail the comparison)."""
    out = []
    for line in mirror.log_text().splitlines():
        m = ANSWER.match(line)
        if m and m.group(4) == f"{repo}@{digest}" and int(m.group(5)) == size:
            end = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
            out.append((end - float(m.group(6)), end, m.group(7)))
    return out


def test_a_cdn_cutting_every_attempt_fails_every_client_and_caches_nothing(mirror, upstream, cache_dir, tmp_path):
    digest, size = fresh_blob(upstream, tmp_path, "team/r-always", 16 * 1024 * 1024)
    upstream.set_cdn_fault("cut", times=0, after=2 * 1024 * 1024)
    try:
        with throttled_port(int(urlsplit(upstream.cdn_url).port), 20):
            started = time.monotonic()
            results = several_clients(mirror, "team/r-always", digest, 3)
            took = time.monotonic() - started
    finally:
        upstream.clear_faults()
    for name, r in results.items():
        assert r["error"] is not None or r["status"] != 200 or len(r["bytes"]) < size, \
            f"{name} saw a complete-looking transfer"
        assert sha256_digest(r["bytes"]) != digest
    assert took < 60, "no hang"
    assert nothing_left(cache_dir, digest)
    gets = blob_gets(upstream, digest)
    # one download the clients follow; on a loaded machine a client may come only after it failed,
    # and start the next one: each download is one whole GET and at most 5 resumes
    starts = [r for r in gets if not r["range"]]
    assert 1 <= len(starts) <= 3, f"{len(starts)} downloads for 3 clients"
    assert len(starts) + 1 <= len(gets) <= (1 + 5) * len(starts), \
        f"resumes bounded: {len(gets)} CDN GETs for {len(starts)} downloads"
    assert "not resumed again after" in mirror.log_text()
    again: dict = {}
    fetch(mirror, "team/r-always", digest, again, "after")  # the CDN works again: a new download, whole
    assert again["after"]["status"] == 200 and sha256_digest(again["after"]["bytes"]) == digest
    assert cached(cache_dir, digest)


def test_without_a_cache_each_client_sees_one_200_of_the_whole_blob(uncached_mirror, cutting_cdn, tmp_path):
    upstream, mirror = cutting_cdn, uncached_mirror
    digest, size = fresh_blob(upstream, tmp_path, "team/r-nocache", 8 * 1024 * 1024)
    results: dict = {}
    fetch(mirror, "team/r-nocache", digest, results, "client")
    r = results["client"]
    assert r["error"] is None and r["status"] == 200 and r["history"] == [], r
    assert len(r["bytes"]) == size and sha256_digest(r["bytes"]) == digest
    check_cut_three_times(upstream, digest, size)
    assert resumes(mirror).get("interrupted", 0) >= 3
    pulled = copy(f"docker://{mirror.host}/team/r-nocache:1", tmp_path / "pulled")  # its cuts were used up: plain
    assert pulled.returncode == 0, pulled.stderr
    assert sha256_file(tmp_path / "pulled" / digest[7:]) == digest


def test_without_a_cache_skopeo_pulls_through_cuts(uncached_mirror, cutting_cdn, tmp_path):
    upstream, mirror = cutting_cdn, uncached_mirror
    digest, size = fresh_blob(upstream, tmp_path, "team/r-nocache-skopeo", 4 * 1024 * 1024)
    pulled = copy(f"docker://{mirror.host}/team/r-nocache-skopeo:1", tmp_path / "pulled")
    assert pulled.returncode == 0, pulled.stderr
    assert sha256_file(tmp_path / "pulled" / digest[7:]) == digest
    check_cut_three_times(upstream, digest, size)


def test_without_a_cache_a_cdn_cutting_every_attempt_is_a_failed_transfer(uncached_mirror, upstream, tmp_path):
    mirror = uncached_mirror
    digest, size = fresh_blob(upstream, tmp_path, "team/r-nocache-always", 8 * 1024 * 1024)
    upstream.set_cdn_fault("cut", times=0, after=1024 * 1024)
    try:
        results: dict = {}
        fetch(mirror, "team/r-nocache-always", digest, results, "client")
    finally:
        upstream.clear_faults()
    r = results["client"]
    assert r["error"] is not None or len(r["bytes"]) < size, "a complete-looking transfer"
    assert sha256_digest(r["bytes"]) != digest
    assert r["seconds"] < 30
    assert "Traceback" not in mirror.log_text()


SIGN_TTL = 3  # seconds a signed CDN URL of ``short_signing_upstream`` lives (1 s after the second 2 s)


@pytest.fixture(scope="module")
def short_signing_upstream(tmp_path_factory, test_ca):
    """An upstream whose registry signs CDN URLs for SIGN_TTL seconds only."""
    from tests.conftest import running_upstream

    yield from running_upstream(tmp_path_factory.mktemp("short-signing"), lambda up: {}, ca=test_ca,
                                cdn_sign_ttl=SIGN_TTL)


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "no-cache"])
def test_a_signed_url_expiring_mid_transfer_is_resumed_from_a_fresh_redirect(short_signing_upstream, cache, tmp_path):
    """The CDN cuts at 50% after a pause longer than the URL's life: the resume from the same URL
    is refused (403, a real expiry), the registry gives a fresh redirect, the rest comes from it."""
    upstream = short_signing_upstream
    repo = f"team/r-expiry-{'cache' if cache else 'stream'}"
    digest, size = fresh_blob(upstream, tmp_path, repo, 8 * 1024 * 1024)
    options = {"hub_cache_dir": str(tmp_path / "cache")} if cache else {}
    with Mirror(tmp_path / "mirror", upstream, options=options) as mirror:
        upstream.set_cdn_fault("cutat", times=0, at="0.5", seconds=SIGN_TTL + 1.5)
        try:
            results: dict = {}
            fetch(mirror, repo, digest, results, "client")
        finally:
            upstream.clear_faults()
        r = results["client"]
        assert r["error"] is None and r["status"] == 200, r
        assert sha256_digest(r["bytes"]) == digest
        gets = blob_gets(upstream, digest, min_count=3)
        assert [(g["status"], g["range"]) for g in gets] == [
            (200, None), (403, f"bytes={size // 2}-"), (206, f"bytes={size // 2}-")], gets
        assert gets[1]["reason"] == "request has expired"  # the signature's own expiry, not an injected 403
        probes = [e for e in upstream.edge_requests() if e["method"] == "GET" and e["path"].endswith(digest)]
        assert len(probes) == 2, probes  # the first redirect and the fresh one
        assert resumes(mirror).get("expired", 0) == 1
        if cache:
            assert cached(tmp_path / "cache", digest)
