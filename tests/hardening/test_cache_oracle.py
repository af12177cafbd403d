"""Issue 9, item 10: no cache-presence oracle.

alice pulls a blob of a private repository through the mirror, so it is in the
cache. An anonymous client then asks for that digest through a public
repository, through the private repository, and through a repository that does
not exist, with and without tokens, by GET, HEAD and Range; and the same for a
digest nobody ever pulled. Status and registry error code must not depend on
whether the digest is cached, and must be what the upstream itself answers for
the uncached digest: otherwise the answer tells that someone pulled it.

In every mode a client can name the registry: reverse mode by plain path, by
path prefix (``/v2/docker.io/<repo>/...``) and by a mapped Host name
(``hub_host_map``); and the mirror as a forward proxy, asked by a client on a
public address (a network namespace) for the registry's API URL in absolute form
and for ``hub.test`` through a CONNECT tunnel (TLS, mitmproxy's CA), where
alice's pull through the proxy filled the proxy's own cache.
"""

from __future__ import annotations

import hashlib
import secrets
import ssl
from collections.abc import Callable
from urllib.parse import urlencode

import httpx
import pytest

from tests.support.mirror import Mirror

from .helpers import (SERVICE, UPSTREAM_TIMEOUT, RawResponse, anonymous_token, cache_blob_path, fresh_image,
                      wait_until)
from .setups import PROXY_REGISTRY, public_conn, public_proxy
from .wire import request_head

# headers that differ between any two answers, whatever they are about
VOLATILE = {"date", "content-length", "content-type", "connection", "keep-alive"}
HOST_MAPPED = "hub.mirror.test"  # a host name that selects docker.io (hub_host_map)
OTHER_MODES = ("path prefix", "host map", "forward proxy", "forward proxy, CONNECT")
ASKS = [(method, ranged) for method in ("GET", "HEAD") for ranged in (False, True)]


@pytest.fixture(scope="module")
def mirror(upstream, cache_dir, tmp_path_factory):
    """The suite's mirror, its table naming the test upstream docker.io, which the host name
    hub.mirror.test selects too."""
    options = {"hub_cache_dir": str(cache_dir), "hub_upstream_timeout": str(UPSTREAM_TIMEOUT)}
    with Mirror(tmp_path_factory.mktemp("oracle-mirror"), upstream, options=options, extra_args=[
            "--set", f"hub_upstreams=docker.io={upstream.api_url}",
            "--set", f"hub_host_map={HOST_MAPPED}=docker.io"]) as m:
        yield m


@pytest.fixture(scope="module")
def cached_private(mirror, upstream, cache_dir, tmp_path_factory) -> dict:
    """A private repository whose layer alice pulled through the mirror: now cached."""
    repo = f"private/h9-oracle-{secrets.token_hex(3)}"
    image = fresh_image(upstream, tmp_path_factory.mktemp("oracle-image"), repo)
    digest = image["layer_digests"][0]
    r = httpx.get(f"{mirror.url}/token", params={"service": SERVICE, "scope": f"repository:{repo}:pull"},
                  auth=("alice", upstream.users["alice"]), timeout=15)
    assert r.status_code == 200, r.text
    pulled = httpx.get(f"{mirror.url}/v2/{repo}/blobs/{digest}", headers={"Authorization": f"Bearer {r.json()['token']}"},
                       follow_redirects=True, timeout=30)
    assert pulled.status_code == 200 and hashlib.sha256(pulled.content).hexdigest() == digest.split(":", 1)[1]
    assert wait_until(lambda: cache_blob_path(cache_dir, digest).exists(), 10), "alice's pull did not cache the blob"
    return {"repo": repo, "digest": digest}


