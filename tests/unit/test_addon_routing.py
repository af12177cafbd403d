"""Routing, per-upstream tokens, mirror accounts and forward-proxy mode, driven
with mitmproxy's test helpers against two real loopback servers standing in
for two registries (the default one and "ghcr.io")."""

from __future__ import annotations

import hashlib

import asyncio
import json

import pytest
from mitmproxy import exceptions, http
from mitmproxy.test import taddons

from hubrewrite.access.accounts import hash_password
from hubrewrite.addon import HubRewrite
from tests.support.auth import basic
from tests.support.ports import free_port

from .driving import drive
from .recording_server import Canned, RecordingServer
from .test_addon import body_json, make_flow, with_core_addons

MANIFEST = b'{"schemaVersion":2}'
GHCR_TOKEN = json.dumps({"token": "ghcr-token", "expires_in": 300}).encode()
HUB_TOKEN = json.dumps({"token": "hub-token", "expires_in": 300}).encode()


def registry(server: RecordingServer, service: str, token_body: bytes) -> None:
    """A token-auth registry: /v2/ challenges, /auth hands out tokens, one manifest."""
    challenge = f'Bearer realm="{server.url}/auth",service="{service}"'
    server.routes[("GET", "/v2/")] = Canned(401, [("WWW-Authenticate", challenge)])
    server.routes[("*", "/auth")] = Canned(200, [("Content-Type", "application/json")], token_body)
    for name in ("owner/tool", "library/nginx", "library/busybox"):
        server.routes[("*", f"/v2/{name}/manifests/1.0")] = Canned(
            200, [("Content-Type", "application/vnd.oci.image.manifest.v1+json")], MANIFEST)
    server.routes[("GET", "/v2/owner/private/manifests/1.0")] = Canned(
        401, [("WWW-Authenticate", f'Bearer realm="{server.url}/auth",service="{service}",'
                                   'scope="repository:owner/private:pull",error="insufficient_scope"')])


@pytest.fixture
def hub():
    with RecordingServer() as server:
        registry(server, "hub-service", HUB_TOKEN)
        yield server


@pytest.fixture
def ghcr():
    with RecordingServer() as server:
        registry(server, "ghcr-service", GHCR_TOKEN)
        yield server


@pytest.fixture
def routed(hub, ghcr):
    addon = HubRewrite()
    # one loop for the whole test: the addon's HTTP client keeps connections across requests
    with taddons.context(*with_core_addons(addon)) as tctx:
        tctx.configure(addon, hub_config="", keep_host_header=True,
                       hub_upstreams=["docker.io=https://registry-1.docker.io", f"ghcr.io={ghcr.url}"],
                       hub_host_map=["ghcr.mirror.test=ghcr.io"])
        tctx.master.event_loop.run_until_complete(asyncio.sleep(0))
        LOOP.append(tctx.master.event_loop)
        yield addon, tctx
        run(addon.done())
        LOOP.clear()


LOOP: list[asyncio.AbstractEventLoop] = []


def run(coro):
    return LOOP[0].run_until_complete(coro)


def ask(addon, hub, method, path, headers=(), content=b"", mode=None, host=None):
    flow = make_flow(hub.url, method, path, headers=headers, content=content, mode=mode)
    if host:
        flow.request.headers["Host"] = host  # as the client sent it (keep_host_header)
    run(drive(addon, flow))
    return flow


def paths(server: RecordingServer) -> list[str]:
    return [r.path for r in server.received]


def test_ns_selects_the_registry_and_is_not_forwarded(routed, hub, ghcr):
    addon, _ = routed
    flow = ask(addon, hub, "GET", "/v2/owner/tool/manifests/1.0?ns=ghcr.io")
    assert flow.response.status_code == 200 and flow.response.content == MANIFEST
    assert paths(ghcr) == ["/v2/owner/tool/manifests/1.0"] and paths(hub) == []
    assert flow.comment == f"hub: ghcr.io owner/tool at {ghcr.url}"  # for mitmweb
    # the library/ rule is Docker Hub's only
    flow = ask(addon, hub, "GET", "/v2/nginx/manifests/1.0?ns=docker.io")
    assert flow.response.status_code == 200 and paths(hub) == ["/v2/library/nginx/manifests/1.0"]


