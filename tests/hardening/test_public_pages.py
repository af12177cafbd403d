"""Issue 9, item 11: no identity on public pages.

alice pulls with her credentials and anonymous clients pull, each from its own
loopback address (127.0.0.x, not the mirror's 127.0.0.1); on a mirror with
accounts, bob signs in. The test upstream's edge says whom it counted, as
Docker Hub does (``docker-ratelimit-source``: the token's account, else the
address). Then the status page, /_hub/health and /_hub/metrics, fetched
without credentials, must name no user, no client address and no rate-limit
source. The mirror's own log may, and does (the proof that the identities were
there to leak).

The pages are reachable through the mirror as a forward proxy too (for any host
of its table: ``http://<API host>/``, ``https://hub.test/_hub/metrics``), so the
same there: alice and an anonymous client pull through the proxy from a public
address (a network namespace), and the pages, fetched through the proxy in both
forms, name neither.
"""

from __future__ import annotations

import base64
import ssl
from urllib.parse import urlencode

import httpx
import pytest

from tests.support.mirror import Mirror

from .helpers import INDEX_ACCEPT, SERVICE, anonymous_token
from .setups import PROXY_REGISTRY, public_conn, public_proxy, users_file
from .wire import Conn, request_head

ALICE_ADDRESS, ANONYMOUS_ADDRESS = "127.0.0.7", "127.0.0.8"
PAGES = ("/", "/_hub/metrics", "/_hub/health")


def client_from(address: str) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=30)


def pull_manifest(client: httpx.Client, base: str, repo: str, tag: str, token: str) -> httpx.Response:
    r = client.get(f"{base}/v2/{repo}/manifests/{tag}",
                   headers=[("Authorization", f"Bearer {token}"), *[("Accept", a) for a in INDEX_ACCEPT]])
    assert r.status_code == 200, r.text
    return r


def pages_of(mirror) -> str:
    with httpx.Client(timeout=15) as plain:
        texts = []
        for page in PAGES:
            r = plain.get(f"{mirror.url}{page}")
            assert r.status_code == 200, (page, r.status_code)
            texts.append(r.text)
    return "\n".join(texts)


def assert_no_identity(mirror, identities: list[str], logged: list[str], text: str | None = None) -> None:
    """None of ``identities`` on a public page (``text``: the pages as fetched, else fetched
    here); the ``logged`` ones in the mirror's log."""
    text = pages_of(mirror) if text is None else text
    found = [i for i in identities if i in text]
    assert not found, f"public pages name {found}"
    log = mirror.log_text()
    unseen = [i for i in logged if i not in log]
    assert not unseen, f"{unseen} never reached the mirror (its log): the test proves nothing"


def test_no_user_or_address_after_pulls(mirror, upstream):
    with client_from(ALICE_ADDRESS) as alice:
        r = alice.get(f"{mirror.url}/token", params={"service": SERVICE, "scope": "repository:private/secret:pull"},
                      auth=("alice", upstream.users["alice"]))
        assert r.status_code == 200, r.text
        pulled = pull_manifest(alice, mirror.url, "private/secret", "1.0", r.json()["token"])
    assert pulled.headers.get("docker-ratelimit-source") in (None, "alice")  # relayed as the upstream said
    with client_from(ANONYMOUS_ADDRESS) as anonymous:
        pull_manifest(anonymous, mirror.url, "library/alpine", "3.19", anonymous_token(mirror.url, "library/alpine"))
    identities = ["alice", ALICE_ADDRESS, ANONYMOUS_ADDRESS]
    assert_no_identity(mirror, identities, logged=identities)


@pytest.fixture(scope="module")
def accounts(upstream, tmp_path_factory):
    base = tmp_path_factory.mktemp("pages-accounts")
    path, passwords = users_file(base, "bob")
    with Mirror(base / "m", upstream, extra_args=["--set", f"hub_users_file={path}"]) as m:
        m.passwords = passwords
        yield m


def test_no_mirror_user_or_upstream_account_after_sign_in(accounts, upstream):
    """bob signs in to the mirror with alice's upstream credentials behind his password."""
    secret = f"{accounts.passwords['bob']}:alice:{upstream.users['alice']}"
    with client_from(ALICE_ADDRESS) as bob:
        r = bob.get(f"{accounts.url}/token", params={"service": SERVICE, "scope": "repository:private/secret:pull"},
                    auth=("bob", secret))
        assert r.status_code == 200, r.text
        pull_manifest(bob, accounts.url, "private/secret", "1.0", r.json()["token"])
    assert_no_identity(accounts, ["alice", "bob", ALICE_ADDRESS], logged=["alice", ALICE_ADDRESS])


# ---------------------------------------------------------------- forward proxy


@pytest.fixture(scope="module")
def proxy(public_client, upstream, tmp_path_factory):
    """The mirror as a forward proxy, reached by a client on a public address."""
    with public_proxy(public_client, tmp_path_factory.mktemp("pages-proxy"), upstream) as m:
        yield m


def proxy_pull(conn: Conn, base: str, host: str, repo: str, tag: str, credentials: str | None = None) -> None:
    """A token (with ``credentials``, user:password) and a manifest, on one connection through
    the proxy: ``base`` "" inside a tunnel, else the registry's URL (absolute-form)."""
    auth = [f"Authorization: Basic {base64.b64encode(credentials.encode()).decode()}"] if credentials else []
    query = urlencode({"service": SERVICE, "scope": f"repository:{repo}:pull"})
    conn.send(request_head("GET", f"{base}/token?{query}", host, *auth) + b"\r\n")
    r = conn.read_response()
    assert r.status == 200, r.short()
    conn.send(request_head("GET", f"{base}/v2/{repo}/manifests/{tag}", host, f"Authorization: Bearer {r.json()['token']}",
                           *[f"Accept: {a}" for a in INDEX_ACCEPT]) + b"\r\n")
    r = conn.read_response()
    assert r.status == 200, r.short()


def proxy_pages(proxy, upstream) -> str:
    """The pages through the proxy, as anyone may fetch them: of hub.test (CONNECT, TLS)
    and of the registry's API URL (absolute form, no tunnel)."""
    verify = ssl.create_default_context(cafile=str(proxy.ca_cert))
    texts = []
    with httpx.Client(proxy=proxy.proxy_url, verify=verify, trust_env=False, timeout=15) as client:
        for base in (f"https://{PROXY_REGISTRY}", upstream.api_url):
            for page in PAGES:
                r = client.get(f"{base}{page}")
                assert r.status_code == 200, (base, page, r.status_code)
                texts.append(r.text)
    return "\n".join(texts)


def test_no_user_or_address_through_the_forward_proxy(proxy, public_client, upstream):
    with public_conn(public_client, proxy).tunnel(f"{PROXY_REGISTRY}:443", proxy.ca_cert) as alice:
        proxy_pull(alice, "", PROXY_REGISTRY, "private/secret", "1.0", f"alice:{upstream.users['alice']}")
    with public_conn(public_client, proxy) as anonymous:
        proxy_pull(anonymous, upstream.api_url, upstream.api_host, "library/alpine", "3.19")
    identities = ["alice", public_client.address]
    text = proxy_pages(proxy, upstream)
    assert_no_identity(proxy, identities, logged=identities, text=text)
    # the status page tells a proxy's users how to use a proxy, not a mirror host
    assert f"HTTPS_PROXY={proxy.proxy_url.rstrip('/')}" in text and "registry-mirrors" not in text
    assert "Traceback" not in proxy.log_text()  # the proxy is not the suite's checked mirror
