"""Several URLs for one registry (issue 20, items 1 and 4), with real parts.

Two upstreams of the HTTPS Docker-Hub shape (tests/support/upstream.py: edge, token
service, CDN, distribution), each with its own token service and signing key, hold the
same image; one mirror (a real mitmdump) lists both for docker.io, the first preferred.
The first is down, answers 5xx or 429, closes connections or flaps; skopeo (and podman)
pull through the mirror all the same. Then both are down: what the cache holds still
pulls, the status page and the metrics say since when the registry is unreachable and
what was served stale, and the mirror is back to normal by itself when a URL answers.
(A bad table stopping mitmdump with one clear line: tests/hardening/test_failed_start.py.)
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import running_upstream
from tests.support.images import push_image
from tests.support.mirror import Mirror

from .test_mirror import copy, sha256_file

REPO, TAG = "library/twice", "1.0"
MANIFEST_ACCEPT = "application/vnd.docker.distribution.manifest.v2+json"
BACKOFF = 2  # hub_source_backoff in these tests


def same_image(up) -> dict:
    """The same bytes on both upstreams: the same digests, whichever URL serves them."""
    image = push_image(up, REPO, TAG, [{"etc/twice": "served by either URL\n"}, {"usr/share/doc": "two layers\n"}],
                       media="docker")
    return {REPO: image}


@pytest.fixture(scope="module")
def first(tmp_path_factory, test_ca):
    yield from running_upstream(tmp_path_factory.mktemp("first"), same_image, ca=test_ca)


@pytest.fixture(scope="module")
def second(tmp_path_factory, test_ca):
    yield from running_upstream(tmp_path_factory.mktemp("second"), same_image, ca=test_ca,
                                service="mirror.example.org", issuer="mirror.example.org")


@pytest.fixture(autouse=True)
def both_up(first, second):
    yield
    for up in (first, second):
        for service in ("token", "edge", "cdn", "registry"):
            up.start_service(service)
        up.clear_faults()


def mirror_of(tmp_path: Path, first, second, name: str = "m", **options: str) -> Mirror:
    return Mirror(tmp_path / name, first, options={
        "hub_upstreams": f"docker.io={first.api_url},{second.api_url}", "hub_source_backoff": str(BACKOFF),
        **options})


def pull(m: Mirror, dest: Path) -> subprocess.CompletedProcess:
    return copy(f"docker://{m.host}/{REPO}:{TAG}", dest)


def pulled_digest(dest: Path) -> str:
    return sha256_file(dest / "manifest.json")


def resolve(m: Mirror) -> httpx.Response:
    """A tag resolution as a client makes it (anonymous token from the mirror, then the manifest)."""
    token = httpx.get(f"{m.url}/token", params={"scope": f"repository:{REPO}:pull"}, timeout=30).json()["token"]
    return httpx.get(f"{m.url}/v2/{REPO}/manifests/{TAG}", timeout=30,
                     headers={"Authorization": f"Bearer {token}", "Accept": MANIFEST_ACCEPT})


def test_first_url_down_skopeo_pulls_from_the_second(first, second, tmp_path):
    digest = first.images[REPO]["digest"]
    assert second.images[REPO]["digest"] == digest
    first.stop_service("edge")
    first.stop_service("token")
    with mirror_of(tmp_path, first, second) as m:
        result = pull(m, tmp_path / "out")
        assert result.returncode == 0, result.stderr + m.log_text()[-3000:]
        assert pulled_digest(tmp_path / "out") == digest
        answer = resolve(m)
        assert answer.status_code == 200 and answer.headers["docker-content-digest"] == digest
        assert answer.headers["x-hub-source"] == second.api_url
        log = m.log_text()
    assert f"{first.api_url} failed" in log and f"resolved to {digest} by {second.api_url}" in log
    assert "Traceback" not in log


@pytest.mark.parametrize("fault", ["status503", "status500", "status429", "close"])
def test_first_url_failing_on_manifests_and_blobs(first, second, tmp_path, fault):
    """The first URL's token service works (the client's token is the first URL's), its registry
    fails: the mirror asks the second URL with a token of the second URL's own token service."""
    first.set_edge_fault(fault, times=0, path_contains=f"/v2/{REPO}/")
    first.clear_logs()
    second.clear_logs()
    with mirror_of(tmp_path, first, second) as m:
        result = pull(m, tmp_path / "out")
        assert result.returncode == 0, result.stderr + m.log_text()[-3000:]
        assert pulled_digest(tmp_path / "out") == first.images[REPO]["digest"]
        assert resolve(m).headers["x-hub-source"] == second.api_url
        log = m.log_text()
    assert "Traceback" not in log and f"{first.api_url} failed" in log
    scope = [f"repository:{REPO}:pull"]
    assert any(r.get("scopes_requested") == scope for r in first.token_requests())  # skopeo's token: the first's
    assert any(r.get("scopes_requested") == scope for r in second.token_requests())  # the mirror's, for the second