def test_unknown_ns_or_prefix_is_refused_without_a_connection(routed, hub, ghcr):
    addon, _ = routed
    for path in ("/v2/x/y/manifests/1.0?ns=quay.io", "/v2/x/manifests/1.0?ns=127.0.0.1:1",
                 "/v2/evil.test/x/manifests/1.0", "/v2/?ns=evil.test"):
        flow = ask(addon, hub, "GET", path)
        assert flow.response.status_code == 404, path
        assert body_json(flow.response)["errors"][0]["code"] == "NAME_UNKNOWN"
    assert hub.received == [] and ghcr.received == []


def test_path_prefix_strips_the_registry_and_challenges_name_it_back(routed, hub, ghcr):
    addon, _ = routed
    flow = ask(addon, hub, "GET", "/v2/ghcr.io/owner/private/manifests/1.0")
    assert paths(ghcr) == ["/v2/owner/private/manifests/1.0"]
    assert flow.response.status_code == 401
    assert flow.response.headers["www-authenticate"] == (
        'Bearer realm="http://127.0.0.1:5000/token/ghcr.io",service="ghcr-service",'
        'scope="repository:ghcr.io/owner/private:pull",error="insufficient_scope"'
    )


def test_host_map_routes_by_the_client_host(routed, hub, ghcr):
    addon, _ = routed
    flow = ask(addon, hub, "GET", "/v2/owner/tool/manifests/1.0", host="ghcr.mirror.test")
    assert flow.response.status_code == 200 and paths(ghcr) == ["/v2/owner/tool/manifests/1.0"]
    # and its /token is ghcr's
    flow = ask(addon, hub, "GET", "/token?scope=repository:owner/tool:pull&service=x", host="ghcr.mirror.test")
    assert body_json(flow.response)["token"] == "ghcr-token"


def test_token_per_registry_with_scopes_and_service_of_that_registry(routed, hub, ghcr):
    addon, _ = routed
    flow = ask(addon, hub, "GET", "/token/ghcr.io?service=hub-service&scope=repository:owner/tool:pull",
               headers=[("Authorization", basic("alice", "pw"))])
    assert body_json(flow.response)["token"] == "ghcr-token"
    auth = ghcr.received[-1]
    assert auth.path == "/auth?service=ghcr-service&scope=repository%3Aowner%2Ftool%3Apull"
    assert auth.header("authorization") == basic("alice", "pw")
    assert [r for r in hub.received if r.path.startswith("/auth")] == []  # credentials went to ghcr only

    # a path-prefix client asks the default realm with prefixed scopes
    flow = ask(addon, hub, "GET", "/token?service=hub-service&scope=repository:ghcr.io/owner/tool:pull")
    assert body_json(flow.response)["token"] == "ghcr-token"
    assert ghcr.received[-1].path == "/auth?service=ghcr-service&scope=repository%3Aowner%2Ftool%3Apull"

    flow = ask(addon, hub, "GET", "/token?scope=repository:ghcr.io/a:pull&scope=repository:nginx:pull")
    assert flow.response.status_code == 400
    for path in ("/token/evil.test", "/token/127.0.0.1:1", "/token/..%2fx"):
        assert ask(addon, hub, "GET", path).response.status_code == 404, path


def test_deny_and_allow_patterns(routed, hub, ghcr):
    addon, tctx = routed
    tctx.configure(addon, hub_deny=["docker.io/library/busybox"], hub_allow=["docker.io/library/*", "ghcr.io/owner/*"])
    for path in ("/v2/busybox/manifests/1.0", "/v2/team/app/manifests/1.0", "/v2/ghcr.io/other/x/manifests/1.0"):
        flow = ask(addon, hub, "GET", path)
        assert flow.response.status_code == 403, path
        assert body_json(flow.response)["errors"][0]["code"] == "DENIED"
    assert hub.received == [] and ghcr.received == []
    assert ask(addon, hub, "GET", "/v2/ghcr.io/owner/tool/manifests/1.0").response.status_code == 200
    with pytest.raises(exceptions.OptionsError):
        tctx.configure(addon, hub_deny=["busybox"])


