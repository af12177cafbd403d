"""The container image of README.md and docs/service.md, built and run as they show, with podman and skopeo.

The image is built once per test session, in the background from the moment the
tests are collected (tests/conftest.py starts it; the build waits for no test): the
README's build command, with ``--from`` a Debian trixie root file system made by
mmdebstrap and pip reading a wheel directory (tests/support/containers.py), the
Containerfile's steps all run. podman keeps its images and containers in a directory
of the tests (``CONTAINERS_*`` files), which also hand every container ``HUB_UPSTREAM``
(the test upstream in place of Docker Hub) and ulimits within this machine's.

The VPS case runs over HTTPS with the certificate from the README's certbot deploy
hook, pulls with skopeo, passes its health check, takes a renewed certificate without
a restart, is checked with the README's check command while it runs, stops on SIGTERM
at once (tini hands it on) and, run again, serves from the cache volume. The team case
shares a bucket of Ceph RGW, logs JSON, and is stopped during a cold pull: the client's
transfer ends short, nothing partial stays in the cache or the bucket, and the restarted
container serves the retry whole.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.support.certs import issue_server_cert, make_ca_and_server_cert, serial_of
from tests.support.containers import BASE_IMAGE, Engine, FollowedBuild, ImageBuild
from tests.support.daemons import NO_NETWORK_ENV
from tests.support.images import make_big_layer, push_image, sha256_digest
from tests.support.mirror import REPO_ROOT
from tests.support.ports import free_port
from tests.support.readme_commands import fenced_blocks
from tests.support.readme_table import Handout, Here, documented, documents
from tests.support.throttle import throttled_port

SERVICE = "registry.docker.io"
UPSTREAM_CA = "/etc/ssl/hub-rewrite-test-upstream-ca.pem"  # the test upstream's CA, in every container
# the test upstream is HTTPS with certificates of a CA the test session makes; Docker Hub's are publicly
# trusted, so the README's commands need nothing of the kind
TRUST = f"--set ssl_verify_upstream_trusted_ca={UPSTREAM_CA}"

# ---------------------------------------------------------------- the documents' text, exactly

BUILD = "podman build --format docker -t hub-rewrite -f Containerfile ."
DEPLOY_HOOK = "RENEWED_LINEAGE=/etc/letsencrypt/live/mirror.example.com contrib/certbot-deploy-hook"
VOLUME = "podman volume create hub-cache"
VPS_RUN = ("podman run -d --name hub-rewrite --network host --cap-add NET_BIND_SERVICE "
           "-e HUB_PORT=443 -v hub-cache:/var/cache/hub-rewrite -v /etc/hub-rewrite:/etc/hub-rewrite:ro "
           "hub-rewrite --certs '*=/etc/hub-rewrite/mirror.pem' --set hub_public_url=https://mirror.example.com")
TEAM_RUN = ("podman run -d --name hub-rewrite-a --network host "
            "-e HUB_PORT=5001 -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY -v hub-cache-a:/var/cache/hub-rewrite "
            "hub-rewrite --set hub_store_url=s3://mirror-cache/hub --set hub_store_endpoint=https://s3.example.com "
            "--set hub_public_url=https://mirror.example.com --set hub_log_format=json")
CHECK = ("podman run --rm --network host -e HUB_CHECK=1 -e HUB_PORT=443 -v hub-cache:/var/cache/hub-rewrite "
         "-v /etc/hub-rewrite:/etc/hub-rewrite:ro hub-rewrite --certs '*=/etc/hub-rewrite/mirror.pem' "
         "--set hub_public_url=https://mirror.example.com")
STOP_RM = "podman stop --time 30 hub-rewrite && podman rm hub-rewrite"


def json_example() -> str:
    return next(b.text for document in documents() for b in fenced_blocks(document.read_text())
                if b.lang == "json" and '"event": "pull"' in b.text)


VPS = ("test_vps_case",)
TRUSTED = f"{TRUST}: the test upstream's CA (mounted by containers.conf)"
WHEELS = "--from <a Debian trixie root file system made by mmdebstrap> and pip's wheels (-v, --build-arg PIP_ENV)"
CERT_DIR = "a directory of the test in place of /etc/hub-rewrite (mounted at /etc/hub-rewrite as the README does)"
TABLE: dict[str, Here] = {
    BUILD: Here(("container_image",), appended=f"{WHEELS}: no registry holds debian:trixie-slim here"),
    DEPLOY_HOOK: Here(VPS, replaced=("/etc/letsencrypt/live/mirror.example.com",),
                      environment=f"HUB_CERT (the hook's variable): {CERT_DIR}"),
    VOLUME: Here(VPS),
    VPS_RUN: Here(VPS, replaced=("HUB_PORT=443", "-v /etc/hub-rewrite:", "https://mirror.example.com"),
                  appended=TRUSTED, environment=f"a free port for 443; {CERT_DIR}; HUB_UPSTREAM in containers.conf"),
    CHECK: Here(VPS, replaced=("HUB_PORT=443", "-v /etc/hub-rewrite:", "https://mirror.example.com"),
                appended=f"{TRUSTED}; and once --set hub_blob_listen=nonsense: a configuration that would not start"),
    STOP_RM: Here(VPS),
    TEAM_RUN: Here(("test_team_case",), replaced=("HUB_PORT=5001", "s3://mirror-cache/hub", "https://s3.example.com",
                                                   "https://mirror.example.com"),
                   appended=TRUSTED, environment="the keys of Ceph RGW's test user in podman's environment; "
                                                 "HUB_UPSTREAM in containers.conf"),
}
JSON_EXAMPLE = json_example()
TABLE[JSON_EXAMPLE] = Here(("test_team_case",), environment="compared with the JSON object of a real pull step")


HANDOUT = Handout(TABLE, documented())


def typed(request, key: str, replace: dict[str, str] | None = None, append: str = "") -> str:
    return HANDOUT.text(request.fixturename or request.node.originalname, key, replace, append)


# ---------------------------------------------------------------- the image, built in the background


class Building:
    """The session's one image build (started by tests/conftest.py once the tests are collected)."""

    build: ImageBuild | None = None
    skipped: str = ""


