"""Bad input: whatever a client sends, the mirror answers with a registry
error (or mitmproxy's own 4xx before the addon runs), never reaches a host of
the client's choosing, never crashes, and keeps serving (checked around every
test by conftest.keeps_serving)."""

from __future__ import annotations

import base64
import json
import re

import httpx
import pytest

from .helpers import (ANSWERS, INDEX_ACCEPT, SERVICE, anonymous_token, assert_registry_error, fresh_image, get,
                      raw_request)

ZERO_HEX = "0" * 64


def record(case: str, resp) -> None:
    entry = {"case": case, "status": resp.status, "layer": resp.layer}
    try:
        entry["code"] = resp.json()["errors"][0]["code"]
    except Exception:
        pass
    ANSWERS.append(entry)


def edge_count(upstream) -> int:
    return len(upstream.edge_requests())


# Paths outside the distribution grammar, sent byte for byte.
BAD_PATHS = {
    "traversal ../../etc/passwd": "/v2/../../etc/passwd",
    "traversal in name": "/v2/library/../../../etc/passwd/manifests/latest",
    "traversal %2e%2e": "/v2/%2e%2e/%2e%2e/etc/passwd",
    "traversal %2E%2E upper": "/v2/library/%2E%2E/%2E%2E/manifests/latest",
    "encoded slash %2f in name": "/v2/library%2falpine/manifests/3.19",
    "traversal in tag %2f": "/v2/library/alpine/manifests/..%2f..%2f..%2fetc%2fpasswd",
    "traversal in digest": f"/v2/library/alpine/blobs/sha256:../../../{ZERO_HEX}",
    "backslash in name": "/v2/library\\alpine/manifests/3.19",
    "NUL byte %00": "/v2/library/alpine%00/manifests/3.19",
    "unknown digest algorithm md5": "/v2/library/alpine/blobs/md5:d41d8cd98f00b204e9800998ecf8427e",
    "unknown digest algorithm in manifest": "/v2/library/alpine/manifests/sha1:da39a3ee5e6b4b0d3255bfef95601890afd80709",
    "digest not hex": "/v2/library/alpine/blobs/sha256:" + "z" * 64,
    "digest too short": "/v2/library/alpine/blobs/sha256:" + "0" * 63,
    "digest upper-case hex": "/v2/library/alpine/blobs/sha256:" + "A" * 64,
    "empty digest": "/v2/library/alpine/blobs/sha256:",
    "name longer than 255": "/v2/" + "a" * 256 + "/manifests/latest",
    "name longer than 255 in components": "/v2/" + "/".join(["abcdefghij"] * 24) + "/manifests/latest",
    "upper case name": "/v2/Library/Alpine/manifests/3.19",
    "empty segment": "/v2/library//alpine/manifests/3.19",
    "empty name": "/v2//manifests/3.19",
    "empty tag": "/v2/library/alpine/manifests/",
    "tag longer than 128": "/v2/library/alpine/manifests/" + "t" * 129,
    "tag starting with '-'": "/v2/library/alpine/manifests/-latest",
    "tag with ':'": "/v2/library/alpine/manifests/a:b",
    "name ending in '.'": "/v2/library/alpine./manifests/3.19",
    "name with '--' start": "/v2/-library/alpine/manifests/3.19",
    "unknown route": "/etc/passwd",
    "unknown /v2 route": "/v2/library/alpine/whatever/3.19",
}


@pytest.mark.parametrize("path", list(BAD_PATHS.values()), ids=list(BAD_PATHS))
def test_bad_path_gets_spec_error_and_never_reaches_upstream(mirror, upstream, path):
    before = edge_count(upstream)
    resp = raw_request(mirror.port, get(path, mirror.port))
    record(f"path {path[:40]}", resp)
    assert_registry_error(resp, (400, 404), path)
    reached = upstream.edge_requests()[before:]
    assert reached == [], f"{path} reached the upstream: {reached}"