@pytest.fixture(scope="module")
def proxy(public_client, upstream, cached_private, tmp_path_factory):
    """The mirror as a forward proxy with a cache of its own, where alice pulled the same
    blob through it (TLS to hub.test, from this host): cached there too."""
    base = tmp_path_factory.mktemp("oracle-proxy")
    cache = base / "cache"
    with public_proxy(public_client, base, upstream, f"hub_cache_dir={cache}",
                      f"hub_upstream_timeout={UPSTREAM_TIMEOUT}") as m:
        repo, digest = cached_private["repo"], cached_private["digest"]
        with httpx.Client(proxy=m.proxy_url, verify=ssl.create_default_context(cafile=str(m.ca_cert)),
                          trust_env=False, timeout=30) as alice:
            r = alice.get(f"https://{PROXY_REGISTRY}/token", params={"service": SERVICE, "scope": f"repository:{repo}:pull"},
                          auth=("alice", upstream.users["alice"]))
            assert r.status_code == 200, r.text
            pulled = alice.get(f"https://{PROXY_REGISTRY}/v2/{repo}/blobs/{digest}",
                               headers={"Authorization": f"Bearer {r.json()['token']}"})
        assert pulled.status_code == 200 and hashlib.sha256(pulled.content).hexdigest() == digest.split(":", 1)[1]
        assert wait_until(lambda: cache_blob_path(cache, digest).exists(), 10), "alice's pull did not cache the blob"
        yield m


def answer(r: httpx.Response) -> tuple:
    """What a client can tell from an answer: status, error code, which headers it has."""
    try:
        code = r.json()["errors"][0]["code"]
    except Exception:
        code = None
    return r.status_code, code, sorted(k.lower() for k in r.headers if k.lower() not in VOLATILE)


def raw_answer(r: RawResponse) -> tuple:
    """The same, of an answer read off the wire."""
    try:
        code = r.json()["errors"][0]["code"]
    except Exception:
        code = None
    return r.status, code, sorted({k.lower() for k, _ in r.headers} - VOLATILE)


# one client for the module's requests (a new one per request costs more than the request),
# trusting the HTTPS upstream's CA as well: set by the fixture below
HTTP: httpx.Client


@pytest.fixture(scope="module", autouse=True)
def _one_client(upstream):
    global HTTP
    with httpx.Client(timeout=15, verify=upstream.verify) as HTTP:
        yield


def ask(base: str, method: str, repo: str, digest: str, token: str | None, ranged: bool,
        host: str | None = None) -> tuple:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if ranged:
        headers["Range"] = "bytes=0-9"
    if host:
        headers["Host"] = host
    return answer(HTTP.request(method, f"{base}/v2/{repo}/blobs/{digest}", headers=headers))


@pytest.mark.parametrize("ranged", [False, True], ids=["whole", "range"])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("through", ["public repository", "the private repository", "a repository that does not exist"])
@pytest.mark.parametrize("with_token", [True, False], ids=["anonymous token", "no token"])
def test_cached_and_uncached_digests_get_the_same_answer(mirror, upstream, cached_private, through, method, ranged,
                                                         with_token):
    repo = repo_for(through, cached_private)
    token = anonymous_token(mirror.url, repo) if with_token else None
    uncached = "sha256:" + hashlib.sha256(secrets.token_bytes(16)).hexdigest()
    cached = ask(mirror.url, method, repo, cached_private["digest"], token, ranged)
    fresh = ask(mirror.url, method, repo, uncached, token, ranged)
    upstream_says = ask(upstream.api_url, method, repo, uncached, token, ranged)
    assert cached[:2] != (200, None) and cached[0] not in (206, 307), f"the cached blob was served: {cached}"
    assert cached == fresh, f"cached {cached} but uncached {fresh}: the answer tells the digest is cached"
    assert fresh[:2] == upstream_says[:2], f"the mirror answers {fresh[:2]}, the upstream itself {upstream_says[:2]}"


def repo_for(through: str, cached_private: dict) -> str:
    return {"public repository": "library/alpine", "the private repository": cached_private["repo"],
            "a repository that does not exist": f"team/h9-none-{secrets.token_hex(3)}"}[through]


# ---------------------------------------------------------------- the other modes


Asker = Callable[[str, str, str, "str | None", bool], tuple]  # (method, repo, digest, token, ranged) -> answer


