"""Self-check of the fake Docker Hub (tests/support): real clients against it.

These do not involve the mirror at all; they prove the upstream behaves like
Docker Hub so that the mirror's integration tests mean something.
"""

import hashlib
import http.client
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.support.images import ALL_MANIFEST_TYPES, DOCKER_LIST, OCI_INDEX, OCI_MANIFEST
from tests.support.skopeo import skopeo
from tests.support.token_server import decode_jwt_unverified

SKOPEO = shutil.which("skopeo")
needs_skopeo = pytest.mark.skipif(SKOPEO is None, reason="skopeo not installed")


def bearer(upstream, repo, user=None, actions="pull"):
    return {"Authorization": "Bearer " + upstream.get_token(f"repository:{repo}:{actions}", user=user)}


# ---------------------------------------------------------------- skopeo


@needs_skopeo
def test_skopeo_inspect_anonymous(upstream, upstream_images):
    r = skopeo("inspect", *upstream.skopeo_tls_args(""), "--no-creds", f"docker://{upstream.api_host}/library/alpine:3.19",
               "--raw")
    assert r.returncode == 0, r.stderr
    alpine = upstream_images["library/alpine"]
    assert r.stdout.encode() == alpine["manifest_bytes"]
    assert json.loads(r.stdout)["mediaType"] == DOCKER_LIST


@needs_skopeo
def test_skopeo_copy_all_through_edge_and_cdn(upstream, upstream_images, tmp_path):
    upstream.clear_logs()
    dest = tmp_path / "alpine"
    r = skopeo("copy", "--all", *upstream.skopeo_tls_args(), "--src-no-creds",
               f"docker://{upstream.api_host}/library/alpine:3.19", f"dir:{dest}")
    assert r.returncode == 0, r.stderr
    alpine = upstream_images["library/alpine"]
    blobs = {img["config_digest"] for img in alpine["manifests"].values()}
    blobs |= {d for img in alpine["manifests"].values() for d in img["layer_digests"]}
    for d in blobs:
        assert (dest / d.split(":", 1)[1]).exists(), d
    cdn = upstream.cdn_requests(min_count=len(blobs))
    served = [c for c in cdn if c["status"] == 200]
    assert len(served) >= len(blobs)
    # skopeo (Go net/http) drops Authorization on the cross-port redirect
    assert not any(c["authorization_present"] for c in cdn), cdn
    assert all(c["has_query_signature"] for c in cdn)
    edge = upstream.edge_requests()
    assert any(e.get("signed_redirect") for e in edge)
    assert all(e["status"] != 400 for e in edge)


@needs_skopeo
def test_skopeo_private_needs_alice(upstream, tmp_path):
    ref = f"docker://{upstream.api_host}/private/secret:1.0"
    r = skopeo("copy", *upstream.skopeo_tls_args(), "--src-no-creds", ref, f"dir:{tmp_path / 'anon'}")
    assert r.returncode != 0
    assert "unauthorized" in r.stderr.lower() or "authentication required" in r.stderr.lower(), r.stderr
    r = skopeo("copy", *upstream.skopeo_tls_args(), "--src-creds", f"alice:{upstream.users['alice']}", ref,
               f"dir:{tmp_path / 'alice'}")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "alice" / "manifest.json").exists()
    # no secret ever reaches our logs
    for path in (upstream.token_log_path, upstream.edge_log_path, upstream.cdn_log_path):
        assert upstream.users["alice"] not in path.read_text()


@needs_skopeo
def test_skopeo_big_image(upstream, upstream_images, tmp_path):
    big = upstream_images["library/big"]
    dest = tmp_path / "big"
    r = skopeo("copy", *upstream.skopeo_tls_args(), "--src-no-creds", f"docker://{upstream.api_host}/library/big:1.0",
               f"dir:{dest}", timeout=300)
    assert r.returncode == 0, r.stderr
    layer = dest / big["big_layer_digest"].split(":", 1)[1]
    assert layer.stat().st_size == big["big_layer_size"]


# ---------------------------------------------------------------- registry protocol


def test_challenge_like_docker_hub(upstream):
    r = httpx.get(f"{upstream.api_url}/v2/", verify=upstream.verify)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == \
        f'Bearer realm="{upstream.token_realm}",service="{upstream.service}"'
    r = httpx.get(f"{upstream.api_url}/v2/library/alpine/manifests/3.19", verify=upstream.verify)
    assert r.status_code == 401
    assert 'scope="repository:library/alpine:pull"' in r.headers["www-authenticate"]
    assert "ratelimit-limit" not in r.headers