@pytest.fixture
def accounts(routed, tmp_path):
    addon, tctx = routed
    users = tmp_path / "users"
    users.write_text(f"ann:{hash_password('mirror-pw')}\nbob:{hash_password('bob-pw', 'argon2')}\n")
    tctx.configure(addon, hub_users_file=str(users))
    return addon, tctx


def test_accounts_v2_needs_a_token_the_mirror_issued(accounts, hub, ghcr):
    addon, _ = accounts
    flow = ask(addon, hub, "GET", "/v2/ghcr.io/owner/tool/manifests/1.0", headers=[("Authorization", "Bearer ghcr-token")])
    assert flow.response.status_code == 401
    assert body_json(flow.response)["errors"][0]["code"] == "UNAUTHORIZED"
    assert flow.response.headers["www-authenticate"] == (
        'Bearer realm="http://127.0.0.1:5000/token/ghcr.io",service="ghcr-service",scope="repository:ghcr.io/owner/tool:pull"')
    assert [r.path for r in ghcr.received] == ["/v2/"]  # only to learn the service

    for bad in (None, basic("ann", "wrong"), basic("eve", "mirror-pw"), basic("ann", "mirror-pw:alice")):
        headers = [("Authorization", bad)] if bad else []
        flow = ask(addon, hub, "GET", "/token/ghcr.io?scope=repository:owner/tool:pull", headers=headers)
        assert flow.response.status_code == 401, bad
        assert flow.response.headers["www-authenticate"] == 'Basic realm="hub-rewrite"'
    assert [r for r in ghcr.received if r.path.startswith("/auth")] == []

    # the mirror password alone: an anonymous upstream token, sealed for ann (any process with the key opens it)
    flow = ask(addon, hub, "GET", "/token/ghcr.io?scope=repository:owner/tool:pull",
               headers=[("Authorization", basic("ann", "mirror-pw"))])
    sealed = body_json(flow.response)["token"]
    assert sealed.startswith("hub1.") and "ghcr-token" not in sealed
    assert ghcr.received[-1].header("authorization") is None
    flow = ask(addon, hub, "GET", "/v2/ghcr.io/owner/tool/manifests/1.0", headers=[("Authorization", f"Bearer {sealed}")])
    assert flow.response.status_code == 200
    assert ghcr.received[-1].header("authorization") == "Bearer ghcr-token"  # the upstream's own token goes on

    # with upstream credentials after the mirror password (argon2 user)
    ask(addon, hub, "GET", "/token/ghcr.io", headers=[("Authorization", basic("bob", "bob-pw:alice:up:pw"))])
    assert ghcr.received[-1].header("authorization") == basic("alice", "up:pw")


def test_a_blob_the_registry_serves_itself_gets_the_upstream_token_never_the_sealed_one(accounts, hub, ghcr):
    """mitmproxy fetches such a blob (ranged: a whole one the mirror streams itself, below) with the
    flow's own request: it carries the upstream's token inside the client's sealed one, and the
    flow's record only the sealed one's fingerprint."""
    from hubrewrite.debug.fingerprint import fingerprint

    addon, _ = accounts
    digest = "sha256:" + "c" * 64
    ghcr.routes[("*", f"/v2/owner/tool/blobs/{digest}")] = Canned(200, [("Docker-Content-Digest", digest)], b"x" * 10)
    flow = ask(addon, hub, "GET", "/token/ghcr.io?scope=repository:owner/tool:pull",
               headers=[("Authorization", basic("ann", "mirror-pw"))])
    sealed = body_json(flow.response)["token"]
    flow = ask(addon, hub, "GET", f"/v2/ghcr.io/owner/tool/blobs/{digest}",
               headers=[("Authorization", f"Bearer {sealed}"), ("Range", "bytes=1-")])
    assert flow.response is None and flow.request.url == f"{ghcr.url}/v2/owner/tool/blobs/{digest}"
    sent_upstream_token = flow.request.headers.get_all("authorization") == ["Bearer ghcr-token"]
    assert sent_upstream_token  # a name: a failure prints no token
    flow.response = http.Response.make(200, b"x" * 10)  # the registry's answer arrives
    addon.responseheaders(flow)  # so the request has gone: its record closes
    assert flow.request.headers.get_all("authorization") == [fingerprint(f"Bearer {sealed}")]



