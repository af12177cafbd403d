"""One mirror for every registry (issue 3), end to end with real parts.

Two independent Docker-Hub-shaped upstreams run on loopback: ``upstream``
(docker.io, the standard image set) and ``second_upstream`` (standing in for
ghcr.io: its own token server with service ``ghcr.io``, CDN, distribution and
edge; ``owner/tool:1.0`` and the alice-only ``private/secret:1.0``).  One real
mitmdump with the addon serves both, configured with

    --set hub_upstreams=docker.io=<upstream edge> --set hub_upstreams=ghcr.io=<second edge>

and the clients are real: containerd's ``ctr`` (hosts.toml mirrors for both
registries, ``?ns=``), skopeo and podman (``registries.conf`` mirror with a
``/ghcr.io`` path prefix), skopeo through the mirror as a forward proxy
(``HTTPS_PROXY``, mitmproxy's CA), curl and httpx for the exact answers.  The
upstreams' own logs (edge, token server, CDN) show which upstream got what.

Covered: routing by ``ns``, by path prefix, by Host header / TLS server name
(``hub_host_map``) and in forward-proxy mode (``hub_proxy_passthrough``);
mirror accounts (``hub_users_file``, bcrypt and argon2id); ``hub_allow`` /
``hub_deny``; server-side upstream credentials (``hub_upstream_credentials``);
and that no client input makes the mirror connect to a host outside its table.

Nothing leaves loopback: primary registries of mirror setups are dead
loopback ports and clients get proxy variables pointing at a dead loopback
port (except the forward-proxy tests, whose only proxy is the mirror, and
whose registry name ``hub.test`` is resolved by the mirror's table, never by
DNS).  A test is skipped only when its client binary is not installed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.hardening.helpers import EvilListener, assert_registry_error, raw_request
# containerd and podman_in are fixtures
from tests.integration.test_clients import containerd, ctr_check, ctr_images, need, podman_in  # noqa: F401
from tests.integration.test_mirror import sha256_file
from tests.support.auth import basic
from tests.support.certs import make_ca_and_server_cert
from tests.support.daemons import dockerd_on_containerd, through_proxy, without_proxies
from tests.support.mirror import Mirror
from tests.support.ports import free_port
from tests.support.skopeo import skopeo

# mitmdump shortens logged URLs to the terminal width; the full query (ns=...) must show
WIDE_LOG = {"COLUMNS": "4000"}
HOST_MAPPED = "ghcr.mirror.test"
PROXY_REGISTRY = "hub.test"  # not loopback-looking: Go clients send it to HTTPS_PROXY
INDEX_ACCEPT = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
]
ACCEPT_HEADERS = [("Accept", t) for t in INDEX_ACCEPT]


# ---------------------------------------------------------------- helpers


def sha256_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def dead_registry() -> str:
    return f"127.0.0.1:{free_port()}"


def table_args(upstream, second_upstream, *settings: str) -> list[str]:
    """``--set`` arguments: the two-registry table plus ``settings`` ("key=value", repeatable keys allowed)."""
    args = ["--set", f"hub_upstreams=docker.io={upstream.api_url}",
            "--set", f"hub_upstreams=ghcr.io={second_upstream.api_url}"]
    for setting in settings:
        args += ["--set", setting]
    return args


def routing_mirror(workdir: Path, upstream, second_upstream, *settings: str, **kw) -> Mirror:
    """A reverse-mode mirror for docker.io (default) and ghcr.io, not yet started."""
    return Mirror(workdir, upstream, extra_args=table_args(upstream, second_upstream, *settings),
                  env=WIDE_LOG, **kw)


def parse_challenge(value: str) -> dict[str, str]:
    """``Bearer realm="..",service="..",scope=".."`` -> {"scheme": "Bearer", "realm": .., ...}."""
    scheme, _, rest = value.strip().partition(" ")
    params = dict(re.findall(r'(\w+)="([^"]*)"', rest))
    params["scheme"] = scheme
    return params


def log_offsets(*upstreams) -> list[tuple[int, int, int]]:
    """(edge, token, cdn) log lengths now, one triple per upstream."""
    return [(len(u.edge_requests()), len(u.token_requests()), len(u.cdn_requests())) for u in upstreams]


def edge_since(up, offsets) -> list[dict]:
    return up.edge_requests()[offsets[0]:]


def tokens_since(up, offsets) -> list[dict]:
    return up.token_requests()[offsets[1]:]


def paths(records: list[dict]) -> list[str]:
    return [r.get("path", "") for r in records]


def auth_file(path: Path, entries: dict[str, tuple[str, str]]) -> Path:
    """A containers-auth.json: key (host[:port][/namespace]) -> (user, password)."""
    auths = {key: {"auth": base64.b64encode(f"{user}:{pw}".encode()).decode()} for key, (user, pw) in entries.items()}
    path.write_text(json.dumps({"auths": auths}))
    return path


def ghcr_registries_conf(mirror: Mirror) -> str:
    """registries.conf: ghcr.io is a dead loopback port, with the mirror's /ghcr.io namespace in front."""
    return (
        "unqualified-search-registries = []\n"
        "[[registry]]\n"
        'prefix = "ghcr.io"\n'
        f'location = "{dead_registry()}"\n'
        "insecure = true\n"
        "[[registry.mirror]]\n"
        f'location = "{mirror.host}/ghcr.io"\n'
        "insecure = true\n"
    )


def assert_pulled_dir(out: Path, image: dict) -> None:
    """A ``dir:`` copy of a single image: manifest and every blob with the right digests."""
    assert sha256_file(out / "manifest.json") == image["digest"]
    for digest in [image["config_digest"], *image["layer_digests"]]:
        assert sha256_file(out / digest.split(":", 1)[1]) == digest


def curl(*args: str, env: dict[str, str] | None = None) -> tuple[int, bytes]:
    """(HTTP status, body bytes); status 0 when curl got no HTTP answer."""
    need("curl", "curl")
    result = subprocess.run(["curl", "-sS", "--max-time", "20", "-o", "-", "-w", "\n%{http_code}", *args],
                            capture_output=True, timeout=60, env=env)
    body, _, code = result.stdout.rpartition(b"\n")
    return int(code or 0), body


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def mirror(upstream, second_upstream, tmp_path_factory):
    """One mirror, two registries; ghcr.mirror.test is a host name for ghcr.io."""
    m = routing_mirror(tmp_path_factory.mktemp("routing-mirror"), upstream, second_upstream,
                       f"hub_host_map={HOST_MAPPED}=ghcr.io").start()
    try:
        yield m
    finally:
        m.stop()


# ---------------------------------------------------------------- a. containerd, ns routing


