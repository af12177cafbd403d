"""The addon's hooks, driven with mitmproxy's test helpers against a real
loopback HTTP server standing in for the upstream registry."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import httpx
import pytest
from mitmproxy import exceptions, http
from mitmproxy.addons import block, dumper, proxyserver
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons, tflow

from hubrewrite.addon import HubRewrite
from hubrewrite.responses import CACHE_HEADER

from .as_mitmproxy import fetch
from .driving import drive
from tests.support.ports import free_port

from .recording_server import Canned, RecordingServer

DIGEST = "sha256:" + "b" * 64
CHALLENGE = 'Bearer realm="{realm}",service="test-registry",scope="repository:library/nginx:pull"'
INDEX_TYPES = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
]


def with_core_addons(addon):
    """The addons whose options mitm.conf sets, as in a real mitmdump."""
    return [addon, proxyserver.Proxyserver(), block.Block(), dumper.Dumper()]


def run(coro):
    return asyncio.run(coro)


def make_flow(upstream_url: str, method: str, path: str, headers=(), content=b"", mode: str | None = None) -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.client_conn.proxy_mode = ProxyMode.parse(mode or f"reverse:{upstream_url}")
    flow.client_conn.sockname = ("127.0.0.1", 5000)
    flow.client_conn.timestamp_tls_setup = None
    flow.client_conn.sni = None
    fields = [(k.encode(), v.encode()) for k, v in headers]
    flow.request = http.Request.make(method, upstream_url + path, content, http.Headers(fields))
    return flow


@pytest.fixture
def recording_upstream():
    """A loopback server with canned answers that records what reaches it, standing in for the
    upstream (not the Docker-Hub-shaped ``upstream`` of tests/conftest.py)."""
    with RecordingServer() as server:
        yield server


@pytest.fixture
def addon_ctx(tmp_path):
    addon = HubRewrite()
    with taddons.context(*with_core_addons(addon)) as tctx:
        tctx.configure(addon, hub_config="")
        yield addon, tctx


def body_json(response: http.Response) -> dict:
    return json.loads(response.content)


def test_not_reverse_mode_flows_pass_untouched(addon_ctx, recording_upstream):
    addon, _ = addon_ctx
    flow = make_flow(recording_upstream.url, "GET", "/v2/../x", mode="regular")
    run(drive(addon, flow))
    assert flow.response is None and flow.request.url == recording_upstream.url + "/v2/../x"
    assert recording_upstream.received == []


def test_cors_preflight(addon_ctx, recording_upstream):
    addon, _ = addon_ctx
    flow = make_flow(recording_upstream.url, "OPTIONS", "/v2/library/nginx/manifests/latest")
    run(drive(addon, flow))
    assert flow.response.status_code == 204
    assert flow.response.headers["access-control-allow-origin"] == "*"
    assert "GET" in flow.response.headers["access-control-allow-methods"]
    assert recording_upstream.received == []


@pytest.mark.parametrize(
    "path,status,code",
    [
        ("/v2/../../etc/passwd", 400, "NAME_INVALID"),
        ("/v2/%2e%2e/x/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/a/blobs/md5:00", 400, "DIGEST_INVALID"),
        ("/v2/a/b/manifests/.INVALID_MANIFEST_NAME", 404, "MANIFEST_UNKNOWN"),
        ("/v2/a/b/manifests/", 404, "MANIFEST_UNKNOWN"),
        ("/admin", 404, "UNSUPPORTED"),
    ],
)
def test_bad_paths_get_registry_errors_and_never_reach_upstream(addon_ctx, recording_upstream, path, status, code):
    addon, _ = addon_ctx
    flow = make_flow(recording_upstream.url, "GET", path)
    run(drive(addon, flow))
    assert flow.response.status_code == status
    assert body_json(flow.response)["errors"][0]["code"] == code
    assert flow.response.headers["content-type"].startswith("application/json")
    assert recording_upstream.received == []


@pytest.mark.parametrize("method", ["PUT", "POST", "PATCH", "DELETE"])
def test_read_only_by_default(addon_ctx, recording_upstream, method):
    addon, _ = addon_ctx
    flow = make_flow(recording_upstream.url, method, "/v2/nginx/manifests/latest", content=b"{}")
    run(drive(addon, flow))
    assert flow.response.status_code == 405
    assert body_json(flow.response)["errors"][0]["code"] == "UNSUPPORTED"
    assert recording_upstream.received == []


def test_push_passes_through_when_allowed(addon_ctx, recording_upstream):
    addon, tctx = addon_ctx
    tctx.configure(addon, hub_allow_push=True)
    flow = make_flow(recording_upstream.url, "PATCH", "/v2/nginx/blobs/uploads/abc")
    run(addon.requestheaders(flow))
    assert flow.request.stream
    run(drive(addon, flow))
    assert flow.response is None  # mitmproxy forwards it
    assert flow.request.path == "/v2/library/nginx/blobs/uploads/abc"


def test_base_challenge_realm_points_at_mirror(addon_ctx, recording_upstream):
    addon, _ = addon_ctx
    realm = recording_upstream.url + "/auth/token"
    recording_upstream.routes[("GET", "/v2/")] = Canned(
        401,
        [("WWW-Authenticate", f'Bearer realm="{realm}",service="test-registry"'), ("Content-Type", "application/json")],
        b'{"errors":[{"code":"UNAUTHORIZED"}]}',
    )
    flow = make_flow(recording_upstream.url, "GET", "/v2/")
    run(drive(addon, flow))
    assert flow.response.status_code == 401
    assert flow.response.headers["www-authenticate"] == (
        'Bearer realm="http://127.0.0.1:5000/token",service="test-registry"'
    )
    assert addon.mirror.realms.known(addon.requests[flow.id].upstream) == (realm, "test-registry")


def test_public_url_option_used_for_realm(addon_ctx, recording_upstream):
    addon, tctx = addon_ctx
    tctx.configure(addon, hub_public_url="https://mirror.example.com/")
    recording_upstream.routes[("GET", "/v2/library/nginx/manifests/latest")] = Canned(
        401, [("WWW-Authenticate", CHALLENGE.format(realm="https://auth.example/token") + ',error="insufficient_scope"')]
    )
    flow = make_flow(recording_upstream.url, "GET", "/v2/nginx/manifests/latest")
    run(drive(addon, flow))
    assert flow.response.headers["www-authenticate"] == (
        'Bearer realm="https://mirror.example.com/token",service="test-registry",'
        'scope="repository:library/nginx:pull",error="insufficient_scope"'
    )


def test_public_url_from_tls_server_name(addon_ctx, recording_upstream):
    addon, _ = addon_ctx
    recording_upstream.routes[("GET", "/v2/")] = Canned(401, [("WWW-Authenticate", 'Bearer realm="http://a/t"')])
    flow = make_flow(recording_upstream.url, "GET", "/v2/")
    flow.client_conn.timestamp_tls_setup = 1.0
    flow.client_conn.sni = "mirror.example"
    flow.client_conn.sockname = ("::ffff:10.0.0.1", 8443)
    run(drive(addon, flow))
    assert flow.response.headers["www-authenticate"] == 'Bearer realm="https://mirror.example:8443/token"'


def test_invalid_public_url_is_an_options_error(addon_ctx):
    addon, tctx = addon_ctx
    for bad in ("mirror.example", "ftp://x", "https://u:p@x", "https://x/?q=1"):
        with pytest.raises(exceptions.OptionsError):
            tctx.configure(addon, hub_public_url=bad)


def test_manifest_relay_keeps_headers_and_accept_order(addon_ctx, recording_upstream):
    addon, _ = addon_ctx
    manifest = b'{"schemaVersion":2}'
    recording_upstream.routes[("*", "/v2/library/nginx/manifests/1.27")] = Canned(
        200,
        [
            ("Content-Type", "application/vnd.oci.image.index.v1+json"),
            ("Docker-Content-Digest", DIGEST),
            ("ETag", f'"{DIGEST}"'),
            ("ratelimit-limit", "100;w=21600"),
            ("ratelimit-remaining", "99;w=21600"),
            ("docker-ratelimit-source", "127.0.0.1"),
            ("Connection", "keep-alive, X-Hop"),
            ("X-Hop", "1"),
            ("Set-Cookie", "tracking=1"),
        ],
        manifest,
    )
    headers = [("Accept", t) for t in INDEX_TYPES] + [("Authorization", "Bearer tok")]
    flow = make_flow(recording_upstream.url, "GET", "/v2/nginx/manifests/1.27", headers=headers)
    run(drive(addon, flow))
    response = flow.response
    assert response.status_code == 200
    assert response.content == manifest
    assert response.headers["docker-content-digest"] == DIGEST
    assert response.headers["content-type"] == "application/vnd.oci.image.index.v1+json"
    assert response.headers["etag"] == f'"{DIGEST}"'
    assert response.headers["ratelimit-remaining"] == "99;w=21600"
    assert response.headers["docker-ratelimit-source"] == "127.0.0.1"
    assert response.headers["content-length"] == str(len(manifest))
    assert "x-hop" not in response.headers and "set-cookie" not in response.headers
    [received] = recording_upstream.received
    assert received.path == "/v2/library/nginx/manifests/1.27"
    assert received.all("accept") == INDEX_TYPES
    assert received.header("authorization") == "Bearer tok"


def test_head_manifest_keeps_content_length(addon_ctx, recording_upstream):
    addon, _ = addon_ctx
    recording_upstream.routes[("HEAD", "/v2/library/nginx/manifests/1.27")] = Canned(
        200, [("Docker-Content-Digest", DIGEST), ("Content-Length", "1234")]
    )
    flow = make_flow(recording_upstream.url, "HEAD", "/v2/library/nginx/manifests/1.27")
    run(drive(addon, flow))
    assert flow.response.status_code == 200
    assert flow.response.headers["content-length"] == "1234"
    assert flow.response.headers["docker-content-digest"] == DIGEST


def test_small_redirect_followed_without_credentials(addon_ctx, recording_upstream):
    addon, _ = addon_ctx
    recording_upstream.routes[("GET", "/v2/library/nginx/tags/list")] = Canned(307, [("Location", "/elsewhere/tags?sig=1")])
    recording_upstream.routes[("GET", "/elsewhere/tags")] = Canned(200, [("Content-Type", "application/json")], b'{"tags":[]}')
    flow = make_flow(recording_upstream.url, "GET", "/v2/nginx/tags/list", headers=[("Authorization", "Bearer tok")])
    run(drive(addon, flow))
    assert flow.response.status_code == 200
    assert flow.response.content == b'{"tags":[]}'
    first, second = recording_upstream.received
    assert first.header("authorization") == "Bearer tok"
    assert second.path == "/elsewhere/tags?sig=1"
    assert second.header("authorization") is None


def test_blob_redirect_retargets_flow_without_credentials(addon_ctx, recording_upstream):
    addon, _ = addon_ctx
    cdn = recording_upstream.url + "/docker/registry/v2/blobs/sha256/bb/x/data?expires=1&signature=abc"
    recording_upstream.routes[("GET", f"/v2/library/nginx/blobs/{DIGEST}")] = Canned(
        307, [("Location", cdn), ("Docker-Content-Digest", DIGEST)]
    )
    headers = [("Authorization", "Bearer tok"), ("Cookie", "a=b"), ("Range", "bytes=10-19"), ("Accept", "*/*")]
    flow = make_flow(recording_upstream.url, "GET", f"/v2/nginx/blobs/{DIGEST}", headers=headers)
    run(drive(addon, flow))
    assert flow.response is None
    assert flow.request.url == cdn
    assert "authorization" not in flow.request.headers
    assert "cookie" not in flow.request.headers
    assert flow.request.headers["range"] == "bytes=10-19"
    assert addon.requests[flow.id].transfer.digest == DIGEST
    [probe] = recording_upstream.received
    assert probe.header("authorization") == "Bearer tok"
    assert probe.header("range") == "bytes=10-19"

    # the CDN's answer is streamed and carries the digest the registry named
    flow.response = http.Response.make(206, b"", {"Content-Range": "bytes 10-19/100", "Content-Length": "10"})
    addon.responseheaders(flow)
    assert flow.response.stream
    assert flow.response.headers["docker-content-digest"] == DIGEST


def test_blob_storage_error_becomes_registry_error(addon_ctx, recording_upstream):
    addon, _ = addon_ctx
    recording_upstream.routes[("GET", f"/v2/library/nginx/blobs/{DIGEST}")] = Canned(307, [("Location", recording_upstream.url + "/cdn")])
    # a ranged GET: without a cache mitmproxy relays it from the storage (a whole one the mirror streams)
    flow = make_flow(recording_upstream.url, "GET", f"/v2/library/nginx/blobs/{DIGEST}?_hub_retry=1",  # no second chance
                     headers=[("Range", "bytes=5-")])
    run(drive(addon, flow))
    assert addon.requests[flow.id].transfer.digest == DIGEST
    flow.response = http.Response.make(403, b"<Error>AccessDenied</Error>", {"Content-Type": "application/xml"})
    addon.responseheaders(flow)
    assert not flow.response.stream
    addon.response(flow)
    assert flow.response.status_code == 502
    assert body_json(flow.response)["errors"][0]["code"] == "UNAVAILABLE"


def test_blob_served_directly_by_registry_ranged_is_fetched_by_mitmproxy(addon_ctx, recording_upstream):
    addon, _ = addon_ctx
    recording_upstream.routes[("*", f"/v2/library/nginx/blobs/{DIGEST}")] = Canned(200, [("Docker-Content-Digest", DIGEST)], b"x" * 10)
    flow = make_flow(recording_upstream.url, "GET", f"/v2/nginx/blobs/{DIGEST}", headers=[("Range", "bytes=2-")])
    head = make_flow(recording_upstream.url, "HEAD", f"/v2/nginx/blobs/{DIGEST}")

    async def both() -> None:  # on one loop: the probe's connection is pooled for the next request
        await drive(addon, flow)
        await drive(addon, head)

    run(both())
    assert flow.response is None
    assert flow.request.url == f"{recording_upstream.url}/v2/library/nginx/blobs/{DIGEST}"
    assert head.response.status_code == 200
    assert head.response.headers["content-length"] == "10"


def test_whole_blob_without_cache_is_streamed_by_the_mirror_and_verified(addon_ctx, recording_upstream):
    """Without a cache a whole blob GET is the mirror's own transfer (resumed after a cut, checked
    against its digest): the client gets one 200 with the blob; bytes that are not the blob end
    short, never as a complete-looking answer."""
    addon, _ = addon_ctx
    blob = b"the blob's bytes" * 1000
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    recording_upstream.routes[("*", f"/v2/library/nginx/blobs/{digest}")] = Canned(307, [("Location", recording_upstream.url + "/cdn/good")])
    recording_upstream.routes[("GET", "/cdn/good")] = Canned(200, [], blob)
    recording_upstream.routes[("*", f"/v2/library/nginx/blobs/{DIGEST}")] = Canned(307, [("Location", recording_upstream.url + "/cdn/bad")])
    recording_upstream.routes[("GET", "/cdn/bad")] = Canned(200, [], b"not that blob")
    good = make_flow(recording_upstream.url, "GET", f"/v2/nginx/blobs/{digest}")
    bad = make_flow(recording_upstream.url, "GET", f"/v2/nginx/blobs/{DIGEST}")

    async def both() -> None:
        await drive(addon, good)
        await drive(addon, bad)

    run(both())
    assert good.request.path.startswith("/streams/")
    assert good.response.status_code == 200 and good.response.content == blob
    assert good.response.headers["docker-content-digest"] == digest
    assert bad.response is None and bad.error is not None  # ended short: a failed transfer


def test_blob_unauthorized_answer_relayed_with_rewritten_challenge(addon_ctx, recording_upstream):
    addon, _ = addon_ctx
    recording_upstream.routes[("GET", f"/v2/library/nginx/blobs/{DIGEST}")] = Canned(
        401, [("WWW-Authenticate", CHALLENGE.format(realm="http://auth.example/token"))], b'{"errors":[]}'
    )
    flow = make_flow(recording_upstream.url, "GET", f"/v2/nginx/blobs/{DIGEST}")
    run(drive(addon, flow))
    assert flow.response.status_code == 401
    assert 'realm="http://127.0.0.1:5000/token"' in flow.response.headers["www-authenticate"]


def after_challenge(addon, recording_upstream, realm, flow):
    """Let the addon see the upstream's challenge, then handle flow (one event loop:
    the addon's HTTP client keeps its connections)."""
    recording_upstream.routes[("GET", "/v2/")] = Canned(401, [("WWW-Authenticate", f'Bearer realm="{realm}",service="test-registry"')])

    async def scenario():
        await drive(addon, make_flow(recording_upstream.url, "GET", "/v2/"))
        recording_upstream.received.clear()
        await drive(addon, flow)

    run(scenario())