def test_a_whole_blob_the_registry_serves_itself_is_streamed_with_the_upstream_token(accounts, hub, ghcr):
    """Without a cache the mirror streams a whole blob itself (to resume it after a cut): from the
    registry with the upstream's token unsealed from the client's, never the sealed one."""
    addon, _ = accounts
    blob = b"y" * 4096
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    ghcr.routes[("*", f"/v2/owner/tool/blobs/{digest}")] = Canned(200, [("Docker-Content-Digest", digest)], blob)
    flow = ask(addon, hub, "GET", "/token/ghcr.io?scope=repository:owner/tool:pull",
               headers=[("Authorization", basic("ann", "mirror-pw"))])
    sealed = body_json(flow.response)["token"]
    flow = ask(addon, hub, "GET", f"/v2/ghcr.io/owner/tool/blobs/{digest}", headers=[("Authorization", f"Bearer {sealed}")])
    assert flow.response.status_code == 200 and flow.response.content == blob
    gets = [r for r in ghcr.received if r.method == "GET" and r.path.endswith(digest)]
    assert gets and all(r.header("authorization") == "Bearer ghcr-token" for r in gets)

def test_accounts_post_password_grant(accounts, hub, ghcr):
    addon, _ = accounts
    form = b"grant_type=password&username=ann&password=mirror-pw%3Aalice%3Aup&service=x&scope=repository%3Aowner%2Ftool%3Apull"
    flow = ask(addon, hub, "POST", "/token/ghcr.io", headers=[("Content-Type", "application/x-www-form-urlencoded")], content=form)
    assert flow.response.status_code == 200
    sent = ghcr.received[-1]
    assert sent.method == "POST" and b"username=alice" in sent.body and b"password=up" in sent.body
    assert b"mirror-pw" not in sent.body
    # the mirror password alone becomes an anonymous GET, answered with access_token too
    form = b"grant_type=password&username=ann&password=mirror-pw&service=x&scope=repository%3Aowner%2Ftool%3Apull"
    flow = ask(addon, hub, "POST", "/token/ghcr.io", headers=[("Content-Type", "application/x-www-form-urlencoded")], content=form)
    opened = addon.mirror.issued.open(body_json(flow.response)["access_token"], addon.mirror.settings.accounts)
    assert opened.upstream_token == "ghcr-token" and opened.user == "ann"
    assert ghcr.received[-1].method == "GET" and ghcr.received[-1].header("authorization") is None
    # a refresh token the mirror never issued is refused
    flow = ask(addon, hub, "POST", "/token/ghcr.io", content=b"grant_type=refresh_token&refresh_token=stolen",
               headers=[("Content-Type", "application/x-www-form-urlencoded")])
    assert flow.response.status_code == 401


def test_metrics_behind_accounts(accounts, hub):
    addon, tctx = accounts
    tctx.configure(addon, hub_metrics_auth=True)
    assert ask(addon, hub, "GET", "/_hub/metrics").response.status_code == 401
    flow = ask(addon, hub, "GET", "/_hub/metrics", headers=[("Authorization", basic("ann", "mirror-pw"))])
    assert flow.response.status_code == 200 and b"hub_requests" in flow.response.content
    assert ask(addon, hub, "GET", "/_hub/health").response.status_code == 200


def test_metrics_auth_needs_accounts(routed):
    addon, tctx = routed
    with pytest.raises(exceptions.OptionsError):
        tctx.configure(addon, hub_metrics_auth=True)


