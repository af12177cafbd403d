"""Issue 9, item 4: an answer to HEAD has no body.

On one keep-alive connection (a raw socket), a HEAD the mirror answers with an
error, then a GET: the GET's answer must start right after the first answer's
head. A body sent with the HEAD answer would be read as the next status line,
the "illegal status line" HTTP clients then fail with. Covered: every error
the mirror makes itself (grammar 400, rules 403, sign-in 401, method 405, a
body where none belongs 400, an unreachable upstream 502), and the upstream's
own (401, 404) relayed; in reverse mode and as a forward proxy (registry
requests, and the refusal of a host outside the table).
"""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from tests.support.mirror import Mirror
from tests.support.ports import free_port

from .helpers import INDEX_ACCEPT, SERVICE, EvilListener, anonymous_token
from .setups import PROXY_REGISTRY, mirror_token, users_file
from .wire import Conn, request_head

ACCEPTS = [f"Accept: {a}" for a in INDEX_ACCEPT]
MISSING = "sha256:" + "e" * 64


@pytest.fixture(scope="module")
def guarded(upstream, tmp_path_factory):
    """Mirror accounts (bob) and a deny rule for library/busybox."""
    base = tmp_path_factory.mktemp("head-guarded")
    path, passwords = users_file(base, "bob")
    with Mirror(base / "m", upstream, extra_args=[
            "--set", f"hub_upstreams=docker.io={upstream.api_url}", "--set", f"hub_users_file={path}",
            "--set", "hub_deny=docker.io/library/busybox"]) as m:
        m.bob = mirror_token(m.url, "bob", passwords["bob"], "repository:library/alpine:pull")
        yield m


@pytest.fixture(scope="module")
def unreachable(tmp_path_factory):
    """A mirror whose upstream refuses every connection."""
    with Mirror(tmp_path_factory.mktemp("head-dead"), f"http://127.0.0.1:{free_port()}",
                options={"hub_upstream_timeout": "3"}) as m:
        yield m


@pytest.fixture(scope="module")
def proxy(upstream, tmp_path_factory):
    """A forward proxy serving the upstream as hub.test; other hosts refused (no pass-through)."""
    with Mirror(tmp_path_factory.mktemp("head-proxy"), "", mode="regular", upstream_ca=upstream.ca_cert, extra_args=[
            "--set", f"hub_upstreams={PROXY_REGISTRY}={upstream.api_url}",
            "--set", "hub_proxy_passthrough=false"]) as m:
        yield m


def head_then_get(port: int, host: str, head_target: str, head_headers: list[str], get_target: str,
                  head_body: bytes = b"") -> tuple:
    """(the HEAD's answer, the GET's answer), both on one connection."""
    with Conn.to(port) as conn:
        lines = request_head("HEAD", head_target, host, *head_headers)
        if head_body:
            lines += b"Content-Length: %d\r\n" % len(head_body)
        conn.send(lines + b"\r\n" + head_body)
        first = conn.read_response("HEAD")
        assert first.status is not None, f"HEAD {head_target}: no answer"
        assert (first.header("connection") or "").lower() != "close", f"HEAD {head_target}: closed {first.short()}"
        conn.send(request_head("GET", get_target, urlsplit(get_target).netloc or host) + b"\r\n")
        second = conn.read_response("GET")  # raises WireError on a broken status line
    return first, second


def reverse_cases(token: str) -> dict:
    auth = f"Authorization: Bearer {token}"
    return {
        "bad name 400": ("/v2/Library/Alpine/manifests/3.19", [auth], b"", 400),
        "bad digest 400": ("/v2/library/alpine/blobs/sha256:xyz", [auth], b"", 400),
        "bad reference 404": ("/v2/library/alpine/manifests/.INVALID_MANIFEST_NAME", [auth], b"", 404),
        "unknown route 404": ("/v2/library/alpine/whatever/3.19", [auth], b"", 404),
        "token endpoint 405": (f"/token?service={SERVICE}", [], b"", 405),
        "with a body 400": ("/v2/library/alpine/manifests/3.19", [auth, *ACCEPTS], b"{}", 400),
        "upstream's 401": ("/v2/library/alpine/manifests/3.19", ACCEPTS, b"", 401),
        "upstream's 404 manifest": ("/v2/library/alpine/manifests/no-such-tag", [auth, *ACCEPTS], b"", 404),
        "upstream's 404 blob": (f"/v2/library/alpine/blobs/{MISSING}", [auth], b"", 404),
    }


def check(first, second, status: int, what: str, get_status: int) -> None:
    assert first.status == status, f"{what}: {first.short()}"
    assert first.body == b""
    assert second.status == get_status, f"{what}: the next answer on the connection is {second.short()}"


@pytest.mark.parametrize("case", list(reverse_cases("")))
def test_reverse_mode(mirror, case):
    target, headers, body, status = reverse_cases(anonymous_token(mirror.url, "library/alpine"))[case]
    first, second = head_then_get(mirror.port, mirror.host, target, headers, "/_hub/health", body)
    check(first, second, status, case, 200)


GUARDED_CASES = {  # what the mirror refuses itself on a mirror with accounts and rules
    "denied 403": ("/v2/library/busybox/manifests/latest", False, 403),
    "denied blob 403": (f"/v2/library/busybox/blobs/{MISSING}", True, 403),
    "no mirror token 401": ("/v2/library/alpine/manifests/3.19", False, 401),
    "no mirror token on /v2/ 401": ("/v2/", False, 401),
    "bad name 400": ("/v2/library/-alpine/manifests/3.19", True, 400),
    "upstream's 404": ("/v2/library/alpine/manifests/no-such-tag", True, 404),
}


@pytest.mark.parametrize("case", list(GUARDED_CASES))
def test_reverse_mode_with_accounts_and_rules(guarded, case):
    target, signed_in, status = GUARDED_CASES[case]
    headers = [*ACCEPTS, *([f"Authorization: Bearer {guarded.bob}"] if signed_in else [])]
    first, second = head_then_get(guarded.port, guarded.host, target, headers, "/_hub/health")
    check(first, second, status, case, 200)


def test_unreachable_upstream(unreachable):
    for target in ("/v2/library/alpine/manifests/3.19", f"/v2/library/alpine/blobs/{MISSING}"):
        first, second = head_then_get(unreachable.port, unreachable.host, target, ACCEPTS, "/_hub/health")
        assert first.status is not None and first.status >= 500, first.short()
        assert first.body == b""
        assert second.status in (200, 503), f"{target}: the next answer is {second.short()}"


@pytest.mark.parametrize("case", ["bad name 400", "token endpoint 405", "with a body 400", "upstream's 401",
                                  "upstream's 404 manifest"])
def test_forward_proxy_registry_requests(proxy, upstream, case):
    """Plain HTTP through the proxy to the registry's API host (in the table)."""
    target, headers, body, status = reverse_cases(upstream.get_token("repository:library/alpine:pull"))[case]
    first, second = head_then_get(proxy.port, upstream.api_host, upstream.api_url + target, headers,
                                  f"{upstream.api_url}/v2/", body)
    check(first, second, status, case, 401)


def test_forward_proxy_refusal_of_a_host_outside_the_table(proxy, upstream):
    """``hub_proxy_passthrough=false``: a HEAD for another host gets 403, without a body."""
    outside = EvilListener()
    try:
        first, second = head_then_get(proxy.port, outside.host, f"http://{outside.host}/", [],
                                      f"{upstream.api_url}/v2/")
        check(first, second, 403, "HEAD outside the table", 401)
        assert outside.connections() == []
    finally:
        outside.close()
