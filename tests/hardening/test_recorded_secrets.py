"""No usable credential in what records flows: mitmweb (its REST API, content views,
``/flows/dump``, the UI's websocket) and saved flows (``save_stream_file``, ``-w``).

Two mirrors do everything that hands out a credential, with real clients:

- ``open``: mitmweb, also saving to a file, with the operator's own upstream account
  (``hub_upstream_credentials``) and a cache whose blobs come through the loopback
  server. skopeo pulls a private image anonymously (the operator's account answers)
  and alice pulls with her own password; docker login's POST (a refresh token) and
  its refresh, a GET with ``offline_token``; a blob GET and HEAD with her token.
- ``sealed``: mitmdump ``-w`` with side flows, mirror accounts (bob, so every token the
  client sees is a sealed ``hub1.``), the operator's account, the blob listener and a
  shared bucket with presigned redirects: skopeo pulls with bob's password alone and
  with bob's and alice's, the same POST grants, then pulls again once the bucket holds
  the blobs (307s to presigned URLs), a blob GET and HEAD without following them.

Then every text either exposes is searched for every secret the upstream's token
service issued (from its log), the passwords, Basic credentials, sealed tokens,
signed listener, CDN and bucket URLs, and the loopback key.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import ssl
import time
from pathlib import Path

import httpx
import pytest

from tests.support.credential_scan import CredentialScan, flow_label, flow_texts
from tests.support.mirror import Mirror
from tests.support.ports import free_port
from tests.support.skopeo import skopeo

from .helpers import SERVICE, UPSTREAM_TIMEOUT
from .setups import PROXY_REGISTRY, users_file

PRIVATE = "private/secret"
PREFIX = "hub"


def skopeo_copy(mirror: Mirror, ref: str, dest: Path, creds: str | None) -> None:
    auth = ["--src-creds", creds] if creds else ["--src-no-creds"]
    result = skopeo("copy", "--src-tls-verify=false", *auth, f"docker://{mirror.host}/{ref}", f"dir:{dest}")
    assert result.returncode == 0, result.stderr[-2000:]


def grants(mirror: Mirror, user: str, password: str) -> list[dict]:
    """The token answers docker login and dockerd ask for: a POST password grant with a
    refresh token, its refresh, and a GET with ``offline_token``."""
    scope = f"repository:{PRIVATE}:pull"
    form = {"grant_type": "password", "username": user, "password": password, "service": SERVICE,
            "client_id": "hardening", "access_type": "offline", "scope": scope}
    first = httpx.post(f"{mirror.url}/token", data=form, timeout=15)
    assert first.status_code == 200 and first.json().get("refresh_token"), first.status_code
    refreshed = httpx.post(f"{mirror.url}/token", timeout=15, data={
        "grant_type": "refresh_token", "refresh_token": first.json()["refresh_token"], "service": SERVICE,
        "client_id": "hardening", "scope": scope})
    assert refreshed.status_code == 200, refreshed.status_code
    offline = httpx.get(f"{mirror.url}/token", auth=(user, password), timeout=15, params={
        "service": SERVICE, "scope": scope, "offline_token": "true", "client_id": "hardening"})
    assert offline.status_code == 200, offline.status_code
    return [first.json(), refreshed.json(), offline.json()]


def blob_requests(mirror: Mirror, upstream, token: str) -> list[int]:
    """A GET and a HEAD of a private layer, redirects not followed: their statuses."""
    layer = upstream.images[PRIVATE]["layer_digests"][0]
    url = f"{mirror.url}/v2/{PRIVATE}/blobs/{layer}"
    auth = {"Authorization": f"Bearer {token}"}
    return [httpx.get(url, headers=auth, timeout=30).status_code, httpx.head(url, headers=auth, timeout=30).status_code]


class Credentials:
    """The operator's upstream account (alice) and the mirror's users file (bob); no repr, so
    a failing test's report does not print bob's password."""

    def __init__(self, base: Path, upstream) -> None:
        self.upstream_file = base / "upstream-credentials"
        self.upstream_file.write_text(f"docker.io alice {upstream.users['alice']}\n")
        os.chmod(self.upstream_file, 0o600)
        self.users_file, passwords = users_file(base, "bob")
        self.bob = passwords["bob"]

    def __repr__(self) -> str:
        return "Credentials(...)"


@pytest.fixture(scope="module")
def credentials(upstream, tmp_path_factory) -> Credentials:
    return Credentials(tmp_path_factory.mktemp("recorded-credentials"), upstream)


@pytest.fixture(scope="module")
def mirror(upstream, credentials, tmp_path_factory):
    """``open``: mitmweb saving to a file too (hardening's conftest checks it around every test)."""
    work = tmp_path_factory.mktemp("recorded-open")
    options = {"hub_cache_dir": str(work / "cache"), "hub_upstream_timeout": str(UPSTREAM_TIMEOUT),
               "hub_upstream_credentials": str(credentials.upstream_file), "save_stream_file": str(work / "open.flows")}
    with Mirror(work / "m", upstream, tool="mitmweb", options=options) as m:
        m.flows_file = work / "open.flows"
        yield m


def test_mitmweb_and_saved_flows_hold_no_usable_credential(mirror, upstream, credentials, ceph, tmp_path):
    alice = upstream.users["alice"]
    scan = CredentialScan(upstream, passwords={"alice": alice}, basic=[("alice", alice)])
    api = mirror.web_api
    with api.updates() as pushed:
        skopeo_copy(mirror, f"{PRIVATE}:1.0", tmp_path / "anonymous", None)  # the operator's account answers
        skopeo_copy(mirror, "library/alpine:3.19", tmp_path / "alice", f"alice:{alice}")
        answers = grants(mirror, "alice", alice)
        assert blob_requests(mirror, upstream, answers[0]["access_token"]) == [200, 200]
        time.sleep(1)  # the last updates on their way
    # the scan finds what it looks for: the answers the client got hold the upstream's tokens
    assert "a JWT signature or refresh token the upstream issued" in scan.found(json.dumps(answers))

    issued = scan.issued()
    leaks = {}
    for place, text in mitmweb_texts(api) + [("the /updates websocket", "\n".join(pushed))]:
        if found := scan.found(text, issued):
            leaks[f"mitmweb {place}"] = found
    for place, text in flow_texts(mirror.flows_file.read_bytes()):
        if found := scan.found(text, issued):
            leaks[f"save_stream_file {place}"] = found
    leaks.update(sealed_mirror_leaks(upstream, credentials, ceph, tmp_path))
    assert not leaks, "usable credentials found:\n" + "\n".join(f"{place}: {', '.join(kinds)}"
                                                             for place, kinds in sorted(leaks.items()))


def mitmweb_texts(api) -> list[tuple[str, str]]:
    """(where, text) for everything mitmweb's API hands out about the flows."""
    flows = api.flows()
    texts = [("/flows.json", json.dumps(flows)), ("/events.json", api.get_text("/events.json"))]
    # a name the API's route cannot carry (socket.io) is no more reachable from the UI
    views = [v for v in api.content_views() if re.fullmatch(r"[0-9a-zA-Z_% -]+", v)]
    for flow in flows:
        label = flow_label(flow["comment"], flow["request"]["method"], flow["request"]["path"])
        for part in ("request", "response"):
            message = flow.get(part)
            if not message or not message.get("contentLength"):
                continue
            texts.append((f"{label} {part} content.data", api.content_data(flow["id"], part).decode("latin-1")))
            for view in ["auto", *views]:
                texts.append((f"{label} {part} view {view}", json.dumps(api.content(flow["id"], part, view))))
    texts += [(f"/flows/dump {place}", text) for place, text in flow_texts(api.dump())]
    return texts


def sealed_mirror_leaks(upstream, credentials, ceph, tmp_path) -> dict[str, list[str]]:
    """``sealed``: mitmdump -w with accounts, listener and presigned bucket; what its file holds."""
    bob = credentials.bob
    alice = upstream.users["alice"]
    bucket = ceph.make_bucket("recorded-" + secrets.token_hex(4))
    flows = tmp_path / "sealed.flows"
    options = {"hub_cache_dir": str(tmp_path / "cache"), "hub_blob_listen": f"127.0.0.1:{free_port()}",
               "hub_users_file": str(credentials.users_file),
               "hub_upstream_credentials": str(credentials.upstream_file), "hub_side_flows": "on",
               "hub_store_url": f"s3://{bucket}/{PREFIX}", "hub_store_endpoint": ceph.endpoint_url,
               "hub_store_addressing": "path", "hub_store_presign": "true"}
    env = {"AWS_ACCESS_KEY_ID": ceph.access_key, "AWS_SECRET_ACCESS_KEY": ceph.secret_key}
    combined = f"{bob}:alice:{alice}"
    scan = CredentialScan(upstream, passwords={"alice": alice, "bob (mirror)": bob, "the bucket": ceph.secret_key},
                          basic=[("bob", bob), ("bob", combined)])
    with Mirror(tmp_path / "sealed", upstream, options=options, env=env, extra_args=["-w", str(flows)]) as m:
        skopeo_copy(m, f"{PRIVATE}:1.0", tmp_path / "bob", f"bob:{bob}")  # the operator's account answers
        skopeo_copy(m, f"{PRIVATE}:1.0", tmp_path / "bob-alice", f"bob:{combined}")
        answers = grants(m, "bob", combined)
        assert all(a["token"].startswith("hub1.") for a in answers)
        for digest in upstream.images[PRIVATE]["layer_digests"]:
            assert ceph.wait_for_blob(bucket, PREFIX, digest)
        skopeo_copy(m, f"{PRIVATE}:1.0", tmp_path / "presigned", f"bob:{bob}")
        # the GET is redirected to the presigned URL; a HEAD's answer, which has no body, is sent
        # after its record is written: the mirror answers it itself (with 200) rather than redirect it
        get, head = blob_requests(m, upstream, answers[0]["access_token"])
        assert get == 307 and head in (200, 307)
    assert "a sealed hub1. token" in scan.found(json.dumps(answers))
    issued = scan.issued()
    return {f"-w {place}": found for place, text in flow_texts(flows.read_bytes())
            if (found := scan.found(text, issued))}


def test_saved_flows_of_a_forward_proxy_hold_not_its_password(upstream, tmp_path):
    """mitmproxy's proxyauth keeps the password it accepted in every flow's metadata, which
    saved flows keep: the mirror's records hold its fingerprint. Through the proxy (CONNECT
    hub.test:443 with mitmproxy's CA): a token for alice and a manifest with it."""
    alice, proxy_password = upstream.users["alice"], "proxy-" + secrets.token_urlsafe(12)
    flows = tmp_path / "proxy.flows"
    with Mirror(tmp_path / "m", "", mode="regular", upstream_ca=upstream.ca_cert,
                options={"proxyauth": f"puller:{proxy_password}"},
                extra_args=["--set", f"hub_upstreams={PROXY_REGISTRY}={upstream.api_url}", "-w", str(flows)]) as m:
        verify = ssl.create_default_context(cafile=str(m.ca_cert))
        with httpx.Client(proxy=f"http://puller:{proxy_password}@{m.host}", verify=verify, trust_env=False,
                          timeout=30) as client:
            token = client.get(f"https://{PROXY_REGISTRY}/token", auth=("alice", alice),
                               params={"service": SERVICE, "scope": f"repository:{PRIVATE}:pull"}).json()["token"]
            manifest = client.get(f"https://{PROXY_REGISTRY}/v2/{PRIVATE}/manifests/1.0",
                                  headers={"Authorization": f"Bearer {token}",
                                           "Accept": upstream.images[PRIVATE]["media_type"]})
            assert manifest.status_code == 200
    scan = CredentialScan(upstream, passwords={"alice": alice, "the proxy": proxy_password},
                          basic=[("alice", alice), ("puller", proxy_password)])
    issued = scan.issued()
    saved = flow_texts(flows.read_bytes())
    assert any("/manifests/1.0" in place for place, _ in saved)
    leaks = {place: found for place, text in saved if (found := scan.found(text, issued))}
    assert not leaks, leaks
