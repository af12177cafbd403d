"""The core mirror end to end: real skopeo -> real mitmdump with the addon ->
a Docker-Hub-shaped upstream (distribution 2.8 with token auth, blobs
redirected to a signed CDN that rejects Authorization)."""

from __future__ import annotations

import hashlib
import json
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.support.certs import make_ca_and_server_cert
from tests.support.mirror import MITMDUMP, REPO_ROOT, Mirror
from tests.support.ports import free_port
from tests.support.skopeo import skopeo

INDEX_ACCEPT = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
]


def copy(src: str, dest: Path, *extra: str) -> subprocess.CompletedProcess:
    return skopeo("copy", "--src-tls-verify=false", *extra, src, f"dir:{dest}")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def anonymous_token(mirror: Mirror, repo: str, **kw) -> str:
    r = httpx.get(f"{mirror.url}/token", params={"service": "registry.docker.io", "scope": f"repository:{repo}:pull"}, **kw)
    assert r.status_code == 200, r.text
    return r.json()["token"]


@pytest.fixture(scope="module")
def mirror(upstream, tmp_path_factory, cdn_log_start):
    with Mirror(tmp_path_factory.mktemp("mirror"), upstream) as m:
        yield m


@pytest.fixture(scope="module")
def cdn_log_start(upstream) -> int:
    """Where the session's CDN log stood when this module began: other modules share the upstream
    (one of them sends a credential to the CDN itself, on purpose), and in which order they run is
    not fixed (pytest-xdist)."""
    return len(upstream.cdn_requests())


# Secrets seen during this module's run; the last test checks none reached the log.
SEEN_SECRETS: set[str] = set()


def test_multiarch_docker_manifest_list_copied_whole(mirror, upstream, tmp_path):
    image = upstream.images["library/alpine"]
    result = copy(f"docker://{mirror.host}/library/alpine:3.19", tmp_path / "out", "--all")
    assert result.returncode == 0, result.stderr
    # the manifest list arrives as the list (not converted to one arch): same digest
    assert sha256_file(tmp_path / "out" / "manifest.json") == image["digest"]
    for arch_image in image["manifests"].values():
        for digest in arch_image["layer_digests"] + [arch_image["config_digest"]]:
            assert sha256_file(tmp_path / "out" / digest.split(":")[1]) == digest


def test_accept_headers_pass_intact(mirror, upstream):
    image = upstream.images["library/alpine"]
    token = anonymous_token(mirror, "library/alpine")
    headers = [("Authorization", f"Bearer {token}")] + [("Accept", t) for t in INDEX_ACCEPT]
    r = httpx.get(f"{mirror.url}/v2/library/alpine/manifests/3.19", headers=headers)
    assert r.status_code == 200
    assert r.headers["docker-content-digest"] == image["digest"]
    assert hashlib.sha256(r.content).hexdigest() == image["digest"].split(":")[1]
    # distribution converts a list to one arch's manifest when the list type is not accepted
    only_single = [("Authorization", f"Bearer {token}"), ("Accept", "application/vnd.docker.distribution.manifest.v2+json")]
    r = httpx.get(f"{mirror.url}/v2/library/alpine/manifests/3.19", headers=only_single)
    assert r.status_code == 200
    assert r.headers["docker-content-digest"] != image["digest"]


def test_official_image_without_library_prefix(mirror, upstream, tmp_path):
    image = upstream.images["library/alpine"]
    result = copy(f"docker://{mirror.host}/alpine:3.19", tmp_path / "out", "--all")
    assert result.returncode == 0, result.stderr
    assert sha256_file(tmp_path / "out" / "manifest.json") == image["digest"]


def test_oci_index_and_oci_image(mirror, upstream, tmp_path):
    busybox = upstream.images["library/busybox"]
    result = copy(f"docker://{mirror.host}/library/busybox:latest", tmp_path / "index", "--all")
    assert result.returncode == 0, result.stderr
    assert sha256_file(tmp_path / "index" / "manifest.json") == busybox["digest"]
    oci = upstream.images["team/ociapp"]
    result = copy(f"docker://{mirror.host}/team/ociapp:1.0", tmp_path / "oci")
    assert result.returncode == 0, result.stderr
    assert sha256_file(tmp_path / "oci" / "manifest.json") == oci["digest"]


