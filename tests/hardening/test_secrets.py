"""Secrets: a whole authenticated flow through the mirror (skopeo login,
private pull, a wrong password, token GET/POST/refresh grants, manifest and
blob requests with the tokens), then every mirror log line and every answer
the test received is searched for the passwords and tokens."""

from __future__ import annotations

import base64
import secrets

import httpx

from tests.support.skopeo import skopeo

from .helpers import INDEX_ACCEPT, SERVICE, fresh_image



def test_no_password_or_token_leaks(mirror, upstream, tmp_path):
    password = upstream.users["alice"]
    wrong = "wrong-" + secrets.token_urlsafe(12)
    passwords = {password, wrong, upstream.users["admin"]}
    basics = {base64.b64encode(f"alice:{p}".encode()).decode() for p in (password, wrong)}
    tokens: set[str] = set()
    responses: list[tuple[str, httpx.Response]] = []
    cdn_before = len(upstream.cdn_requests())

    def keep(what: str, r: httpx.Response) -> httpx.Response:
        responses.append((what, r))
        if r.status_code == 200 and r.headers.get("content-type", "").startswith("application/json"):
            try:
                grant = r.json()
            except ValueError:
                grant = {}
            if isinstance(grant, dict):
                tokens.update(v for k, v in grant.items() if k in ("token", "access_token", "refresh_token") and v)
        return r

    # skopeo: login (right and wrong), private pull (right and wrong password)
    authfile = tmp_path / "auth.json"
    login = skopeo("login", "--tls-verify=false", "--authfile", str(authfile), "-u", "alice", "-p", password, mirror.host)
    assert login.returncode == 0, login.stderr
    bad_login = skopeo("login", "--tls-verify=false", "--authfile", str(tmp_path / "bad.json"), "-u", "alice",
                       "-p", wrong, mirror.host)
    assert bad_login.returncode != 0
    ref = f"docker://{mirror.host}/private/secret:1.0"
    pulled = skopeo("copy", "--src-tls-verify=false", "--src-creds", f"alice:{password}", ref, f"dir:{tmp_path / 'ok'}")
    assert pulled.returncode == 0, pulled.stderr
    refused = skopeo("copy", "--src-tls-verify=false", "--src-creds", f"alice:{wrong}", ref, f"dir:{tmp_path / 'no'}")
    assert refused.returncode != 0
    for what, out in (("skopeo login", login), ("skopeo bad login", bad_login), ("skopeo pull", pulled),
                      ("skopeo refused pull", refused)):
        for p in passwords:
            assert p not in out.stdout + out.stderr, f"{what} printed a password"

    # token grants the way docker / containerd ask for them
    scope = "repository:private/secret:pull"
    keep("GET /token basic", httpx.get(f"{mirror.url}/token", params={"service": SERVICE, "scope": scope},
                                       auth=("alice", password), timeout=15))
    keep("GET /token basic offline", httpx.get(f"{mirror.url}/token", auth=("alice", password), timeout=15, params={
        "service": SERVICE, "scope": scope, "offline_token": "true", "client_id": "hardening", "account": "alice"}))
    form = {"grant_type": "password", "username": "alice", "password": password, "service": SERVICE,
            "client_id": "hardening", "access_type": "offline", "scope": scope}
    grant = keep("POST /token password", httpx.post(f"{mirror.url}/token", data=form, timeout=15))
    assert grant.status_code == 200, grant.text
    if grant.json().get("refresh_token"):
        keep("POST /token refresh", httpx.post(f"{mirror.url}/token", timeout=15, data={
            "grant_type": "refresh_token", "refresh_token": grant.json()["refresh_token"], "service": SERVICE,
            "client_id": "hardening", "scope": scope}))
    bad = keep("POST /token wrong password", httpx.post(f"{mirror.url}/token", data={**form, "password": wrong}, timeout=15))
    assert bad.status_code == 401, bad.text
    bad = keep("GET /token wrong password", httpx.get(f"{mirror.url}/token", params={"service": SERVICE, "scope": scope},
                                                      auth=("alice", wrong), timeout=15))
    assert bad.status_code == 401, bad.text
    keep("GET /v2/ basic", httpx.get(f"{mirror.url}/v2/", auth=("alice", password), timeout=15))
    assert tokens, "no token collected"

    # the tokens in use: manifest and blob of the private image (blob through the CDN or the cache)
    access = grant.json()["access_token"]
    image = upstream.images["private/secret"]
    auth = {"Authorization": f"Bearer {access}"}
    m = keep("GET manifest", httpx.get(f"{mirror.url}/v2/private/secret/manifests/1.0", timeout=15,
                                       headers=[("Authorization", f"Bearer {access}")] + [("Accept", a) for a in INDEX_ACCEPT]))
    assert m.status_code == 200, m.text
    keep("HEAD manifest", httpx.head(f"{mirror.url}/v2/private/secret/manifests/{image['digest']}", headers=auth, timeout=15))
    for digest in [image["config_digest"], *image["layer_digests"]]:
        b = keep(f"GET blob {digest[:19]}", httpx.get(f"{mirror.url}/v2/private/secret/blobs/{digest}", headers=auth,
                                                       timeout=15, follow_redirects=True))
        assert b.status_code == 200, b.text
        keep("GET blob range", httpx.get(f"{mirror.url}/v2/private/secret/blobs/{digest}", timeout=15,
                                         headers={**auth, "Range": "bytes=0-3"}))
    # an uncached blob, so the CDN is certainly reached in this test
    fresh = fresh_image(upstream, tmp_path, "private/h-secret")
    tok = keep("GET /token basic private/h-secret", httpx.get(f"{mirror.url}/token", auth=("alice", password), timeout=15,
                                                              params={"service": SERVICE, "scope": "repository:private/h-secret:pull"}))
    b = keep("GET fresh private blob", httpx.get(f"{mirror.url}/v2/private/h-secret/blobs/{fresh['layer_digests'][0]}",
                                                  headers={"Authorization": f"Bearer {tok.json()['token']}"}, timeout=15))
    assert b.status_code == 200, b.text

    # nothing secret in any answer: passwords never; tokens only in the grants asked for
    for what, r in responses:
        text = "\n".join(f"{k}: {v}" for k, v in r.headers.items()) + "\n" + r.content.decode("latin-1")
        for p in passwords | basics:
            assert p not in text, f"{what}: the answer contains a password"
        if not what.startswith(("GET /token", "POST /token")):
            for t in tokens:
                assert t not in text, f"{what}: the answer contains a token"

    # nothing secret in the mirror's log
    log = mirror.log_text()  # the whole run of this mirror, startup included
    assert log, "empty mirror log"
    for secret in passwords | basics | tokens:
        assert secret not in log, f"a secret ({secret[:6]}...) is in the mirror log"
    assert "Authorization" not in log and "authorization:" not in log.lower()
    assert "signature=" not in log, "a signed CDN URL (a bearer capability) is in the mirror log"

    # the CDN never saw credentials
    cdn = upstream.cdn_requests(min_count=cdn_before + 1)[cdn_before:]
    assert cdn, "no blob reached the CDN during this test"
    assert [r for r in cdn if r.get("authorization_present")] == [], cdn