def test_token_get_goes_to_learned_realm_with_credentials(addon_ctx, recording_upstream):
    addon, _ = addon_ctx
    recording_upstream.routes[("GET", "/auth/token")] = Canned(200, [("Content-Type", "application/json")], b'{"token":"t"}')
    flow = make_flow(
        recording_upstream.url,
        "GET",
        "/token?service=test-registry&scope=repository:nginx:pull&scope=repository:a/b:pull&offline_token=true"
        "&account=alice&realm=http://evil.example/",
        headers=[("Authorization", "Basic YWxpY2U6cHc="), ("Cookie", "x=1")],
    )
    after_challenge(addon, recording_upstream, recording_upstream.url + "/auth/token", flow)
    assert flow.response.status_code == 200
    assert flow.response.content == b'{"token":"t"}'
    [received] = recording_upstream.received
    assert received.path.startswith("/auth/token?")
    assert "scope=repository%3Alibrary%2Fnginx%3Apull&scope=repository%3Aa%2Fb%3Apull" in received.path
    assert received.header("authorization") == "Basic YWxpY2U6cHc="
    assert received.header("cookie") is None


def test_token_wrong_credentials_get_upstream_401(addon_ctx, recording_upstream):
    addon, _ = addon_ctx
    recording_upstream.routes[("GET", "/auth/token")] = Canned(401, [("Content-Type", "application/json")], b'{"details":"incorrect username or password"}')
    flow = make_flow(recording_upstream.url, "GET", "/token?service=test-registry", headers=[("Authorization", "Basic eDp5")])
    after_challenge(addon, recording_upstream, recording_upstream.url + "/auth/token", flow)
    assert flow.response.status_code == 401
    assert b"incorrect" in flow.response.content