def test_manifest_accept_and_ratelimit(upstream, upstream_images):
    h = bearer(upstream, "library/busybox")
    before = upstream.get_ratelimit()["remaining"]
    # repeated Accept headers must reach distribution intact (the index needs the OCI type)
    headers = [("Authorization", h["Authorization"])] + [("Accept", t) for t in ALL_MANIFEST_TYPES]
    with httpx.Client(verify=upstream.verify) as c:
        r = c.get(f"{upstream.api_url}/v2/library/busybox/manifests/latest", headers=headers)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == OCI_INDEX
        assert r.content == upstream_images["library/busybox"]["manifest_bytes"]
        assert r.headers["docker-content-digest"] == upstream_images["library/busybox"]["digest"]
        assert r.headers["ratelimit-limit"] == "100;w=21600"
        assert r.headers["ratelimit-remaining"] == f"{max(before - 1, 0)};w=21600"
        assert r.headers["docker-ratelimit-source"] == "127.0.0.1"
        r = c.head(f"{upstream.api_url}/v2/library/busybox/manifests/latest", headers=headers)
        assert r.status_code == 200
        assert int(r.headers["content-length"]) == upstream_images["library/busybox"]["size"]
        assert r.headers["ratelimit-remaining"] == f"{max(before - 1, 0)};w=21600"  # HEAD is free
    edge = upstream.edge_requests()
    assert any(e["accept"] == ALL_MANIFEST_TYPES for e in edge)


def test_oci_manifest_needs_oci_accept(upstream, upstream_images):
    """distribution 2.8 quirk: an OCI manifest is 404 unless Accept allows OCI."""
    h = bearer(upstream, "team/ociapp")
    url = f"{upstream.api_url}/v2/team/ociapp/manifests/1.0"
    assert httpx.get(url, headers=h, verify=upstream.verify).status_code == 404
    r = httpx.get(url, headers={**h, "Accept": OCI_MANIFEST}, verify=upstream.verify)
    assert r.status_code == 200 and r.content == upstream_images["team/ociapp"]["manifest_bytes"]


def test_ratelimit_enforcement(upstream):
    h = {**bearer(upstream, "team/ociapp"), "Accept": OCI_MANIFEST}
    url = f"{upstream.api_url}/v2/team/ociapp/manifests/1.0"
    try:
        upstream.set_ratelimit(1, enforce=True)
        assert httpx.get(url, headers=h, verify=upstream.verify).status_code == 200
        r = httpx.get(url, headers=h, verify=upstream.verify)
        assert r.status_code == 429
        assert r.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
        assert r.headers["ratelimit-remaining"] == "0;w=21600"
        assert httpx.head(url, headers=h, verify=upstream.verify).status_code == 200  # HEAD does not count
    finally:
        upstream.set_ratelimit(100, enforce=False)


def test_blob_redirect_is_signed_and_served(upstream, upstream_images):
    img = upstream_images["team/ociapp"]
    digest = img["layer_digests"][0]
    h = bearer(upstream, "team/ociapp")
    for method in ("HEAD", "GET"):
        r = httpx.request(method, f"{upstream.api_url}/v2/team/ociapp/blobs/{digest}", headers=h, verify=upstream.verify)
        assert r.status_code == 307, (method, r.status_code, r.text)
        loc = r.headers["location"]
        assert loc.startswith(upstream.cdn_url + upstream.blob_storage_path(digest) + "?expires=")
        assert "&signature=" in loc
    body = httpx.get(loc, verify=upstream.verify).content
    assert "sha256:" + hashlib.sha256(body).hexdigest() == digest
    # the same via the direct registry port is NOT signed (and so refused by the CDN)
    r = httpx.get(f"{upstream.registry_url}/v2/team/ociapp/blobs/{digest}", headers=h, verify=upstream.verify)
    assert r.status_code == 307 and "signature=" not in r.headers["location"]
    assert httpx.get(r.headers["location"], verify=upstream.verify).status_code == 403


def test_push_through_edge_chunked_and_keepalive(upstream):
    """Uploads work through the edge too (POST/PATCH chunked/PUT) on one connection."""
    repo = "selfcheck/upload"
    h = bearer(upstream, repo, user="admin", actions="pull,push")
    data = b"edge-upload-" * 5000
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with httpx.Client(base_url=upstream.api_url, verify=upstream.verify) as c:
        r = c.post(f"/v2/{repo}/blobs/uploads/", headers=h)
        assert r.status_code == 202, r.text
        loc = r.headers["location"]
        assert loc.startswith(upstream.api_url) or loc.startswith("/")  # Host was forwarded intact

        def gen():
            for i in range(0, len(data), 7000):
                yield data[i:i + 7000]

        r = c.patch(loc, content=gen(), headers={**h, "Content-Type": "application/octet-stream"})
        assert r.status_code == 202, r.text
        loc = r.headers["location"]
        r = c.put(loc + ("&" if "?" in loc else "?") + "digest=" + digest, headers=h)
        assert r.status_code == 201, r.text
        r = c.head(f"/v2/{repo}/blobs/{digest}", headers=h)
        assert r.status_code == 307


# ---------------------------------------------------------------- token server