def missing_tools() -> str:
    missing = [t for t in ("podman", "mmdebstrap", "skopeo") if not shutil.which(t)]
    if missing:
        return f"not installed: {', '.join(missing)} (scripts/test installs them)"
    if os.geteuid() != 0:
        return "mmdebstrap and rootful podman need root"
    return ""


def build_arguments(workdir: Path) -> str:
    wheels = workdir / "wheels"
    return (f"--from {BASE_IMAGE} --network host -v {wheels}:/wheels:ro "
            "--build-arg PIP_ENV='PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels'")


# HUB_TEST_KEEP_IMAGE=<dir>: keep podman's storage, the base and the wheels there between runs (for
# working on the image: the build then redoes only the layers that changed); CI builds from nothing
KEEP = os.environ.get("HUB_TEST_KEEP_IMAGE", "")


# Under pytest-xdist the controller builds the image once and its workers follow that build: the
# controller names the build's directory here before it starts them (they inherit its environment)
SHARED_BUILD = "HUB_TEST_IMAGE_BUILD"


def start_image_build(for_workers: bool = False) -> None:
    if Building.build is not None or Building.skipped:
        return
    Building.skipped = missing_tools()
    if Building.skipped:
        return
    followed = os.environ.get(SHARED_BUILD)
    if followed and not for_workers:
        root = Path(followed)
        Building.build = FollowedBuild(root, f"{BUILD} {build_arguments(root / 'build')}", root / "done.json")
        return
    workdir = Path(KEEP) if KEEP else Path(tempfile.mkdtemp(prefix="hub-rewrite-image-", dir="/var/tmp"))
    engine = Engine(workdir / "engine", keep=bool(KEEP))
    command = f"{BUILD} {build_arguments(workdir / 'build')}"
    build = ImageBuild(engine, workdir / "build", command, reuse=bool(KEEP))
    if for_workers:
        build.done_file = workdir / "done.json"
        build.done_file.unlink(missing_ok=True)  # a kept directory's outcome of an earlier run
        os.environ[SHARED_BUILD] = str(workdir)
    Building.build = build.start()