def test_token_post_form_rewritten(addon_ctx, recording_upstream):
    addon, _ = addon_ctx
    recording_upstream.routes[("POST", "/auth/token")] = Canned(200, [("Content-Type", "application/json")], b'{"access_token":"t"}')
    body = b"grant_type=refresh_token&refresh_token=r&client_id=containerd&scope=repository%3Anginx%3Apull&service=test-registry"
    flow = make_flow(recording_upstream.url, "POST", "/token", headers=[("Content-Type", "application/x-www-form-urlencoded")], content=body)
    after_challenge(addon, recording_upstream, recording_upstream.url + "/auth/token", flow)
    assert flow.response.status_code == 200
    [received] = recording_upstream.received
    assert b"scope=repository%3Alibrary%2Fnginx%3Apull" in received.body
    assert b"refresh_token=r" in received.body


def test_token_learns_realm_when_none_seen_yet(addon_ctx, recording_upstream):
    addon, _ = addon_ctx
    recording_upstream.routes[("GET", "/v2/")] = Canned(401, [("WWW-Authenticate", f'Bearer realm="{recording_upstream.url}/auth/token"')])
    recording_upstream.routes[("GET", "/auth/token")] = Canned(200, [], b"{}")
    flow = make_flow(recording_upstream.url, "GET", "/token?service=x")
    run(drive(addon, flow))
    assert flow.response.status_code == 200
    assert [r.path.partition("?")[0] for r in recording_upstream.received] == ["/v2/", "/auth/token"]