def test_server_side_credentials_for_anonymous_clients_only(routed, hub, ghcr, tmp_path):
    addon, tctx = routed
    creds = tmp_path / "creds"
    creds.write_text("ghcr.io octo s3cret\n")
    tctx.configure(addon, hub_upstream_credentials=str(creds))
    ask(addon, hub, "GET", "/token/ghcr.io?scope=repository:owner/tool:pull")
    assert ghcr.received[-1].header("authorization") == basic("octo", "s3cret")
    ask(addon, hub, "GET", "/token/ghcr.io", headers=[("Authorization", basic("alice", "pw"))])
    assert ghcr.received[-1].header("authorization") == basic("alice", "pw")
    ask(addon, hub, "GET", "/token?scope=repository:nginx:pull")
    assert hub.received[-1].header("authorization") is None  # none configured for docker.io


def test_forward_proxy_serves_table_hosts_and_passes_others(routed, hub, ghcr):
    addon, tctx = routed
    flow = make_flow(ghcr.url, "GET", "/v2/owner/tool/manifests/1.0", mode="regular")
    flow.request.host = "ghcr.io"  # the client asked the proxy for ghcr.io
    flow.request.port = 443
    flow.request.scheme = "https"
    run(drive(addon, flow))
    assert flow.response.status_code == 200 and paths(ghcr) == ["/v2/owner/tool/manifests/1.0"]
    flow = make_flow(ghcr.url, "GET", "/v2/owner/private/manifests/1.0", mode="regular")
    flow.request.url = "https://ghcr.io/v2/owner/private/manifests/1.0"
    run(drive(addon, flow))
    assert 'realm="https://ghcr.io/token/ghcr.io"' in flow.response.headers["www-authenticate"]

    other = make_flow(hub.url, "GET", "/anything", mode="regular")
    run(drive(addon, other))
    assert other.response is None  # untouched
    tctx.configure(addon, hub_proxy_passthrough=False)
    run(drive(addon, other))
    assert other.response.status_code == 403


def test_metrics_on_a_separate_loopback_port(routed):
    import httpx

    addon, tctx = routed
    port = free_port()
    tctx.configure(addon, hub_metrics_listen=f"127.0.0.1:{port}")
    try:
        answer = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert answer.status_code == 200 and "hub_requests" in answer.text
    finally:
        tctx.configure(addon, hub_metrics_listen="")
    for bad in ("0.0.0.0:9464", "10.1.2.3:9464", "127.0.0.1:http", "127.0.0.1:70000"):
        with pytest.raises(exceptions.OptionsError):
            tctx.configure(addon, hub_metrics_listen=bad)


def test_no_token_scope_for_a_refused_repository(routed, hub, ghcr, tmp_path):
    """With server-side credentials a token is the operator's: it must not open
    repositories the rules refuse, even when used elsewhere."""
    addon, tctx = routed
    creds = tmp_path / "creds"
    creds.write_text("ghcr.io octo s3cret\n")
    tctx.configure(addon, hub_upstream_credentials=str(creds), hub_allow=["ghcr.io/owner/tool"])
    ask(addon, hub, "GET", "/token/ghcr.io?scope=repository:owner/tool:pull&scope=repository:owner/private:pull")
    assert ghcr.received[-1].path == "/auth?scope=repository%3Aowner%2Ftool%3Apull"
    form = b"grant_type=password&username=a&password=b&service=x&scope=repository%3Aowner%2Fprivate%3Apull"
    ask(addon, hub, "POST", "/token/ghcr.io", headers=[("Content-Type", "application/x-www-form-urlencoded")], content=form)
    assert b"scope" not in ghcr.received[-1].body