def test_containerd_hosts_toml_for_two_registries(mirror, upstream, second_upstream, containerd, tmp_path):
    """ctr with hosts.toml mirrors for docker.io AND ghcr.io, both pointing at the one
    mirror (primaries: dead loopback ports), pulls docker.io/library/alpine:3.19 and
    ghcr.io/owner/tool:1.0 with the right digests, complete and unpacked.  containerd
    sends ``?ns=ghcr.io``; the mirror sends the ghcr requests (manifests, blobs,
    tokens) to the second upstream only, without the ``ns`` parameter, and nothing
    of owner/tool reaches the first upstream."""
    hosts = tmp_path / "hosts"
    for registry in ("docker.io", "ghcr.io"):
        (hosts / registry).mkdir(parents=True)
        (hosts / registry / "hosts.toml").write_text(
            f'server = "http://{dead_registry()}"\n'
            f'[host."http://{mirror.host}"]\n'
            '  capabilities = ["pull", "resolve"]\n'
        )
    first, second = log_offsets(upstream, second_upstream)
    start = len(mirror.log_text())
    alpine, tool = upstream.images["library/alpine"], second_upstream.images["owner/tool"]
    for ref, digest in (("docker.io/library/alpine:3.19", alpine["digest"]), ("ghcr.io/owner/tool:1.0", tool["digest"])):
        result = containerd.ctr("images", "pull", "--hosts-dir", str(hosts), ref)
        assert result.returncode == 0, result.stderr + mirror.log_text()[start:][-3000:]
        assert "trying next host" not in result.stderr  # the mirror answered everything
        assert ctr_images(containerd)[ref][1] == digest
        check = ctr_check(containerd, ref)
        assert "complete" in check and check.split()[-1] == "true", check

    log = mirror.log_text()[start:]
    assert "/v2/owner/tool/manifests/1.0?ns=ghcr.io" in log, log[-3000:]
    assert "/v2/library/alpine/manifests/3.19?ns=docker.io" in log, log[-3000:]

    edge1, edge2 = edge_since(upstream, first), edge_since(second_upstream, second)
    # ghcr.io: manifest and every blob from the second upstream
    assert "/v2/owner/tool/manifests/1.0" in paths(edge2) or \
        f"/v2/owner/tool/manifests/{tool['digest']}" in paths(edge2), paths(edge2)
    for digest in [tool["config_digest"], *tool["layer_digests"]]:
        assert f"/v2/owner/tool/blobs/{digest}" in paths(edge2)
    assert not any("alpine" in p for p in paths(edge2)), paths(edge2)
    # docker.io: alpine from the first upstream, nothing of owner/tool there
    assert any(p.startswith("/v2/library/alpine/") for p in paths(edge1)), paths(edge1)
    assert not any("owner/tool" in p for p in paths(edge1)), paths(edge1)
    # ns is the mirror's business: never forwarded
    assert all("ns" not in r.get("query_keys", []) for r in edge1 + edge2)
    # each token service saw only its own repositories
    tok1, tok2 = tokens_since(upstream, first), tokens_since(second_upstream, second)
    assert any("repository:owner/tool:pull" in r.get("scopes_requested", []) and r.get("service") == "ghcr.io"
               for r in tok2), tok2
    assert not any("owner/tool" in " ".join(r.get("scopes_requested", [])) for r in tok1), tok1
    assert not any("alpine" in " ".join(r.get("scopes_requested", [])) for r in tok2), tok2


# ---------------------------------------------------------------- path prefix and ns, exact answers


def test_path_prefix_and_ns_challenges_and_tokens(mirror, upstream, second_upstream):
    """The challenge for ``/v2/ghcr.io/owner/tool/...`` names the realm
    ``<mirror>/token/ghcr.io``, ghcr's service, and the scope as the client named
    the repository (``ghcr.io/owner/tool``); a token from that realm (and from plain
    ``/token`` with the prefixed scope) opens the manifest.  The second upstream's
    token service got the scope without the prefix.  With ``?ns=ghcr.io`` the
    challenge names ``owner/tool``.  docker.io's challenge keeps realm ``<mirror>/token``."""
    tool = second_upstream.images["owner/tool"]
    first, second = log_offsets(upstream, second_upstream)

    r = httpx.get(f"{mirror.url}/v2/ghcr.io/owner/tool/manifests/1.0", headers=ACCEPT_HEADERS, timeout=30)
    assert r.status_code == 401, r.text
    ch = parse_challenge(r.headers["www-authenticate"])
    realm = urlsplit(ch["realm"])
    assert ch["scheme"] == "Bearer"
    assert (realm.scheme, realm.netloc, realm.path) == ("http", mirror.host, "/token/ghcr.io"), ch
    assert ch.get("service") == "ghcr.io", ch
    assert ch.get("scope") == "repository:ghcr.io/owner/tool:pull", ch

    t = httpx.get(ch["realm"], params={"service": ch["service"], "scope": ch["scope"]}, timeout=30)
    assert t.status_code == 200, t.text
    m = httpx.get(f"{mirror.url}/v2/ghcr.io/owner/tool/manifests/1.0", timeout=30,
                  headers=[("Authorization", f"Bearer {t.json()['token']}"), *ACCEPT_HEADERS])
    assert m.status_code == 200, m.text
    assert m.headers["docker-content-digest"] == tool["digest"]
    assert sha256_bytes(m.content) == tool["digest"]

    # plain /token with a prefixed scope goes to ghcr.io too
    t2 = httpx.get(f"{mirror.url}/token", params={"service": "ghcr.io", "scope": "repository:ghcr.io/owner/tool:pull"},
                   timeout=30)
    assert t2.status_code == 200, t2.text
    m2 = httpx.head(f"{mirror.url}/v2/ghcr.io/owner/tool/manifests/1.0", timeout=30,
                    headers=[("Authorization", f"Bearer {t2.json()['token']}"), *ACCEPT_HEADERS])
    assert m2.status_code == 200
    assert m2.headers["docker-content-digest"] == tool["digest"]

    tok2 = tokens_since(second_upstream, second)
    assert len(tok2) >= 2, tok2
    assert all(r.get("scopes_requested") == ["repository:owner/tool:pull"] for r in tok2 if r.get("status") == 200), tok2
    assert not any("owner/tool" in " ".join(r.get("scopes_requested", [])) for r in tokens_since(upstream, first))
    assert not any("owner/tool" in p for p in paths(edge_since(upstream, first)))

    # containerd's form: ns names the registry, the name carries no prefix
    r = httpx.get(f"{mirror.url}/v2/owner/tool/manifests/1.0?ns=ghcr.io", headers=ACCEPT_HEADERS, timeout=30)
    assert r.status_code == 401, r.text
    ch = parse_challenge(r.headers["www-authenticate"])
    assert urlsplit(ch["realm"]).path == "/token/ghcr.io", ch
    assert ch.get("scope") == "repository:owner/tool:pull", ch

    # the default registry keeps the plain realm
    r = httpx.get(f"{mirror.url}/v2/library/alpine/manifests/3.19", headers=ACCEPT_HEADERS, timeout=30)
    assert r.status_code == 401
    ch = parse_challenge(r.headers["www-authenticate"])
    assert ch["realm"] == f"{mirror.url}/token", ch
    assert ch.get("service") == upstream.service