def test_upstream_unreachable_is_registry_error():
    addon = HubRewrite()
    with taddons.context(*with_core_addons(addon)) as tctx:
        tctx.configure(addon, hub_config="")
        flow = make_flow(f"http://127.0.0.1:{free_port()}", "GET", "/v2/library/nginx/manifests/latest")
        run(drive(addon, flow))
        assert flow.response.status_code == 502
        assert body_json(flow.response)["errors"][0]["code"] == "UNAVAILABLE"


def test_upstream_timeout_is_504(addon_ctx, recording_upstream):
    addon, tctx = addon_ctx
    tctx.configure(addon, hub_upstream_timeout=1)
    recording_upstream.routes[("GET", "/v2/library/nginx/manifests/latest")] = Canned(delay_forever=True)
    flow = make_flow(recording_upstream.url, "GET", "/v2/nginx/manifests/latest")
    run(drive(addon, flow))
    assert flow.response.status_code == 504
    assert body_json(flow.response)["errors"][0]["code"] == "UNAVAILABLE"


def test_oversized_answer_refused(addon_ctx, recording_upstream):
    addon, tctx = addon_ctx
    tctx.configure(addon, hub_max_buffered_body=65536)
    recording_upstream.routes[("GET", "/v2/library/nginx/tags/list")] = Canned(200, [], b"x" * 70000)
    flow = make_flow(recording_upstream.url, "GET", "/v2/nginx/tags/list")
    run(drive(addon, flow))
    assert flow.response.status_code == 502