def test_token_server_users_and_grants(upstream):
    realm, svc = upstream.token_realm, upstream.service
    r = httpx.get(realm, verify=upstream.verify, params={"service": svc, "scope": "repository:private/secret:pull"},
                  auth=("alice", "wrong"))
    assert r.status_code == 401
    assert r.json() == {"details": "incorrect username or password"}

    # anonymous: private scope silently left out (200, empty grant)
    r = httpx.get(realm, verify=upstream.verify, params=[("service", svc), ("scope", "repository:private/secret:pull"),
                                 ("scope", "repository:library/alpine:pull,push")])
    assert r.status_code == 200
    body = r.json()
    assert body["token"] == body["access_token"] and body["expires_in"] == 300 and "issued_at" in body
    header, claims = decode_jwt_unverified(body["token"])
    assert header["alg"] == "RS256" and header["x5c"]
    assert claims["aud"] == svc and claims["sub"] == ""
    assert {a["name"]: a["actions"] for a in claims["access"]} == {"private/secret": [],
                                                                    "library/alpine": ["pull"]}

    # alice, offline token, then OAuth2 refresh
    r = httpx.get(realm, verify=upstream.verify, params={"service": svc, "scope": "repository:private/secret:pull",
                                 "offline_token": "true", "client_id": "selfcheck"},
                  auth=("alice", upstream.users["alice"]))
    assert r.status_code == 200
    refresh = r.json()["refresh_token"]
    r = httpx.post(realm, verify=upstream.verify, data={"grant_type": "refresh_token", "refresh_token": refresh, "client_id": "selfcheck",
                                "service": svc, "scope": "repository:private/secret:pull"})
    assert r.status_code == 200, r.text
    _, claims = decode_jwt_unverified(r.json()["access_token"])
    assert claims["sub"] == "alice" and claims["access"][0]["actions"] == ["pull"]

    # OAuth2 password grant
    r = httpx.post(realm, verify=upstream.verify, data={"grant_type": "password", "username": "alice", "password": upstream.users["alice"],
                                "client_id": "selfcheck", "access_type": "offline", "service": svc,
                                "scope": "repository:private/secret:pull repository:x/y:push"})
    assert r.status_code == 200 and r.json()["refresh_token"]
    _, claims = decode_jwt_unverified(r.json()["access_token"])
    assert {a["name"]: a["actions"] for a in claims["access"]} == {"private/secret": ["pull"], "x/y": []}
    r = httpx.post(realm, verify=upstream.verify, data={"grant_type": "password", "username": "alice", "password": "nope",
                                "client_id": "selfcheck", "service": svc})
    assert r.status_code == 401

    log = upstream.token_requests()
    text = upstream.token_log_path.read_text()
    assert upstream.users["alice"] not in text and refresh not in text
    assert any(rec["auth_scheme"] == "Basic" and rec["account"] == "alice" for rec in log)


def test_admin_token_grants_everything(upstream):
    tok = upstream.get_token("repository:library/alpine:pull,push,delete,*", user="admin")
    _, claims = decode_jwt_unverified(tok)
    assert claims["access"][0]["actions"] == ["pull", "push", "delete", "*"]


# ---------------------------------------------------------------- CDN


def test_cdn_refuses_unsigned_and_authorization(upstream, upstream_images):
    digest = upstream_images["team/ociapp"]["config_digest"]
    path = upstream.blob_storage_path(digest)
    assert httpx.get(upstream.cdn_url + path, verify=upstream.verify).status_code == 403
    url = upstream.sign_cdn_url(path)
    assert httpx.get(url.replace("signature=", "signature=00"), verify=upstream.verify).status_code == 403
    assert httpx.get(upstream.sign_cdn_url(path, ttl=-5), verify=upstream.verify).status_code == 403  # expired
    r = httpx.get(url, headers={"Authorization": "Bearer abc"}, verify=upstream.verify)
    assert r.status_code == 400
    assert "Only one auth mechanism allowed" in r.text
    r = httpx.get(url, verify=upstream.verify)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.content == upstream_images["team/ociapp"]["config_bytes"]
    assert r.headers["etag"] == f'"{digest.split(":")[1]}"'
    assert httpx.get(upstream.sign_cdn_url("/docker/registry/v2/blobs/sha256/00/nothere/data"), verify=upstream.verify).status_code == 404
    recs = upstream.cdn_requests()
    assert any(rec["status"] == 400 and rec["authorization_present"] for rec in recs)
    assert "abc" not in upstream.cdn_log_path.read_text()


def test_cdn_ranges(upstream, upstream_images):
    big = upstream_images["library/big"]
    size = big["big_layer_size"]
    url = upstream.sign_cdn_url(upstream.blob_storage_path(big["big_layer_digest"]))
    with httpx.Client(verify=upstream.verify) as c:
        r = c.get(url, headers={"Range": "bytes=10-19"})
        assert r.status_code == 206 and len(r.content) == 10
        assert r.headers["content-range"] == f"bytes 10-19/{size}"
        tail = c.get(url, headers={"Range": "bytes=-100"})
        assert tail.status_code == 206 and len(tail.content) == 100
        assert tail.headers["content-range"] == f"bytes {size - 100}-{size - 1}/{size}"
        r = c.get(url, headers={"Range": f"bytes={size - 5}-"})
        assert r.status_code == 206 and r.content == tail.content[-5:]
        r = c.get(url, headers={"Range": f"bytes={size}-"})
        assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{size}"
        r = c.head(url)
        assert r.status_code == 200 and int(r.headers["content-length"]) == size
        assert r.headers["accept-ranges"] == "bytes"
        r = c.get(url, headers={"If-None-Match": r.headers["etag"]})
        assert r.status_code == 304


