"""Images kept warm (hub_prefetch, issue 20 item 3) against the Docker-Hub-shaped upstream.

A mirror given a prefetch list pulls its images into the cache at start with no
client asking, and a client then pulls them with the whole upstream stopped; a
tag that moves upstream is seen at the next check by a HEAD (never a GET of the
tag) and only the new digest is fetched; a repository the rules refuse is never
asked for; two processes on one Ceph bucket do each round once; the status page
and the metrics show the progress; a malformed list stops mitmdump with one line.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import running_upstream
from tests.support.images import Pusher, push_image, push_index
from tests.support.mirror import MITMDUMP, REPO_ROOT, Mirror
from tests.support.ports import free_port

from .test_mirror import copy, sha256_file

INTERVAL = 2  # seconds between two checks, where a test waits for them


def prefetch_images(up) -> dict:
    """``team/warm:1`` (a Docker list: amd64 + arm64); ``team/moving:1``, ``team/refused:1`` and
    ``private/kept:1`` (images; only alice and admin may pull ``private/*``)."""
    out = {}
    with Pusher(up) as p:
        arches = [push_image(up, "team/warm", None, [{f"{arch}.bin": os.urandom(200_000)}, {"etc/arch": arch}],
                             arch=arch, pusher=p) for arch in ("amd64", "arm64")]
        out["team/warm"] = push_index(up, "team/warm", "1", arches, pusher=p)
        for repo in ("team/moving", "team/refused", "private/kept"):
            out[repo] = push_image(up, repo, "1", [{"data.bin": os.urandom(150_000)}], pusher=p)
    return out


@pytest.fixture(scope="module")
def hub(tmp_path_factory, test_ca):
    """An upstream of this module's own: its services are stopped and its tags moved here."""
    yield from running_upstream(tmp_path_factory.mktemp("prefetch-upstream"), prefetch_images, ca=test_ca)


def blobs_of(image: dict) -> list[str]:
    images = image.get("manifests", {"": image}).values()
    return [d for img in images for d in [img["config_digest"], *img["layer_digests"]]]


def cdn_gets(up, digests: list[str]) -> list[dict]:
    return [r for r in up.cdn_requests() if r.get("method") == "GET" and any(d[7:] in r["path"] for d in digests)]


def edge(up, method: str, path_part: str) -> list[dict]:
    return [r for r in up.edge_requests() if r["method"] == method and path_part in r["path"]]


def metric(mirror: Mirror, name: str, **labels: str) -> float:
    text = httpx.get(f"{mirror.url}/_hub/metrics", timeout=10).text
    wanted = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
    for line in text.splitlines():
        if line.startswith(name + wanted + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_for(predicate, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.2)


def write_list(directory: Path, text: str) -> Path:
    path = directory / "prefetch.txt"
    path.write_text(text)
    return path


def test_prefetched_images_are_pulled_with_the_upstream_stopped(hub, tmp_path):
    """Nobody asks: the list's images (every platform of the index) come into the cache, the
    refused repository is never asked for; then, with the token service, the registry, the
    edge and the CDN all stopped, skopeo pulls the index's amd64 image from the mirror."""
    warm, refused = hub.images["team/warm"], hub.images["team/refused"]
    hub.clear_logs()
    listed = write_list(tmp_path, "# kept warm\ndocker.io/team/warm:1\nteam/refused:1   # the rules refuse it\n")
    options = {"hub_cache_dir": str(tmp_path / "cache"), "hub_prefetch": str(listed),
               "hub_deny": "docker.io/team/refused"}
    with Mirror(tmp_path / "m", hub, options=options) as m:
        wait_for(lambda: metric(m, "hub_prefetch_images", state="warm") == 1, what="team/warm warm")
        assert metric(m, "hub_prefetch_images", state="refused") == 1
        digests = blobs_of(warm)
        assert sorted(r["path"] for r in cdn_gets(hub, digests)) == sorted({r["path"] for r in cdn_gets(hub, digests)})
        assert len(cdn_gets(hub, digests)) == len(digests)  # every platform, each blob once
        assert not any(r["authorization_present"] for r in hub.cdn_requests())  # no credential at the CDN
        assert edge(hub, "HEAD", "/team/warm/manifests/1") and not edge(hub, "GET", "/team/warm/manifests/1")
        assert [r for r in hub.edge_requests() if "team/refused" in r["path"]] == []
        assert cdn_gets(hub, blobs_of(refused)) == []
        page = httpx.get(f"{m.url}/", timeout=10).text
        assert "Images kept warm" in page and "docker.io/team/warm:1" in page and warm["digest"][:19] in page
        assert "refused by hub_allow/hub_deny" in page
        for service in ("edge", "token", "registry", "cdn"):
            hub.stop_service(service)
        try:
            result = copy(f"docker://{m.host}/team/warm:1", tmp_path / "out", "--override-arch", "amd64")
        finally:
            for service in ("edge", "token", "registry", "cdn"):
                hub.start_service(service)
        assert result.returncode == 0, result.stderr + m.log_text()[-3000:]
        amd64 = warm["manifests"]["amd64"]
        assert sha256_file(tmp_path / "out" / "manifest.json") == amd64["digest"]
        for digest in (amd64["config_digest"], *amd64["layer_digests"]):
            assert sha256_file(tmp_path / "out" / digest[7:]) == digest
        log = m.log_text()
        assert log.count("team/refused:1 is not fetched: refused by hub_allow/hub_deny") == 1
        assert "Traceback" not in log


def every_interval(tmp_path, listed: str) -> dict[str, str]:
    """A mirror's options to keep what ``listed`` names warm, checked every INTERVAL seconds."""
    return {"hub_cache_dir": str(tmp_path / "cache"), "hub_prefetch": str(write_list(tmp_path, listed)),
            "hub_prefetch_interval": str(INTERVAL)}


def test_a_tag_that_moves_is_checked_with_head_and_only_the_new_digest_fetched(hub, tmp_path):
    """Every INTERVAL seconds the tag is checked with a HEAD: unchanged, that is the only request;
    once it moves, the new manifest is fetched by digest and its blobs once each; the tag itself
    never gets a GET. The status page and the metrics follow."""
    first = hub.images["team/moving"]
    hub.clear_logs()
    options = every_interval(tmp_path, "team/moving:1\n")
    with Mirror(tmp_path / "m", hub, options=options) as m:
        wait_for(lambda: metric(m, "hub_prefetch_rounds_total", outcome="done") >= 2, what="two rounds")
        assert metric(m, "hub_prefetch_images", state="warm") == 1
        assert len(edge(hub, "GET", f"/team/moving/manifests/{first['digest']}")) == 1  # once, in the first round
        assert len(cdn_gets(hub, blobs_of(first))) == len(blobs_of(first))
        heads_before = len(edge(hub, "HEAD", "/team/moving/manifests/1"))
        assert heads_before >= 2
        moved = push_image(hub, "team/moving", "1", [{"data.bin": os.urandom(150_000)}])
        assert moved["digest"] != first["digest"]
        wait_for(lambda: moved["digest"][:19] in httpx.get(f"{m.url}/", timeout=10).text, what="the new digest shown")
        wait_for(lambda: metric(m, "hub_prefetch_images", state="warm") == 1, what="warm again")
        rounds = metric(m, "hub_prefetch_rounds_total", outcome="done")
        wait_for(lambda: metric(m, "hub_prefetch_rounds_total", outcome="done") >= rounds + 1, what="one more round")
        assert edge(hub, "GET", "/team/moving/manifests/1") == []  # the tag: HEADs only
        assert len(edge(hub, "GET", f"/team/moving/manifests/{moved['digest']}")) == 1
        assert len(edge(hub, "GET", f"/team/moving/manifests/{first['digest']}")) == 1
        assert len(edge(hub, "HEAD", "/team/moving/manifests/1")) > heads_before
        assert len(cdn_gets(hub, blobs_of(moved))) == len(blobs_of(moved))  # new blobs once each
        assert metric(m, "hub_prefetch_requests_total", kind="tag check") >= 3
        assert metric(m, "hub_prefetch_requests_total", kind="manifest") == 2
        assert metric(m, "hub_prefetch_pending_blobs") == 0
        assert "Traceback" not in m.log_text()


def test_a_problem_is_logged_once_per_image_and_cause(hub, tmp_path):
    """An image the registry does not have fails every round, and says so once."""
    options = every_interval(tmp_path, "team/nowhere:1\n")
    with Mirror(tmp_path / "m", hub, options=options) as m:
        wait_for(lambda: metric(m, "hub_prefetch_rounds_total", outcome="done") >= 3, what="three rounds")
        assert metric(m, "hub_prefetch_images", state="failed") == 1
        log = m.log_text()
        assert log.count("prefetch: docker.io/team/nowhere:1: the registry answered 404") == 1, log[-2000:]
        assert "404" in httpx.get(f"{m.url}/", timeout=10).text


def test_only_the_operators_server_side_credentials_are_used(hub, tmp_path):
    """A private image is kept warm with the operator's account for the registry (the environment's
    HUB_UPSTREAM_CREDENTIALS_DOCKER_IO), asked of the token service only; without one it fails,
    anonymously, and nothing of it is fetched."""
    private = hub.images["private/kept"]
    listed = write_list(tmp_path, "private/kept:1\n")
    for account in ("alice", None):
        hub.clear_logs()
        env = {"HUB_UPSTREAM_CREDENTIALS_DOCKER_IO": f"alice:{hub.users['alice']}"} if account else {}
        options = {"hub_cache_dir": str(tmp_path / f"cache-{account}"), "hub_prefetch": str(listed)}
        with Mirror(tmp_path / f"m-{account}", hub, options=options, env=env, name=f"m-{account}") as m:
            state = "warm" if account else "failed"
            wait_for(lambda: metric(m, "hub_prefetch_images", state=state) == 1, what=f"{account}: {state}")
            assert {r.get("account") for r in hub.token_requests()} == {account}
            fetched = cdn_gets(hub, blobs_of(private))
            assert len(fetched) == (len(blobs_of(private)) if account else 0)
            assert not any(r["authorization_present"] for r in hub.cdn_requests())
            log = m.log_text()
            assert hub.users["alice"] not in log and "Traceback" not in log
            if account is None:
                assert "prefetch: docker.io/private/kept:1: the registry answered 401" in log, log[-2000:]


def test_two_processes_on_one_bucket_do_the_work_once(hub, ceph, tmp_path):
    """Two mirrors with their own disks and one bucket: one does every round, the other finds the
    round's lock taken; each blob crosses the CDN once, and the other serves the image from the bucket."""
    bucket = "prefetch-" + secrets.token_hex(4)
    ceph.make_bucket(bucket)
    hub.clear_logs()
    listed = write_list(tmp_path, "team/warm:1 linux/amd64\nteam/moving:1\n")
    env = {"AWS_ACCESS_KEY_ID": ceph.access_key, "AWS_SECRET_ACCESS_KEY": ceph.secret_key}

    def options(name: str) -> dict[str, str]:
        return {"hub_cache_dir": str(tmp_path / f"cache-{name}"), "hub_prefetch": str(listed),
                "hub_prefetch_interval": str(INTERVAL), "hub_store_url": f"s3://{bucket}/hub",
                "hub_store_endpoint": ceph.endpoint_url, "hub_store_addressing": "path"}

    with Mirror(tmp_path / "a", hub, options=options("a"), env=env, name="a") as a, \
            Mirror(tmp_path / "b", hub, options=options("b"), env=env, name="b") as b:
        rounds = lambda m, outcome: metric(m, "hub_prefetch_rounds_total", outcome=outcome)  # noqa: E731
        wait_for(lambda: rounds(a, "done") + rounds(b, "done") >= 3, timeout=60, what="three rounds")
        doer, other = (a, b) if rounds(a, "done") else (b, a)
        assert rounds(other, "done") == 0 and rounds(other, "elsewhere") >= 1
        assert metric(doer, "hub_prefetch_images", state="warm") == 2
        assert metric(other, "hub_prefetch_images", state="elsewhere") == 2
        amd64 = hub.images["team/warm"]["manifests"]["amd64"]
        digests = [amd64["config_digest"], *amd64["layer_digests"]]
        assert len(cdn_gets(hub, digests)) == len(digests)  # once, for both processes
        done = rounds(doer, "done")
        assert len(edge(hub, "HEAD", "/team/warm/manifests/1")) <= done + 1  # one check per round, not two
        assert "another process" in httpx.get(f"{other.url}/", timeout=10).text
        result = copy(f"docker://{other.host}/team/warm:1", tmp_path / "out", "--override-arch", "amd64")
        assert result.returncode == 0, result.stderr
        assert sha256_file(tmp_path / "out" / "manifest.json") == amd64["digest"]
        assert len(cdn_gets(hub, digests)) == len(digests)  # served from the bucket
        for m in (a, b):
            assert "Traceback" not in m.log_text()


@pytest.mark.parametrize("text,message", [
    ("docker.io/team/warm:1\nNginx:latest\n", "prefetch.txt:2: 'Nginx:latest' is not an image reference"),
    ("team/warm:1 linux\n", "prefetch.txt:1: 'linux' is not a platform"),
    ("team/warm:1\ndocker.io/team/warm:1\n", "prefetch.txt:2: docker.io/team/warm:1 is listed on line 1 too"),
])
def test_a_malformed_list_stops_mitmdump_with_one_clear_line(tmp_path, text, message):
    listed = write_list(tmp_path, text)
    argv = [str(MITMDUMP), "-s", str(REPO_ROOT / "addons" / "hub_rewrite.py"),
            "--mode", f"reverse:http://127.0.0.1:1@127.0.0.1:{free_port()}", "--set", f"confdir={tmp_path / 'conf'}",
            "--set", f"hub_cache_dir={tmp_path / 'cache'}", "--set", f"hub_prefetch={listed}"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=str(REPO_ROOT))
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-2000:]
    lines = [line for line in output.splitlines() if "hub_prefetch:" in line]
    assert len(lines) == 1 and message in lines[0] and "stopping" in lines[0], output[-2000:]
    assert "Traceback" not in output