# ---------------------------------------------------------------- b. registries.conf with a path prefix


def test_skopeo_registries_conf_ghcr_prefix(mirror, second_upstream, tmp_path):
    """skopeo with ``[[registry]] prefix="ghcr.io"`` (location: a dead port) and a
    mirror location ``<mirror>/ghcr.io`` copies ghcr.io/owner/tool:1.0 (manifest and
    blobs verified by digest); the mirror got ``/v2/ghcr.io/owner/tool/...``."""
    conf = tmp_path / "registries.conf"
    conf.write_text(ghcr_registries_conf(mirror))
    start = len(mirror.log_text())
    # skopeo 1.9 reads the file named by its (hidden) --registries-conf flag, as podman reads registries.conf
    result = skopeo("--registries-conf", str(conf), "copy", "docker://ghcr.io/owner/tool:1.0", f"dir:{tmp_path / 'out'}")
    assert result.returncode == 0, result.stderr + mirror.log_text()[start:][-3000:]
    assert_pulled_dir(tmp_path / "out", second_upstream.images["owner/tool"])
    assert "/v2/ghcr.io/owner/tool/manifests/1.0" in mirror.log_text()[start:]


def test_skopeo_private_ghcr_image_with_own_credentials(mirror, upstream, second_upstream, tmp_path):
    """The private ghcr image needs the client's own ghcr credentials: with
    ``--src-creds alice:<ghcr password>`` on ``<mirror>/ghcr.io/private/secret:1.0``,
    and through registries.conf with an auth file entry for ``<mirror>/ghcr.io``
    (containers/image never sends --creds to a mirror), it copies; anonymously it
    is refused.  alice's credentials reached ghcr's token service only."""
    password = second_upstream.users["alice"]
    secret = second_upstream.images["private/secret"]
    first, second = log_offsets(upstream, second_upstream)
    direct = f"docker://{mirror.host}/ghcr.io/private/secret:1.0"

    ok = skopeo("copy", "--src-tls-verify=false", "--src-creds", f"alice:{password}", direct, f"dir:{tmp_path / 'ok'}")
    assert ok.returncode == 0, ok.stderr
    assert_pulled_dir(tmp_path / "ok", secret)

    anonymous = skopeo("copy", "--src-tls-verify=false", "--src-no-creds", direct, f"dir:{tmp_path / 'anon'}")
    assert anonymous.returncode != 0
    assert "denied" in anonymous.stderr.lower() or "unauthorized" in anonymous.stderr.lower(), anonymous.stderr

    conf = tmp_path / "registries.conf"
    conf.write_text(ghcr_registries_conf(mirror))
    authfile = auth_file(tmp_path / "auth.json", {f"{mirror.host}/ghcr.io": ("alice", password)})
    via_conf = skopeo("--registries-conf", str(conf), "copy", "--authfile", str(authfile),
                      "docker://ghcr.io/private/secret:1.0", f"dir:{tmp_path / 'conf'}")
    assert via_conf.returncode == 0, via_conf.stderr
    assert_pulled_dir(tmp_path / "conf", secret)

    no_auth = skopeo("--registries-conf", str(conf), "copy", "--authfile", str(auth_file(tmp_path / "none.json", {})),
                     "docker://ghcr.io/private/secret:1.0", f"dir:{tmp_path / 'conf-anon'}")
    assert no_auth.returncode != 0

    assert any(r.get("account") == "alice" and r.get("status") == 200 for r in tokens_since(second_upstream, second))
    assert not any(r.get("auth_scheme") == "Basic" for r in tokens_since(upstream, first)), \
        "ghcr credentials went to docker.io's token service"
    assert password not in mirror.log_text()


def test_podman_registries_conf_ghcr_prefix(mirror, second_upstream, podman_in, tmp_path):
    """podman with the same registries.conf pulls ghcr.io/owner/tool:1.0 through the
    mirror's /ghcr.io namespace, and the private image with an auth file entry for it."""
    podman = podman_in(registries_conf=ghcr_registries_conf(mirror))
    start = len(mirror.log_text())
    result = podman("pull", "ghcr.io/owner/tool:1.0")
    assert result.returncode == 0, result.stderr + mirror.log_text()[start:][-3000:]
    assert podman.inspect("ghcr.io/owner/tool:1.0")["Digest"] == second_upstream.images["owner/tool"]["digest"]

    anonymous = podman("pull", "ghcr.io/private/secret:1.0")
    assert anonymous.returncode != 0
    auth_file(podman.base / "auth.json", {f"{mirror.host}/ghcr.io": ("alice", second_upstream.users["alice"])})
    ok = podman("pull", "ghcr.io/private/secret:1.0")
    assert ok.returncode == 0, ok.stderr
    assert podman.inspect("ghcr.io/private/secret:1.0")["Digest"] == second_upstream.images["private/secret"]["digest"]


# ---------------------------------------------------------------- c. forward-proxy mode


@pytest.fixture(scope="module")
def forward_proxy(upstream, tmp_path_factory):
    """The mirror as a forward proxy (``--mode regular``) whose table has one registry,
    ``hub.test``, served by the first upstream; ``.cert_dir`` holds its CA as ca.crt."""
    base = tmp_path_factory.mktemp("routing-forward")
    m = Mirror(base, "", mode="regular", upstream_ca=upstream.ca_cert, env=WIDE_LOG, extra_args=[
        "--set", f"hub_upstreams={PROXY_REGISTRY}={upstream.api_url}",
    ]).start()
    try:
        m.cert_dir = base / "client-certs"
        m.cert_dir.mkdir()
        (m.cert_dir / "ca.crt").write_bytes(m.ca_cert.read_bytes())
        yield m
    finally:
        m.stop()


def test_forward_proxy_with_the_cache(upstream, tmp_path):
    """Forward-proxy mode gets the pull-through cache too: a second skopeo copy
    through the proxy makes no CDN request, and the blobs come marked as hits."""
    m = Mirror(tmp_path / "m", "", mode="regular", upstream_ca=upstream.ca_cert, env=WIDE_LOG, extra_args=[
        "--set", f"hub_upstreams={PROXY_REGISTRY}={upstream.api_url}", "--set", f"hub_cache_dir={tmp_path / 'cache'}",
    ]).start()
    try:
        (tmp_path / "certs").mkdir()
        (tmp_path / "certs" / "ca.crt").write_bytes(m.ca_cert.read_bytes())
        ref = f"docker://{PROXY_REGISTRY}/team/ociapp:1.0"
        image = upstream.images["team/ociapp"]
        counts = []
        for run in ("cold", "warm"):
            (_, _, cdn0), = log_offsets(upstream)
            result = skopeo("copy", "--src-tls-verify=true", "--src-cert-dir", str(tmp_path / "certs"), ref,
                            f"dir:{tmp_path / run}", env=through_proxy(m.proxy_url))
            assert result.returncode == 0, result.stderr + m.log_text()[-3000:]
            assert sha256_file(tmp_path / run / "manifest.json") == image["digest"]
            counts.append(len([r for r in upstream.cdn_requests()[cdn0:] if r.get("method") == "GET"]))
        assert counts[0] >= len(image["layer_digests"]) and counts[1] == 0, counts
        assert "cache=hit" in m.log_text()
    finally:
        m.stop()