# Manifest references that are no tag and no digest, or none at all. The spec's only
# failure for a manifest GET or HEAD is 404 (end-3) and distribution's router answers 404:
# the OCI conformance suite asks for ".INVALID_MANIFEST_NAME" and expects 404.
BAD_REFERENCES = {
    "starts with '.'": ".INVALID_MANIFEST_NAME",
    "starts with '-'": "-latest",
    "longer than 128": "t" * 129,
    "missing": "",
    "'..'": "..",
    "':' in a tag": "a:b",
    "digest not hex": "sha256:totallywrong",
    "digest too short": "sha256:" + "0" * 63,
    "unknown digest algorithm": "sha1:da39a3ee5e6b4b0d3255bfef95601890afd80709",
}


@pytest.mark.parametrize("reference", list(BAD_REFERENCES.values()), ids=list(BAD_REFERENCES))
def test_bad_manifest_reference_is_unknown_and_never_reaches_upstream(mirror, upstream, reference):
    token = anonymous_token(mirror.url, "team/ociapp")
    path = f"/v2/team/ociapp/manifests/{reference}"
    edge_before, tokens_before = edge_count(upstream), len(upstream.token_requests())
    for method in (b"GET", b"HEAD"):
        for auth in ([], [f"Authorization: Bearer {token}"]):
            resp = raw_request(mirror.port, get(path, mirror.port, *auth, method=method))
            what = f"{method.decode()} {path} {'with' if auth else 'without'} a token"
            assert resp.status == 404, f"{what}: {resp.short()}"
            assert resp.header("content-type") == "application/json; charset=utf-8", what
            if method == b"GET":
                assert assert_registry_error(resp, (404,), what)["code"] == "MANIFEST_UNKNOWN"
    # the conformance suite's "400 response body" request: a GET with a body
    resp = raw_request(mirror.port, get(path, mirror.port, "Content-Type: application/vnd.oci.image.manifest.v1+json",
                                        "Content-Length: 9") + b"blablabla")
    assert assert_registry_error(resp, (404,), f"GET {path} with a body")["code"] == "MANIFEST_UNKNOWN"
    assert upstream.edge_requests()[edge_before:] == [], f"{path} reached the upstream"
    assert upstream.token_requests()[tokens_before:] == [], f"{path} made the mirror ask for a token"


def test_bad_paths_leave_nothing_odd_in_the_cache(mirror, cache_dir):
    # secret: the key, made at start; hub-rewrite-cache.json: the layout's version stamp
    allowed_top = {"blobs", "manifests", "tags", "repos", "tmp", "secret", "hub-rewrite-cache.json"}
    for p in cache_dir.rglob("*"):
        rel = p.relative_to(cache_dir)
        assert rel.parts[0] in allowed_top, f"unexpected cache entry {rel}"
        assert not re.search(r"passwd|\.\.|etc|evil|[A-Z]", str(rel)), f"suspicious cache entry {rel}"


def test_non_utf8_bytes_in_path(mirror, upstream):
    before = edge_count(upstream)
    for case, path in {
        "raw 0xff in name": b"/v2/library/\xff\xfe/manifests/3.19",
        "raw 0xff in tag": b"/v2/library/alpine/manifests/\xc3\x28",
        "%ff in name": b"/v2/library/%ff%fe/manifests/3.19",
        "%c0%ae%c0%ae overlong dot": b"/v2/%c0%ae%c0%ae/%c0%ae%c0%ae/etc/passwd",
    }.items():
        resp = raw_request(mirror.port, get(path, mirror.port))
        record(f"path {case}", resp)
        assert resp.status is not None and 400 <= resp.status < 500, (case, resp.short())
        if not resp.layer.startswith("mitmproxy"):
            assert_registry_error(resp, (400, 404), case)
    assert upstream.edge_requests()[before:] == []


