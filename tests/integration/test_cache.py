"""The pull-through cache end to end: skopeo -> mitmdump with the addon and
hub_cache_dir -> the Docker-Hub-shaped upstream, whose CDN and edge logs show
what reached the upstream."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import httpx
import pytest

from tests.support.images import fresh_blob, make_big_layer, push_image
from tests.support.mirror import Mirror
from tests.support.upstream import Upstream
from tests.support.images import standard_images

from .test_mirror import copy, sha256_file


def blob_digests(image: dict) -> set[str]:
    images = image.get("manifests", {"": image}).values()
    return {d for img in images for d in [img["config_digest"], *img["layer_digests"]]}


def cdn_count(upstream, before: int = 0, expected: int | None = None) -> int:
    # the CDN logs a request after its body is sent: wait for the expected ones
    return len(upstream.cdn_requests(min_count=before + (expected or 0), timeout=5 if expected else 0.5))


def manifest_gets(upstream) -> int:
    return sum(1 for e in upstream.edge_requests() if e["method"] == "GET" and "/manifests/" in e["path"])


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def mirror(upstream, cache_dir, tmp_path_factory):
    with Mirror(tmp_path_factory.mktemp("cached-mirror"), upstream, options={"hub_cache_dir": str(cache_dir)}) as m:
        yield m


def test_cold_pull_fetches_each_blob_once_warm_pull_touches_no_cdn(mirror, upstream, tmp_path):
    image = upstream.images["library/busybox"]
    blobs = blob_digests(image)
    cdn_before, gets_before = cdn_count(upstream), manifest_gets(upstream)

    cold = copy(f"docker://{mirror.host}/library/busybox:latest", tmp_path / "cold", "--all")
    assert cold.returncode == 0, cold.stderr
    requests = upstream.cdn_requests(min_count=cdn_before + len(blobs))[cdn_before:]
    assert len(requests) == len(blobs), requests
    assert len({r["path"] for r in requests}) == len(blobs)

    cdn_after_cold, gets_after_cold = cdn_count(upstream), manifest_gets(upstream)
    assert gets_after_cold > gets_before
    warm = copy(f"docker://{mirror.host}/library/busybox:latest", tmp_path / "warm", "--all")
    assert warm.returncode == 0, warm.stderr
    assert sha256_file(tmp_path / "warm" / "manifest.json") == image["digest"]
    for digest in blobs:
        assert sha256_file(tmp_path / "warm" / digest.split(":")[1]) == digest
    assert cdn_count(upstream) == cdn_after_cold, "a warm pull must not reach the CDN"
    assert manifest_gets(upstream) == gets_after_cold, "a warm pull resolves tags with HEAD only"


def test_cache_hit_range_and_headers(mirror, upstream):
    image = upstream.images["library/busybox"]
    layer = next(iter(image["manifests"].values()))["layer_digests"][0]
    token = httpx.get(f"{mirror.url}/token", params={"service": upstream.service, "scope": "repository:library/busybox:pull"}).json()["token"]
    r = httpx.get(f"{mirror.url}/v2/library/busybox/blobs/{layer}", headers={"Authorization": f"Bearer {token}", "Range": "bytes=0-9"})
    assert r.status_code == 206
    assert r.headers["x-hub-cache"] == "hit"
    assert r.headers["docker-content-digest"] == layer
    assert len(r.content) == 10


def test_corrupted_cache_file_is_never_served(mirror, upstream, cache_dir, tmp_path):
    image = upstream.images["library/busybox"]
    first = copy(f"docker://{mirror.host}/library/busybox:latest", tmp_path / "first", "--all")
    assert first.returncode == 0, first.stderr
    layer = next(iter(image["manifests"].values()))["layer_digests"][0]
    cached = cache_dir / "blobs" / "sha256" / layer[7:9] / layer[7:]
    assert cached.exists()
    with open(cached, "r+b") as f:
        f.seek(cached.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    before = cdn_count(upstream)
    again = copy(f"docker://{mirror.host}/library/busybox:latest", tmp_path / "again", "--all")
    assert again.returncode == 0, again.stderr
    assert sha256_file(tmp_path / "again" / layer[7:]) == layer
    refetched = upstream.cdn_requests(min_count=before + 1)[before:]
    assert [r["path"].rsplit("/", 2)[-2] for r in refetched] == [layer[7:]]
    assert sha256_file(cached) == layer  # replaced by a verified copy


def test_private_blobs_stay_private_when_cached(mirror, upstream, tmp_path):
    image = upstream.images["private/secret"]
    password = upstream.users["alice"]
    ok = copy(f"docker://{mirror.host}/private/secret:1.0", tmp_path / "alice", "--src-creds", f"alice:{password}")
    assert ok.returncode == 0, ok.stderr
    anonymous = copy(f"docker://{mirror.host}/private/secret:1.0", tmp_path / "anon", "--src-no-creds")
    assert anonymous.returncode != 0
    # cached now, but not for a client without access to the repository...
    layer = image["layer_digests"][0]
    token = httpx.get(f"{mirror.url}/token", params={"service": upstream.service, "scope": "repository:private/secret:pull"}).json()["token"]
    r = httpx.get(f"{mirror.url}/v2/private/secret/blobs/{layer}", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 401
    # ...nor through another repository the client may pull (same digest, other repository)
    token = httpx.get(f"{mirror.url}/token", params={"service": upstream.service, "scope": "repository:library/busybox:pull"}).json()["token"]
    r = httpx.get(f"{mirror.url}/v2/library/busybox/blobs/{layer}", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 404
    assert r.json()["errors"][0]["code"]
    r = httpx.get(f"{mirror.url}/v2/library/busybox/manifests/{image['digest']}",
                  headers={"Authorization": f"Bearer {token}", "Accept": image["media_type"]})
    assert r.status_code in (401, 404)


def test_concurrent_pulls_of_one_uncached_blob_fetch_it_once(mirror, upstream, tmp_path):
    layer_path = tmp_path / "layer.tar"
    digest, size = make_big_layer(layer_path, 32 * 1024 * 1024, seed=b"concurrent")
    push_image(upstream, "team/concurrent", "1", [layer_path], media="oci")
    token = httpx.get(f"{mirror.url}/token", params={"service": upstream.service, "scope": "repository:team/concurrent:pull"}).json()["token"]
    before = cdn_count(upstream)

    async def pull(client: httpx.AsyncClient) -> str:
        h = hashlib.sha256()
        async with client.stream("GET", f"{mirror.url}/v2/team/concurrent/blobs/{digest}",
                                 headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status_code == 200
            async for chunk in r.aiter_bytes():
                h.update(chunk)
        return "sha256:" + h.hexdigest()

    async def all_pulls():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=40)) as client:
            return await asyncio.gather(*(pull(client) for _ in range(20)))

    results = asyncio.run(all_pulls())
    assert results == [digest] * 20
    requests = upstream.cdn_requests(min_count=before + 1)[before:]
    assert [r for r in requests if digest[7:] in r["path"]] == requests
    assert len(requests) == 1, requests


def test_two_mirror_processes_share_one_cache(mirror, upstream, cache_dir, tmp_path):
    assert copy(f"docker://{mirror.host}/team/ociapp:1.0", tmp_path / "a").returncode == 0
    before = cdn_count(upstream)
    with Mirror(tmp_path / "second", upstream, options={"hub_cache_dir": str(cache_dir)}, name="second") as second:
        result = copy(f"docker://{second.host}/team/ociapp:1.0", tmp_path / "b")
        assert result.returncode == 0, result.stderr
        assert sha256_file(tmp_path / "b" / "manifest.json") == upstream.images["team/ociapp"]["digest"]
    assert cdn_count(upstream) == before


def test_cached_image_pulls_while_upstream_is_down(tmp_path):
    """On a plain-HTTP upstream (an in-house registry; the module's other tests use the HTTPS one):
    the cache fills, then serves while the upstream is gone."""
    with Upstream(tmp_path / "upstream", tls=False) as up:
        images = standard_images(up, big_size=1024 * 1024)
        with Mirror(tmp_path / "m", up, options={"hub_cache_dir": str(tmp_path / "cache"), "hub_cache_stale": "600"}) as m:
            ok = copy(f"docker://{m.host}/library/alpine:3.19", tmp_path / "before", "--all")
            assert ok.returncode == 0, ok.stderr
            up.stop()
            stale = copy(f"docker://{m.host}/library/alpine:3.19", tmp_path / "during", "--all")
            assert stale.returncode == 0, stale.stderr + m.log_text()[-3000:]
            assert sha256_file(tmp_path / "during" / "manifest.json") == images["library/alpine"]["digest"]
            token = httpx.get(f"{m.url}/token", params={"service": up.service, "scope": "repository:library/alpine:pull"}).json()["token"]
            r = httpx.get(f"{m.url}/v2/library/alpine/manifests/3.19",
                          headers=[("Authorization", f"Bearer {token}")] + [("Accept", images["library/alpine"]["media_type"])])
            assert r.status_code == 200
            assert r.headers["x-hub-cache"] == "stale"
            assert r.headers["warning"].startswith("110")
            # never pulled before: a clear error, no hang
            missing = copy(f"docker://{m.host}/team/ociapp:1.0", tmp_path / "missing")
            assert missing.returncode != 0
            r = httpx.get(f"{m.url}/v2/team/ociapp/manifests/1.0", headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 502
            assert r.json()["errors"][0]["code"] == "UNAVAILABLE"
            assert "Traceback" not in m.log_text()


def assert_nothing_cached(cache_dir: Path, digest: str) -> None:
    assert not (cache_dir / "blobs" / "sha256" / digest[7:9] / digest[7:]).exists()
    assert list((cache_dir / "tmp").glob("*.part")) == []


def test_cdn_cutting_the_blob_leaves_nothing_in_the_cache(mirror, upstream, cache_dir, tmp_path):
    digest, _ = fresh_blob(upstream, tmp_path, "team/cut", 8 * 1024 * 1024)
    # every blob GET cut: the mirror's fetch ahead of skopeo and skopeo's own request alike
    upstream.set_cdn_fault("cut", times=0, after=3 * 1024 * 1024)
    try:
        failed = copy(f"docker://{mirror.host}/team/cut:1", tmp_path / "failed")
        assert failed.returncode != 0
    finally:
        upstream.clear_faults()
    assert_nothing_cached(cache_dir, digest)
    ok = copy(f"docker://{mirror.host}/team/cut:1", tmp_path / "ok")
    assert ok.returncode == 0, ok.stderr
    assert sha256_file(tmp_path / "ok" / digest[7:]) == digest


def test_corrupted_upstream_bytes_end_as_a_failed_transfer(mirror, upstream, cache_dir, tmp_path):
    digest, _ = fresh_blob(upstream, tmp_path, "team/corrupt", 4 * 1024 * 1024)
    token = httpx.get(f"{mirror.url}/token", params={"service": upstream.service, "scope": "repository:team/corrupt:pull"}).json()["token"]
    upstream.set_cdn_fault("corrupt", times=1)
    try:
        received = 0
        with pytest.raises(httpx.HTTPError):
            with httpx.stream("GET", f"{mirror.url}/v2/team/corrupt/blobs/{digest}",
                              headers={"Authorization": f"Bearer {token}"}, timeout=30) as r:
                assert r.status_code == 200
                for chunk in r.iter_raw():
                    received += len(chunk)
        assert received < 4 * 1024 * 1024 + 10240  # never the whole, complete-looking body
    finally:
        upstream.clear_faults()
    assert_nothing_cached(cache_dir, digest)
    assert "does not match its digest" in mirror.log_text()


def test_podman_pulls_twice_second_from_cache(mirror, upstream, tmp_path):
    from .test_clients import Podman, need

    need("podman", "podman")
    image = upstream.images["library/alpine"]
    ref = f"{mirror.host}/library/alpine:3.19"

    def pull_into_empty_storage(storage: Path) -> None:
        podman = Podman(storage)
        try:
            pulled = podman("pull", "--tls-verify=false", ref)
            assert pulled.returncode == 0, pulled.stderr
            assert podman.inspect(ref)["Digest"] == image["digest"]
        finally:
            podman.close()

    pull_into_empty_storage(tmp_path / "first")
    cdn_before, gets_before = cdn_count(upstream), manifest_gets(upstream)
    pull_into_empty_storage(tmp_path / "second")  # everything comes from the mirror again
    assert cdn_count(upstream) == cdn_before
    assert manifest_gets(upstream) == gets_before