def test_forward_proxy_skopeo(forward_proxy, upstream, tmp_path):
    """skopeo with HTTPS_PROXY=<mirror> and mitmproxy's CA (TLS verified) copies
    hub.test/library/alpine:3.19 (--all: the list and every blob, by digest) and
    inspects hub.test/team/ociapp:1.0.  Every blob came from the CDN without
    Authorization, with a valid signature."""
    alpine = upstream.images["library/alpine"]
    (_, _, cdn0), = log_offsets(upstream)
    start = len(forward_proxy.log_text())
    result = skopeo("copy", "--all", "--src-tls-verify=true", "--src-cert-dir", str(forward_proxy.cert_dir),
                    f"docker://{PROXY_REGISTRY}/library/alpine:3.19", f"dir:{tmp_path / 'out'}",
                    env=through_proxy(forward_proxy.proxy_url))
    assert result.returncode == 0, result.stderr + forward_proxy.log_text()[start:][-3000:]
    assert sha256_file(tmp_path / "out" / "manifest.json") == alpine["digest"]
    blobs = set()
    for image in alpine["manifests"].values():
        blobs.update([image["config_digest"], *image["layer_digests"]])
        # skopeo's dir: transport keeps each instance of a list as <hex>.manifest.json
        assert sha256_file(tmp_path / "out" / f"{image['digest'].split(':', 1)[1]}.manifest.json") == image["digest"]
    for digest in blobs:
        assert sha256_file(tmp_path / "out" / digest.split(":", 1)[1]) == digest

    inspect = skopeo("inspect", "--tls-verify=true", "--cert-dir", str(forward_proxy.cert_dir),
                     f"docker://{PROXY_REGISTRY}/team/ociapp:1.0", env=through_proxy(forward_proxy.proxy_url))
    assert inspect.returncode == 0, inspect.stderr
    assert json.loads(inspect.stdout)["Digest"] == upstream.images["team/ociapp"]["digest"]

    cdn = upstream.cdn_requests(min_count=cdn0 + len(blobs))[cdn0:]
    fetched = {r["path"]: r for r in cdn if r.get("method") == "GET"}
    for digest in blobs:
        rec = fetched.get(upstream.blob_storage_path(digest))
        assert rec is not None, f"{digest} never fetched from the CDN: {cdn}"
        assert rec["authorization_present"] is False and rec["has_query_signature"] and rec["status"] in (200, 206)


def test_forward_proxy_client_never_sees_token_server_or_cdn(forward_proxy, upstream):
    """Through the proxy, a hub.test manifest request is challenged with realm
    ``https://hub.test/token...`` (the mirror, not the token server); a token from
    there opens the manifest, and each blob GET is answered 200 with the bytes by
    the mirror itself, never with a redirect to the CDN.  Asked for by its API host
    (``https://127.0.0.1:<edge port>``, through a CONNECT tunnel), the registry
    is served the same way: the realm names that host, not the token server."""
    ociapp = upstream.images["team/ociapp"]
    ctx = ssl.create_default_context(cafile=str(forward_proxy.ca_cert))
    with httpx.Client(proxy=forward_proxy.proxy_url, verify=ctx, trust_env=False, timeout=30) as client:
        r = client.get(f"https://{PROXY_REGISTRY}/v2/team/ociapp/manifests/1.0", headers=ACCEPT_HEADERS)
        assert r.status_code == 401, r.text
        ch = parse_challenge(r.headers["www-authenticate"])
        realm = urlsplit(ch["realm"])
        assert (realm.scheme, realm.netloc) == ("https", PROXY_REGISTRY), ch
        assert realm.path.startswith("/token"), ch
        assert ch.get("service") == upstream.service and ch.get("scope") == "repository:team/ociapp:pull", ch
        token = client.get(ch["realm"], params={"service": ch["service"], "scope": ch["scope"]})
        assert token.status_code == 200, token.text
        auth = [("Authorization", f"Bearer {token.json()['token']}")]
        m = client.get(f"https://{PROXY_REGISTRY}/v2/team/ociapp/manifests/1.0", headers=auth + ACCEPT_HEADERS)
        assert m.status_code == 200
        assert m.headers["docker-content-digest"] == ociapp["digest"]
        for digest in [ociapp["config_digest"], *ociapp["layer_digests"]]:
            b = client.get(f"https://{PROXY_REGISTRY}/v2/team/ociapp/blobs/{digest}", headers=auth,
                           follow_redirects=False)
            assert b.status_code == 200, (b.status_code, b.headers)
            assert "location" not in b.headers
            assert sha256_bytes(b.content) == digest

        r = client.get(f"{upstream.api_url}/v2/team/ociapp/manifests/1.0", headers=ACCEPT_HEADERS)
        assert r.status_code == 401, r.text
        ch = parse_challenge(r.headers["www-authenticate"])
        realm = urlsplit(ch["realm"])
        assert realm.netloc == upstream.api_host and realm.path.startswith("/token"), ch
        token = client.get(ch["realm"], params={"service": ch["service"], "scope": ch["scope"]})
        assert token.status_code == 200, token.text
        m = client.get(f"{upstream.api_url}/v2/team/ociapp/manifests/1.0",
                       headers=[("Authorization", f"Bearer {token.json()['token']}"), *ACCEPT_HEADERS])
        assert m.status_code == 200 and m.headers["docker-content-digest"] == ociapp["digest"]