def configured(conf_path: Path, **cli):
    addon = HubRewrite()
    ctx = taddons.context(*with_core_addons(addon))
    tctx = ctx.__enter__()
    for key, value in cli.items():
        setattr(tctx.options, key, value)  # as if given with --set
    return addon, tctx, ctx


def test_config_file_applies_where_command_line_is_silent(tmp_path: Path):
    conf = tmp_path / "mitm.conf"
    conf.write_text("hub_upstream_timeout: 7\nhub_official_prefix: official\nhttp2: false\n")
    addon, tctx, ctx = configured(conf, hub_official_prefix="cli")
    try:
        tctx.configure(addon, hub_config=str(conf))
        assert tctx.options.hub_upstream_timeout == 7
        assert tctx.options.http2 is False
        assert tctx.options.hub_official_prefix == "cli"
    finally:
        ctx.__exit__(None, None, None)


@pytest.mark.parametrize(
    "text,message",
    [
        ("bogus: 1\n", "unknown option"),
        ("listen_port: 5000\n", "listeners"),
        ("mode: [regular]\n", "listeners"),
        ("hub_upstream_timeout: [1, 2]\n", "hub_upstream_timeout"),
        ("a: [unclosed\n", "line"),
        (None, "does not exist"),
    ],
)
def test_config_file_errors_are_clear(tmp_path: Path, text, message):
    conf = tmp_path / "mitm.conf"
    if text is not None:
        conf.write_text(text)
    addon, tctx, ctx = configured(conf)
    try:
        with pytest.raises(exceptions.OptionsError, match=message):
            tctx.configure(addon, hub_config=str(conf))
    finally:
        ctx.__exit__(None, None, None)


def test_shipped_mitm_conf_loads(tmp_path: Path):
    from hubrewrite.config_file import DEFAULT_CONFIG

    addon, tctx, ctx = configured(DEFAULT_CONFIG)
    try:
        tctx.configure(addon, hub_config=str(DEFAULT_CONFIG))
        assert tctx.options.http2 is False
        assert tctx.options.stream_large_bodies == "1m"
        assert tctx.options.block_global is False
    finally:
        ctx.__exit__(None, None, None)


