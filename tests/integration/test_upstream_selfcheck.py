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

import httpx
import pytest

from tests.support.images import ALL_MANIFEST_TYPES, DOCKER_LIST, OCI_INDEX, OCI_MANIFEST
from tests.support.token_server import decode_jwt_unverified

SKOPEO = shutil.which("skopeo")
needs_skopeo = pytest.mark.skipif(SKOPEO is None, reason="skopeo not installed")


def skopeo(*args, timeout=180):
    r = subprocess.run([SKOPEO, *args], capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    return r


def bearer(upstream, repo, user=None, actions="pull"):
    return {"Authorization": "Bearer " + upstream.get_token(f"repository:{repo}:{actions}", user=user)}


# ---------------------------------------------------------------- skopeo


@needs_skopeo
def test_skopeo_inspect_anonymous(upstream, upstream_images):
    r = skopeo("inspect", "--tls-verify=false", "--no-creds", f"docker://{upstream.api_host}/library/alpine:3.19",
               "--raw")
    assert r.returncode == 0, r.stderr
    alpine = upstream_images["library/alpine"]
    assert r.stdout.encode() == alpine["manifest_bytes"]
    assert json.loads(r.stdout)["mediaType"] == DOCKER_LIST


@needs_skopeo
def test_skopeo_copy_all_through_edge_and_cdn(upstream, upstream_images, tmp_path):
    upstream.clear_logs()
    dest = tmp_path / "alpine"
    r = skopeo("copy", "--all", "--src-tls-verify=false", "--src-no-creds",
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
    r = skopeo("copy", "--src-tls-verify=false", "--src-no-creds", ref, f"dir:{tmp_path / 'anon'}")
    assert r.returncode != 0
    assert "unauthorized" in r.stderr.lower() or "authentication required" in r.stderr.lower(), r.stderr
    r = skopeo("copy", "--src-tls-verify=false", "--src-creds", f"alice:{upstream.users['alice']}", ref,
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
    r = skopeo("copy", "--src-tls-verify=false", "--src-no-creds", f"docker://{upstream.api_host}/library/big:1.0",
               f"dir:{dest}", timeout=300)
    assert r.returncode == 0, r.stderr
    layer = dest / big["big_layer_digest"].split(":", 1)[1]
    assert layer.stat().st_size == big["big_layer_size"]


# ---------------------------------------------------------------- registry protocol


def test_challenge_like_docker_hub(upstream):
    r = httpx.get(f"{upstream.api_url}/v2/")
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == \
        f'Bearer realm="{upstream.token_realm}",service="{upstream.service}"'
    r = httpx.get(f"{upstream.api_url}/v2/library/alpine/manifests/3.19")
    assert r.status_code == 401
    assert 'scope="repository:library/alpine:pull"' in r.headers["www-authenticate"]
    assert "ratelimit-limit" not in r.headers


def test_manifest_accept_and_ratelimit(upstream, upstream_images):
    h = bearer(upstream, "library/busybox")
    before = upstream.get_ratelimit()["remaining"]
    # repeated Accept headers must reach distribution intact (the index needs the OCI type)
    headers = [("Authorization", h["Authorization"])] + [("Accept", t) for t in ALL_MANIFEST_TYPES]
    with httpx.Client() as c:
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
    assert httpx.get(url, headers=h).status_code == 404
    r = httpx.get(url, headers={**h, "Accept": OCI_MANIFEST})
    assert r.status_code == 200 and r.content == upstream_images["team/ociapp"]["manifest_bytes"]


def test_ratelimit_enforcement(upstream):
    h = {**bearer(upstream, "team/ociapp"), "Accept": OCI_MANIFEST}
    url = f"{upstream.api_url}/v2/team/ociapp/manifests/1.0"
    try:
        upstream.set_ratelimit(1, enforce=True)
        assert httpx.get(url, headers=h).status_code == 200
        r = httpx.get(url, headers=h)
        assert r.status_code == 429
        assert r.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
        assert r.headers["ratelimit-remaining"] == "0;w=21600"
        assert httpx.head(url, headers=h).status_code == 200  # HEAD does not count
    finally:
        upstream.set_ratelimit(100, enforce=False)


def test_blob_redirect_is_signed_and_served(upstream, upstream_images):
    img = upstream_images["team/ociapp"]
    digest = img["layer_digests"][0]
    h = bearer(upstream, "team/ociapp")
    for method in ("HEAD", "GET"):
        r = httpx.request(method, f"{upstream.api_url}/v2/team/ociapp/blobs/{digest}", headers=h)
        assert r.status_code == 307, (method, r.status_code, r.text)
        loc = r.headers["location"]
        assert loc.startswith(upstream.cdn_url + upstream.blob_storage_path(digest) + "?expires=")
        assert "&signature=" in loc
    body = httpx.get(loc).content
    assert "sha256:" + hashlib.sha256(body).hexdigest() == digest
    # the same via the direct registry port is NOT signed (and so refused by the CDN)
    r = httpx.get(f"{upstream.registry_url}/v2/team/ociapp/blobs/{digest}", headers=h)
    assert r.status_code == 307 and "signature=" not in r.headers["location"]
    assert httpx.get(r.headers["location"]).status_code == 403


def test_push_through_edge_chunked_and_keepalive(upstream):
    """Uploads work through the edge too (POST/PATCH chunked/PUT) on one connection."""
    repo = "selfcheck/upload"
    h = bearer(upstream, repo, user="admin", actions="pull,push")
    data = b"edge-upload-" * 5000
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with httpx.Client(base_url=upstream.api_url) as c:
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
    r = httpx.get(realm, params={"service": svc, "scope": "repository:private/secret:pull"},
                  auth=("alice", "wrong"))
    assert r.status_code == 401
    assert r.json() == {"details": "incorrect username or password"}

    # anonymous: private scope silently left out (200, empty grant)
    r = httpx.get(realm, params=[("service", svc), ("scope", "repository:private/secret:pull"),
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
    r = httpx.get(realm, params={"service": svc, "scope": "repository:private/secret:pull",
                                 "offline_token": "true", "client_id": "selfcheck"},
                  auth=("alice", upstream.users["alice"]))
    assert r.status_code == 200
    refresh = r.json()["refresh_token"]
    r = httpx.post(realm, data={"grant_type": "refresh_token", "refresh_token": refresh, "client_id": "selfcheck",
                                "service": svc, "scope": "repository:private/secret:pull"})
    assert r.status_code == 200, r.text
    _, claims = decode_jwt_unverified(r.json()["access_token"])
    assert claims["sub"] == "alice" and claims["access"][0]["actions"] == ["pull"]

    # OAuth2 password grant
    r = httpx.post(realm, data={"grant_type": "password", "username": "alice", "password": upstream.users["alice"],
                                "client_id": "selfcheck", "access_type": "offline", "service": svc,
                                "scope": "repository:private/secret:pull repository:x/y:push"})
    assert r.status_code == 200 and r.json()["refresh_token"]
    _, claims = decode_jwt_unverified(r.json()["access_token"])
    assert {a["name"]: a["actions"] for a in claims["access"]} == {"private/secret": ["pull"], "x/y": []}
    r = httpx.post(realm, data={"grant_type": "password", "username": "alice", "password": "nope",
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
    assert httpx.get(upstream.cdn_url + path).status_code == 403
    url = upstream.sign_cdn_url(path)
    assert httpx.get(url.replace("signature=", "signature=00")).status_code == 403
    assert httpx.get(upstream.sign_cdn_url(path, ttl=-5)).status_code == 403  # expired
    r = httpx.get(url, headers={"Authorization": "Bearer abc"})
    assert r.status_code == 400
    assert "Only one auth mechanism allowed" in r.text
    r = httpx.get(url)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.content == upstream_images["team/ociapp"]["config_bytes"]
    assert r.headers["etag"] == f'"{digest.split(":")[1]}"'
    assert httpx.get(upstream.sign_cdn_url("/docker/registry/v2/blobs/sha256/00/nothere/data")).status_code == 404
    recs = upstream.cdn_requests()
    assert any(rec["status"] == 400 and rec["authorization_present"] for rec in recs)
    assert "abc" not in upstream.cdn_log_path.read_text()


def test_cdn_ranges(upstream, upstream_images):
    big = upstream_images["library/big"]
    size = big["big_layer_size"]
    url = upstream.sign_cdn_url(upstream.blob_storage_path(big["big_layer_digest"]))
    with httpx.Client() as c:
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
    with httpx.stream("GET", url, timeout=120) as r:
        assert r.status_code == 200
        for chunk in r.iter_raw(1 << 20):
            h.update(chunk)
            n += len(chunk)
    assert n == big["big_layer_size"]
    assert "sha256:" + h.hexdigest() == big["big_layer_digest"]
    assert time.monotonic() - t0 < 60


def test_processes_are_local_and_alive(upstream):
    for url in (upstream.api_url, upstream.registry_url, upstream.cdn_url, upstream.token_realm):
        assert url.startswith("http://127.0.0.1:")
    assert upstream.running
    port = int(upstream.api_url.rsplit(":", 1)[1])
    with socket.socket() as s:
        s.settimeout(1)
        assert s.connect_ex(("127.0.0.1", port)) == 0


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