class OutsideServer:
    """A loopback HTTP (or HTTPS, with our own test CA's certificate) server outside
    the mirror's table: counts accepted connections and records each request."""

    def __init__(self, host: str = "127.0.0.1", tls: dict[str, Path] | None = None) -> None:
        outer = self
        self.connections = 0
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        ctx = None
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(tls["cert"], tls["key"])

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                with outer._lock:
                    outer.requests.append((self.command, self.path))
                body = b"hello from outside\n"
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def get_request(self):
                conn, addr = self.socket.accept()
                with outer._lock:
                    outer.connections += 1
                if ctx is not None:
                    conn.settimeout(10)
                    conn = ctx.wrap_socket(conn, server_side=True)  # an intercepted handshake fails here
                return conn, addr

        self.server = Server((host, 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"{'https' if tls else 'http'}://{host}:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def check_passthrough(proxy: Mirror, host: str, certs: dict[str, Path]) -> None:
    """Plain HTTP and HTTPS (verified against our own CA, so never intercepted) to
    servers on ``host`` go through ``proxy`` and reach them."""
    plain, tls = OutsideServer(host), OutsideServer(host, tls=certs)
    try:
        status, body = curl("-x", proxy.proxy_url, f"{plain.url}/outside", env=without_proxies())
        assert (status, body) == (200, b"hello from outside\n"), f"plain HTTP to {plain.url} did not pass through"
        assert plain.requests == [("GET", "/outside")]

        status, body = curl("-x", proxy.proxy_url, "--cacert", str(certs["ca"]), f"{tls.url}/outside-tls",
                            env=without_proxies())
        assert (status, body) == (200, b"hello from outside\n"), f"TLS to {tls.url} was intercepted or refused"
        assert tls.requests == [("GET", "/outside-tls")]
    finally:
        plain.close()
        tls.close()


def test_forward_proxy_passes_other_hosts_through(forward_proxy, tmp_path):
    """A host outside the table (127.0.0.2, another loopback address) passes through
    the proxy untouched: plain HTTP reaches a local server, and HTTPS to a server
    with our own test CA's certificate verifies against that CA (so the proxy did
    not intercept TLS)."""
    check_passthrough(forward_proxy, "127.0.0.2", make_ca_and_server_cert(tmp_path / "certs", ips=("127.0.0.2",)))


def test_forward_proxy_table_match_includes_the_port(forward_proxy, tmp_path):
    """The table entry ``hub.test=http://127.0.0.1:<edge port>`` names one API host
    (host AND port): another port on 127.0.0.1 is outside the table and passes
    through untouched, like any other host."""
    check_passthrough(forward_proxy, "127.0.0.1", make_ca_and_server_cert(tmp_path / "certs"))


def test_forward_proxy_passthrough_off_refuses_other_hosts(upstream, tmp_path):
    """With ``hub_proxy_passthrough=false`` a host outside the table is refused, for
    plain HTTP and for CONNECT: the target never gets a connection.  The table's
    registry is still served."""
    canary = EvilListener()
    try:
        with Mirror(tmp_path / "m", "", mode="regular", upstream_ca=upstream.ca_cert, env=WIDE_LOG, extra_args=[
            "--set", f"hub_upstreams={PROXY_REGISTRY}={upstream.api_url}",
            "--set", "hub_proxy_passthrough=false",
        ]) as m:
            status, body = curl("-x", m.proxy_url, f"http://{canary.host}/outside", env=without_proxies())
            assert status != 200 and b"hello" not in body, (status, body)
            status, _ = curl("-x", m.proxy_url, "-k", f"https://{canary.host}/outside", env=without_proxies())
            assert status != 200
            assert canary.connections() == [], "the proxy connected to a host outside its table"

            ctx = ssl.create_default_context(cafile=str(m.ca_cert))
            with httpx.Client(proxy=m.proxy_url, verify=ctx, trust_env=False, timeout=30) as client:
                r = client.get(f"https://{PROXY_REGISTRY}/v2/")
            assert r.status_code == 401
            assert parse_challenge(r.headers["www-authenticate"])["realm"].startswith(f"https://{PROXY_REGISTRY}/token")
    finally:
        canary.close()


# ---------------------------------------------------------------- d. host map


def test_host_map_by_host_header(mirror, upstream, second_upstream):
    """With ``hub_host_map=ghcr.mirror.test=ghcr.io``, a request with
    ``Host: ghcr.mirror.test`` is for ghcr.io: its challenge leads (followed as a
    client resolving the realm's host to the mirror would) to a ghcr token that
    opens ghcr's owner/tool manifest and blobs.  Only the second upstream saw them."""
    tool = second_upstream.images["owner/tool"]
    first, second = log_offsets(upstream, second_upstream)

    def get(url_path: str, host: str, **kw) -> httpx.Response:
        return httpx.get(f"{mirror.url}{url_path}", headers=[("Host", host), *kw.pop("headers", [])], timeout=30, **kw)

    for host in (HOST_MAPPED, f"{HOST_MAPPED}:{mirror.port}"):
        r = get("/v2/owner/tool/manifests/1.0", host, headers=ACCEPT_HEADERS)
        assert r.status_code == 401, (host, r.text)
        ch = parse_challenge(r.headers["www-authenticate"])
        assert ch.get("service") == "ghcr.io", ch
        assert ch.get("scope") == "repository:owner/tool:pull", ch
        realm = urlsplit(ch["realm"])
        assert realm.hostname in (HOST_MAPPED, "127.0.0.1"), ch
        assert realm.path in ("/token", "/token/ghcr.io"), ch
        if realm.hostname == "127.0.0.1":
            assert realm.path == "/token/ghcr.io", f"a realm without the host name must name the registry: {ch}"
        t = get(realm.path, realm.netloc, params={"service": ch["service"], "scope": ch["scope"]})
        assert t.status_code == 200, t.text
        auth = [("Authorization", f"Bearer {t.json()['token']}")]
        m = get("/v2/owner/tool/manifests/1.0", host, headers=auth + ACCEPT_HEADERS)
        assert m.status_code == 200, m.text
        assert m.headers["docker-content-digest"] == tool["digest"]
        assert sha256_bytes(m.content) == tool["digest"]
        layer = tool["layer_digests"][0]
        b = get(f"/v2/owner/tool/blobs/{layer}", host, headers=auth)
        assert b.status_code == 200 and sha256_bytes(b.content) == layer

    assert "/v2/owner/tool/manifests/1.0" in paths(edge_since(second_upstream, second))
    assert not any("owner/tool" in p for p in paths(edge_since(upstream, first)))
    assert any(r.get("service") == "ghcr.io" and r.get("status") == 200 for r in tokens_since(second_upstream, second))


def test_host_map_by_tls_server_name(upstream, second_upstream, tmp_path):
    """Over HTTPS (the mirror serving a certificate for ghcr.mirror.test), curl
    connecting to https://ghcr.mirror.test/ (TLS server name and Host both
    ghcr.mirror.test, --connect-to the mirror: no DNS) gets ghcr's owner/tool."""
    certs = make_ca_and_server_cert(tmp_path / "certs", hosts=(HOST_MAPPED, "localhost"))
    tool = second_upstream.images["owner/tool"]
    with routing_mirror(tmp_path / "m", upstream, second_upstream, f"hub_host_map={HOST_MAPPED}=ghcr.io",
                        tls=(certs["pem"], "*")) as m:
        connect = ["--cacert", str(certs["ca"]), "--connect-to", f"::127.0.0.1:{m.port}"]
        hdrs = tmp_path / "headers.txt"
        status, _ = curl(*connect, "-D", str(hdrs), *[f"-HAccept: {t}" for t in INDEX_ACCEPT],
                         f"https://{HOST_MAPPED}/v2/owner/tool/manifests/1.0")
        assert status == 401
        challenge = next(line.split(":", 1)[1] for line in hdrs.read_text().splitlines()
                         if line.lower().startswith("www-authenticate:"))
        ch = parse_challenge(challenge)
        assert ch.get("service") == "ghcr.io", ch
        realm = urlsplit(ch["realm"])
        assert realm.scheme == "https" and realm.path in ("/token", "/token/ghcr.io"), ch
        status, body = curl(*connect, "-G", "--data-urlencode", f"service={ch['service']}",
                            "--data-urlencode", f"scope={ch['scope']}", ch["realm"])
        assert status == 200, body
        token = json.loads(body)["token"]
        status, body = curl(*connect, "-H", f"Authorization: Bearer {token}", "-D", str(hdrs),
                            *[f"-HAccept: {t}" for t in INDEX_ACCEPT],
                            f"https://{HOST_MAPPED}/v2/owner/tool/manifests/1.0")
        assert status == 200, body
        assert sha256_bytes(body) == tool["digest"]


# ---------------------------------------------------------------- e. mirror accounts


@pytest.fixture(scope="module")
def accounts(upstream, second_upstream, tmp_path_factory):
    """A mirror with ``hub_users_file``: bob (bcrypt $2b$) and carol (argon2id)."""
    import secrets

    import bcrypt
    from argon2 import PasswordHasher

    base = tmp_path_factory.mktemp("routing-accounts")
    users = {"bob": "bob-" + secrets.token_urlsafe(10), "carol": "carol-" + secrets.token_urlsafe(10)}
    hashes = {"bob": bcrypt.hashpw(users["bob"].encode(), bcrypt.gensalt()).decode(),
              "carol": PasswordHasher().hash(users["carol"])}
    assert hashes["bob"].startswith("$2b$") and hashes["carol"].startswith("$argon2id$")
    users_file = base / "users.htpasswd"
    users_file.write_text("".join(f"{u}:{h}\n" for u, h in hashes.items()))
    m = routing_mirror(base / "m", upstream, second_upstream, f"hub_users_file={users_file}").start()
    m.users = users
    try:
        yield m
    finally:
        m.stop()


def test_accounts_refuse_requests_without_a_mirror_token(accounts, upstream):
    """Without credentials: /v2/ and a manifest get 401 UNAUTHORIZED with a Bearer
    challenge whose realm is the mirror's /token; /token itself refuses anonymous and
    wrong-password requests (401 UNAUTHORIZED) without asking the upstream; a token
    from the upstream's own token service (not issued by the mirror) opens nothing."""
    (_, tok0, _), = log_offsets(upstream)
    for path in ("/v2/", "/v2/library/alpine/manifests/3.19"):
        r = httpx.get(f"{accounts.url}{path}", headers=ACCEPT_HEADERS, timeout=30)
        err = assert_registry_error(r, (401,), path)
        assert err["code"] == "UNAUTHORIZED", err
        ch = parse_challenge(r.headers["www-authenticate"])
        assert ch["scheme"] == "Bearer" and ch["realm"].startswith(f"{accounts.url}/token"), ch

    params = {"service": upstream.service, "scope": "repository:library/alpine:pull"}
    for what, headers in (("anonymous", {}), ("wrong password", {"Authorization": basic("bob", "not-the-password")}),
                          ("unknown user", {"Authorization": basic("mallory", accounts.users["bob"])})):
        r = httpx.get(f"{accounts.url}/token", params=params, headers=headers, timeout=30)
        assert assert_registry_error(r, (401,), f"/token {what}")["code"] == "UNAUTHORIZED"
    r = httpx.get(f"{accounts.url}/token/ghcr.io", params={"service": "ghcr.io"}, timeout=30,
                  headers={"Authorization": basic("carol", "not-the-password")})
    assert assert_registry_error(r, (401,), "/token/ghcr.io wrong password")["code"] == "UNAUTHORIZED"
    assert tokens_since(upstream, (0, tok0, 0)) == [], "a refused mirror login reached the upstream token service"

    upstream_token = upstream.get_token("repository:library/alpine:pull")
    r = httpx.get(f"{accounts.url}/v2/library/alpine/manifests/3.19", timeout=30,
                  headers=[("Authorization", f"Bearer {upstream_token}"), *ACCEPT_HEADERS])
    assert assert_registry_error(r, (401,), "upstream token")["code"] == "UNAUTHORIZED"


def test_accounts_skopeo_pulls(accounts, upstream, second_upstream, tmp_path):
    """skopeo with the mirror credentials of bob (bcrypt) pulls docker.io's alpine and of
    carol (argon2id) ghcr's owner/tool; a wrong password and no credentials fail."""
    users = accounts.users
    ok = skopeo("copy", "--all", "--src-tls-verify=false", "--src-creds", f"bob:{users['bob']}",
                f"docker://{accounts.host}/library/alpine:3.19", f"dir:{tmp_path / 'alpine'}")
    assert ok.returncode == 0, ok.stderr + accounts.log_text()[-3000:]
    assert sha256_file(tmp_path / "alpine" / "manifest.json") == upstream.images["library/alpine"]["digest"]

    ok = skopeo("copy", "--src-tls-verify=false", "--src-creds", f"carol:{users['carol']}",
                f"docker://{accounts.host}/ghcr.io/owner/tool:1.0", f"dir:{tmp_path / 'tool'}")
    assert ok.returncode == 0, ok.stderr
    assert_pulled_dir(tmp_path / "tool", second_upstream.images["owner/tool"])

    wrong = skopeo("copy", "--src-tls-verify=false", "--src-creds", "bob:not-the-password",
                   f"docker://{accounts.host}/team/ociapp:1.0", f"dir:{tmp_path / 'wrong'}")
    assert wrong.returncode != 0
    assert "unauthorized" in wrong.stderr.lower() or "401" in wrong.stderr, wrong.stderr
    anonymous = skopeo("copy", "--src-tls-verify=false", "--src-no-creds",
                       f"docker://{accounts.host}/team/ociapp:1.0", f"dir:{tmp_path / 'anon'}")
    assert anonymous.returncode != 0
    log = accounts.log_text()
    assert users["bob"] not in log and users["carol"] not in log


def test_accounts_private_image_with_upstream_credentials(accounts, upstream, second_upstream, tmp_path):
    """``<mirror password>:<upstream user>:<upstream password>`` as the password pulls
    ghcr's private image (alice's ghcr credentials reach ghcr's token service only);
    the mirror password alone is refused for it."""
    bob = accounts.users["bob"]
    alice = second_upstream.users["alice"]
    ref = f"docker://{accounts.host}/ghcr.io/private/secret:1.0"
    first, second = log_offsets(upstream, second_upstream)

    only_mirror = skopeo("copy", "--src-tls-verify=false", "--src-creds", f"bob:{bob}", ref, f"dir:{tmp_path / 'no'}")
    assert only_mirror.returncode != 0
    assert "denied" in only_mirror.stderr.lower() or "unauthorized" in only_mirror.stderr.lower(), only_mirror.stderr

    ok = skopeo("copy", "--src-tls-verify=false", "--src-creds", f"bob:{bob}:alice:{alice}", ref, f"dir:{tmp_path / 'ok'}")
    assert ok.returncode == 0, ok.stderr + accounts.log_text()[-3000:]
    assert_pulled_dir(tmp_path / "ok", second_upstream.images["private/secret"])

    assert any(r.get("account") == "alice" and r.get("status") == 200 for r in tokens_since(second_upstream, second))
    assert not any(r.get("auth_scheme") == "Basic" for r in tokens_since(upstream, first))
    log = accounts.log_text()
    assert alice not in log and bob not in log


# ---------------------------------------------------------------- f. allow / deny


def assert_denied(mirror: Mirror, path: str) -> None:
    r = httpx.get(f"{mirror.url}{path}", headers=ACCEPT_HEADERS, timeout=30)
    err = assert_registry_error(r, (403,), path)
    assert err["code"] == "DENIED", (path, err)


def test_deny_one_repository(upstream, second_upstream, tmp_path):
    """``hub_deny=docker.io/library/busybox``: manifests (by full name, short name and
    with ``?ns=docker.io``), blobs and the tag list of busybox get 403 DENIED without
    any upstream request; skopeo's pull of busybox fails with "denied"; alpine still pulls."""
    busybox = upstream.images["library/busybox"]
    some_blob = busybox["manifests"]["amd64"]["layer_digests"][0]
    with routing_mirror(tmp_path / "m", upstream, second_upstream, "hub_deny=docker.io/library/busybox") as m:
        (edge0, _, _), = log_offsets(upstream)
        for path in ("/v2/library/busybox/manifests/latest", "/v2/busybox/manifests/latest",
                     "/v2/library/busybox/manifests/latest?ns=docker.io", f"/v2/library/busybox/blobs/{some_blob}",
                     "/v2/library/busybox/tags/list"):
            assert_denied(m, path)
        result = skopeo("copy", "--src-tls-verify=false", f"docker://{m.host}/library/busybox:latest",
                        f"dir:{tmp_path / 'busybox'}")
        assert result.returncode != 0
        assert "denied" in result.stderr.lower(), result.stderr
        assert not any("busybox" in p for p in paths(upstream.edge_requests()[edge0:])), \
            "a denied repository was requested upstream"

        ok = skopeo("copy", "--all", "--src-tls-verify=false", f"docker://{m.host}/library/alpine:3.19",
                    f"dir:{tmp_path / 'alpine'}")
        assert ok.returncode == 0, ok.stderr
        assert sha256_file(tmp_path / "alpine" / "manifest.json") == upstream.images["library/alpine"]["digest"]


def test_allow_only_ghcr(upstream, second_upstream, tmp_path):
    """``hub_allow=ghcr.io/*``: every docker.io repository gets 403 DENIED (nothing
    sent to the first upstream) and skopeo fails; ghcr.io/owner/tool still pulls."""
    with routing_mirror(tmp_path / "m", upstream, second_upstream, "hub_allow=ghcr.io/*") as m:
        (edge0, _, _), = log_offsets(upstream)
        for path in ("/v2/library/alpine/manifests/3.19", "/v2/alpine/manifests/3.19", "/v2/team/ociapp/tags/list",
                     "/v2/library/alpine/manifests/3.19?ns=docker.io"):
            assert_denied(m, path)
        refused = skopeo("copy", "--src-tls-verify=false", f"docker://{m.host}/team/ociapp:1.0", f"dir:{tmp_path / 'no'}")
        assert refused.returncode != 0
        assert "denied" in refused.stderr.lower(), refused.stderr
        assert not any(p.startswith(("/v2/library/", "/v2/team/")) for p in paths(upstream.edge_requests()[edge0:]))

        ok = skopeo("copy", "--src-tls-verify=false", f"docker://{m.host}/ghcr.io/owner/tool:1.0", f"dir:{tmp_path / 'ok'}")
        assert ok.returncode == 0, ok.stderr
        assert_pulled_dir(tmp_path / "ok", second_upstream.images["owner/tool"])


# ---------------------------------------------------------------- g. server-side upstream credentials


def test_server_side_upstream_credentials(upstream, second_upstream, tmp_path):
    """``hub_upstream_credentials`` with alice's ghcr.io password: an anonymous
    skopeo pulls ghcr.io/private/secret:1.0 (ghcr's token service saw account alice);
    docker.io has no entry, so its private image stays refused.  The password appears
    nowhere in the mirror log."""
    password = second_upstream.users["alice"]
    creds = tmp_path / "upstream-credentials"
    creds.write_text(f"ghcr.io alice {password}\n")
    os.chmod(creds, 0o600)
    with routing_mirror(tmp_path / "m", upstream, second_upstream, f"hub_upstream_credentials={creds}") as m:
        first, second = log_offsets(upstream, second_upstream)
        ok = skopeo("copy", "--src-tls-verify=false", "--src-no-creds",
                    f"docker://{m.host}/ghcr.io/private/secret:1.0", f"dir:{tmp_path / 'ok'}")
        assert ok.returncode == 0, ok.stderr + m.log_text()[-3000:]
        assert_pulled_dir(tmp_path / "ok", second_upstream.images["private/secret"])
        assert any(r.get("account") == "alice" and r.get("status") == 200 for r in tokens_since(second_upstream, second))

        refused = skopeo("copy", "--src-tls-verify=false", "--src-no-creds",
                         f"docker://{m.host}/private/secret:1.0", f"dir:{tmp_path / 'no'}")
        assert refused.returncode != 0
        assert not any(r.get("auth_scheme") == "Basic" for r in tokens_since(upstream, first))
        log = m.log_text()
    assert password not in log
    assert base64.b64encode(f"alice:{password}".encode()).decode() not in log


# ---------------------------------------------------------------- h. no connection to unlisted hosts


def test_no_connection_to_hosts_outside_the_table(mirror):
    """Client input naming a host outside the table (``?ns=``, Host header, a path
    prefix, /token's query and path, a Location of the client's choosing, an
    absolute-form URI, CONNECT) never makes the
    mirror connect to it: a loopback "canary" listener records zero connections.
    Registry-API requests get registry error JSON (4xx), the names the contract
    fixes get 404 NAME_UNKNOWN."""
    canary = EvilListener()
    try:
        evil = canary.host
        name_unknown = {
            "ns=evil.test": "/v2/x/manifests/latest?ns=evil.test",
            "path prefix evil.test": "/v2/evil.test/x/manifests/latest",
            "token path evil.test": "/token/evil.test?service=x",
        }
        for what, path in name_unknown.items():
            r = httpx.get(f"{mirror.url}{path}", headers=ACCEPT_HEADERS, timeout=30)
            err = assert_registry_error(r, (404,), what)
            assert err["code"] == "NAME_UNKNOWN", (what, err)

        # the canary's address in the registry-naming places: refused (400 malformed or 404 unknown)
        refused = {
            "ns=canary": f"/v2/x/manifests/latest?ns={evil}",
            "path prefix canary": f"/v2/{evil}/x/manifests/latest",
            "token path canary": f"/token/{evil}?service=x",
        }
        for what, path in refused.items():
            assert_registry_error(httpx.get(f"{mirror.url}{path}", timeout=30), (400, 404), what)

        # client-chosen realm and scope naming the canary: whatever the answer, no connection, no 5xx
        for what, params in (("realm=canary", {"realm": f"http://{evil}/", "service": "x"}),
                             ("scope with canary prefix", {"scope": f"repository:{evil}/x:pull"}),
                             ("scope with evil.test prefix", {"scope": "repository:evil.test/x:pull"})):
            r = httpx.get(f"{mirror.url}/token", params=params, timeout=30)
            assert r.status_code < 500, (what, r.status_code, r.text)
            if r.status_code >= 400:
                assert_registry_error(r, (r.status_code,), what)

        # a Host header naming the canary is not in the host map: the default registry answers
        raw = (f"GET /v2/library/alpine/manifests/3.19 HTTP/1.1\r\nHost: {evil}\r\n"
               "Accept: application/vnd.docker.distribution.manifest.list.v2+json\r\nConnection: close\r\n\r\n")
        resp = raw_request(mirror.port, raw.encode())
        assert resp.status is not None and 400 <= resp.status < 500, resp.short()
        assert_registry_error(resp, (resp.status,), "Host: canary")
        raw = f"GET /token?service=x HTTP/1.1\r\nHost: {evil}\r\nConnection: close\r\n\r\n"
        resp = raw_request(mirror.port, raw.encode())
        assert resp.status is not None and resp.status < 500, resp.short()

        # a Location of the client's choosing (header, query, the retry marker) is never followed
        digest = "sha256:" + "0" * 64
        for what, path, headers in (
            ("Location header", f"/v2/library/alpine/blobs/{digest}", {"Location": f"http://{evil}/x"}),
            ("location query", f"/v2/library/alpine/blobs/{digest}?location=http://{evil}/x&_hub_retry=1", {}),
            ("Referer/Forwarded", f"/v2/library/alpine/blobs/{digest}", {"Referer": f"http://{evil}/",
                                                                          "Forwarded": f"host={evil}"}),
        ):
            r = httpx.get(f"{mirror.url}{path}", headers=headers, timeout=30)
            assert r.status_code < 500 and "location" not in {k.lower() for k in r.headers}, (what, r.status_code)

        # proxy-style requests to a reverse-mode mirror
        for what, data in (
            ("absolute-form URI", f"GET http://{evil}/v2/ HTTP/1.1\r\nHost: {evil}\r\nConnection: close\r\n\r\n"),
            ("CONNECT", f"CONNECT {evil} HTTP/1.1\r\nHost: {evil}\r\n\r\n"),
        ):
            resp = raw_request(mirror.port, data.encode(), timeout=10)
            assert resp.status != 200 or not resp.body, (what, resp.short())

        assert canary.connections() == [], f"the mirror connected to {evil}"
    finally:
        canary.close()


def test_no_secret_in_mirror_log(mirror, upstream, second_upstream):
    """Runs last in this module: no upstream password reached the shared mirror's log,
    and it logged no Traceback."""
    text = mirror.log_text()
    for password in [*upstream.users.values(), *second_upstream.users.values()]:
        assert password not in text
    assert "Traceback" not in text


@pytest.fixture(scope="module")
def accounts_dockerd(accounts, tmp_path_factory):
    need("dockerd", "docker.io")
    cli = need("docker", "docker.io")
    need("containerd", "containerd")
    config = {"insecure-registries": [accounts.host]}
    with dockerd_on_containerd(tmp_path_factory.mktemp("routing-docker"), config, cli) as daemon:
        yield daemon


def test_docker_login_to_a_mirror_with_accounts(accounts, upstream, second_upstream, accounts_dockerd):
    """dockerd 20.10 and a mirror with accounts: ``docker login`` checks the mirror
    password; with the mirror password alone public images of both registries pull
    (Docker Hub by name, ghcr.io by path prefix) but not a private one; with
    ``<mirror password>:<upstream user>:<upstream password>`` the same login opens it.
    (docker login itself asks the default registry, so its upstream account is
    checked there: the login is the Docker Hub account's.)"""
    docker, host = accounts_dockerd.docker, accounts.host
    bob = accounts.users["bob"]
    wrong = docker("login", "-u", "bob", "--password-stdin", host, input="not-it\n")
    assert wrong.returncode != 0 and "unauthorized" in wrong.stderr.lower(), wrong.stderr
    assert docker("pull", f"{host}/library/alpine:3.19", timeout=120).returncode != 0  # not signed in

    login = docker("login", "-u", "bob", "--password-stdin", host, input=bob + "\n")
    assert login.returncode == 0 and "Login Succeeded" in login.stdout, login.stderr
    alpine = docker("pull", f"{host}/library/alpine:3.19", timeout=120)
    assert alpine.returncode == 0, alpine.stderr
    assert upstream.images["library/alpine"]["digest"] in alpine.stdout
    tool = docker("pull", f"{host}/ghcr.io/owner/tool:1.0", timeout=120)
    assert tool.returncode == 0, tool.stderr
    assert second_upstream.images["owner/tool"]["digest"] in tool.stdout
    private = docker("pull", f"{host}/private/secret:1.0", timeout=120)
    assert private.returncode != 0 and "denied" in private.stderr, private.stderr  # anonymous upstream

    alice = upstream.users["alice"]
    wrong = docker("login", "-u", "bob", "--password-stdin", host, input=f"{bob}:alice:not-it\n")
    assert wrong.returncode != 0, wrong.stderr  # the upstream refuses a wrong upstream password
    login = docker("login", "-u", "bob", "--password-stdin", host, input=f"{bob}:alice:{alice}\n")
    assert login.returncode == 0, login.stderr
    private = docker("pull", f"{host}/private/secret:1.0", timeout=120)
    assert private.returncode == 0, private.stderr
    assert upstream.images["private/secret"]["digest"] in private.stdout
    log = accounts.log_text()
    assert bob not in log and alice not in log