def test_accounts_in_front_of_an_upstream_without_token_auth(hub, ghcr, tmp_path):
    """An open upstream (no Bearer challenge): the mirror issues its own token
    after sign-in, accepts it on /v2/, and never sends it upstream."""
    with RecordingServer() as plain:
        plain.routes[("GET", "/v2/")] = Canned(200, [("Content-Type", "application/json")], b"{}")
        plain.routes[("*", "/v2/owner/tool/manifests/1.0")] = Canned(
            200, [("Content-Type", "application/vnd.oci.image.manifest.v1+json")], MANIFEST)
        users = tmp_path / "users"
        users.write_text(f"ann:{hash_password('mirror-pw')}\n")
        addon = HubRewrite()
        with taddons.context(*with_core_addons(addon)) as tctx:
            tctx.configure(addon, hub_config="", hub_upstreams=["docker.io", f"open.test={plain.url}"],
                           hub_users_file=str(users))
            LOOP.append(tctx.master.event_loop)
            try:
                assert ask(addon, hub, "GET", "/v2/open.test/owner/tool/manifests/1.0").response.status_code == 401
                assert ask(addon, hub, "GET", "/token/open.test").response.status_code == 401
                flow = ask(addon, hub, "GET", "/token/open.test", headers=[("Authorization", basic("ann", "mirror-pw"))])
                token = body_json(flow.response)["token"]
                flow = ask(addon, hub, "GET", "/v2/open.test/owner/tool/manifests/1.0",
                           headers=[("Authorization", f"Bearer {token}")])
                assert flow.response.status_code == 200 and flow.response.content == MANIFEST
                assert plain.received[-1].header("authorization") is None
                assert all(token not in str(r.headers) for r in plain.received)
            finally:
                run(addon.done())
                LOOP.clear()


def test_forward_proxy_passes_through_only_for_private_clients(routed, hub):
    """block_global is off for the mirror: passing other hosts through for anyone
    on the internet would make an open proxy."""
    addon, tctx = routed
    for peer, passed in ((("10.1.2.3", 5555), True), (("::ffff:192.168.1.9", 5555), True), (("8.8.8.8", 5555), False)):
        flow = make_flow(hub.url, "GET", "/anything", mode="regular")
        flow.client_conn.peername = peer
        run(drive(addon, flow))
        assert (flow.response is None) == passed, peer
    # a public client may still use it for registries in the table
    flow = make_flow(hub.url, "GET", "/v2/owner/tool/manifests/1.0", mode="regular")
    flow.request.url = "https://ghcr.io/v2/owner/tool/manifests/1.0"
    flow.client_conn.peername = ("8.8.8.8", 5555)
    run(drive(addon, flow))
    assert flow.response.status_code == 200


def test_private_means_the_operators_list_not_is_global(routed, hub):
    """hub_private_networks, not ipaddress.is_global: 6to4, Teredo and CGNAT clients are
    public by default; an operator who calls a network private gets exactly that."""
    addon, tctx = routed

    def passes(peer: str) -> bool:
        flow = make_flow(hub.url, "GET", "/anything", mode="regular")
        flow.client_conn.peername = (peer, 5555)
        run(drive(addon, flow))
        return flow.response is None

    private = ["127.0.0.1", "::1", "10.9.8.7", "172.31.0.1", "192.168.1.9", "169.254.3.4", "fe80::1%eth0",
               "fd00::5", "::ffff:10.1.2.3"]
    public = ["2002:c000:204::5", "2001:0:4136:e378:8000:63bf:3fff:fdd2", "100.64.7.9", "::ffff:100.64.7.9",
              "192.88.99.7", "8.8.8.8", "2606:4700::1111", "172.32.0.1"]
    assert [p for p in private if not passes(p)] == []
    assert [p for p in public if passes(p)] == []
    tctx.configure(addon, hub_private_networks=["100.64.0.0/10", "2002::/16"])
    assert [p for p in ("100.64.7.9", "::ffff:100.64.7.9", "2002:c000:204::5") if not passes(p)] == []
    assert [p for p in ("10.9.8.7", "127.0.0.1", "fd00::5") if passes(p)] == []
    tctx.configure(addon, hub_private_networks=[])
    assert not passes("127.0.0.1")


@pytest.mark.parametrize("spec,message", [("10.0.0.1/8", "host bits"), ("10.0.0.0/33", "CIDR"),
                                          ("example.com", "CIDR"), ("::ffff:10.0.0.0/104", "IPv4-mapped")])
def test_private_networks_must_be_networks(routed, spec, message):
    addon, tctx = routed
    with pytest.raises(exceptions.OptionsError, match=message):
        tctx.configure(addon, hub_private_networks=[spec])
