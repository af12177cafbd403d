"""Nothing that grants access reaches mitmdump's output, whatever its flow_detail or the
terminal's width: not the loopback server's key, not a signed storage URL, not a
token, password or Authorization header, not a cache hit's internal URL; as a
forward proxy, not the proxy's own credentials (Proxy-Authorization) either."""

from __future__ import annotations

import base64
import re
import secrets
import ssl
import subprocess

import httpx
import pytest

from tests.support.daemons import through_proxy
from tests.support.mirror import Mirror
from tests.support.skopeo import skopeo

from .helpers import SERVICE, UPSTREAM_TIMEOUT
from .setups import PROXY_REGISTRY

WIDE = {"COLUMNS": "4000"}  # mitmdump cuts URLs to the terminal's width: make it wide


def skopeo_copy(mirror, ref: str, dest, creds: str | None = None) -> subprocess.CompletedProcess:
    auth = ["--src-creds", creds] if creds else []
    return skopeo("copy", "--src-tls-verify=false", *auth, f"docker://{mirror.host}/{ref}", f"dir:{dest}")


@pytest.fixture(scope="module")
def mirror(upstream, cache_dir, tmp_path_factory):
    """Unused here: each test starts its own mirror (hardening's conftest checks this one around every test)."""
    with Mirror(tmp_path_factory.mktemp("log-secrets-idle"), upstream,
                options={"hub_cache_dir": str(cache_dir), "hub_upstream_timeout": str(UPSTREAM_TIMEOUT)}) as m:
        yield m


@pytest.mark.parametrize("flow_detail", ["1", "2", "4"])
def test_mitmdump_output_holds_no_secret(upstream, tmp_path, flow_detail):
    password = upstream.users["alice"]
    options = {"hub_cache_dir": str(tmp_path / "cache"), "flow_detail": flow_detail}
    with Mirror(tmp_path / "m", upstream, options=options, env=WIDE) as m:
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
    assert_nothing_grants_access(log, password, grants)
    assert "/v2/private/secret/manifests/1.0" in log  # the flows are there, as the client made them


def assert_nothing_grants_access(log: str, password: str, grants: list[dict]) -> None:
    """alice's password and Basic header, the ``grants``' tokens, signed URLs, the loopback
    server's key and its URLs: none of them in ``log``."""
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
    assert not re.search(r"://[^/\s]+/(blobs|answers)/", log), "an internal loopback URL is in the log"
    basic = httpx.BasicAuth("alice", password)._auth_header  # the Basic header alice's clients send
    assert basic.split()[1] not in log


@pytest.mark.parametrize("flow_detail", ["1", "2", "4"])
def test_forward_proxy_output_holds_no_secret(upstream, tmp_path, flow_detail):
    """The mirror as a forward proxy guarded by mitmproxy's proxyauth. Through it (CONNECT
    hub.test:443, TLS with mitmproxy's CA): a Range GET of a private layer, which the
    client's own flow streams from where the registry redirects (the CDN, a signed URL),
    then skopeo pulls the image cold (from the CDN); again, now both from the cache (the
    Range from the loopback server); token grants through the tunnel and in absolute form
    to the registry's API URL."""
    password, proxy_password = upstream.users["alice"], "proxy-" + secrets.token_urlsafe(12)
    options = {"hub_cache_dir": str(tmp_path / "cache"), "flow_detail": flow_detail,
               "proxyauth": f"puller:{proxy_password}"}
    with Mirror(tmp_path / "m", "", mode="regular", upstream_ca=upstream.ca_cert, options=options, env=WIDE,
                extra_args=["--set", f"hub_upstreams={PROXY_REGISTRY}={upstream.api_url}"]) as m:
        proxy_url = f"http://puller:{proxy_password}@{m.host}"
        verify = ssl.create_default_context(cafile=str(m.ca_cert))
        scope = {"service": SERVICE, "scope": "repository:private/secret:pull"}
        with httpx.Client(proxy=proxy_url, verify=verify, trust_env=False, timeout=30) as client:
            token = client.get(f"https://{PROXY_REGISTRY}/token", params=scope, auth=("alice", password)).json()["token"]
            layer = upstream.images["private/secret"]["layer_digests"][0]
            for run in ("cold", "warm"):
                part = client.get(f"https://{PROXY_REGISTRY}/v2/private/secret/blobs/{layer}",
                                  headers={"Authorization": f"Bearer {token}", "Range": "bytes=0-9"})
                assert part.status_code == 206 and len(part.content) == 10, (part.status_code, part.headers)
                result = skopeo_through(m, proxy_url, "private/secret:1.0", tmp_path / run, f"alice:{password}")
                assert result.returncode == 0, result.stderr
            grants = [
                client.get(f"https://{PROXY_REGISTRY}/token", params=scope, auth=("alice", password)).json(),
                client.post(f"{upstream.api_url}/token", data={
                    "grant_type": "password", "username": "alice", "password": password, "client_id": "t",
                    "access_type": "offline", **scope}).json(),
            ]
        log = m.log_text()
    assert_nothing_grants_access(log, password, [{"token": token}, *grants])
    assert proxy_password not in log, "the proxy's password is in the log"
    assert base64.b64encode(f"puller:{proxy_password}".encode()).decode() not in log, "Proxy-Authorization in the log"
    assert f"https://{PROXY_REGISTRY}/v2/private/secret/manifests/1.0" in log  # the flows are there
    assert "cache=hit" in log and "cache=miss" in log  # the warm pull was served from the cache


def skopeo_through(proxy: Mirror, proxy_url: str, ref: str, dest, creds: str) -> subprocess.CompletedProcess:
    """skopeo copy of hub.test/``ref`` whose only proxy is ``proxy_url``, trusting mitmproxy's CA."""
    certs = dest.with_name(dest.name + "-certs")
    certs.mkdir(exist_ok=True)
    (certs / "ca.crt").write_bytes(proxy.ca_cert.read_bytes())
    return skopeo("copy", "--src-tls-verify=true", "--src-cert-dir", str(certs), "--src-creds", creds,
                  f"docker://{PROXY_REGISTRY}/{ref}", f"dir:{dest}", env=through_proxy(proxy_url))