def stop_image_build() -> None:
    build = Building.build
    Building.build = None
    if isinstance(build, FollowedBuild):  # the controller's to remove; this worker's containers are its own
        if build.engine is not None:
            build.engine.podman("rm", "--all", "--force", "--time", "0", check=False)
    elif build is not None:
        if build.thread is not None:
            build.thread.join(900)
        if KEEP:
            build.engine.podman("rm", "--all", "--force", "--time", "0", check=False)
        else:
            build.engine.close()
            shutil.rmtree(build.workdir.parent, ignore_errors=True)


@pytest.fixture(scope="module")
def container_image(request, upstream) -> ImageBuild:
    start_image_build()  # when the collection hook did not (a run of this module alone does too)
    if Building.skipped:
        HANDOUT.skip("container_image", Building.skipped)
    build = Building.build
    assert build.command == typed(request, BUILD, append=build_arguments(build.workdir))
    waited = time.monotonic()
    build.result()
    build.steps["waited"] = time.monotonic() - waited
    report = ", ".join(f"{k} {v:.0f} s" for k, v in build.steps.items())
    print(f"\nimage build: {report}")  # the time it adds, in the test report (-s or a failure)
    build.engine.configure({"HUB_UPSTREAM": upstream.api_url}, {upstream.ca_cert: UPSTREAM_CA})
    return build


@pytest.fixture()
def engine(container_image) -> Engine:
    engine = container_image.engine
    yield engine
    engine.podman("rm", "--all", "--force", "--time", "0", check=False)
    engine.podman("volume", "prune", "--force", check=False)