def test_the_first_url_is_preferred_again_once_it_answers(first, second, tmp_path):
    """Flapping: down, up, down, up; every pull works, and the first URL serves once it is back."""
    with mirror_of(tmp_path, first, second, hub_cache_dir=str(tmp_path / "cache")) as m:
        for round_ in range(2):
            first.stop_service("edge")
            result = pull(m, tmp_path / f"down{round_}")
            assert result.returncode == 0, result.stderr + m.log_text()[-3000:]
            assert resolve(m).headers["x-hub-source"] == second.api_url
            first.start_service("edge")
            time.sleep(BACKOFF * 2 ** round_ + 0.5)  # its back-off doubles with each failure in a row
            result = pull(m, tmp_path / f"up{round_}")
            assert result.returncode == 0, result.stderr + m.log_text()[-3000:]
            assert resolve(m).headers["x-hub-source"] == first.api_url
        log = m.log_text()
    assert log.count(f"{first.api_url} answers again") >= 2 and "Traceback" not in log


def test_podman_pulls_with_the_first_url_down(first, second, tmp_path):
    from .test_clients import Podman, need

    need("podman", "podman")
    first.stop_service("edge")
    with mirror_of(tmp_path, first, second) as m:
        podman = Podman(tmp_path / "storage")
        try:
            pulled = podman("pull", "--tls-verify=false", f"{m.host}/{REPO}:{TAG}")
            assert pulled.returncode == 0, pulled.stderr + m.log_text()[-3000:]
            assert podman.inspect(f"{m.host}/{REPO}:{TAG}")["Digest"] == first.images[REPO]["digest"]
        finally:
            podman.close()


def test_containerd_pulls_with_the_first_url_down(first, second, tmp_path):
    """ctr (a private containerd, tests/support/daemons.py) against the mirror: the first URL's
    edge and token service are down, every manifest and blob comes from the second URL."""
    from tests.support.daemons import Containerd

    from .test_clients import ctr_check, ctr_images, need

    need("containerd", "containerd")
    need("ctr", "containerd")
    digest = first.images[REPO]["digest"]
    first.stop_service("edge")
    first.stop_service("token")
    second.clear_logs()
    with mirror_of(tmp_path, first, second) as m, Containerd(tmp_path / "containerd") as containerd:
        ref = f"{m.host}/{REPO}:{TAG}"
        pulled = containerd.ctr("images", "pull", "--plain-http", ref)
        assert pulled.returncode == 0, pulled.stderr + m.log_text()[-3000:]
        assert ctr_images(containerd)[ref] == (MANIFEST_ACCEPT, digest)
        check = ctr_check(containerd, ref)
        assert "complete" in check and check.split()[-1] == "true", check  # every blob there, unpacked
        log = m.log_text()
    assert f"{first.api_url} failed" in log and f"resolved to {digest} by {second.api_url}" in log
    image = first.images[REPO]
    for blob in (image["config_digest"], *image["layer_digests"]):
        assert second.cdn_gets(blob) >= 1, blob  # the second URL's redirect, followed
    assert "Traceback" not in log


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "no-cache"])
def test_a_transfer_its_storage_refuses_to_resume_goes_on_from_the_next_url(first, second, tmp_path, cache):
    """The first URL's CDN cuts every blob in the middle and answers every resume 503: the first
    URL is marked failed and the transfer goes on, from the byte it reached, at the second URL's
    fresh redirect (paths/origins.next_source); into the cache, or the mirror's own stream."""
    digest = first.images[REPO]["digest"]
    first.clear_logs()
    second.clear_logs()
    first.set_cdn_fault("cutrefuse", times=0)
    options = {"hub_cache_dir": str(tmp_path / "cache")} if cache else {}
    with mirror_of(tmp_path, first, second, **options) as m:
        result = pull(m, tmp_path / "out")
        assert result.returncode == 0, result.stderr + m.log_text()[-3000:]
        assert pulled_digest(tmp_path / "out") == digest
        log = m.log_text()
    refused = [r for r in first.cdn_requests() if r.get("status") == 503]
    assert refused and all(r["range"] for r in refused), first.cdn_requests()
    resumed = [r for r in second.cdn_requests() if r.get("status") == 206]
    assert resumed and all(r["range"] != "bytes=0-" for r in resumed), second.cdn_requests()  # from where it was cut
    assert f"{first.api_url} failed (its storage at" in log
    assert f"goes on from the redirect of {second.api_url}" in log
    assert "Traceback" not in log