def test_cdn_streams_full_blob(upstream, upstream_images):
    big = upstream_images["library/big"]
    url = upstream.sign_cdn_url(upstream.blob_storage_path(big["big_layer_digest"]))
    h = hashlib.sha256()
    n = 0
    t0 = time.monotonic()
    with httpx.stream("GET", url, timeout=120, verify=upstream.verify) as r:
        assert r.status_code == 200
        for chunk in r.iter_raw(1 << 20):
            h.update(chunk)
            n += len(chunk)
    assert n == big["big_layer_size"]
    assert "sha256:" + h.hexdigest() == big["big_layer_digest"]
    assert time.monotonic() - t0 < 60


def test_processes_are_local_and_alive(upstream):
    for url in (upstream.api_url, upstream.cdn_url, upstream.token_realm):
        assert url.startswith("https://127.0.0.1:")
    assert upstream.registry_url.startswith("http://127.0.0.1:")  # distribution: loopback only, behind the edge
    assert upstream.running
    port = int(upstream.api_url.rsplit(":", 1)[1])
    with socket.socket() as s:
        s.settimeout(1)
        assert s.connect_ex(("127.0.0.1", port)) == 0


# ---------------------------------------------------------------- transport (TLS, ALPN)


def _negotiate(url: str, alpn: list[str], context=None) -> tuple[str | None, str]:
    """(ALPN protocol, TLS version) a client offering ``alpn`` gets from ``url``'s host."""
    import ssl

    u = urlsplit(url)
    ctx = context or ssl.create_default_context()
    ctx.set_alpn_protocols(alpn)
    with socket.create_connection((u.hostname, u.port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=u.hostname) as tls:
            return tls.selected_alpn_protocol(), tls.version()


def _fresh_context(upstream):
    import ssl

    return ssl.create_default_context(cafile=str(upstream.ca_cert))


def test_every_host_a_client_is_sent_to_is_https_with_a_verified_certificate(upstream):
    """The edge, the token service and the CDN speak HTTPS only, with certificates of the
    session's test CA: unverified by the system's CAs, verified by the test CA, for 127.0.0.1
    and localhost; plain HTTP on those ports gets nothing (the CDN's nginx: 400)."""
    import ssl

    urls = {"edge": upstream.api_url + "/v2/", "token": upstream.token_realm, "cdn": upstream.cdn_url + "/"}
    for name, url in urls.items():
        assert url.startswith("https://127.0.0.1:"), name
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(url, timeout=5)  # the system's CAs do not know ours
        assert httpx.get(url, timeout=5, verify=upstream.verify).status_code < 500, name
        assert httpx.get(url.replace("127.0.0.1", "localhost"), timeout=5, verify=upstream.verify).status_code < 500
        try:  # plain HTTP: the Python servers' handshake fails, nginx answers 400
            assert httpx.get(url.replace("https://", "http://"), timeout=5).status_code == 400, name
        except httpx.HTTPError:
            pass
    with pytest.raises(ssl.SSLCertVerificationError):  # a name the certificate does not hold
        ctx = _fresh_context(upstream)
        u = urlsplit(upstream.api_url)
        with socket.create_connection((u.hostname, u.port), timeout=5) as raw:
            ctx.wrap_socket(raw, server_hostname="registry-1.docker.io")


def test_alpn_like_docker_hub(upstream):
    """The CDN offers HTTP/2 and HTTP/1.1 (Cloudflare); registry and token hosts HTTP/1.1 only."""
    both = ["h2", "http/1.1"]
    assert _negotiate(upstream.cdn_url, both, _fresh_context(upstream))[0] == "h2"
    assert _negotiate(upstream.cdn_url, ["http/1.1"], _fresh_context(upstream))[0] == "http/1.1"
    for url in (upstream.api_url, upstream.token_realm):
        assert _negotiate(url, both, _fresh_context(upstream)) [0] == "http/1.1"
    assert _negotiate(upstream.api_url, both, _fresh_context(upstream))[1] == "TLSv1.3"


def test_cdn_over_http2_keeps_its_rules_and_faults(faulty, small_blob):
    """Through the TLS front over HTTP/2: blobs, ranges, the Authorization refusal and the faults
    behave as over HTTP/1.1, and the Python CDN still logs every request."""
    digest, url, data = small_blob
    with httpx.Client(http2=True, verify=faulty.verify, timeout=5) as c:
        r = c.get(url)
        assert r.http_version == "HTTP/2" and r.content == data
        r = c.get(url, headers={"Range": "bytes=3-9"})
        assert r.status_code == 206 and r.content == data[3:10]
        assert c.get(url, headers={"Authorization": "Bearer x"}).status_code == 400
        faulty.set_cdn_fault("cut", after=7)
        with pytest.raises(httpx.RemoteProtocolError):
            c.get(url)
        faulty.set_cdn_fault("corrupt")
        assert c.get(url).content != data
        assert c.get(url).content == data
    rec = _wait_records(faulty.cdn_requests, lambda r: r.get("fault") == "cut")
    assert rec and rec[-1]["bytes"] == 7


def test_plain_http_shape_still_there(tmp_path):
    """Upstream(tls=False): the old plain-HTTP shape, for the registries and in-house mirrors
    that are plain HTTP."""
    from tests.support.upstream import Upstream

    with Upstream(tmp_path / "plain", tls=False) as up:
        assert up.ca_cert is None and up.verify is True
        for url in (up.api_url, up.cdn_url, up.token_realm):
            assert url.startswith("http://127.0.0.1:")
        r = httpx.get(up.api_url + "/v2/")
        assert r.status_code == 401 and f'realm="{up.token_realm}"' in r.headers["www-authenticate"]
        tok = up.get_token("repository:x/y:pull")
        assert httpx.get(up.api_url + "/v2/", headers={"Authorization": "Bearer " + tok}).status_code == 200
        assert httpx.get(up.sign_cdn_url(up.blob_storage_path("sha256:" + "0" * 64))).status_code == 404
        assert up.skopeo_tls_args() == ["--src-tls-verify=false"]


def test_round_trip_time_through_relays(tmp_path):
    """Upstream(rtt_ms=): every URL a client learns points at a delaying relay; the services
    themselves stay reachable without delay (service_url), and the relays log connections."""
    from tests.support.images import push_image
    from tests.support.upstream import RELAYED, Upstream

    with Upstream(tmp_path / "slow", rtt_ms=60) as up:
        info = push_image(up, "slow/one", "1", [{"a.txt": "a\n"}])
        for name in RELAYED:
            assert urlsplit(up.service_url(name)).port != urlsplit(
                {"edge": up.api_url, "token": up.token_realm, "cdn": up.cdn_url}[name]).port
        up.clear_logs()
        with httpx.Client(verify=up.verify, timeout=10) as c:
            t0 = time.monotonic()
            r = c.get(up.api_url + "/v2/")
            fresh = time.monotonic() - t0  # TCP (charged), TLS, request: 3 round trips
            assert r.status_code == 401 and f'realm="{up.token_realm}"' in r.headers["www-authenticate"]
            t0 = time.monotonic()
            c.get(up.api_url + "/v2/")
            reused = time.monotonic() - t0
            tok = c.get(up.token_realm, params={"scope": "repository:slow/one:pull"}).json()["token"]
            r = c.get(f"{up.api_url}/v2/slow/one/blobs/{info['layer_digests'][0]}",
                      headers={"Authorization": "Bearer " + tok})
            assert r.status_code == 307 and r.headers["location"].startswith(up.cdn_url + "/")
        assert 0.18 <= fresh < 0.5, fresh
        assert 0.06 <= reused < 0.15, reused
        # the services themselves are not delayed
        t0 = time.monotonic()
        httpx.get(up.service_url("edge") + "/v2/", verify=up.verify)
        assert time.monotonic() - t0 < 0.06
        from tests.support.latency_relay import summarize_round_trips

        edge = summarize_round_trips(up.relay_records()["edge"])
        # one connection: TCP, TLS, three requests in a row
        assert edge == {"connections": 1, "tls_handshakes": 1, "probes": 0, "round_trips": 5,
                        "sequential_round_trips": 5}, edge


# ---------------------------------------------------------------- edge framing


class _Backend(BaseHTTPRequestHandler):
    """A deliberately awkward upstream for the edge: chunked, close-delimited,
    304, repeated headers, redirects to the CDN base."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def _body(self):
        if "chunked" in (self.headers.get("Transfer-Encoding") or ""):
            out = b""
            while True:
                n = int(self.rfile.readline().split(b";")[0], 16)
                if n == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(n)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self):
        body = self._body()
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for piece in (b"hello ", b"chunked ", b"world"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/close":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"until close")
            self.close_connection = True
        elif self.path == "/304":
            self.send_response(304)
            self.send_header("ETag", '"x"')
            self.end_headers()
        elif self.path.startswith("/redirect"):
            self.send_response(307)
            self.send_header("Location", "http://127.0.0.1:9/docker/registry/v2/blobs/sha256/aa/x/data")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:  # echo
            data = json.dumps({"method": self.command, "path": self.path, "headers": self.headers.items(),
                               "body_sha": hashlib.sha256(body).hexdigest(), "body_len": len(body)}).encode()
            self.send_response(201)
            self.send_header("Link", "<a>; rel=a")
            self.send_header("Link", "<b>; rel=b")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle


@pytest.fixture
def edge_on_backend(tmp_path):
    backend = ThreadingHTTPServer(("127.0.0.1", 0), _Backend)
    backend.daemon_threads = True
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    secret = tmp_path / "secret"
    secret.write_text("s3cr3t")
    ready = tmp_path / "edge.ready"
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.edge",
                             "--upstream", f"http://127.0.0.1:{backend.server_address[1]}",
                             "--cdn-base", "http://127.0.0.1:9", "--secret-file", str(secret),
                             "--ready-file", str(ready), "--log", str(tmp_path / "edge.jsonl")],
                            cwd=str(Path(__file__).resolve().parents[2]))
    try:
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "edge did not start"
            time.sleep(0.05)
        yield json.loads(ready.read_text())["port"]
    finally:
        proc.terminate()
        proc.wait(10)
        backend.shutdown()
        backend.server_close()


def test_edge_framing_and_headers(edge_on_backend):
    conn = http.client.HTTPConnection("127.0.0.1", edge_on_backend, timeout=10)
    # repeated request headers in order, Host intact, body, repeated response headers
    conn.putrequest("POST", "/echo?x=1", skip_accept_encoding=True)
    for t in ("a/1", "b/2", "c/3"):
        conn.putheader("Accept", t)
    conn.putheader("Content-Length", "5")
    conn.endheaders(b"12345")
    r = conn.getresponse()
    echo = json.loads(r.read())
    assert r.status == 201 and r.msg.get_all("Link") == ["<a>; rel=a", "<b>; rel=b"]
    assert [v for k, v in echo["headers"] if k == "Accept"] == ["a/1", "b/2", "c/3"]
    assert dict(echo["headers"])["Host"] == f"127.0.0.1:{edge_on_backend}"
    assert echo["path"] == "/echo?x=1" and echo["body_len"] == 5
    # chunked request body, same connection
    conn.request("PATCH", "/echo", body=iter([b"abc", b"defg"]), encode_chunked=True)
    r = conn.getresponse()
    assert json.loads(r.read())["body_sha"] == hashlib.sha256(b"abcdefg").hexdigest()
    # HEAD keeps Content-Length, no body
    conn.request("HEAD", "/echo")
    r = conn.getresponse()
    assert r.status == 201 and int(r.headers["Content-Length"]) > 0 and r.read() == b""
    # chunked and close-delimited responses are re-chunked, connection stays usable
    for path, want in (("/chunked", b"hello chunked world"), ("/close", b"until close")):
        conn.request("GET", path)
        r = conn.getresponse()
        assert r.status == 200 and r.read() == want
    conn.request("GET", "/304")
    r = conn.getresponse()
    assert r.status == 304 and r.read() == b"" and r.headers["ETag"] == '"x"'
    conn.request("GET", "/redirect")
    r = conn.getresponse()
    r.read()
    loc = r.headers["Location"]
    assert r.status == 307 and "?expires=" in loc and "&signature=" in loc
    conn.close()


# ---------------------------------------------------------------- fault injection


@pytest.fixture
def faulty(upstream):
    """The shared upstream with all faults cleared before and after the test."""
    upstream.clear_faults()
    try:
        yield upstream
    finally:
        upstream.clear_faults()


def _wait_records(read, pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while True:
        recs = [r for r in read() if pred(r)]
        if recs or time.monotonic() > deadline:
            return recs
        time.sleep(0.02)


@pytest.fixture
def small_blob(upstream, upstream_images):
    digest = upstream_images["team/ociapp"]["layer_digests"][1]
    url = upstream.sign_cdn_url(upstream.blob_storage_path(digest))
    data = httpx.get(url, verify=upstream.verify).content
    assert "sha256:" + hashlib.sha256(data).hexdigest() == digest and len(data) > 20
    return digest, url, data


def test_cdn_fault_cut(faulty, small_blob):
    digest, url, data = small_blob
    st = faulty.set_cdn_fault("cut", after=10)
    assert st["mode"] == "cut" and st["remaining"] == 1 and st["params"] == {"after": 10}
    assert httpx.head(url, verify=faulty.verify).status_code == 200  # HEAD is never faulted
    u = urlsplit(url)
    conn = http.client.HTTPSConnection(u.hostname, u.port, timeout=5, context=faulty.verify)
    try:
        conn.request("GET", f"{u.path}?{u.query}")
        r = conn.getresponse()
        assert r.status == 200 and int(r.headers["Content-Length"]) == len(data)
        with pytest.raises(http.client.IncompleteRead) as ei:
            r.read()
        assert ei.value.partial == data[:10]
    finally:
        conn.close()
    assert faulty.faults()["cdn"]["mode"] == "none"  # times=1: cleared itself
    assert httpx.get(url, verify=faulty.verify).content == data
    rec = _wait_records(faulty.cdn_requests, lambda r: r.get("fault") == "cut")
    assert rec and rec[-1]["status"] == 200 and rec[-1]["bytes"] == 10
    # default cut point (half), seen by httpx as a protocol error
    faulty.set_cdn_fault("cut")
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(url, timeout=5, verify=faulty.verify)
    assert httpx.get(url, verify=faulty.verify).content == data


def test_cdn_fault_corrupt(faulty, small_blob):
    digest, url, data = small_blob
    faulty.set_cdn_fault("corrupt")
    r = httpx.get(url, timeout=5, verify=faulty.verify)
    assert r.status_code == 200 and len(r.content) == len(data) == int(r.headers["content-length"])
    assert "sha256:" + hashlib.sha256(r.content).hexdigest() != digest
    diff = [i for i, (a, b) in enumerate(zip(r.content, data)) if a != b]
    assert diff == [len(data) // 2]
    assert httpx.get(url, verify=faulty.verify).content == data  # one-shot
    rec = _wait_records(faulty.cdn_requests, lambda r: r.get("fault") == "corrupt")
    assert rec and rec[-1]["bytes"] == len(data) and rec[-1]["fault_offset"] == len(data) // 2
    # explicit offset, on a range request
    faulty.set_cdn_fault("corrupt", after=0)
    r = httpx.get(url, headers={"Range": "bytes=5-14"}, verify=faulty.verify)
    assert r.status_code == 206 and r.content[1:] == data[6:15] and r.content[0] != data[5]


def test_cdn_fault_status403_counted(faulty, small_blob):
    _, url, data = small_blob
    applied = faulty.faults()["cdn"]["applied"]
    faulty.set_cdn_fault("status403", times=2)
    for left in (1, 0):
        r = httpx.get(url, verify=faulty.verify)
        assert r.status_code == 403 and "<Message>Request has expired</Message>" in r.text
        assert r.headers["content-type"] == "application/xml"
        assert faulty.faults()["cdn"]["remaining"] == left
    assert httpx.get(url, verify=faulty.verify).content == data
    st = faulty.faults()["cdn"]
    assert st["mode"] == "none" and st["applied"] == applied + 2
    recs = _wait_records(faulty.cdn_requests, lambda r: r.get("fault") == "status403")
    assert len(recs) >= 2 and all(r["status"] == 403 for r in recs)


def test_cdn_fault_hang_does_not_block_others(faulty, small_blob):
    _, url, data = small_blob
    faulty.set_cdn_fault("hang")
    errors = []

    def hanging():
        try:
            httpx.get(url, timeout=1.0, verify=faulty.verify)
        except Exception as exc:
            errors.append(exc)

    t = threading.Thread(target=hanging)
    t.start()
    deadline = time.monotonic() + 5
    while faulty.faults()["cdn"]["mode"] != "none":  # consumed by the hanging request
        assert time.monotonic() < deadline
        time.sleep(0.02)
    t0 = time.monotonic()
    assert httpx.get(url, timeout=5, verify=faulty.verify).content == data  # served while the other one hangs
    assert time.monotonic() - t0 < 0.8
    t.join(5)
    assert len(errors) == 1 and isinstance(errors[0], httpx.ReadTimeout)
    rec = _wait_records(faulty.cdn_requests, lambda r: r.get("fault") == "hang")
    assert rec and rec[-1]["reason"] == "injected hang: client_disconnected" and rec[-1]["bytes"] == 0


def test_fault_control_sticky_clear_and_validation(faulty, small_blob):
    _, url, data = small_blob
    faulty.set_cdn_fault("status403", times=0)  # until cleared
    assert [httpx.get(url, verify=faulty.verify).status_code for _ in range(3)] == [403, 403, 403]
    assert faulty.faults()["cdn"]["mode"] == "status403"
    faulty.set_cdn_fault("none")
    assert httpx.get(url, verify=faulty.verify).content == data
    for path in (faulty.cdn_url + "/_cdn/fault", faulty.api_url + "/_edge/fault",
                 faulty.service_url("token") + "/_token/fault"):
        assert httpx.post(path, params={"mode": "bogus"}, verify=faulty.verify).status_code == 400
        assert httpx.post(path, params={"mode": "hang", "nope": "1"}, verify=faulty.verify).status_code == 400
    faulty.set_cdn_fault("cut", times=0)
    faulty.set_edge_fault("close", times=0)
    faulty.set_token_fault("status500", times=0)
    faulty.clear_faults()
    assert {st["mode"] for st in faulty.faults().values()} == {"none"}
    # control requests are not in the CDN/token access logs
    assert not any("/_cdn/" in r["path"] for r in faulty.cdn_requests())
    assert not any("/_token/" in r["path"] for r in faulty.token_requests())


def test_edge_fault_status500_path_contains(faulty, upstream_images):
    h = bearer(faulty, "library/alpine")
    st = faulty.set_edge_fault("status500", path_contains="/manifests/")
    assert st["params"] == {"path_contains": "/manifests/"}
    assert httpx.get(f"{faulty.api_url}/v2/", verify=faulty.verify).status_code == 401  # not matched, not consumed
    url = f"{faulty.api_url}/v2/library/alpine/manifests/3.19"
    r = httpx.get(url, headers=h, verify=faulty.verify)
    assert r.status_code == 500
    assert r.json()["errors"][0]["code"] == "UNKNOWN"
    assert r.headers["docker-distribution-api-version"] == "registry/2.0"
    assert httpx.head(url, headers={**h, "Accept": DOCKER_LIST}, verify=faulty.verify).status_code == 200  # one-shot
    rec = _wait_records(faulty.edge_requests, lambda r: r.get("fault") == "status500")
    assert rec and rec[-1]["status"] == 500 and rec[-1]["path"].endswith("/manifests/3.19")
    # method filter
    faulty.set_edge_fault("status500", path_contains="/manifests/", method="GET")
    assert httpx.head(url, headers={**h, "Accept": DOCKER_LIST}, verify=faulty.verify).status_code == 200
    assert httpx.get(url, headers=h, verify=faulty.verify).status_code == 500


def test_edge_fault_status429(faulty):
    faulty.set_edge_fault("status429", times=2)
    for _ in range(2):
        r = httpx.get(f"{faulty.api_url}/v2/", verify=faulty.verify)
        assert r.status_code == 429 and r.headers["retry-after"] == "7"
        assert r.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert httpx.get(f"{faulty.api_url}/v2/", verify=faulty.verify).status_code == 401


def test_edge_fault_hang_and_close(faulty):
    v2 = f"{faulty.api_url}/v2/"
    faulty.set_edge_fault("hang")
    t0 = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(v2, timeout=0.5, verify=faulty.verify)
    assert time.monotonic() - t0 < 3
    assert httpx.get(v2, verify=faulty.verify).status_code == 401
    faulty.set_edge_fault("close")
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(v2, timeout=5, verify=faulty.verify)
    assert httpx.get(v2, verify=faulty.verify).status_code == 401
    modes = [r.get("fault") for r in faulty.edge_requests()]
    assert "hang" in modes and "close" in modes


def test_token_faults(faulty):
    faulty.set_token_fault("status500")
    r = httpx.get(faulty.token_realm, params={"service": faulty.service}, verify=faulty.verify)
    assert r.status_code == 500
    assert faulty.get_token("repository:library/alpine:pull")  # one-shot
    faulty.set_token_fault("hang")
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(faulty.token_realm, params={"service": faulty.service}, timeout=0.5, verify=faulty.verify)
    faulty.set_token_fault("close")
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.post(faulty.token_realm, verify=faulty.verify, data={"grant_type": "password", "username": "alice",
                                             "password": faulty.users["alice"], "service": faulty.service})
    assert faulty.get_token("repository:library/alpine:pull", user="alice")
    modes = [r.get("fault") for r in faulty.token_requests()]
    assert {"status500", "hang", "close"} <= set(modes)


def test_stop_and_start_services_on_same_port(tmp_path):
    """On a private Upstream: each service can go down and come back on its port."""
    from tests.support.upstream import SERVICES, Upstream

    with Upstream(tmp_path / "hub") as up:
        urls = {n: up.service_url(n) for n in SERVICES}
        v2 = up.api_url + "/v2/"

        up.stop_service("edge")
        assert not up.running
        with pytest.raises(httpx.ConnectError):
            httpx.get(v2, timeout=2, verify=up.verify)
        up.start_service("edge")
        assert up.running and httpx.get(v2, verify=up.verify).status_code == 401

        with up.service_stopped("registry"):
            r = httpx.get(v2, verify=up.verify)
            assert r.status_code == 502 and r.json()["errors"][0]["code"] == "UNAVAILABLE"
            with pytest.raises(httpx.ConnectError):
                httpx.get(up.registry_url + "/v2/", timeout=2, verify=up.verify)
        assert httpx.get(v2, verify=up.verify).status_code == 401

        with up.service_stopped("token"):
            with pytest.raises(httpx.ConnectError):
                up.get_token("repository:x/y:pull")
            assert up.faults().keys() == {"cdn", "edge"}
            up.clear_faults()  # skips the stopped service
        tok = up.get_token("repository:x/y:pull")
        assert httpx.get(v2, headers={"Authorization": "Bearer " + tok}, verify=up.verify).status_code == 200

        missing = up.sign_cdn_url(up.blob_storage_path("sha256:" + "0" * 64))
        up.set_cdn_fault("status403", times=0)
        up.stop_service("cdn")
        with pytest.raises(httpx.ConnectError):
            httpx.get(missing, timeout=2, verify=up.verify)
        up.start_service("cdn")
        assert httpx.get(missing, verify=up.verify).status_code == 404
        assert up.faults()["cdn"]["mode"] == "none"  # fresh process, no faults

        assert {n: up.service_url(n) for n in SERVICES} == urls
        assert up.running