def api_paths(upstream, tmp_path, repo: str) -> dict[str, str]:
    """One path per way the addon talks upstream: relay (/v2/), cached manifest
    (HEAD then GET), blob probe (an uncached blob), token forwarding."""
    blob = fresh_image(upstream, tmp_path, repo)["layer_digests"][0]
    return {"/v2/": "/v2/", "manifest": f"/v2/{repo}/manifests/1", "blob": f"/v2/{repo}/blobs/{blob}",
            "/token": f"/token?service={SERVICE}&scope=repository:{repo}:pull"}


def test_non_utf8_bytes_in_headers(mirror, upstream, tmp_path):
    repo = "team/h-bad-headers"
    paths = api_paths(upstream, tmp_path, repo)
    token = anonymous_token(mirror.url, repo)
    cases = {
        "Accept 0xff": b"Accept: \xff\xfe\xfd",
        "Authorization Bearer 0xff": b"Authorization: Bearer \xff\xfe",
        "header name 0xff": b"X-\xff: 1",
        "User-Agent 0xff": b"User-Agent: \xc3\x28",
    }
    problems = []
    for where, path in paths.items():
        for case, header in cases.items():
            extra = [header] if header.startswith(b"Authorization") else [header, f"Authorization: Bearer {token}"]
            resp = raw_request(mirror.port, get(path, mirror.port, *extra))
            record(f"header {case} on {where}", resp)
            # refused (4xx) or answered normally: never a 5xx
            if resp.status is None or resp.status >= 500:
                problems.append(f"{case} on {where}: {resp.short()}")
    assert not problems, "\n".join(problems)


def test_malformed_range_on_uncached_and_cached_blob(mirror, upstream):
    image = upstream.images["team/ociapp"]
    digest = image["layer_digests"][1]
    size = image["layer_sizes"][1]
    token = anonymous_token(mirror.url, "team/ociapp")
    url = f"{mirror.url}/v2/team/ociapp/blobs/{digest}"
    auth = {"Authorization": f"Bearer {token}"}
    ranges = ["bytes=abc", "bytes=10-5", "bytes=-", "items=0-1", "bytes=0-1,,", "bytes=--1",
              "bytes=0-18446744073709551616", f"bytes={size + 10}-", "bytes=" + "1" * 300 + "-"]

    blob = httpx.get(upstream.sign_cdn_url(upstream.blob_storage_path(digest)), timeout=15, verify=upstream.verify).content
    assert len(blob) == size

    def check(where: str) -> None:
        for value in ranges:
            r = httpx.get(url, headers={**auth, "Range": value}, timeout=15)
            ANSWERS.append({"case": f"Range {value[:24]} ({where})", "status": r.status_code, "layer": where})
            assert r.status_code < 500, (where, value, r.status_code, r.text[:300])
            if r.status_code in (200, 206) and where.startswith("cached"):
                assert r.headers.get("x-hub-cache") == "hit", (where, value, r.headers)
            if r.status_code == 200:
                assert r.content == blob, (where, value)
            elif r.status_code == 206:
                m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", r.headers.get("content-range", ""))
                assert m, (where, value, r.headers)
                start, end = int(m[1]), int(m[2])
                assert r.content == blob[start:end + 1] and int(m[3]) == size, (where, value, r.headers)
            elif r.status_code != 416:
                assert_registry_error(r, (400,), f"{where} Range {value}")

    check("uncached: CDN")
    whole = httpx.get(url, headers=auth, timeout=30)
    assert whole.status_code == 200
    check("cached: mirror file server")


NS_VALUES = {
    "scheme": "http://evil.example",
    "host:port": "evil.example:443",
    "path": "a/b",
    "CRLF": "docker.io%0d%0aX-Injected:1",
    "CRLF raw-encoded LF only": "docker.io%0aX-Injected:1",
    "userinfo": "docker.io@{evil}",
    "evil listener": "{evil}",
    "evil listener with scheme": "http://{evil}/",
    "empty": "",
}