async def fetch_from_loopback(addon, flow) -> httpx.Response:
    """What mitmproxy does with a flow retargeted to the mirror's loopback server."""
    assert flow.request.port == addon.mirror.loopback.server.port
    return await fetch(flow)


def blob_with_cache(addon_ctx, recording_upstream, tmp_path, data: bytes, cdn_path: str = "/cdn/x"):
    """A caching addon; its upstream redirects a blob path to `cdn_path` on itself, which serves `data`."""
    addon, tctx = addon_ctx
    tctx.configure(addon, hub_cache_dir=str(tmp_path / "cache"))
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blob_path = f"/v2/library/nginx/blobs/{digest}"
    recording_upstream.routes[("*", blob_path)] = Canned(307, [("Location", recording_upstream.url + cdn_path + "?sig=1")])
    recording_upstream.routes[("GET", cdn_path)] = Canned(200, [("Content-Length", str(len(data)))], data)
    return addon, blob_path, digest


def test_cache_fill_then_hit_with_confirmed_access(addon_ctx, recording_upstream, tmp_path):
    data = b"layer-bytes" * 10_000  # larger than INLINE_LIMIT: streamed from the loopback server
    addon, blob_path, digest = blob_with_cache(addon_ctx, recording_upstream, tmp_path, data)

    async def scenario():
        cold = make_flow(recording_upstream.url, "GET", blob_path, headers=[("Authorization", "Bearer t1")])
        await drive(addon, cold)
        assert cold.request.path == f"/blobs/{digest}" and "authorization" not in cold.request.headers
        assert (await fetch_from_loopback(addon, cold)).content == data
        [probe, cdn] = recording_upstream.received
        assert probe.header("authorization") == "Bearer t1" and cdn.path == "/cdn/x?sig=1"
        assert cdn.header("authorization") is None
        assert addon.mirror.cache.store.has_blob(digest)

        # same token: access remembered, no upstream request at all
        recording_upstream.received.clear()
        warm = make_flow(recording_upstream.url, "GET", blob_path, headers=[("Authorization", "Bearer t1"), ("Range", "bytes=0-3")])
        await drive(addon, warm)
        assert warm.request.host == "127.0.0.1" and warm.request.port == addon.mirror.loopback.server.port
        assert "authorization" not in warm.request.headers and warm.request.headers["range"] == "bytes=0-3"
        assert (await fetch_from_loopback(addon, warm)).content == data[:4]
        assert recording_upstream.received == []

        # another token the upstream refuses: the cached bytes are not served
        refusal = Canned(401, [("WWW-Authenticate", 'Bearer realm="http://a/t",error="insufficient_scope"')],
                         b'{"errors":[{"code":"UNAUTHORIZED","message":"no"}]}')
        recording_upstream.routes[("HEAD", blob_path)] = recording_upstream.routes[("GET", blob_path)] = refusal
        other = make_flow(recording_upstream.url, "GET", blob_path, headers=[("Authorization", "Bearer other")])
        await drive(addon, other)
        assert other.response.status_code == 401
        assert json.loads(other.response.content)["errors"][0]["code"] == "UNAUTHORIZED"
        # the answer is the upstream's own, as for an uncached blob: nothing tells what the cache holds
        assert [r.method for r in recording_upstream.received] == ["HEAD", "GET"]
        await addon.done()

    run(scenario())


def test_cache_mismatch_ends_every_transfer_short_and_keeps_nothing(addon_ctx, recording_upstream, tmp_path):
    real = b"the-real-blob" * 10_000
    addon, blob_path, digest = blob_with_cache(addon_ctx, recording_upstream, tmp_path, real)
    recording_upstream.routes[("GET", "/cdn/x")] = Canned(200, [("Content-Length", str(len(real)))], b"not-the-blob!" * 10_000)

    async def scenario():
        flow = make_flow(recording_upstream.url, "GET", blob_path)
        await drive(addon, flow)
        try:
            answer = await fetch_from_loopback(addon, flow)
        except httpx.RemoteProtocolError:
            pass  # followed the download: fewer bytes than announced, a failed transfer
        else:
            assert answer.status_code >= 400  # came after the download failed: an error, never the wrong bytes
        assert not addon.mirror.cache.store.has_blob(digest)
        assert digest not in addon.mirror.cache.downloads.running
        await addon.done()

    run(scenario())


