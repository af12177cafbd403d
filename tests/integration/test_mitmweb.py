"""The mirror under mitmweb, started as the README shows
(``mitmweb -s addons/hub_rewrite.py --mode reverse:...``), with real skopeo
pulls through it: the multi-arch image (``copy --all``) and the private image
with credentials.  Then mitmweb's REST API lists the client flows (token,
manifests, blobs), and headless Chromium shows them in the web UI.

It loads the repository's mitm.conf (``flow_detail`` there is mitmdump's own:
skipped by mitmweb, not an error). The mirror's own upstream exchanges show up
as side flows linked to the client flows they served, credentials as
fingerprints, and the registry content views decode manifests and tokens.

A second mitmweb has mirror accounts and the operator's own upstream account
(``hub_upstream_credentials``): skopeo pulls with a mirror password alone and
with upstream credentials too, and docker login's POST grant is refreshed.
Token answers, of Docker Hub's shape (no ``scope``), show their JWT's claims
in the clients' flows and the side flows alike, with the fingerprint the
``Authorization`` that later carries the token shows (README, mitmweb section);
tokens the mirror sealed and refresh tokens are fingerprints. Every secret in
what mitmweb exposes is looked for in tests/hardening/test_recorded_secrets.py.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

import httpx
import pytest

from hubrewrite.access.accounts import hash_password
from hubrewrite.registry import jwt

from tests.support.browser import Chromium, screenshot_path
from tests.support.mirror import Mirror
from tests.support.png import assert_not_blank

from .test_mirror import copy, sha256_file

# virtual time for the UI to open its websocket and render the flow list
UI_WAIT_MS = 5000


@pytest.fixture(scope="module")
def pulled(upstream, tmp_path_factory):
    """mitmweb with the addon, after skopeo pulled alpine (every platform) and private/secret through it."""
    work = tmp_path_factory.mktemp("mitmweb")
    with Mirror(work / "mirror", upstream, tool="mitmweb") as mirror:
        alpine = copy(f"docker://{mirror.host}/library/alpine:3.19", work / "alpine", "--all")
        assert alpine.returncode == 0, alpine.stderr
        password = upstream.users["alice"]
        secret = copy(f"docker://{mirror.host}/private/secret:1.0", work / "secret", "--src-creds", f"alice:{password}")
        assert secret.returncode == 0, secret.stderr
        assert sha256_file(work / "secret" / "manifest.json") == upstream.images["private/secret"]["digest"]
        yield mirror


def path_of(flow: dict[str, Any]) -> str:
    """The request path without its query: blob flows carry the CDN's signed query, which must never be printed."""
    return flow["request"]["path"].split("?", 1)[0]


def summary(flows: list[dict[str, Any]]) -> list[str]:
    """Method, path and status of each flow: enough to read a failure; no headers or queries (credentials, signatures)."""
    return [f"{f['request']['method']} {path_of(f)} {(f.get('response') or {}).get('status_code')}" for f in flows]