@pytest.mark.parametrize("value", list(NS_VALUES.values()), ids=list(NS_VALUES))
def test_ns_values(mirror, upstream, evil, value):
    value = value.replace("{evil}", evil.host)
    token = anonymous_token(mirror.url, "library/alpine")
    before = edge_count(upstream)
    path = f"/v2/library/alpine/manifests/3.19?ns={value}"
    resp = raw_request(mirror.port, get(path, mirror.port, f"Authorization: Bearer {token}",
                                        *[f"Accept: {a}" for a in INDEX_ACCEPT]))
    record(f"ns={value[:40]}", resp)
    if resp.status == 200:
        # ignored: a normal answer, but then nothing may have gone anywhere else
        assert resp.header("docker-content-digest") == upstream.images["library/alpine"]["digest"]
    else:
        assert_registry_error(resp, (400, 404), f"ns={value}")
    assert resp.header("x-injected") is None, resp.headers
    assert evil.connections() == [], f"the mirror connected to {evil.host}"
    for e in upstream.edge_requests()[before:]:
        assert "ns" not in e.get("query_keys", []), f"ns went upstream: {e}"
        assert evil.host not in json.dumps(e), e


def test_two_ns_values_one_evil(mirror, upstream, evil):
    token = anonymous_token(mirror.url, "library/alpine")
    resp = raw_request(mirror.port, get(f"/v2/library/alpine/manifests/3.19?ns=docker.io&ns={evil.host}", mirror.port,
                                        f"Authorization: Bearer {token}"))
    record("ns=docker.io&ns=evil", resp)
    assert resp.status in (200, 400, 404), resp.short()
    assert evil.connections() == []