def test_small_blob_is_answered_whole_once_verified(addon_ctx, recording_upstream, tmp_path):
    """A blob up to INLINE_LIMIT (a config blob) is answered with its bytes, no loopback
    hop; one whose download does not match its digest gets a registry error, never the bytes."""
    data = b"config" * 100
    addon, blob_path, digest = blob_with_cache(addon_ctx, recording_upstream, tmp_path, data)
    wrong = b"x" * len(data)
    wrong_digest = "sha256:" + hashlib.sha256(b"y" * len(data)).hexdigest()
    wrong_path = f"/v2/library/nginx/blobs/{wrong_digest}"
    recording_upstream.routes[("*", wrong_path)] = Canned(307, [("Location", recording_upstream.url + "/cdn/wrong")])
    recording_upstream.routes[("GET", "/cdn/wrong")] = Canned(200, [("Content-Length", str(len(wrong)))], wrong)

    async def scenario():
        cold = make_flow(recording_upstream.url, "GET", blob_path, headers=[("Authorization", "Bearer t1")])
        await drive(addon, cold)
        assert cold.response.status_code == 200 and cold.response.content == data
        assert cold.response.headers["docker-content-digest"] == digest
        assert cold.response.headers[CACHE_HEADER] == "miss"
        recording_upstream.received.clear()
        warm = make_flow(recording_upstream.url, "GET", blob_path, headers=[("Authorization", "Bearer t1")])
        await drive(addon, warm)
        assert warm.response.content == data and warm.response.headers[CACHE_HEADER] == "hit"
        assert recording_upstream.received == []  # access remembered for this token

        mismatch = make_flow(recording_upstream.url, "GET", wrong_path)
        await drive(addon, mismatch)
        assert mismatch.response.status_code == 502
        assert json.loads(mismatch.response.content)["errors"][0]["code"] == "UNAVAILABLE"
        assert not addon.mirror.cache.store.has_blob(wrong_digest)
        await addon.done()

    run(scenario())


def test_cache_aborted_download_releases_it(addon_ctx, recording_upstream, tmp_path):
    size = 100_000  # streamed: larger than INLINE_LIMIT
    addon, blob_path, digest = blob_with_cache(addon_ctx, recording_upstream, tmp_path, b"x" * size)
    recording_upstream.routes[("GET", "/cdn/x")] = Canned(200, [("Content-Length", str(size))], b"partial")  # then stalls
    addon_ctx[1].configure(addon, hub_upstream_timeout=1)

    async def scenario():
        flow = make_flow(recording_upstream.url, "GET", blob_path)
        await drive(addon, flow)
        download = addon.requests[flow.id].transfer.download
        try:
            answer = await fetch_from_loopback(addon, flow)
        except httpx.HTTPError:
            pass  # a failed transfer
        else:
            assert answer.status_code >= 400
        await download.task  # the storage stalled: the download gives up after hub_upstream_timeout
        assert not addon.mirror.cache.store.has_blob(digest)
        assert list(addon.mirror.cache.store.tmp.glob("*.download")) == []
        # the next client may download it again
        recording_upstream.routes[("GET", "/cdn/x")] = Canned(200, [("Content-Length", str(size))], b"x" * size)
        again = make_flow(recording_upstream.url, "GET", blob_path)
        await drive(addon, again)
        assert addon.requests[again.id].transfer.download is not None
        assert (await fetch_from_loopback(addon, again)).content == b"x" * size
        await addon.done()

    run(scenario())


@pytest.mark.parametrize(
    "ns,status,code",
    [
        ("evil.example", 404, "NAME_UNKNOWN"),
        ("http://evil.example", 400, "NAME_INVALID"),
        ("docker.io/x", 400, "NAME_INVALID"),
        ("docker.io\r\nX: 1", 400, "NAME_INVALID"),
    ],
)
def test_ns_must_name_the_served_registry(addon_ctx, recording_upstream, ns, status, code):
    from urllib.parse import quote

    addon, _ = addon_ctx
    flow = make_flow(recording_upstream.url, "GET", f"/v2/library/nginx/manifests/1?ns={quote(ns)}")
    run(drive(addon, flow))
    assert flow.response.status_code == status
    assert body_json(flow.response)["errors"][0]["code"] == code
    assert recording_upstream.received == []


def test_ns_of_the_served_registry_is_accepted_and_not_forwarded(addon_ctx, recording_upstream):
    addon, _ = addon_ctx
    recording_upstream.routes[("GET", "/v2/library/nginx/manifests/1")] = Canned(200, [], b"{}")
    flow = make_flow(recording_upstream.url, "GET", "/v2/library/nginx/manifests/1?ns=docker.io")
    run(drive(addon, flow))
    assert flow.response.status_code == 200
    assert recording_upstream.received[0].path == "/v2/library/nginx/manifests/1"


RANGED = [("Range", "bytes=100-")]  # relayed by mitmproxy without a cache (a whole blob is the mirror's own stream)