def flows_commented(flows: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """The flows whose comment (set by the addon) contains ``text``."""
    return [f for f in flows if text in f["comment"]]


def side_flows(flows: list[dict[str, Any]], purpose: str = "") -> list[dict[str, Any]]:
    """The mirror's own exchanges: marked, and commented with what they were for."""
    return [f for f in flows if f["comment"].startswith("hub side flow: " + purpose)]


def client_flows(flows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f for f in flows if not f["comment"].startswith("hub side flow")]


def header(message: dict[str, Any], name: str) -> str | None:
    return next((value for key, value in message["headers"] if key.lower() == name.lower()), None)


def blob_digests(info: dict[str, Any]) -> set[str]:
    images = (info.get("manifests") or {info["repo"]: info}).values()
    return {d for image in images for d in (image["config_digest"], *image["layer_digests"])}


def test_web_api_needs_the_password(pulled):
    assert httpx.get(f"{pulled.web_url}/flows.json").status_code == 403
    wrong = httpx.get(f"{pulled.web_url}/flows.json", headers={"Authorization": "Bearer not-the-password"})
    assert wrong.status_code == 403


def test_rest_api_lists_the_client_flows(pulled, upstream):
    api = pulled.web_api
    flows = client_flows(api.flows())
    shown = summary(flows)
    assert all(f["response"] and f["response"]["status_code"] in (200, 401) for f in flows), shown

    tokens = [f for f in flows if path_of(f) == "/token"]
    scopes = sorted(f["request"]["path"].split("scope=", 1)[1].split("&")[0] for f in tokens)
    assert scopes == ["repository%3Alibrary%2Falpine%3Apull", "repository%3Aprivate%2Fsecret%3Apull"], shown
    assert all(f["response"]["status_code"] == 200 for f in tokens), shown
    for token_flow in tokens:
        # Docker Hub's answer shape, no scope: the view has only the JWT's claims to show
        shown_token = token_view(api, token_flow)
        scope = "repository:" + token_flow["request"]["path"].split("scope=repository%3A", 1)[1].split("&")[0]
        assert scope.replace("%2F", "/").replace("%3A", ":") in shown_token.text
        # the token is followed into the manifest requests that carry it
        carried = [header(f["request"], "Authorization") for f in flows if "/manifests/" in path_of(f)]
        assert f"Bearer {shown_token.fingerprint}" in carried, (shown_token.fingerprint, carried)

    alpine, secret = upstream.images["library/alpine"], upstream.images["private/secret"]
    alpine_flows = flows_commented(flows, "hub: docker.io library/alpine")
    manifests = {path_of(f): f for f in alpine_flows if "/manifests/" in path_of(f)}
    wanted = {"/v2/library/alpine/manifests/3.19"} | {
        f"/v2/library/alpine/manifests/{image['digest']}" for image in alpine["manifests"].values()}
    assert set(manifests) == wanted, shown
    by_tag = manifests["/v2/library/alpine/manifests/3.19"]
    assert header(by_tag["response"], "Docker-Content-Digest") == alpine["digest"]
    listing = api.content(by_tag["id"], "response")
    assert listing["view_name"] == "Registry manifest"
    assert all(image["digest"] in listing["text"] for image in alpine["manifests"].values())
    assert "linux/amd64" in listing["text"] and "linux/arm64" in listing["text"]

    # blob flows keep the client's /v2/ path (the CDN's signed URL is the mirror's business);
    # the comment says where the bytes came from
    blobs = [f for f in alpine_flows if "blob streamed from" in f["comment"]]
    assert {f"/v2/library/alpine/blobs/{d}" for d in blob_digests(alpine)} == {path_of(f) for f in blobs}, shown
    assert all(f["response"]["status_code"] == 200 for f in blobs)

    secret_flows = flows_commented(flows, "hub: docker.io private/secret")
    assert "/v2/private/secret/manifests/1.0" in {path_of(f) for f in secret_flows}, shown
    secret_blobs = {path_of(f) for f in secret_flows if "blob streamed from" in f["comment"]}
    assert secret_blobs == {f"/v2/private/secret/blobs/{d}" for d in blob_digests(secret)}, shown


class ShownToken:
    """A token answer as mitmweb shows it: the view's text and the token's fingerprint."""

    def __init__(self, text: str, fingerprint: str) -> None:
        self.text, self.fingerprint = text, fingerprint


def token_view(api, flow: dict[str, Any]) -> ShownToken:
    """The ``auto`` view of a token answer holding a JWT: the decoded claims, and the token's
    fingerprint, which is also the signature of the JWT the recorded body holds (still a JWT
    that decodes, not the one the token service signed)."""
    view = api.content(flow["id"], "response")
    assert view["view_name"] == "Registry token", view["view_name"]
    text = view["text"]
    assert "claims:" in text and "issuer (iss): auth.docker.io" in text and "access (1):" in text
    assert "scope:" not in text  # the token server answers as Docker Hub does
    recorded = json.loads(api.content(flow["id"], "response", "raw")["text"])
    assert set(recorded) - {"refresh_token"} == {"token", "access_token", "expires_in", "issued_at"}
    token = recorded["token"]
    decoded = jwt.decode(token)
    assert decoded is not None and decoded.claims["access"]
    signature = token.rsplit(".", 1)[1]
    # its fingerprint's digits, never the token service's signature (a name, so a failure prints no token)
    signature_is_a_fingerprint = re.fullmatch(r"[0-9a-f]{12}", signature) is not None
    assert signature_is_a_fingerprint
    match = re.search(r"^token: JWT (<hmac:[0-9a-f]{12}>), signature not shown", text, re.M)
    assert match and match.group(1) == f"<hmac:{signature}>", text.splitlines()[:4]
    return ShownToken(text, match.group(1))


def test_side_flows_are_shown(pulled, upstream):
    """The mirror's own exchanges, each a flow of its own, linked both ways to its client flow."""
    api = pulled.web_api
    flows = api.flows()
    shown = summary(flows)
    token_service = side_flows(flows, "token request to the token service")
    assert token_service, shown
    realm_host = upstream.token_realm.split("://", 1)[1].split("/", 1)[0]
    for side in token_service:
        assert side["response"]["status_code"] == 200
        assert side["marked"]
        if realm_host:
            assert side["request"]["host"] in realm_host
        # credentials as fingerprints: alice's Basic header names her, never her password
        auth = header(side["request"], "Authorization")
        assert auth is None or "<hmac:" in auth
        # the token service's answer, decoded: the same token the client got, the same fingerprint
        client_id = side["comment"].split("for client flow ", 1)[1][:8]
        client = next(f for f in flows if f["id"].startswith(client_id))
        assert token_view(api, side).fingerprint == token_view(api, client).fingerprint
    probes = side_flows(flows, "blob probe")
    assert probes and all(p["response"]["status_code"] == 307 for p in probes), shown
    assert all("<hmac:" in header(p["response"], "Location") or "signature" not in header(p["response"], "Location")
               for p in probes)
    # linked both ways: the side flow names its client flow, which names the side flow back
    for side in token_service + probes:
        client_id = side["comment"].split("for client flow ", 1)[1][:8]
        client = next(f for f in flows if f["id"].startswith(client_id))
        assert side["id"][:8] in client["comment"]
    every_text = str(flows)
    assert upstream.users["alice"] not in every_text
    # no usable signed URL anywhere: signatures are fingerprints (the test CDN signs with 64 hex digits)
    assert not re.search(r"signature=[0-9a-f]{16}", every_text)


@pytest.fixture(scope="module")
def signed_in(upstream, tmp_path_factory):
    """mitmweb with mirror accounts (bob) and the operator's upstream account (alice's): skopeo
    pulls private/secret with bob's password alone (the operator's account answers for him) and
    alpine with bob's and alice's; then docker login's POST password grant and its refresh."""
    work = tmp_path_factory.mktemp("mitmweb-accounts")
    bob, alice = "bob-" + secrets.token_urlsafe(10), upstream.users["alice"]
    users, creds = work / "users", work / "upstream-credentials"
    users.write_text(f"bob:{hash_password(bob)}\n")
    creds.write_text(f"docker.io alice {alice}\n")
    creds.chmod(0o600)
    options = {"hub_users_file": str(users), "hub_upstream_credentials": str(creds)}
    with Mirror(work / "mirror", upstream, tool="mitmweb", options=options) as mirror:
        secret = copy(f"docker://{mirror.host}/private/secret:1.0", work / "secret", "--src-creds", f"bob:{bob}")
        assert secret.returncode == 0, secret.stderr
        alpine = copy(f"docker://{mirror.host}/library/alpine:3.19", work / "alpine", "--src-creds",
                      f"bob:{bob}:alice:{alice}")
        assert alpine.returncode == 0, alpine.stderr
        scope = {"service": upstream.service, "scope": "repository:private/secret:pull", "client_id": "docker"}
        granted = httpx.post(f"{mirror.url}/token", timeout=15, data={
            "grant_type": "password", "username": "bob", "password": f"{bob}:alice:{alice}",
            "access_type": "offline", **scope})
        assert granted.status_code == 200 and granted.json()["token"].startswith("hub1.")
        refreshed = httpx.post(f"{mirror.url}/token", timeout=15, data={
            "grant_type": "refresh_token", "refresh_token": granted.json()["refresh_token"], **scope})
        assert refreshed.status_code == 200
        yield mirror


def test_sealed_tokens_are_followed_by_their_fingerprints(signed_in):
    """The tokens bob got are the mirror's, sealed: the view shows their fingerprints, which
    his manifest requests carry; his refresh token's is the one his refresh request sent."""
    api = signed_in.web_api
    flows = client_flows(api.flows())
    tokens = [f for f in flows if path_of(f) == "/token"]
    assert [f["request"]["method"] for f in tokens].count("POST") == 2, summary(flows)
    carried = {header(f["request"], "Authorization") for f in flows if "/manifests/" in path_of(f)}
    for flow in tokens:
        assert flow["response"]["status_code"] == 200
        text = api.content(flow["id"], "response")["text"]
        sealed = re.search(r"^token: opaque (<hmac:[0-9a-f]{12}>)$", text, re.M)
        assert sealed, text
        if flow["request"]["method"] == "GET":  # skopeo's: it pulled with them
            assert f"Bearer {sealed.group(1)}" in carried
    granted, refreshing = [f for f in tokens if f["request"]["method"] == "POST"]
    issued = re.search(r"^refresh_token: (<hmac:[0-9a-f]{12}>)$", api.content(granted["id"], "response")["text"], re.M)
    sent = api.content(refreshing["id"], "request")
    assert sent["view_name"] == "Registry token request" and f"refresh_token: {issued.group(1)}" in sent["text"]
    assert "password: <hmac:" in api.content(granted["id"], "request")["text"]


def test_side_flows_show_the_upstream_tokens_claims(signed_in, upstream):
    """Inside the sealed tokens: the upstream's, decoded in the side flows to the token service,
    the operator's account's (alice) for bob alone; each followed by its fingerprint into the
    manifest requests the mirror relayed with it."""
    api = signed_in.web_api
    flows = api.flows()
    token_service = side_flows(flows, "token request to the token service")
    relayed = {header(f["request"], "Authorization") for f in side_flows(flows, "manifest request relayed")}
    basic = {header(f["request"], "Authorization") for f in token_service}
    assert any(b and b.startswith("Basic user=alice <hmac:") for b in basic), basic
    for side in token_service:
        shown = token_view(api, side)
        assert "subject (sub): alice" in shown.text
        if side["request"]["method"] == "GET":
            assert f"Bearer {shown.fingerprint}" in relayed


def test_no_secret_in_the_log(pulled, upstream):
    log = pulled.log_text()
    leaked = [name for name, secret in (("alice's password", upstream.users["alice"]),
                                        ("mitmweb's password", pulled.web_password)) if secret in log]
    assert leaked == []


def test_web_ui_shows_the_flows(pulled, tmp_path):
    flows = pulled.web_api.flows()
    browser = Chromium(tmp_path)
    size = (1600, 1000)  # every flow in view: the list renders only the visible rows
    # the DOM is never printed: the blob flows' URLs in it carry the CDN's signatures
    dom = browser.dump_dom(pulled.web_api.ui_url, size=size, wait_ms=UI_WAIT_MS)
    # the list renders the rows in view (a screenful), client flows and side flows alike
    rendered = [f for f in flows if path_of(f) in dom]
    assert len(rendered) >= 20, summary(flows)
    assert any(f["comment"].startswith("hub side flow") for f in rendered), summary(rendered)
    assert any(path_of(f) == "/token" for f in rendered), summary(rendered)
    footer_counts_them = f"0 of {len(flows)} flows selected" in dom
    assert footer_counts_them

    shot = browser.screenshot(pulled.web_api.ui_url, screenshot_path(tmp_path, "mitmweb.png"), size=size,
                              wait_ms=UI_WAIT_MS)
    stats = assert_not_blank(shot)
    assert (stats.width, stats.height) == size