def test_by_digest_and_tag_list(mirror, upstream, tmp_path):
    oci = upstream.images["team/ociapp"]
    result = copy(f"docker://{mirror.host}/team/ociapp@{oci['digest']}", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    result = skopeo("list-tags", "--tls-verify=false", f"docker://{mirror.host}/team/ociapp")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["Tags"] == ["1.0"]


def test_private_image_needs_the_right_credentials(mirror, upstream, tmp_path):
    password = upstream.users["alice"]
    SEEN_SECRETS.add(password)
    ref = f"docker://{mirror.host}/private/secret:1.0"
    ok = copy(ref, tmp_path / "ok", "--src-creds", f"alice:{password}")
    assert ok.returncode == 0, ok.stderr
    assert sha256_file(tmp_path / "ok" / "manifest.json") == upstream.images["private/secret"]["digest"]

    wrong = copy(ref, tmp_path / "wrong", "--src-creds", "alice:not-the-password")
    assert wrong.returncode != 0
    assert "incorrect username or password" in wrong.stderr or "unauthorized" in wrong.stderr.lower()

    anonymous = copy(ref, tmp_path / "anon", "--src-no-creds")
    assert anonymous.returncode != 0
    assert "unauthorized" in anonymous.stderr.lower() or "denied" in anonymous.stderr.lower()


def test_login_and_token_post_form(mirror, upstream, tmp_path):
    password = upstream.users["alice"]
    authfile = tmp_path / "auth.json"
    ok = skopeo("login", "--tls-verify=false", "--authfile", str(authfile), "-u", "alice", "-p", password, mirror.host)
    assert ok.returncode == 0, ok.stderr
    bad = skopeo("login", "--tls-verify=false", "--authfile", str(tmp_path / "bad.json"), "-u", "alice", "-p", "nope", mirror.host)
    assert bad.returncode != 0

    # containerd / dockerd after login: POST form with grant_type=password, then refresh_token
    form = {
        "grant_type": "password",
        "username": "alice",
        "password": password,
        "service": "registry.docker.io",
        "client_id": "containerd-client",
        "access_type": "offline",
        "scope": "repository:private/secret:pull",
    }
    r = httpx.post(f"{mirror.url}/token", data=form)
    assert r.status_code == 200, r.text
    grant = r.json()
    SEEN_SECRETS.update({grant["access_token"], grant.get("refresh_token", "")} - {""})
    r = httpx.get(
        f"{mirror.url}/v2/private/secret/manifests/1.0",
        headers=[("Authorization", f"Bearer {grant['access_token']}"), ("Accept", INDEX_ACCEPT[3])],
    )
    assert r.status_code == 200
    if grant.get("refresh_token"):
        refreshed = httpx.post(
            f"{mirror.url}/token",
            data={"grant_type": "refresh_token", "refresh_token": grant["refresh_token"], "service": "registry.docker.io",
                  "client_id": "containerd-client", "scope": "repository:private/secret:pull"},
        )
        assert refreshed.status_code == 200, refreshed.text
        SEEN_SECRETS.add(refreshed.json()["access_token"])
    wrong = httpx.post(f"{mirror.url}/token", data={**form, "password": "wrong"})
    assert wrong.status_code == 401


def test_challenge_realm_points_at_mirror(mirror):
    r = httpx.get(f"{mirror.url}/v2/library/alpine/manifests/3.19")
    assert r.status_code == 401
    challenge = r.headers["www-authenticate"]
    assert challenge.startswith(f'Bearer realm="{mirror.url}/token"')
    assert 'service="registry.docker.io"' in challenge
    assert 'scope="repository:library/alpine:pull"' in challenge


def test_big_blob_streams_with_flat_memory(mirror, upstream, tmp_path):
    big = upstream.images["library/big"]
    assert big["big_layer_size"] >= 256 * 1024 * 1024
    mirror.reset_peak_rss()
    result = copy(f"docker://{mirror.host}/library/big:1.0", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    layer = tmp_path / "out" / big["big_layer_digest"].split(":")[1]
    assert layer.stat().st_size == big["big_layer_size"]
    assert sha256_file(layer) == big["big_layer_digest"]
    peak = mirror.peak_rss()
    assert peak < 150 * 1024 * 1024, f"mirror peak RSS {peak / 2**20:.0f} MiB while streaming a {big['big_layer_size'] >> 20} MiB blob"


def test_range_requests_get_206(mirror, upstream):
    big = upstream.images["library/big"]
    digest = big["big_layer_digest"]
    token = anonymous_token(mirror, "library/big")
    r = httpx.get(
        f"{mirror.url}/v2/library/big/blobs/{digest}",
        headers={"Authorization": f"Bearer {token}", "Range": "bytes=1000-1999"},
    )
    assert r.status_code == 206
    assert r.headers["content-range"] == f"bytes 1000-1999/{big['big_layer_size']}"
    assert r.headers["docker-content-digest"] == digest
    storage = Path(upstream.storage_root) / upstream.blob_storage_path(digest).lstrip("/")
    with open(storage, "rb") as f:
        f.seek(1000)
        assert r.content == f.read(1000)


def test_blob_head_and_manifest_head_headers(mirror, upstream):
    image = upstream.images["team/ociapp"]
    token = anonymous_token(mirror, "team/ociapp")
    auth = [("Authorization", f"Bearer {token}")]
    r = httpx.head(f"{mirror.url}/v2/team/ociapp/manifests/1.0", headers=auth + [("Accept", t) for t in INDEX_ACCEPT])
    assert r.status_code == 200
    assert r.headers["docker-content-digest"] == image["digest"]
    assert r.headers["content-type"] == "application/vnd.oci.image.manifest.v1+json"
    assert int(r.headers["content-length"]) == len(image["manifest_bytes"])
    assert "etag" in r.headers
    assert r.headers["ratelimit-limit"].startswith("100;w=21600")
    assert "ratelimit-remaining" in r.headers and "docker-ratelimit-source" in r.headers
    layer = image["layer_digests"][0]
    r = httpx.head(f"{mirror.url}/v2/team/ociapp/blobs/{layer}", headers=auth)
    assert r.status_code == 200
    assert r.headers["docker-content-digest"] == layer
    assert int(r.headers["content-length"]) > 0


def test_cdn_never_sees_credentials(upstream, cdn_log_start):
    requests = upstream.cdn_requests(min_count=cdn_log_start + 1)[cdn_log_start:]
    assert requests, "the blob pulls above should have reached the CDN"
    assert all(not r.get("authorization_present") for r in requests)
    # statuses are not checked here: other suites share this upstream's CDN log
    # (injected faults, malformed ranges); the pulls above verify their bytes


def test_registries_conf_mirror_entry(mirror, upstream, tmp_path):
    conf = tmp_path / "registries.conf"
    conf.write_text(
        'unqualified-search-registries = ["docker.io"]\n'
        "[[registry]]\n"
        'prefix = "docker.io"\n'
        # the registry itself: a dead loopback port, so that only the mirror can answer
        f'location = "127.0.0.1:{free_port()}"\n'
        "insecure = true\n"
        "[[registry.mirror]]\n"
        f'location = "{mirror.host}"\n'
        "insecure = true\n"
    )
    # the mirror's own pull lines (flow lines are cut to the terminal's width, longer for https:// URLs)
    before = mirror.log_text().count("GET manifest library/alpine:3.19 ")
    # skopeo 1.9 reads the file named by its (hidden) --registries-conf flag, as podman reads registries.conf
    result = skopeo("--registries-conf", str(conf), "copy", "--all", "docker://docker.io/library/alpine:3.19",
                    f"dir:{tmp_path / 'out'}")
    assert result.returncode == 0, result.stderr + mirror.log_text()[-3000:]
    assert sha256_file(tmp_path / "out" / "manifest.json") == upstream.images["library/alpine"]["digest"]
    assert mirror.log_text().count("GET manifest library/alpine:3.19 ") > before


def test_read_only_refuses_pushes(mirror, tmp_path):
    r = httpx.put(f"{mirror.url}/v2/library/alpine/manifests/evil", content=b"{}")
    assert r.status_code == 405
    assert r.json()["errors"][0]["code"] == "UNSUPPORTED"
    r = httpx.post(f"{mirror.url}/v2/library/alpine/blobs/uploads/")
    assert r.status_code == 405
    src = tmp_path / "src"
    assert copy(f"docker://{mirror.host}/team/ociapp:1.0", src).returncode == 0
    push = skopeo("copy", "--dest-tls-verify=false", f"dir:{src}", f"docker://{mirror.host}/team/pushed:1")
    assert push.returncode != 0


def test_cors_preflight(mirror):
    r = httpx.options(f"{mirror.url}/v2/library/alpine/manifests/3.19")
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == "*"


def test_bad_input_gets_registry_errors(mirror, upstream):
    cases = {
        "/v2/../../etc/passwd": 400,
        "/v2/%2e%2e/%2e%2e/etc/passwd": 400,
        "/v2/library/alpine/blobs/md5:abc": 400,
        "/v2/UPPER/manifests/latest": 400,
        "/etc/passwd": 404,
    }
    before = len(upstream.edge_requests())
    for path, status in cases.items():
        # curl --path-as-is: httpx would normalise the '..' away
        raw = subprocess.run(
            ["curl", "-s", "--path-as-is", "-o", "-", "-w", "\n%{http_code}", f"{mirror.url}{path}"],
            capture_output=True, text=True, timeout=30,
        ).stdout
        body, _, code = raw.rpartition("\n")
        assert int(code) == status, (path, raw)
        assert json.loads(body)["errors"][0]["code"], body
    raw_paths = [e["path"] for e in upstream.edge_requests()[before:]]
    assert not any(".." in p or "etc/passwd" in p for p in raw_paths)


def test_upstream_unreachable_gives_json_error(tmp_path):
    with Mirror(tmp_path, f"http://127.0.0.1:{free_port()}") as dead:
        r = httpx.get(f"{dead.url}/v2/library/alpine/manifests/3.19", timeout=30)
        assert r.status_code == 502
        assert r.json()["errors"][0]["code"] == "UNAVAILABLE"
        r = httpx.get(f"{dead.url}/token?service=x", timeout=30)
        assert r.status_code == 502
        assert r.json()["errors"][0]["code"] == "UNAVAILABLE"
        result = skopeo("inspect", "--tls-verify=false", f"docker://{dead.host}/library/alpine:3.19")
        assert result.returncode != 0
        assert "Traceback" not in dead.log_text()


def test_https_with_user_certificate(upstream, tmp_path):
    certs = make_ca_and_server_cert(tmp_path / "certs")
    cert_dir = tmp_path / "client-certs"
    cert_dir.mkdir()
    (cert_dir / "ca.crt").write_bytes(certs["ca"].read_bytes())
    with Mirror(tmp_path / "m", upstream, tls=(certs["pem"], "*")) as m:
        # verified TLS with the user's certificate, served as HTTP/1.1 even to an h2-capable client
        version = subprocess.run(
            ["curl", "-s", "--http2", "--cacert", str(certs["ca"]), "-o", "/dev/null", "-w", "%{http_version}", f"{m.url}/v2/"],
            capture_output=True, text=True, timeout=30,
        ).stdout
        assert version == "1.1"
        r = httpx.get(f"{m.url}/v2/", verify=ssl.create_default_context(cafile=str(certs["ca"])))
        assert r.headers["www-authenticate"].startswith(f'Bearer realm="https://127.0.0.1:{m.port}/token"')
        result = skopeo("copy", "--all", "--src-cert-dir", str(cert_dir), f"docker://{m.host}/library/alpine:3.19", f"dir:{tmp_path / 'out'}")
        assert result.returncode == 0, result.stderr
        assert sha256_file(tmp_path / "out" / "manifest.json") == upstream.images["library/alpine"]["digest"]
        # with an explicit public URL the realm follows it
    with Mirror(tmp_path / "m2", upstream, tls=(certs["pem"], "*"), options={"hub_public_url": "https://localhost:%d" % 1}) as m2:
        r = httpx.get(f"{m2.url}/v2/", verify=ssl.create_default_context(cafile=str(certs["ca"])))
        assert r.headers["www-authenticate"].startswith('Bearer realm="https://localhost:1/token"')


def test_upstream_tls_obeys_mitmproxy_options(upstream, tmp_path):
    """The mirror verifies the upstream's TLS like mitmproxy does: the HTTPS upstream's CA must be
    trusted (ssl_verify_upstream_trusted_ca, as an operator sets it), another CA is not enough,
    ssl_insecure skips the check."""
    other = make_ca_and_server_cert(tmp_path / "other-ca")
    for name, options in (("untrusted", {}), ("other-ca", {"ssl_verify_upstream_trusted_ca": str(other["ca"])})):
        with Mirror(tmp_path / name, upstream.api_url, name=name, options=options) as m:
            r = httpx.get(f"{m.url}/v2/", timeout=30)
            assert r.status_code == 502, name
            assert r.json()["errors"][0]["code"] == "UNAVAILABLE"
            assert "TLS" in r.json()["errors"][0]["message"]
    with Mirror(tmp_path / "trusted", upstream.api_url, name="trusted", upstream_ca=upstream.ca_cert) as m:
        assert f"ssl_verify_upstream_trusted_ca={upstream.ca_cert}" in m.argv
        result = copy(f"docker://{m.host}/team/ociapp:1.0", tmp_path / "out")  # blobs from the HTTPS CDN too
        assert result.returncode == 0, result.stderr
    with Mirror(tmp_path / "insecure", upstream.api_url, name="insecure", options={"ssl_insecure": "true"}) as m:
        r = httpx.get(f"{m.url}/v2/", timeout=30)
        assert r.status_code == 401


@pytest.fixture(scope="module")
def plain_upstream(tmp_path_factory):
    """An in-house registry on plain HTTP (some registries and in-house mirrors are), with its
    token service and blob storage plain HTTP too."""
    from tests.support.images import push_image
    from tests.support.upstream import Upstream

    with Upstream(tmp_path_factory.mktemp("plain-upstream"), tls=False) as up:
        up.images = {"team/plain": push_image(up, "team/plain", "1.0", [{"plain.txt": "in-house\n"}])}
        yield up


def test_plain_http_upstream_through_the_mirror(plain_upstream, tmp_path):
    """A plain-HTTP registry (no CA anywhere) is pulled with skopeo through the mirror: challenge,
    token, manifest and the blobs' redirect to its plain-HTTP storage."""
    assert plain_upstream.api_url.startswith("http://") and plain_upstream.cdn_url.startswith("http://")
    with Mirror(tmp_path / "m", plain_upstream, name="plain") as m:
        assert not any("ssl_verify_upstream_trusted_ca" in a for a in m.argv)
        result = copy(f"docker://{m.host}/team/plain:1.0", tmp_path / "out")
        assert result.returncode == 0, result.stderr + m.log_text()[-3000:]
    assert sha256_file(tmp_path / "out" / "manifest.json") == plain_upstream.images["team/plain"]["digest"]
    cdn = plain_upstream.cdn_requests(min_count=2)
    assert [r["status"] for r in cdn].count(200) >= 2 and not any(r["authorization_present"] for r in cdn)


def test_no_secret_in_mirror_log(mirror, upstream):
    """Runs last in this module: every password and token used above stays out of the log."""
    text = mirror.log_text()
    secrets = SEEN_SECRETS | set(upstream.users.values())
    assert secrets
    for secret in secrets:
        assert secret not in text
    assert "Authorization" not in text and "authorization:" not in text.lower()
    assert "Traceback" not in text


@pytest.mark.parametrize("args,message", [
    (["--set", "hub_config={bad_conf}"], "unknown option(s): bogus_key"),
    (["--set", "hub_users_file=/nonexistent/users"], "hub_users_file: cannot read"),
    (["--set", "hub_upstreams=https://not-a-name"], "not a registry host name"),
])
def test_bad_configuration_stops_the_mirror_with_status_1(tmp_path, args, message):
    """Fail closed: a mirror that cannot apply its configuration (say, its accounts)
    must not run open with defaults."""
    bad_conf = tmp_path / "bad.conf"
    bad_conf.write_text("bogus_key: 1\n")
    argv = [str(MITMDUMP), "-s", str(REPO_ROOT / "addons" / "hub_rewrite.py"), "--mode", f"reverse:http://127.0.0.1:1@127.0.0.1:{free_port()}",
            "--set", f"confdir={tmp_path / 'confdir'}", *(a.format(bad_conf=bad_conf) for a in args)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=str(REPO_ROOT))
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert message in result.stdout + result.stderr