def sh(engine: Engine, text: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """A command as typed, with podman's environment (the tests' storage and settings)."""
    return subprocess.run(["bash", "-c", text], cwd=REPO_ROOT, env={**engine.env, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def wait_listening(engine: Engine, name: str, port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        logs = engine.podman("logs", name, check=False)
        if "listening at" in logs.stdout + logs.stderr:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                pass
        state = engine.podman("inspect", "--format", "{{.State.Status}}", name, check=False).stdout.strip()
        if state in ("exited", "stopped"):
            break
        time.sleep(0.2)
    logs = engine.podman("logs", name, check=False)
    pytest.fail(f"{name} is not listening on {port}:\n{(logs.stdout + logs.stderr)[-3000:]}")


def served_serial(port: int, ca: Path) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ssl.create_default_context(cafile=str(ca)).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return serial_of(tls.getpeercert(binary_form=True))


def skopeo_copy(port: int, dest: Path, ca: Path | None = None) -> subprocess.CompletedProcess:
    args = ["skopeo", "copy"] + ([] if ca else ["--src-tls-verify=false"])
    env = {**os.environ, **NO_NETWORK_ENV, **({"SSL_CERT_FILE": str(ca)} if ca else {})}
    return subprocess.run([*args, f"docker://127.0.0.1:{port}/library/alpine:3.19", f"dir:{dest}"], env=env,
                          capture_output=True, text=True, timeout=120)


def container_state(engine: Engine, name: str) -> tuple[str, int]:
    out = engine.podman("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", name).stdout.split()
    return out[0], int(out[1])


def volume_dir(engine: Engine, volume: str) -> Path:
    return Path(engine.podman("volume", "inspect", "--format", "{{.Mountpoint}}", volume).stdout.strip())


# ---------------------------------------------------------------- the image itself


def test_the_image_runs_the_mirror_unprivileged_with_a_health_check(engine):
    image = json.loads(engine.podman("image", "inspect", "localhost/hub-rewrite").stdout)[0]
    config = image["Config"]
    assert config["User"] == "hub" and "/var/cache/hub-rewrite" in config["Volumes"]
    assert config["Entrypoint"][:2] == ["/usr/bin/tini", "--"]
    assert image["Healthcheck"]["Test"][-2:] == ["-m", "hubrewrite.probe"]  # kept by --format docker
    ids = engine.podman("run", "--rm", "--entrypoint", "id", "localhost/hub-rewrite").stdout
    assert ids.startswith("uid=10001(hub) gid=10001(hub)")


# ---------------------------------------------------------------- on a VPS, over HTTPS


@pytest.fixture()
def certificates(tmp_path) -> dict[str, Path]:
    """certbot's live/ directory for mirror.example.com (and 127.0.0.1), and where the hook puts the PEM."""
    made = make_ca_and_server_cert(tmp_path / "ca", hosts=("mirror.example.com",), ips=("127.0.0.1",))
    live = tmp_path / "live"
    live.mkdir()
    (live / "fullchain.pem").write_bytes(made["cert"].read_bytes())
    (live / "privkey.pem").write_bytes(made["key"].read_bytes())
    cert_dir = tmp_path / "etc-hub-rewrite"
    cert_dir.mkdir()
    return {"ca": made["ca"], "ca_dir": tmp_path / "ca", "live": live, "dir": cert_dir}


def deploy(engine: Engine, text: str, certs: dict[str, Path]) -> None:
    done = sh(engine, text, env={"HUB_CERT": str(certs["dir"] / "mirror.pem")})
    assert done.returncode == 0, done.stderr


def test_vps_case(request, engine, upstream, certificates, tmp_path):
    """HTTPS with the deploy hook's certificate; health check; renewal without a restart; the check
    beside the running mirror; a clean stop; the same command again serves from the cache volume."""
    port = free_port()
    where = {"HUB_PORT=443": f"HUB_PORT={port}", "-v /etc/hub-rewrite:": f"-v {certificates['dir']}:",
             "https://mirror.example.com": f"https://127.0.0.1:{port}"}
    deploy(engine, typed(request, DEPLOY_HOOK, {"/etc/letsencrypt/live/mirror.example.com": str(certificates["live"])}),
           certificates)
    assert sh(engine, typed(request, VOLUME)).returncode == 0
    run = typed(request, VPS_RUN, where, append=TRUST)
    started = sh(engine, run)
    assert started.returncode == 0, started.stderr
    wait_listening(engine, "hub-rewrite", port)
    copied = skopeo_copy(port, tmp_path / "cold", certificates["ca"])
    assert copied.returncode == 0, copied.stderr + engine.podman("logs", "hub-rewrite").stdout[-3000:]
    health = engine.podman("healthcheck", "run", "hub-rewrite", check=False)
    assert health.returncode == 0, health.stdout + health.stderr
    users = {line.split()[0] for line in engine.podman("top", "hub-rewrite", "user", "comm").stdout.splitlines()[1:]}
    assert users == {"hub"}  # tini and mitmdump: nothing runs as root
    renewed_without_a_restart(engine, port, certificates, tmp_path)
    checked(request, engine, where)
    stopped_cleanly(request, engine)
    again = sh(engine, run)
    assert again.returncode == 0, again.stderr
    wait_listening(engine, "hub-rewrite", port)
    served_from_the_cache_volume(engine, port, upstream, certificates, tmp_path)


def renewed_without_a_restart(engine: Engine, port: int, certs: dict[str, Path], tmp_path: Path) -> None:
    first = served_serial(port, certs["ca"])
    renewed = issue_server_cert(tmp_path / "renewed", certs["ca_dir"], hosts=("mirror.example.com",),
                                ips=("127.0.0.1",), intermediate="R11")
    (certs["live"] / "fullchain.pem").write_bytes(renewed["cert"].read_bytes())
    (certs["live"] / "privkey.pem").write_bytes(renewed["key"].read_bytes())
    hook = sh(engine, str(REPO_ROOT / "contrib" / "certbot-deploy-hook"),
              env={"RENEWED_LINEAGE": str(certs["live"]), "HUB_CERT": str(certs["dir"] / "mirror.pem")})
    assert hook.returncode == 0, hook.stderr
    deadline = time.monotonic() + 5
    while served_serial(port, certs["ca"]) == first and time.monotonic() < deadline:
        time.sleep(0.3)
    # verified against the root only: the renewed chain's intermediate came with it
    assert served_serial(port, certs["ca"]) == serial_of(renewed["cert"].read_bytes())


def checked(request, engine: Engine, where: dict[str, str]) -> None:
    ok = sh(engine, typed(request, CHECK, where, append=TRUST))
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    assert "check: configuration OK" in ok.stdout and "cache: /var/cache/hub-rewrite (layout 1" in ok.stdout
    bad = sh(engine, typed(request, CHECK, where, append=f"{TRUST} --set hub_blob_listen=nonsense"))
    assert bad.returncode == 1 and "check: hub_blob_listen 'nonsense'" in bad.stdout, bad.stdout[-2000:]
    assert "Traceback" not in bad.stdout + bad.stderr
    assert engine.podman("inspect", "--format", "{{.State.Status}}", "hub-rewrite").stdout.strip() == "running"


def stopped_cleanly(request, engine: Engine) -> None:
    """SIGTERM reaches mitmdump through tini: it stops at once (not after --time 30) and exits 0."""
    started = time.monotonic()
    stop = sh(engine, typed(request, STOP_RM).replace(" && podman rm hub-rewrite", ""), timeout=60)
    seconds = time.monotonic() - started
    assert stop.returncode == 0, stop.stderr
    assert container_state(engine, "hub-rewrite") == ("exited", 0) and seconds < 15, seconds
    removed = sh(engine, typed(request, STOP_RM), timeout=60)  # as typed: the stop is a no-op by now
    assert removed.returncode == 0, removed.stderr


def served_from_the_cache_volume(engine: Engine, port: int, upstream, certs: dict[str, Path], tmp_path: Path) -> None:
    before = len(upstream.cdn_requests())
    warm = skopeo_copy(port, tmp_path / "warm", certs["ca"])
    assert warm.returncode == 0, warm.stderr
    assert len(upstream.cdn_requests()) == before  # every blob from the volume
    stamp = json.loads((volume_dir(engine, "hub-cache") / "hub-rewrite-cache.json").read_text())
    assert stamp["layout"] == 1


# ---------------------------------------------------------------- a team mirror on a shared bucket


def fresh_blob(upstream, tmp_path: Path, repo: str, size: int) -> str:
    layer = tmp_path / f"{repo.replace('/', '_')}.tar"
    digest, _ = make_big_layer(layer, size, seed=os.urandom(8))
    push_image(upstream, repo, "1", [layer], media="oci")
    return digest


def token(port: int, repo: str) -> str:
    r = httpx.get(f"http://127.0.0.1:{port}/token", params={"service": SERVICE, "scope": f"repository:{repo}:pull"},
                  timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["token"]


def test_team_case(request, engine, upstream, ceph, tmp_path):
    """JSON logs without a secret; SIGTERM during a cold pull: the transfer ends short, nothing partial in
    the cache volume or the bucket; started again, the client's retry gets the blob whole; SIGTERM right
    after it: the blob's upload to the bucket completes before the process exits."""
    port, bucket = free_port(), "team-" + secrets.token_hex(4)
    ceph.make_bucket(bucket)
    keys = {"AWS_ACCESS_KEY_ID": ceph.access_key, "AWS_SECRET_ACCESS_KEY": ceph.secret_key}
    run = typed(request, TEAM_RUN, {"HUB_PORT=5001": f"HUB_PORT={port}", "s3://mirror-cache/hub": f"s3://{bucket}/hub",
                                    "https://s3.example.com": ceph.endpoint_url,
                                    "https://mirror.example.com": f"http://127.0.0.1:{port}"}, append=TRUST)
    assert sh(engine, run, env=keys).returncode == 0
    wait_listening(engine, "hub-rewrite-a", port)
    digest = fresh_blob(upstream, tmp_path, "team/c-sigterm", 24 * 1024 * 1024)
    got = stopped_during_a_cold_pull(engine, port, upstream, digest)
    assert 0 < len(got) < 24 * 1024 * 1024
    cache = volume_dir(engine, "hub-cache-a")
    assert not (cache / "blobs" / "sha256" / digest[7:9] / digest[7:]).exists()
    assert list((cache / "tmp").glob("*.download")) == []
    assert not ceph.wait_for_blob(bucket, "hub", digest, timeout=1)
    assert engine.podman("start", "hub-rewrite-a").returncode == 0
    wait_listening(engine, "hub-rewrite-a", port)
    retry = httpx.get(f"http://127.0.0.1:{port}/v2/team/c-sigterm/blobs/{digest}", timeout=120,
                      headers={"Authorization": f"Bearer {token(port, 'team/c-sigterm')}"})
    assert retry.status_code == 200 and sha256_digest(retry.content) == digest
    # stopped as soon as the client has it, while its upload to the bucket has just begun: the upload
    # is finished before the process exits, and what the bucket holds is the blob, whole
    assert engine.podman("stop", "--time", "30", "hub-rewrite-a").returncode == 0
    assert container_state(engine, "hub-rewrite-a") == ("exited", 0)
    assert ceph.wait_for_blob(bucket, "hub", digest, timeout=0.5), "the upload did not complete before the exit"
    stored = ceph.client().get_object(Bucket=bucket, Key=f"hub/blobs/sha256/{digest[7:]}")["Body"].read()
    assert sha256_digest(stored) == digest
    example = json.loads(typed(request, JSON_EXAMPLE))
    logs_are_json_without_secrets(engine.podman("logs", "hub-rewrite-a").stdout, keys, digest, example)


def stopped_during_a_cold_pull(engine: Engine, port: int, upstream, digest: str) -> bytes:
    """The CDN slowed to 4 MB/s; a client reading the blob; podman stop after its first MiB."""
    got = bytearray()
    bearer = token(port, "team/c-sigterm")

    def pull() -> None:
        try:
            with httpx.stream("GET", f"http://127.0.0.1:{port}/v2/team/c-sigterm/blobs/{digest}",
                              headers={"Authorization": f"Bearer {bearer}"}, timeout=60) as r:
                for chunk in r.iter_raw(65536):
                    got.extend(chunk)
        except httpx.HTTPError:
            pass  # the transfer ends short: what a client then retries

    with throttled_port(int(urlsplit(upstream.cdn_url).port), 4):
        client = threading.Thread(target=pull)
        client.start()
        deadline = time.monotonic() + 30
        while len(got) < (1 << 20) and time.monotonic() < deadline:
            time.sleep(0.05)
        stop = engine.podman("stop", "--time", "30", "hub-rewrite-a", timeout=60)
        client.join(60)
    assert stop.returncode == 0 and container_state(engine, "hub-rewrite-a") == ("exited", 0)
    return bytes(got)


def logs_are_json_without_secrets(logs: str, keys: dict[str, str], digest: str, example: dict) -> None:
    lines = [line for line in logs.splitlines() if line.strip()]
    text_lines = [line for line in lines if not line.startswith("{")]
    assert all(line.endswith("Loading script addons/hub_rewrite.py") for line in text_lines), text_lines
    entries = [json.loads(line) for line in lines if line.startswith("{")]
    pulls = [e for e in entries if e.get("event") == "pull" and e.get("reference") == digest]
    assert pulls and pulls[-1]["status"] == 200 and pulls[-1]["kind"] == "blob"
    assert set(example) == set(pulls[-1])  # the README's example has the same fields
    assert not any(secret in logs for secret in keys.values())
    assert "Bearer ey" not in logs and "X-Amz-Signature" not in logs


def test_zz_every_command_assigned_here_ran(request):
    ours = [item for item in request.session.items if item.module is request.module]
    if {item.originalname for item in ours} != {n for n in globals() if n.startswith("test_")}:
        pytest.skip("only part of this module was selected")
    assert HANDOUT.not_run() == []
