"""Issue 9, item 1: bodies before decisions.

mitm.conf streams request bodies over 1 MiB (``stream_large_bodies: 1m``), and
mitmproxy starts that stream right after the ``requestheaders`` hook (for a
chunked body: as soon as 1 MiB has arrived, with no hook at all). Every decision
of the mirror must therefore be made on the request's head. Here 2 MiB bodies,
framed by Content-Length, chunked and behind ``Expect: 100-continue``, are sent
byte for byte where the mirror must refuse them, and the test upstream's own logs
(the edge's records, distribution's log) and its storage show that nothing
arrived: pushes to a read-only mirror, reads of denied repositories without a
mirror token, reads with a body, in reverse mode, by path prefix, ``ns`` and host
name; and in forward-proxy mode, a client on a PUBLIC address (a network
namespace, tests/support/netns.py) sending a body to a host outside the table,
a CONNECT to a registry's name on another port, websocket upgrades.

Why a namespace: the proxy's pass-through depends on the client's real source
address (``is_global``), and the point is mitmproxy's own behaviour before any
hook on a real connection, which a faked peername in a unit test cannot show.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

import pytest

from tests.integration.test_routing import HOST_MAPPED, routing_mirror
from tests.support.images import OCI_MANIFEST, canonical_json, sha256_digest

from .helpers import INDEX_ACCEPT, anonymous_token, assert_registry_error, fresh_image
from .setups import (LOCAL_REGISTRY, PROXY_REGISTRY, log_marks, mirror_token, public_conn, public_proxy,
                     registry_has_blob, registry_has_manifest, upload_session, upstream_saw, users_file)
from .wire import FRAMINGS, TWO_MIB, Conn, request_head, send_with_body

ACCEPTS = [f"Accept: {a}" for a in INDEX_ACCEPT]


def marker() -> str:
    return "h9-" + secrets.token_hex(4)


def padding(size: int = TWO_MIB) -> bytes:
    return secrets.token_bytes(16).hex().encode() * (size // 32)


# ---------------------------------------------------------------- set-ups


@pytest.fixture(scope="module")
def routed(upstream, second_upstream, tmp_path_factory):
    """Two registries (docker.io; ghcr.io, also by the host name ghcr.mirror.test), mirror
    accounts (bob), and deny rules for docker.io/library/busybox and ghcr.io/private/*."""
    base = tmp_path_factory.mktemp("bodies-routed")
    path, passwords = users_file(base, "bob")
    m = routing_mirror(base / "m", upstream, second_upstream, f"hub_host_map={HOST_MAPPED}=ghcr.io",
                       f"hub_users_file={path}", "hub_deny=docker.io/library/busybox",
                       "hub_deny=ghcr.io/private/*").start()
    m.bob = mirror_token(m.url, "bob", passwords["bob"], "repository:library/alpine:pull")
    try:
        yield m
    finally:
        m.stop()


@pytest.fixture(scope="module")
def proxy(public_client, upstream, tmp_path_factory):
    """A forward proxy whose table holds hub.test and localhost (both: the test upstream),
    listening where the public client reaches it; pass-through as configured by default."""
    with public_proxy(public_client, tmp_path_factory.mktemp("bodies-proxy"), upstream) as m:
        yield m


# ---------------------------------------------------------------- pushes to a read-only mirror


def push_request(kind: str, upstream, tmp_path, repo: str) -> tuple[str, str, list[str], bytes, Callable[[], bool]]:
    """(method, path, headers, body, took_effect) of a push an admin token would make work upstream."""
    token = upstream.get_token(f"repository:{repo}:pull,push", user="admin")
    auth = f"Authorization: Bearer {token}"
    if kind == "POST monolithic upload":
        blob = padding()
        digest = sha256_digest(blob)
        return ("POST", f"/v2/{repo}/blobs/uploads/?digest={digest}", [auth, "Content-Type: application/octet-stream"],
                blob, lambda: registry_has_blob(upstream, repo, digest))
    if kind == "PUT blob":
        blob = padding()
        digest = sha256_digest(blob)
        session = upload_session(upstream, repo, token)
        return ("PUT", f"{session}&digest={digest}", [auth, "Content-Type: application/octet-stream"], blob,
                lambda: registry_has_blob(upstream, repo, digest))
    image = fresh_image(upstream, tmp_path, repo)
    manifest = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "size": len(image["config_bytes"]), "digest": image["config_digest"]},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "size": size, "digest": digest}
                   for digest, size in zip(image["layer_digests"], image["layer_sizes"])],
        "annotations": {"padding": padding().decode()},
    }
    return ("PUT", f"/v2/{repo}/manifests/pushed", [auth, f"Content-Type: {OCI_MANIFEST}"], canonical_json(manifest),
            lambda: registry_has_manifest(upstream, repo, "pushed"))


PUSHES = ("POST monolithic upload", "PUT blob", "PUT manifest")


@pytest.mark.parametrize("framing", FRAMINGS)
@pytest.mark.parametrize("kind", PUSHES)
def test_push_with_a_big_body_never_reaches_the_upstream(mirror, upstream, tmp_path, kind, framing):
    repo = f"team/{marker()}"
    method, path, headers, body, took_effect = push_request(kind, upstream, tmp_path, repo)
    since = log_marks(upstream)
    with Conn.to(mirror.port) as conn:
        resp = send_with_body(conn, method, path, mirror.host, headers, body, framing)
    err = assert_registry_error(resp, (405,), f"{kind} ({framing})")
    assert err["code"] == "UNSUPPORTED", err
    assert upstream_saw(upstream, since, repo) == [], f"{kind} ({framing}) reached the upstream"
    assert not took_effect(), f"{kind} ({framing}) was stored upstream"


@pytest.mark.parametrize("routing", ["path prefix", "ns", "host name"])
def test_push_by_any_routing_never_reaches_the_upstream(routed, second_upstream, routing):
    """On the two-registry mirror, signed in (bob's mirror token): a 2 MiB manifest
    PUT for ghcr.io, however the request names the registry, gets 405."""
    name = f"owner/{marker()}"
    target, host = {
        "path prefix": (f"/v2/ghcr.io/{name}/manifests/1", routed.host),
        "ns": (f"/v2/{name}/manifests/1?ns=ghcr.io", routed.host),
        "host name": (f"/v2/{name}/manifests/1", HOST_MAPPED),
    }[routing]
    since = log_marks(second_upstream)
    for framing in FRAMINGS:
        with Conn.to(routed.port) as conn:
            resp = send_with_body(conn, "PUT", target, host, [f"Authorization: Bearer {routed.bob}",
                                                             f"Content-Type: {OCI_MANIFEST}"], padding(), framing)
        err = assert_registry_error(resp, (405,), f"{routing} ({framing})")
        assert err["code"] == "UNSUPPORTED", err
    assert upstream_saw(second_upstream, since, name) == []


# ---------------------------------------------------------------- reads with a body


DENIED = {  # routing -> (path, Host): the denied repository as each routing names it
    "docker.io by name": ("/v2/library/busybox/manifests/latest", None),
    "docker.io short name": ("/v2/busybox/manifests/latest", None),
    "ghcr.io by path prefix": ("/v2/ghcr.io/private/secret/manifests/1.0", None),
    "ghcr.io by ns": ("/v2/private/secret/manifests/1.0?ns=ghcr.io", None),
    "ghcr.io by host name": ("/v2/private/secret/manifests/1.0", HOST_MAPPED),
}


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("routing", list(DENIED))
def test_denied_manifest_with_a_big_body_and_no_mirror_token(routed, upstream, second_upstream, routing, framing):
    """The client brings a token the upstream itself issued (alice's, for ghcr's private
    repository), which would open the manifest there, but none from the mirror.
    Neither upstream hears of the request: not the one it names, nor the reverse
    target (where mitmproxy streams a body it was not told about)."""
    path, host = DENIED[routing]
    if "docker.io" in routing:
        repo, token = "busybox", upstream.get_token("repository:library/busybox:pull")
    else:
        repo, token = "private/secret", second_upstream.get_token("repository:private/secret:pull", user="alice")
    since = {up: log_marks(up) for up in (upstream, second_upstream)}
    with Conn.to(routed.port) as conn:
        resp = send_with_body(conn, "GET", path, host or routed.host, [f"Authorization: Bearer {token}", *ACCEPTS],
                              padding(), framing)
    reached = [seen for up in (upstream, second_upstream) for seen in upstream_saw(up, since[up], repo)]
    assert reached == [], f"{routing} ({framing}) reached an upstream"
    err = assert_registry_error(resp, (401, 403), f"{routing} ({framing})")
    assert err["code"] in ("UNAUTHORIZED", "DENIED"), err
    assert b"schemaVersion" not in resp.raw, "manifest bytes in the answer"


@pytest.mark.parametrize("framing", FRAMINGS)
def test_read_with_a_body_is_refused_before_the_upstream(mirror, upstream, framing):
    """Registry reads have no body: with a valid token for an allowed repository, a
    GET of a manifest, a blob and /v2/, and a HEAD, each with a body (2 MiB, and
    small), get 400; none of them reaches the upstream."""
    token = anonymous_token(mirror.url, "team/ociapp")
    tag = marker()
    blob = upstream.images["team/ociapp"]["layer_digests"][0]
    since = log_marks(upstream)
    for method, path in (("GET", f"/v2/team/ociapp/manifests/{tag}"), ("HEAD", f"/v2/team/ociapp/manifests/{tag}"),
                         ("GET", f"/v2/team/ociapp/blobs/{blob}?{tag}"), ("GET", f"/v2/?{tag}")):
        for body in (padding(), b"{}"):
            with Conn.to(mirror.port) as conn:
                resp = send_with_body(conn, method, path, mirror.host, [f"Authorization: Bearer {token}", *ACCEPTS],
                                      body, framing)
            what = f"{method} {path} with {len(body)} bytes ({framing})"
            if method == "HEAD":  # an answer to HEAD has no body to tell the error's code
                assert resp.status == 400, f"{what}: {resp.short()}"
            else:
                assert assert_registry_error(resp, (400,), what)["code"] == "UNSUPPORTED"
    assert [e for e in upstream.edge_requests()[since[0]:] if tag in e.get("path", "") or "blobs" in e.get("path", "")
            or e.get("path") == "/v2/"] == [], "a read with a body reached the upstream"


def test_read_with_a_body_by_any_routing(routed, upstream, second_upstream):
    """The same on the two-registry mirror, signed in: by path prefix, ns and host name."""
    tag = marker()
    since1, since2 = log_marks(upstream), log_marks(second_upstream)
    for path, host in ((f"/v2/ghcr.io/owner/tool/manifests/{tag}", routed.host),
                       (f"/v2/owner/tool/manifests/{tag}?ns=ghcr.io", routed.host),
                       (f"/v2/owner/tool/manifests/{tag}", HOST_MAPPED),
                       (f"/v2/library/alpine/manifests/{tag}", routed.host)):
        for framing in ("content-length", "chunked"):
            with Conn.to(routed.port) as conn:
                resp = send_with_body(conn, "GET", path, host, [f"Authorization: Bearer {routed.bob}", *ACCEPTS],
                                      padding(), framing)
            assert assert_registry_error(resp, (400,), f"{path} Host {host} ({framing})")["code"] == "UNSUPPORTED"
    assert upstream_saw(upstream, since1, tag) == [] and upstream_saw(second_upstream, since2, tag) == []


def test_bodies_on_the_mirrors_own_paths_never_reach_the_upstream(mirror, upstream):
    """What the mirror answers itself: a 2 MiB token form (413), a POST to the status
    page (405), an OPTIONS preflight with a body (400): answered after the body is
    drained, and nothing goes to the upstream (whose API is the reverse target)."""
    since = log_marks(upstream)
    tokens_before = len(upstream.token_requests())
    for method, path, status in (("POST", "/token", 413), ("POST", "/", 405), ("POST", "/_hub/metrics", 405),
                                 ("OPTIONS", "/v2/library/alpine/manifests/3.19", 400)):
        for framing in FRAMINGS:
            with Conn.to(mirror.port) as conn:
                resp = send_with_body(conn, method, path, mirror.host,
                                      ["Content-Type: application/x-www-form-urlencoded"], padding(), framing)
            if path == "/token" and framing == "chunked":
                status_wanted = (411,)  # a token form must say how long it is
            else:
                status_wanted = (status,)
            assert_registry_error(resp, status_wanted, f"{method} {path} ({framing})")
    assert upstream.edge_requests()[since[0]:] == [], "a request the mirror answers itself reached the upstream"
    assert len(upstream.token_requests()) == tokens_before


def test_websocket_upgrade_never_reaches_the_upstream(mirror, routed, upstream, second_upstream):
    token = anonymous_token(mirror.url, "library/alpine")
    tag = marker()
    upgrade = ["Connection: Upgrade", "Upgrade: websocket", "Sec-WebSocket-Version: 13",
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="]
    since1, since2 = log_marks(upstream), log_marks(second_upstream)
    for m, path, host, auth in ((mirror, f"/v2/library/alpine/manifests/{tag}", mirror.host, token),
                                (mirror, f"/v2/?{tag}", mirror.host, token),
                                (routed, f"/v2/ghcr.io/owner/tool/manifests/{tag}", routed.host, routed.bob),
                                (routed, f"/v2/owner/tool/manifests/{tag}", HOST_MAPPED, routed.bob)):
        with Conn.to(m.port) as conn:
            conn.send(request_head("GET", path, host, f"Authorization: Bearer {auth}", *upgrade) + b"\r\n")
            resp = conn.read_response()
        assert resp.status != 101, f"{path}: switched protocols"
        assert_registry_error(resp, (400,), f"websocket {path}")
    assert upstream.edge_requests()[since1[0]:] == [] and upstream_saw(second_upstream, since2, tag) == []


# ---------------------------------------------------------------- forward proxy, public client


@pytest.mark.parametrize("framing", FRAMINGS)
def test_public_client_body_to_a_host_outside_the_table(proxy, public_client, evil, framing):
    """A client on a public address may use the proxy for its registries only: a
    request with a 2 MiB body (POST, and GET) for a host outside the table gets 403
    and the host never gets a connection."""
    answers = {}
    for method in ("POST", "GET"):
        with public_conn(public_client, proxy) as conn:
            answers[method] = send_with_body(conn, method, f"http://{evil.host}/upload", evil.host, [], padding(),
                                             framing)
    assert evil.connections() == [], "the proxy passed a public client's body to a host outside its table"
    for method, resp in answers.items():
        err = assert_registry_error(resp, (403,), f"{method} to {evil.host} ({framing})")
        assert err["code"] == "DENIED", err


def test_public_client_reads_with_a_body_through_the_proxy(proxy, public_client, upstream):
    """Through the proxy (the registry's API URL in absolute form, which the table names),
    a GET with a body is refused 400 and nothing reaches the upstream; without a body it
    is served."""
    tag = marker()
    since = log_marks(upstream)
    for framing in FRAMINGS:
        with public_conn(public_client, proxy) as conn:
            resp = send_with_body(conn, "GET", f"{upstream.api_url}/v2/library/alpine/manifests/{tag}",
                                  upstream.api_host, ACCEPTS, padding(), framing)
        assert assert_registry_error(resp, (400,), framing)["code"] == "UNSUPPORTED"
    assert upstream_saw(upstream, since, tag) == []
    with public_conn(public_client, proxy) as conn:
        conn.send(request_head("GET", f"{upstream.api_url}/v2/", upstream.api_host) + b"\r\n")
        resp = conn.read_response()
    assert resp.status == 401 and "realm=" in (resp.header("www-authenticate") or ""), resp.short()


def test_public_client_connect_only_to_a_registrys_own_port(proxy, public_client, evil):
    """CONNECT to a registry's name on another port (``hub.test:22``, and
    ``localhost:<a listener's port>``, which resolves: a tunnel there would connect)
    is refused 403, and bytes sent after it go nowhere; on the registry's own port
    (443, or the API host's port) CONNECT is accepted."""
    for target in (f"{PROXY_REGISTRY}:22", f"{LOCAL_REGISTRY}:{evil.port}", f"{LOCAL_REGISTRY}:22"):
        with public_conn(public_client, proxy) as conn:
            conn.send(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            resp = conn.read_response("CONNECT")
            assert resp.status == 403, f"CONNECT {target}: {resp.short()}"
            try:
                conn.send(b"SSH-2.0-OpenSSH_9.2\r\n")  # what a tunnel to port 22 would carry
            except AssertionError:
                pass  # closed after the refusal: fine
    assert evil.connections() == [], "a CONNECT to a registry name on another port connected"
    for target in (f"{PROXY_REGISTRY}:443", f"{LOCAL_REGISTRY}:443"):
        with public_conn(public_client, proxy) as conn:
            conn.send(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            resp = conn.read_response("CONNECT")
            assert resp.status == 200, f"CONNECT {target}: {resp.short()}"


def test_public_client_websocket_through_the_proxy(proxy, public_client, upstream, evil):
    tag = marker()
    since = log_marks(upstream)
    upgrade = ["Connection: Upgrade", "Upgrade: websocket", "Sec-WebSocket-Version: 13",
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="]
    for url, host, status in ((f"{upstream.api_url}/v2/?{tag}", upstream.api_host, 400),
                              (f"http://{evil.host}/ws", evil.host, 403)):
        with public_conn(public_client, proxy) as conn:
            conn.send(request_head("GET", url, host, *upgrade) + b"\r\n")
            resp = conn.read_response()
        assert resp.status == status, f"websocket to {url}: {resp.short()}"
    assert upstream.edge_requests()[since[0]:] == [] and evil.connections() == []


def test_public_client_plain_http_only_to_a_registrys_own_port(proxy, public_client, evil):
    """The plain-HTTP forms of the same: an absolute-form request for a registry's name on
    another port, and an origin-form request whose Host names another host, are
    refused 403 before any connection."""
    for target, host in ((f"http://{PROXY_REGISTRY}:22/v2/", f"{PROXY_REGISTRY}:22"),
                         (f"http://{LOCAL_REGISTRY}:{evil.port}/v2/", f"{LOCAL_REGISTRY}:{evil.port}"),
                         (f"http://{LOCAL_REGISTRY}:{evil.port}/token?service=x", f"{LOCAL_REGISTRY}:{evil.port}"),
                         ("/v2/", evil.host)):
        with public_conn(public_client, proxy) as conn:
            conn.send(request_head("GET", target, host) + b"\r\n")
            resp = conn.read_response()
        assert resp.status == 403, f"GET {target} (Host {host}): {resp.short()}"
    assert evil.connections() == [], "a request for another port or host connected"


AMBIGUOUS_FRAMING = {  # request smuggling's classics: mitmproxy or the mirror must refuse them
    "Content-Length twice": ["Content-Length: 0", "Content-Length: 20"],
    "Content-Length and chunked": ["Content-Length: 20", "Transfer-Encoding: chunked"],
    "chunked twice": ["Transfer-Encoding: chunked", "Transfer-Encoding: chunked"],
    "gzip, chunked": ["Transfer-Encoding: gzip, chunked"],
    "identity": ["Transfer-Encoding: identity"],
    "space before the colon": ["Content-Length : 20"],
    "chunked with a tab": ["Transfer-Encoding:\tchunked"],
}


@pytest.mark.parametrize("case", list(AMBIGUOUS_FRAMING))
def test_ambiguous_framing_never_reaches_the_upstream(mirror, upstream, case):
    """A read whose body length two parsers could see differently is refused (by mitmproxy
    or the mirror, 400) and nothing of it reaches the upstream."""
    token = anonymous_token(mirror.url, "library/alpine")
    tag = marker()
    head = request_head("GET", f"/v2/library/alpine/manifests/{tag}", mirror.host, f"Authorization: Bearer {token}",
                        *AMBIGUOUS_FRAMING[case], "Connection: close")
    since = log_marks(upstream)
    smuggled = f"GET /v2/library/alpine/manifests/{tag}-smuggled HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    with Conn.to(mirror.port) as conn:
        conn.send(head + b"\r\n" + b"0\r\n\r\n" + smuggled)
        resp = conn.read_response()
    assert resp.status == 400, f"{case}: {resp.short()}"
    assert upstream_saw(upstream, since, tag) == [], f"{case} reached the upstream"


HOST_FORMS = {  # ways to name ghcr.mirror.test ambiguously; the rule for ghcr.io/private/* must hold
    "Host twice, mapped first": ("/v2/private/secret/manifests/1.0", [f"Host: {HOST_MAPPED}", "Host: 127.0.0.1"]),
    "Host twice, mapped second": ("/v2/private/secret/manifests/1.0", ["Host: 127.0.0.1", f"Host: {HOST_MAPPED}"]),
    "absolute-form names it": (f"http://{HOST_MAPPED}/v2/private/secret/manifests/1.0", ["Host: 127.0.0.1"]),
    "absolute-form, Host names it": ("http://127.0.0.1/v2/private/secret/manifests/1.0", [f"Host: {HOST_MAPPED}"]),
    "trailing dot": ("/v2/private/secret/manifests/1.0", [f"Host: {HOST_MAPPED}."]),
    "upper case": ("/v2/private/secret/manifests/1.0", [f"Host: {HOST_MAPPED.upper()}"]),
    "with a port": ("/v2/private/secret/manifests/1.0", [f"Host: {HOST_MAPPED}:443"]),
}


@pytest.mark.parametrize("case", list(HOST_FORMS))
def test_ambiguous_host_never_reaches_a_denied_repository(routed, second_upstream, case):
    """Whichever registry the mirror takes such a request for (signed in as bob), it applies
    that registry's rules: ghcr.io's private/secret (denied) never hears of it."""
    target, host_lines = HOST_FORMS[case]
    since = log_marks(second_upstream)
    with Conn.to(routed.port) as conn:
        conn.send(f"GET {target} HTTP/1.1\r\n".encode() + "".join(h + "\r\n" for h in host_lines).encode()
                  + f"Authorization: Bearer {routed.bob}\r\n\r\n".encode())
        resp = conn.read_response()
    assert resp.status is not None and resp.status != 200, f"{case}: {resp.short()}"
    assert upstream_saw(second_upstream, since, "private/secret") == [], f"{case} reached ghcr's denied repository"