def reverse_way(mirror, mode: str) -> tuple[Callable[[str], str], Asker]:
    """(a token for a repository, a blob request) as a client naming the registry by
    path prefix or by host name asks the reverse-mode mirror."""
    prefix = "docker.io/" if mode == "path prefix" else ""
    host = HOST_MAPPED if mode == "host map" else None

    def token(repo: str) -> str:
        r = HTTP.get(f"{mirror.url}/token", params={"service": SERVICE, "scope": f"repository:{prefix}{repo}:pull"},
                     headers={"Host": host} if host else None)
        assert r.status_code == 200, r.text
        return r.json()["token"]

    def blob(method: str, repo: str, digest: str, token: str | None, ranged: bool) -> tuple:
        return ask(mirror.url, method, prefix + repo, digest, token, ranged, host)

    return token, blob


def proxy_way(proxy, public_client, upstream, mode: str) -> tuple[Callable[[str], str], Asker]:
    """The same through the forward proxy, from the public client: the registry's
    https:// API URL in absolute form (no tunnel), or CONNECT hub.test:443 and TLS inside."""

    def exchange(method: str, path: str, headers: list[str]) -> RawResponse:
        with public_conn(public_client, proxy) as conn:
            if mode == "forward proxy, CONNECT":
                conn.tunnel(f"{PROXY_REGISTRY}:443", proxy.ca_cert)
                target, host = path, PROXY_REGISTRY
            else:
                target, host = upstream.api_url + path, upstream.api_host
            conn.send(request_head(method, target, host, *headers, "Connection: close") + b"\r\n")
            return conn.read_response(method)

    def token(repo: str) -> str:
        r = exchange("GET", "/token?" + urlencode({"service": SERVICE, "scope": f"repository:{repo}:pull"}), [])
        assert r.status == 200, r.short()
        return r.json()["token"]

    def blob(method: str, repo: str, digest: str, token: str | None, ranged: bool) -> tuple:
        headers = [f"Authorization: Bearer {token}"] if token else []
        if ranged:
            headers.append("Range: bytes=0-9")
        return raw_answer(exchange(method, f"/v2/{repo}/blobs/{digest}", headers))

    return token, blob


@pytest.mark.parametrize("through", ["public repository", "the private repository", "a repository that does not exist"])
@pytest.mark.parametrize("with_token", [True, False], ids=["anonymous token", "no token"])
@pytest.mark.parametrize("mode", OTHER_MODES)
def test_the_same_answer_in_every_other_mode(request, mirror, upstream, cached_private, mode, with_token, through):
    """GET, HEAD and Range of each, asked as a client of that mode asks."""
    served = request.getfixturevalue("proxy") if mode.startswith("forward proxy") else mirror
    log_start = len(served.log_text())
    if served is mirror:
        token_for, ask_blob = reverse_way(mirror, mode)
    else:
        token_for, ask_blob = proxy_way(served, request.getfixturevalue("public_client"), upstream, mode)
    repo = repo_for(through, cached_private)
    token = token_for(repo) if with_token else None
    problems = []
    for method, ranged in ASKS:
        what = f"{method}{' Range' if ranged else ''}"
        uncached = "sha256:" + hashlib.sha256(secrets.token_bytes(16)).hexdigest()
        cached = ask_blob(method, repo, cached_private["digest"], token, ranged)
        fresh = ask_blob(method, repo, uncached, token, ranged)
        upstream_says = ask(upstream.api_url, method, repo, uncached, token, ranged)
        if cached[:2] == (200, None) or cached[0] in (206, 307):
            problems.append(f"{what}: the cached blob was served: {cached}")
        elif cached != fresh:
            problems.append(f"{what}: cached {cached} but uncached {fresh}: the answer tells the digest is cached")
        elif fresh[:2] != upstream_says[:2]:
            problems.append(f"{what}: the mirror answers {fresh[:2]}, the upstream itself {upstream_says[:2]}")
    assert not problems, "\n".join(problems)
    assert "Traceback" not in served.log_text()[log_start:]  # the proxy is not the suite's checked mirror