def test_forged_host_and_forwarded_headers(mirror, upstream, evil):
    token = anonymous_token(mirror.url, "library/alpine")
    forged = [f"X-Forwarded-Host: {evil.host}", "X-Forwarded-Proto: http", f"Forwarded: host={evil.host}"]

    def req(path: str, *headers: str) -> bytes:
        lines = [f"GET {path} HTTP/1.1", f"Host: {evil.host}", *forged, *headers, "Connection: close"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    challenge = raw_request(mirror.port, req("/v2/"))
    record("Host: evil GET /v2/", challenge)
    assert challenge.status == 401, challenge.short()
    realm = challenge.header("www-authenticate") or ""
    assert realm.startswith(f'Bearer realm="{mirror.url}/token"'), realm
    assert evil.host not in realm

    manifest = raw_request(mirror.port, req("/v2/library/alpine/manifests/3.19", f"Authorization: Bearer {token}",
                                            *[f"Accept: {a}" for a in INDEX_ACCEPT]))
    record("Host: evil GET manifest", manifest)
    assert manifest.status == 200, manifest.short()

    tok = raw_request(mirror.port, req(f"/token?service={SERVICE}&scope=repository:library/alpine:pull"))
    record("Host: evil GET /token", tok)
    assert tok.status == 200, tok.short()

    blob = upstream.images["team/ociapp"]["layer_digests"][0]
    token2 = anonymous_token(mirror.url, "team/ociapp")
    b = raw_request(mirror.port, req(f"/v2/team/ociapp/blobs/{blob}", f"Authorization: Bearer {token2}"))
    record("Host: evil GET blob", b)
    assert b.status == 200, b.short()
    assert evil.connections() == [], f"the mirror connected to {evil.host}"


def test_absolute_form_and_connect_to_evil_host(mirror, evil):
    for case, data in {
        "absolute-form URI": f"GET http://{evil.host}/v2/ HTTP/1.1\r\nHost: {evil.host}\r\nConnection: close\r\n\r\n",
        "absolute-form token": f"GET http://{evil.host}/token?service=x HTTP/1.1\r\nHost: {evil.host}\r\nConnection: close\r\n\r\n",
        "CONNECT": f"CONNECT {evil.host} HTTP/1.1\r\nHost: {evil.host}\r\n\r\n",
    }.items():
        resp = raw_request(mirror.port, data.encode(), timeout=10)
        record(case, resp)
        # a normal answer for the configured upstream, or a refusal; never a tunnel
        if case == "CONNECT":
            assert resp.status != 200, resp.short()
        assert resp.status is None or resp.status < 500, (case, resp.short())
    assert evil.connections() == [], f"the mirror connected to {evil.host}"


def test_token_request_with_client_chosen_realm(mirror, upstream, evil):
    before_tokens = len(upstream.token_requests())
    evil_url = f"http://{evil.host}/"
    for case, (method, path, body) in {
        "GET realm=": ("GET", f"/token?realm={evil_url}&service={SERVICE}&scope=repository:library/alpine:pull", None),
        "GET service=evil": ("GET", f"/token?service={evil_url}&scope=repository:library/alpine:pull", None),
        "GET url=": ("GET", f"/token?url={evil_url}&service={SERVICE}", None),
        "GET scope with realm": ("GET", f"/token?service={SERVICE}&scope=repository:library/alpine:pull%20realm={evil_url}", None),
        "POST realm=": ("POST", "/token", f"grant_type=password&username=alice&password=x&service={SERVICE}&realm={evil_url}"),
        "path /token/../evil": ("GET", f"/token/../{evil.host}", None),
        "path //evil/token": ("GET", f"//{evil.host}/token", None),
    }.items():
        raw = get(path, mirror.port, method=method.encode())
        if body is not None:
            raw = raw[:-2] + f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode()
        resp = raw_request(mirror.port, raw)
        record(f"token {case}", resp)
        assert resp.status is not None, case
        if resp.status != 200:
            assert resp.status < 500, (case, resp.short())
    assert evil.connections() == [], f"the mirror connected to {evil.host}"
    # the five well-formed ones went to the realm learned from the upstream, and only there
    recs = upstream.token_requests(min_count=before_tokens + 5)[before_tokens:]
    assert len(recs) == 5 and all(r["path"] == "/token" for r in recs), recs


def test_huge_headers(mirror, upstream):
    big = "x" * (64 * 1024)
    cases = {
        "64 KiB X-Junk value": f"X-Junk: {big}",
        "64 KiB Authorization": f"Authorization: Bearer {big}",
        "64 KiB Accept": f"Accept: {big}",
        "2000 headers": "\r\n".join(f"X-H{i}: {i}" for i in range(2000)),
    }
    for path in ("/v2/library/alpine/manifests/3.19", f"/token?service={SERVICE}"):
        for case, header in cases.items():
            resp = raw_request(mirror.port, get(path, mirror.port, header), timeout=20)
            record(f"{case} {path[:20]}", resp)
            # refused (mitmproxy's or the upstream's 4xx), or answered normally
            # when the mirror does not forward the header: never a 5xx or a hang
            assert resp.status is not None and resp.status < 500, (case, path, resp.short())
    basic = base64.b64encode(b"alice:" + b"p" * 65536).decode()
    resp = raw_request(mirror.port, get(f"/token?service={SERVICE}", mirror.port, f"Authorization: Basic {basic}"), timeout=20)
    record("64 KiB Basic on /token", resp)
    assert resp.status is not None and 400 <= resp.status < 500, resp.short()


def test_huge_request_line(mirror, upstream, tmp_path):
    repo = "team/h-long-query"
    paths = api_paths(upstream, tmp_path, repo)
    token = anonymous_token(mirror.url, repo)
    problems = []
    cases = {f"64 KiB query on {where}": path + ("&" if "?" in path else "?") + "a=" + "b" * 65536
             for where, path in paths.items()}
    cases["64 KiB tag"] = "/v2/library/alpine/manifests/" + "t" * 65536
    cases["64 KiB name"] = "/v2/" + "a" * 65536 + "/manifests/latest"
    for case, path in cases.items():
        resp = raw_request(mirror.port, get(path, mirror.port, f"Authorization: Bearer {token}"), timeout=20)
        record(case, resp)
        # refused (400/404/414/431) or answered normally: never a 5xx
        if resp.status is None or resp.status >= 500:
            problems.append(f"{case}: {resp.short()}")
        elif resp.layer.startswith("addon") and resp.status >= 400:
            assert_registry_error(resp, (400, 404, 414, 431), case)
    assert not problems, "\n".join(problems)
