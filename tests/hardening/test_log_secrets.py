"""Nothing that grants access reaches mitmdump's output, whatever its flow_detail or the
terminal's width: not the loopback server's key, not a signed storage URL, not a
token, password or Authorization header, not a cache hit's internal URL."""

from __future__ import annotations

import re
import subprocess

import httpx
import pytest

from tests.support.mirror import Mirror

from .helpers import SERVICE, UPSTREAM_TIMEOUT

WIDE = {"COLUMNS": "4000"}  # mitmdump cuts URLs to the terminal's width: make it wide


def skopeo_copy(mirror, ref: str, dest, creds: str | None = None) -> subprocess.CompletedProcess:
    args = ["skopeo", "copy", "--src-tls-verify=false"]
    if creds:
        args += ["--src-creds", creds]
    return subprocess.run([*args, f"docker://{mirror.host}/{ref}", f"dir:{dest}"], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def mirror(upstream, cache_dir, tmp_path_factory):
    """Unused here: each test starts its own mirror (hardening's conftest checks this one around every test)."""
    with Mirror(tmp_path_factory.mktemp("log-secrets-idle"), upstream.api_url,
                options={"hub_cache_dir": str(cache_dir), "hub_upstream_timeout": str(UPSTREAM_TIMEOUT)}) as m:
        yield m


@pytest.mark.parametrize("flow_detail", ["1", "2", "4"])
def test_mitmdump_output_holds_no_secret(upstream, tmp_path, flow_detail):
    password = upstream.users["alice"]
    options = {"hub_cache_dir": str(tmp_path / "cache"), "flow_detail": flow_detail}
    with Mirror(tmp_path / "m", upstream.api_url, options=options, env=WIDE) as m:
        for run in ("cold", "warm"):  # a cold pull streams from the CDN, a warm one from the loopback server
            result = skopeo_copy(m, "private/secret:1.0", tmp_path / run, f"alice:{password}")
            assert result.returncode == 0, result.stderr
        grants = [
            httpx.get(f"{m.url}/token", params={"service": SERVICE, "scope": "repository:private/secret:pull"},
                      auth=("alice", password)).json(),
            httpx.post(f"{m.url}/token", data={"grant_type": "password", "username": "alice", "password": password,
                                               "service": SERVICE, "client_id": "t", "access_type": "offline",
                                               "scope": "repository:private/secret:pull"}).json(),
        ]
        log = m.log_text()
    tokens = {g[k] for g in grants for k in ("token", "access_token", "refresh_token") if g.get(k)}
    assert tokens
    assert password not in log
    for token in tokens:
        assert token not in log, "a token is in the log"
        if token.count(".") == 2:  # a JWT: its signature is what makes it usable
            assert token.rsplit(".", 1)[1] not in log
    assert "signature=" not in log.replace("signature=%3Chmac%3A", "").replace("signature=<hmac:", ""), \
        "a signed storage URL is in the log"
    assert not re.search(r"(?i)x-hub-loopback-key: [0-9a-f]{32}", log), "the loopback server's key is in the log"
    assert not re.search(r"127\.0\.0\.1:\d+/(blobs|answers)/", log), "an internal loopback URL is in the log"
    basic = httpx.BasicAuth("alice", password)._auth_header  # the Basic header alice's clients send
    assert basic.split()[1] not in log
    assert "/v2/private/secret/manifests/1.0" in log  # the flows are there, as the client made them