def test_expired_signed_url_sends_client_back_once(addon_ctx, recording_upstream):
    addon, _ = addon_ctx
    blob_path = f"/v2/library/nginx/blobs/{DIGEST}"
    recording_upstream.routes[("*", blob_path)] = Canned(307, [("Location", recording_upstream.url + "/cdn?sig=old")])

    async def scenario():
        flow = make_flow(recording_upstream.url, "GET", blob_path, headers=RANGED)
        await drive(addon, flow)
        flow.response = http.Response.make(403, b"<Error>Request has expired</Error>")
        addon.responseheaders(flow)
        addon.response(flow)
        assert flow.response.status_code == 307
        assert flow.response.headers["location"] == f"{blob_path}?_hub_retry=1"

        again = make_flow(recording_upstream.url, "GET", f"{blob_path}?_hub_retry=1", headers=RANGED)
        await drive(addon, again)
        assert recording_upstream.received[-1].path == blob_path  # the marker is the mirror's own
        again.response = http.Response.make(403, b"expired")
        addon.responseheaders(again)
        addon.response(again)
        assert again.response.status_code == 502

    run(scenario())


def test_the_second_chance_is_the_clients_own_request(addon_ctx, recording_upstream):
    """The client named the repository its way (no ``library/``) and the registry with
    ``ns``: the way back keeps both, or a mirror serving several registries would lose it."""
    addon, _ = addon_ctx
    recording_upstream.routes[("*", f"/v2/library/nginx/blobs/{DIGEST}")] = Canned(307, [("Location", recording_upstream.url + "/cdn?sig=old")])
    client_path = f"/v2/nginx/blobs/{DIGEST}"

    async def scenario():
        flow = make_flow(recording_upstream.url, "GET", f"{client_path}?ns=docker.io", headers=RANGED)
        await drive(addon, flow)
        flow.response = http.Response.make(403, b"<Error>Request has expired</Error>")
        addon.responseheaders(flow)
        addon.response(flow)
        assert flow.response.headers["location"] == f"{client_path}?ns=docker.io&_hub_retry=1"
        again = make_flow(recording_upstream.url, "GET", flow.response.headers["location"], headers=RANGED)
        await drive(addon, again)
        assert recording_upstream.received[-1].path == f"/v2/library/nginx/blobs/{DIGEST}"  # ns and marker are the mirror's

    run(scenario())


def test_unreachable_blob_storage_is_a_registry_error(addon_ctx, recording_upstream):
    addon, _ = addon_ctx
    recording_upstream.routes[("*", f"/v2/library/nginx/blobs/{DIGEST}")] = Canned(
        307, [("Location", f"http://127.0.0.1:{free_port()}/cdn/x")]
    )
    flow = make_flow(recording_upstream.url, "GET", f"/v2/nginx/blobs/{DIGEST}")
    run(drive(addon, flow))
    assert flow.response.status_code == 502
    assert body_json(flow.response)["errors"][0]["code"] == "UNAVAILABLE"
    assert addon.requests[flow.id].transfer is None


def with_unreachable_bucket(addon_ctx, tmp_path, monkeypatch):
    """A caching addon on a bucket whose endpoint refuses connections (each call fails fast)."""
    addon, tctx = addon_ctx
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    tctx.configure(addon, hub_cache_dir=str(tmp_path / "cache"), hub_store_url="s3://bucket/hub",
                   hub_store_endpoint=f"http://127.0.0.1:{free_port()}", hub_store_addressing="path")
    return addon


def test_shutdown_waits_for_blobs_on_their_way_to_the_shared_bucket(addon_ctx, tmp_path, monkeypatch):
    """done() awaits the shared store's background work (uploads): before, it only scheduled the
    close, and the loop's end cancelled an upload not yet handed to its thread."""
    addon = with_unreachable_bucket(addon_ctx, tmp_path, monkeypatch)
    finished: list[str] = []

    async def upload_still_going() -> None:
        await asyncio.sleep(0.3)
        finished.append("uploaded")

    async def scenario():
        addon.mirror.cache.shared.later(upload_still_going())
        await addon.done()
        assert finished == ["uploaded"]

    run(scenario())


def test_shutdown_cancels_a_running_download_and_does_not_wait_out_its_lock_refresh(addon_ctx, tmp_path, monkeypatch):
    """A download still running at shutdown is cancelled and lets its file and locks go; its bucket
    lock's refresher ends with it (it slept KEEP_LOCK_EVERY before: shutdown waited 30 s)."""
    from hubrewrite.cache.downloads import DownloadState

    from .fed_upstream import FedUpstream

    addon = with_unreachable_bucket(addon_ctx, tmp_path, monkeypatch)
    digest = "sha256:" + hashlib.sha256(b"never finished").hexdigest()

    async def scenario():
        cache = addon.mirror.cache
        download = cache.downloads.claim(digest)
        upstream = FedUpstream(1 << 20)
        download.start(upstream, lambda n: None)
        cache.tiers.publish_when_done(download)
        await upstream.queue.put(b"x" * 1000)
        await asyncio.sleep(0.1)
        started = asyncio.get_running_loop().time()
        await addon.done()
        assert asyncio.get_running_loop().time() - started < 10
        assert download.state is DownloadState.FAILED and digest not in cache.downloads.running
        assert list(cache.store.tmp.glob("*.download")) == []

    run(scenario())
