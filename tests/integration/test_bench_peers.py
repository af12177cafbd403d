"""The blob benchmark's own parts work: nginx as the reference pull-through
mirror (bench/nginx_peer.py: tokens through its /token, the registry's 307
followed inside nginx, blobs cached) and the tc throttle of the CDN's answers
(tests/support/throttle.py)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time

import httpx
import pytest

from bench.nginx_peer import NginxPeer
from tests.support.images import make_big_layer, push_image
from tests.support.throttle import STATE_DIR, throttled_port, throttles_active

from .test_mirror import copy, sha256_file

REPO, TAG = "bench/peer", "1.0"
LAYER_BYTES = 4 << 20


@pytest.fixture(scope="module")
def peer_image(upstream, tmp_path_factory) -> dict:
    """``bench/peer:1.0`` in the session upstream: one 4 MiB uncompressed layer."""
    layer = tmp_path_factory.mktemp("peer-layer") / "layer.tar"
    make_big_layer(layer, LAYER_BYTES, seed=b"bench-peer")
    try:
        return push_image(upstream, REPO, TAG, [layer], media="oci")
    finally:
        layer.unlink()


def token(base_url: str, service: str) -> str:
    r = httpx.get(f"{base_url}/token", params={"service": service, "scope": f"repository:{REPO}:pull"}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["token"]


def get_blob(base_url: str, digest: str, tok: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {tok}"} if tok else {}
    return httpx.get(f"{base_url}/v2/{REPO}/blobs/{digest}", headers=headers, timeout=30)


def new_cdn_requests(upstream, before: int) -> list[dict]:
    time.sleep(0.3)  # the CDN logs a request after its body went out
    return upstream.cdn_requests()[before:]


def test_nginx_peer_pulls_through_and_caches_blobs(upstream, peer_image, tmp_path):
    layer = peer_image["layer_digests"][0]
    with NginxPeer(tmp_path / "nginx", upstream.api_url, upstream.token_realm, ca_cert=upstream.ca_cert) as peer:
        r = httpx.get(f"{peer.url}/v2/", timeout=10)
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith(f'Bearer realm="{peer.url}/token",')
        # a blob request without a token gets the registry's challenge, realm rewritten too
        r = get_blob(peer.url, peer_image["config_digest"], None)
        assert r.status_code == 401
        assert f'realm="{peer.url}/token"' in r.headers["www-authenticate"]

        tok = token(peer.url, upstream.service)
        before = len(upstream.cdn_requests())
        cold = get_blob(peer.url, layer, tok)
        assert cold.status_code == 200 and cold.headers["x-cache-status"] == "MISS"
        assert "sha256:" + hashlib.sha256(cold.content).hexdigest() == layer
        fetched = new_cdn_requests(upstream, before)
        assert [(r["status"], r["bytes"], r["authorization_present"]) for r in fetched] == [(200, peer_image["layer_sizes"][0], False)]

        before = len(upstream.cdn_requests())
        warm = get_blob(peer.url, layer, tok)
        assert warm.status_code == 200 and warm.headers["x-cache-status"] == "HIT"
        assert warm.content == cold.content
        assert new_cdn_requests(upstream, before) == []

        # a real client: skopeo finds /token from the challenge and checks every digest
        tokens_before = len(upstream.token_requests())
        result = copy(f"docker://{peer.host}/{REPO}:{TAG}", tmp_path / "out")
        assert result.returncode == 0, result.stderr
        assert sha256_file(tmp_path / "out" / "manifest.json") == peer_image["digest"]
        assert len(upstream.token_requests()) > tokens_before
        assert "[emerg]" not in peer.log_tail() and "[crit]" not in peer.log_tail()
    assert peer.proc.poll() is not None and peer.pids() == []


def test_nginx_peer_verifies_upstream_tls(upstream, peer_image, tmp_path):
    """The peer verifies the HTTPS upstream (registry, token service, CDN) against the CA it is
    given (proxy_ssl_trusted_certificate): the test CA works (above), the system's CAs do not."""
    with NginxPeer(tmp_path / "system-cas", upstream.api_url, upstream.token_realm) as peer:
        assert httpx.get(f"{peer.url}/v2/", timeout=10).status_code == 502
        assert "upstream SSL certificate verify error" in peer.log_tail()


def timed_cdn_download(upstream, digest: str) -> float:
    url = upstream.sign_cdn_url(upstream.blob_storage_path(digest))
    p = subprocess.run(["curl", "-sS", "--fail", "--cacert", str(upstream.ca_cert), "-o", "/dev/null",
                        "-w", "%{time_total}", url],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return float(p.stdout)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("tc") is None, reason="tc on lo needs root and iproute2")
def test_throttle_slows_only_inside_the_block_and_always_goes(upstream, peer_image):
    layer = peer_image["layer_digests"][0]
    cdn_port = int(upstream.cdn_url.rsplit(":", 1)[1])
    assert timed_cdn_download(upstream, layer) < 0.1  # 4 MiB over loopback: milliseconds
    with throttled_port(cdn_port, 20):
        assert throttles_active(cdn_port)
        assert timed_cdn_download(upstream, layer) > 0.15  # 4.2 MB at 20 MB/s: 0.21 s
    assert not throttles_active(cdn_port)
    assert timed_cdn_download(upstream, layer) < 0.1

    with pytest.raises(RuntimeError, match="inside"):
        with throttled_port(cdn_port, 20):
            raise RuntimeError("a failure inside the block")
    assert not throttles_active(cdn_port)
    assert cdn_port not in [json.loads(f.read_text())["port"] for f in STATE_DIR.glob("*.json")]
