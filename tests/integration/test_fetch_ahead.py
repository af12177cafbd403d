"""Fetching ahead of the client (hub_fetch_ahead, paths/ahead.py) against the Docker-Hub-shaped
upstream: once a client got a manifest, its blobs come into the cache without the client
asking, with its token at the registry and no credential at the CDN, and the client's own
requests then find them there and cost the upstream nothing."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import httpx
import pytest

from tests.support.images import push_image, push_index
from tests.support.mirror import Mirror

MANIFEST_TYPES = ", ".join([
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
])


@pytest.fixture(scope="module")
def mirror(upstream, tmp_path_factory):
    cache = tmp_path_factory.mktemp("ahead-cache")
    with Mirror(tmp_path_factory.mktemp("ahead-mirror"), upstream, options={"hub_cache_dir": str(cache)}) as m:
        yield m


def token(mirror: Mirror, service: str, repo: str) -> str:
    r = httpx.get(f"{mirror.url}/token", params={"service": service, "scope": f"repository:{repo}:pull"})
    return r.json()["token"]


def fresh(upstream, repo: str, arch: str = "amd64") -> dict:
    layers = [{f"data/{arch}-{i}.bin": os.urandom(n)} for i, n in enumerate((600_000, 300_000))]
    return push_image(upstream, repo, "1", layers, media="docker", arch=arch, compress=False)


def blobs_of(image: dict) -> list[str]:
    return [image["config_digest"], *image["layer_digests"]]


def cdn_gets_of(upstream, digests: list[str]) -> list[dict]:
    return [r for r in upstream.cdn_requests() if any(d[7:] in r["path"] for d in digests)]


def ahead_requests(mirror: Mirror) -> dict[str, float]:
    text = httpx.get(f"{mirror.url}/_hub/metrics").text
    out = {}
    for line in text.splitlines():
        if line.startswith("hub_ahead_requests_total{"):
            labels, value = line.rsplit(" ", 1)
            out[labels.split('kind="')[1].split('"')[0]] = float(value)
    return out


def wait_for(predicate, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_a_served_manifest_has_its_blobs_fetched_ahead_and_the_clients_requests_cost_nothing(mirror, upstream):
    image = fresh(upstream, "team/ahead")
    digests = blobs_of(image)
    bearer = token(mirror, upstream.service, "team/ahead")
    auth = {"Authorization": f"Bearer {bearer}"}
    r = httpx.get(f"{mirror.url}/v2/team/ahead/manifests/1", headers={**auth, "Accept": MANIFEST_TYPES})
    assert r.status_code == 200
    # the client has asked for nothing else yet
    assert wait_for(lambda: len(cdn_gets_of(upstream, digests)) == len(digests)), cdn_gets_of(upstream, digests)
    fetched = cdn_gets_of(upstream, digests)
    assert not any(rec["authorization_present"] for rec in fetched)  # never a credential at the CDN
    assert ahead_requests(mirror)["blob probe"] >= len(digests)
    time.sleep(0.3)
    edge_before, cdn_before = len(upstream.edge_requests()), len(upstream.cdn_requests())
    for digest in digests:
        for state in ("miss", "hit"):  # fetched for this client: its first request is the miss
            blob = httpx.get(f"{mirror.url}/v2/team/ahead/blobs/{digest}", headers=auth, timeout=30)
            assert blob.status_code == 200 and blob.headers["x-hub-cache"] == state
            assert "sha256:" + hashlib.sha256(blob.content).hexdigest() == digest
    time.sleep(0.5)
    assert len(upstream.cdn_requests()) == cdn_before
    assert len(upstream.edge_requests()) == edge_before  # confirmed by the fetches' own probes
    assert len(cdn_gets_of(upstream, digests)) == len(digests)  # one download each, in all
    assert "Traceback" not in mirror.log_text()


def test_a_client_the_registry_refuses_gets_nothing_fetched_for_it(mirror, upstream):
    """A cached manifest served to a client the upstream refuses is its upstream answer (no 200):
    nothing is fetched with its token, and the CDN sees nothing."""
    image = upstream.images["private/secret"]
    digests = blobs_of(image)
    anonymous = token(mirror, upstream.service, "private/secret")
    before = len(cdn_gets_of(upstream, digests))
    r = httpx.get(f"{mirror.url}/v2/private/secret/manifests/{image['digest']}",
                  headers={"Authorization": f"Bearer {anonymous}", "Accept": MANIFEST_TYPES})
    assert r.status_code in (401, 403, 404)
    time.sleep(1.0)
    assert len(cdn_gets_of(upstream, digests)) == before


def test_off_nothing_is_fetched_but_what_clients_ask_for(upstream, tmp_path):
    image = fresh(upstream, "team/not-ahead")
    options = {"hub_cache_dir": str(tmp_path / "cache"), "hub_fetch_ahead": "false"}
    with Mirror(tmp_path / "m", upstream, options=options) as m:
        bearer = token(m, upstream.service, "team/not-ahead")
        r = httpx.get(f"{m.url}/v2/team/not-ahead/manifests/1",
                      headers={"Authorization": f"Bearer {bearer}", "Accept": MANIFEST_TYPES})
        assert r.status_code == 200
        time.sleep(1.5)
        assert cdn_gets_of(upstream, blobs_of(image)) == []
        assert ahead_requests(m) == {}


def test_platform_manifests_are_fetched_ahead_only_from_registries_without_a_rate_limit(upstream, tmp_path):
    """Docker Hub counts manifest GETs (it says so in ratelimit headers: the edge does too): only
    the client's own. A registry that announces no limit (here distribution itself, behind no
    edge) gets the index's platform manifests fetched ahead, but never their layers: a client
    wants one platform of many."""
    arches = [fresh(upstream, "team/ahead-index", arch) for arch in ("amd64", "arm64")]
    index = push_index(upstream, "team/ahead-index", "multi", arches, media="docker")
    headers_for = lambda m: {"Authorization": f"Bearer {token(m, upstream.service, 'team/ahead-index')}",  # noqa: E731
                             "Accept": MANIFEST_TYPES}
    for url, expect_manifests in ((upstream.registry_url, True), (upstream, False)):
        cache = tmp_path / f"cache-{expect_manifests}"
        with Mirror(tmp_path / f"m-{expect_manifests}", url, upstream_ca=upstream.ca_cert,
                    options={"hub_cache_dir": str(cache)}) as m:
            r = httpx.get(f"{m.url}/v2/team/ahead-index/manifests/multi", headers=headers_for(m))
            assert r.status_code == 200 and r.headers["docker-content-digest"] == index["digest"]
            stored = lambda: all(manifest_file(cache, a["digest"]).exists() for a in arches)  # noqa: E731
            assert wait_for(stored, 5.0 if expect_manifests else 1.5) == expect_manifests
            counted = ahead_requests(m)
            assert counted.get("manifest", 0) == (len(arches) if expect_manifests else 0)
            assert counted.get("blob probe", 0) == 0  # no platform's layers: the client asked for none
            if expect_manifests:
                r = httpx.get(f"{m.url}/v2/team/ahead-index/manifests/{arches[1]['digest']}", headers=headers_for(m))
                assert r.status_code == 200 and r.headers["x-hub-cache"] == "hit"
            assert "Traceback" not in m.log_text()


def manifest_file(cache: Path, digest: str) -> Path:
    return cache / "manifests" / "sha256" / digest[7:9] / digest[7:]