def metric(m: Mirror, name: str) -> float:
    text = httpx.get(f"{m.url}/_hub/metrics", timeout=10).text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name)]
    return sum(values)


def test_offline_every_url_down_the_cache_keeps_pulling_and_says_so(first, second, tmp_path):
    digest = first.images[REPO]["digest"]
    with mirror_of(tmp_path, first, second, hub_cache_dir=str(tmp_path / "cache")) as m:
        warm = pull(m, tmp_path / "warm")
        assert warm.returncode == 0, warm.stderr
        assert metric(m, "hub_upstream_unreachable_since_seconds") == 0
        for up in (first, second):
            up.stop_service("edge")
            up.stop_service("token")
        started = time.time()
        for attempt in range(2):  # the second while every URL is backing off
            offline = pull(m, tmp_path / f"offline{attempt}")
            assert offline.returncode == 0, offline.stderr + m.log_text()[-3000:]
            assert pulled_digest(tmp_path / f"offline{attempt}") == digest
        page = httpx.get(f"{m.url}/", timeout=10).text
        assert "docker.io is unreachable since" in page and "served from the cache meanwhile" in page
        served = re.search(r"served from the cache meanwhile: ([^.]*)\.", page).group(1)
        assert "manifest" in served and "blob" in served, served
        since = metric(m, "hub_upstream_unreachable_since_seconds")
        assert started - 5 <= since <= time.time()
        assert metric(m, "hub_stale_served_total") >= 4 and metric(m, "hub_source_up") == 0
        never = copy(f"docker://{m.host}/library/never:1.0", tmp_path / "never")
        assert never.returncode != 0  # nothing cached: a clear error, no hang
        for up in (first, second):
            up.start_service("token")
            up.start_service("edge")
        time.sleep(BACKOFF * 2 + 0.5)
        back = resolve(m)
        assert back.status_code == 200 and back.headers.get("x-hub-cache") != "stale"
        assert back.headers["x-hub-source"] == first.api_url
        page = httpx.get(f"{m.url}/", timeout=10).text
        assert "unreachable since" not in page
        assert metric(m, "hub_upstream_unreachable_since_seconds") == 0
        log = m.log_text()
    assert "upstream docker.io: unreachable" in log and "upstream docker.io: reachable again" in log
    assert "Traceback" not in log


def test_each_url_may_have_its_own_server_side_account(first, second, tmp_path):
    """The operator's account for the second URL only (its host in hub_upstream_credentials): an
    anonymous client pulls a private image the second URL holds, once the first is down."""
    private = push_image(second, "private/solo", "1.0", [{"solo": "only on the second URL\n"}], media="docker")
    host = second.api_url.split("://", 1)[1]
    credentials = tmp_path / "credentials"
    credentials.write_text(f"{host} alice {second.users['alice']}\n")
    first.stop_service("edge")
    first.stop_service("token")
    with mirror_of(tmp_path, first, second, hub_upstream_credentials=str(credentials)) as m:
        result = copy(f"docker://{m.host}/private/solo:1.0", tmp_path / "out")
        assert result.returncode == 0, result.stderr + m.log_text()[-3000:]
        assert pulled_digest(tmp_path / "out") == private["digest"]
        log = m.log_text()
    assert second.users["alice"] not in log and "Traceback" not in log
    assert any(r.get("account") == "alice" for r in second.token_requests())
