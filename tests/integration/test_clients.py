"""Real container clients pulling through the mirror (real mitmdump with the
addon in front of the Docker-Hub-shaped upstream):

* podman with a registries.conf mirror entry, directly, and with credentials;
* ctr against a private containerd with a hosts.toml mirror for docker.io
  (every mirror request carries ``?ns=docker.io``), directly with
  ``--plain-http``, and with ``--user``;
* docker against a private dockerd 20.10 with ``registry-mirrors``, the
  ``host:port/library/name`` form, and ``docker login``.

Nothing leaves loopback: the primary registry of every mirror setup is a dead
loopback port, and all clients and daemons get proxy variables pointing at a
dead loopback port (tests/support/daemons.py), so dockerd's unavoidable
fallback to registry-1.docker.io fails at the proxy without a DNS lookup.
A test is skipped only when its client binary is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.support.daemons import NO_NETWORK_ENV, Containerd, Dockerd, dockerd_on_containerd
from tests.support.mirror import Mirror
from tests.support.ports import free_port

CLIENT_TIMEOUT = 120


def need(binary: str, package: str) -> str:
    path = shutil.which(binary)
    if not path:
        pytest.skip(f"{binary} not installed (Debian package {package})")
    return path


@pytest.fixture(scope="module", params=["relay", "blob listener"])
def mirror(request, upstream, tmp_path_factory):
    """Every client test runs twice: blobs relayed by mitmproxy (no cache), and with the
    cache and the blob listener, where each blob request is answered with a 307 to a signed
    URL on the listener, which the clients follow as they follow Docker Hub's CDN redirects."""
    work = tmp_path_factory.mktemp("clients-mirror")
    options = {}
    if request.param == "blob listener":
        options = {"hub_cache_dir": str(work / "cache"), "hub_blob_listen": f"127.0.0.1:{free_port()}"}
    # mitmdump shortens logged URLs to the terminal width; the full query (ns=docker.io) must show
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COLUMNS", "4000")
        m = Mirror(work, upstream, options=options).start()
    try:
        yield m
    finally:
        m.stop()


def new_log(mirror: Mirror, start: int) -> str:
    return mirror.log_text()[start:]


def dead_registry() -> str:
    return f"127.0.0.1:{free_port()}"


# ---------------------------------------------------------------- podman


class Podman:
    """podman with its own storage, run dirs, config files and auth file."""

    def __init__(self, base: Path, registries_conf: str = "") -> None:
        self.binary = need("podman", "podman")
        self.base = base
        for d in ("root", "tmp", "networks"):
            (base / d).mkdir(parents=True, exist_ok=True)
        # podman refuses a runroot longer than 50 characters: pytest's tmp_path is too long
        self.short = Path(tempfile.mkdtemp(prefix="hub-podman-", dir="/tmp"))
        run, libpod = self.short / "run", self.short / "libpod"
        (base / "auth.json").write_text('{"auths": {}}\n')  # podman wants REGISTRY_AUTH_FILE to exist
        (base / "registries.conf").write_text(registries_conf or "unqualified-search-registries = []\n")
        (base / "storage.conf").write_text(
            f'[storage]\ndriver = "vfs"\nrunroot = "{run}"\ngraphroot = "{base / "root"}"\n'
        )
        (base / "containers.conf").write_text(
            '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
            f'events_logfile_path = "{base / "events.log"}"\n'
            # netavark (the default) would create /run/containers/networks for root; CNI keeps
            # its lock in --network-config-dir.  Pulls use no network backend either way.
            '[network]\nnetwork_backend = "cni"\n'
        )
        self.env = {
            **os.environ,
            **NO_NETWORK_ENV,
            "CONTAINERS_REGISTRIES_CONF": str(base / "registries.conf"),
            "CONTAINERS_STORAGE_CONF": str(base / "storage.conf"),
            "CONTAINERS_CONF": str(base / "containers.conf"),
            "REGISTRY_AUTH_FILE": str(base / "auth.json"),
            "TMPDIR": str(base / "tmp"),
        }
        self.prefix = [
            self.binary,
            "--root", str(base / "root"),
            "--runroot", str(run),
            "--storage-driver", "vfs",
            "--cgroup-manager", "cgroupfs",
            "--events-backend", "file",
            "--tmpdir", str(libpod),
            "--network-config-dir", str(base / "networks"),
        ]

    def close(self) -> None:
        shutil.rmtree(self.short, ignore_errors=True)

    def __call__(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*self.prefix, *args], capture_output=True, text=True, timeout=CLIENT_TIMEOUT, env=self.env)

    def inspect(self, ref: str) -> dict:
        result = self("image", "inspect", ref)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)[0]


@pytest.fixture()
def podman_in(tmp_path):
    """podman_in(registries_conf="") -> a Podman with its own everything under tmp_path."""
    made: list[Podman] = []

    def make(registries_conf: str = "") -> Podman:
        made.append(Podman(tmp_path / f"podman{len(made)}", registries_conf))
        return made[-1]

    try:
        yield make
    finally:
        for podman in made:
            podman.close()


def test_podman_registries_conf_mirror(mirror, upstream, podman_in):
    alpine = upstream.images["library/alpine"]
    podman = podman_in(registries_conf=(
        'unqualified-search-registries = ["docker.io"]\n'
        "[[registry]]\n"
        'prefix = "docker.io"\n'
        f'location = "{dead_registry()}"\n'  # only the mirror can answer
        "insecure = true\n"
        "[[registry.mirror]]\n"
        f'location = "{mirror.host}"\n'
        "insecure = true\n"
    ))
    start = len(mirror.log_text())
    result = podman("pull", "docker.io/library/alpine:3.19")
    assert result.returncode == 0, result.stderr + new_log(mirror, start)[-3000:]
    image = podman.inspect("docker.io/library/alpine:3.19")
    assert image["Digest"] == alpine["digest"]
    assert image["Architecture"] == "amd64"
    assert f"docker.io/library/alpine@{alpine['manifests']['amd64']['digest']}" in image["RepoDigests"]
    assert "/v2/library/alpine/manifests/3.19" in new_log(mirror, start)
    # the layers were unpacked (real tar archives, the amd64 ones)
    mount = podman("image", "mount", "docker.io/library/alpine:3.19")
    assert mount.returncode == 0, mount.stderr
    try:
        rootfs = Path(mount.stdout.strip())
        assert (rootfs / "etc" / "os-release").read_text() == "NAME=alpine\nARCH=amd64\n"
        assert (rootfs / "usr" / "share" / "alpine" / "amd64.txt").exists()
    finally:
        podman("image", "unmount", "docker.io/library/alpine:3.19")


def test_podman_direct_oci_images(mirror, upstream, podman_in):
    podman = podman_in()
    for repo, tag in (("team/ociapp", "1.0"), ("library/busybox", "latest")):
        ref = f"{mirror.host}/{repo}:{tag}"
        result = podman("pull", "--tls-verify=false", ref)
        assert result.returncode == 0, result.stderr
        assert podman.inspect(ref)["Digest"] == upstream.images[repo]["digest"]


def test_podman_private_image_with_credentials(mirror, upstream, podman_in):
    password = upstream.users["alice"]
    podman = podman_in()
    ref = f"{mirror.host}/private/secret:1.0"
    wrong = podman("pull", "--tls-verify=false", "--creds", "alice:not-the-password", ref)
    assert wrong.returncode != 0
    assert "incorrect username or password" in wrong.stderr, wrong.stderr
    anonymous = podman("pull", "--tls-verify=false", ref)
    assert anonymous.returncode != 0
    assert "denied" in anonymous.stderr or "unauthorized" in anonymous.stderr, anonymous.stderr
    ok = podman("pull", "--tls-verify=false", "--creds", f"alice:{password}", ref)
    assert ok.returncode == 0, ok.stderr
    assert podman.inspect(ref)["Digest"] == upstream.images["private/secret"]["digest"]


# ---------------------------------------------------------------- containerd


@pytest.fixture(scope="module")
def containerd(mirror, tmp_path_factory):
    """One per mirror variant: a containerd that already holds the images would fetch nothing."""
    need("containerd", "containerd")
    need("ctr", "containerd")
    with Containerd(tmp_path_factory.mktemp("containerd")) as daemon:
        yield daemon


def ctr_images(containerd: Containerd) -> dict[str, tuple[str, str]]:
    """ref -> (media type, digest) from ``ctr images ls``."""
    result = containerd.ctr("images", "ls")
    assert result.returncode == 0, result.stderr
    out = {}
    for line in result.stdout.splitlines()[1:]:
        ref, media_type, digest = line.split()[:3]
        out[ref] = (media_type, digest)
    return out


def ctr_check(containerd: Containerd, ref: str) -> str:
    result = containerd.ctr("images", "check", f"name=={ref}")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines()[1:] if line.split()[0] == ref]
    assert len(lines) == 1, result.stdout
    return lines[0]


@pytest.fixture()
def docker_io_hosts(mirror, tmp_path) -> Path:
    """A --hosts-dir: docker.io is a dead loopback port with the mirror in front."""
    hosts = tmp_path / "hosts"
    (hosts / "docker.io").mkdir(parents=True)
    (hosts / "docker.io" / "hosts.toml").write_text(
        f'server = "http://{dead_registry()}"\n'
        f'[host."http://{mirror.host}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
    )
    return hosts


def test_containerd_hosts_toml_mirror(mirror, upstream, containerd, docker_io_hosts):
    alpine = upstream.images["library/alpine"]
    ref = "docker.io/library/alpine:3.19"
    start = len(mirror.log_text())
    result = containerd.ctr("images", "pull", "--hosts-dir", str(docker_io_hosts), ref)
    assert result.returncode == 0, result.stderr + new_log(mirror, start)[-3000:]
    assert "trying next host" not in result.stderr  # the mirror answered everything
    assert ctr_images(containerd)[ref] == ("application/vnd.docker.distribution.manifest.list.v2+json", alpine["digest"])
    check = ctr_check(containerd, ref)
    assert "complete" in check and check.split()[-1] == "true", check  # all content present, unpacked
    log = new_log(mirror, start)
    ns_requests = [line for line in log.splitlines() if "ns=docker.io" in line]
    assert any("/v2/library/alpine/manifests/3.19?ns=docker.io" in line for line in ns_requests), log[-3000:]
    assert any(f"/v2/library/alpine/manifests/{alpine['manifests']['amd64']['digest']}?ns=docker.io" in line
               for line in ns_requests), log[-3000:]


def test_containerd_direct_plain_http(mirror, upstream, containerd):
    for repo, tag, media_type in (
        ("library/busybox", "latest", "application/vnd.oci.image.index.v1+json"),
        ("team/ociapp", "1.0", "application/vnd.oci.image.manifest.v1+json"),
    ):
        ref = f"{mirror.host}/{repo}:{tag}"
        result = containerd.ctr("images", "pull", "--plain-http", ref)
        assert result.returncode == 0, result.stderr
        assert ctr_images(containerd)[ref] == (media_type, upstream.images[repo]["digest"])
        assert "complete" in ctr_check(containerd, ref)


def test_containerd_private_image_with_user(mirror, upstream, containerd, docker_io_hosts):
    password = upstream.users["alice"]
    secret = upstream.images["private/secret"]
    pull = ("images", "pull", "--hosts-dir", str(docker_io_hosts))
    wrong = containerd.ctr(*pull, "--user", "alice:not-the-password", "docker.io/private/secret:1.0")
    assert wrong.returncode != 0
    assert "401" in wrong.stderr, wrong.stderr
    anonymous = containerd.ctr("images", "pull", "--plain-http",
                               f"{mirror.host}/private/secret:1.0")
    assert anonymous.returncode != 0
    assert "denied" in anonymous.stderr or "insufficient_scope" in anonymous.stderr, anonymous.stderr
    ok = containerd.ctr(*pull, "--user", f"alice:{password}", "docker.io/private/secret:1.0")
    assert ok.returncode == 0, ok.stderr
    assert ctr_images(containerd)["docker.io/private/secret:1.0"][1] == secret["digest"]


# ---------------------------------------------------------------- docker


@pytest.fixture(scope="module")
def dockerd(mirror, tmp_path_factory):
    need("dockerd", "docker.io")
    cli = need("docker", "docker.io")
    need("containerd", "containerd")
    config = {"registry-mirrors": [mirror.url], "insecure-registries": [mirror.host]}
    with dockerd_on_containerd(tmp_path_factory.mktemp("docker"), config, cli) as daemon:
        yield daemon


def repo_digests(dockerd: Dockerd, ref: str) -> list[str]:
    result = dockerd.docker("image", "inspect", "--format", "{{json .RepoDigests}}", ref)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_docker_registry_mirrors(mirror, upstream, dockerd):
    alpine = upstream.images["library/alpine"]
    start, daemon_start = len(mirror.log_text()), len(dockerd.log_text())
    result = dockerd.docker("pull", "alpine:3.19", timeout=CLIENT_TIMEOUT)
    assert result.returncode == 0, result.stderr + dockerd.log_text()[daemon_start:][-3000:]
    assert f"Digest: {alpine['digest']}" in result.stdout
    assert f"alpine@{alpine['digest']}" in repo_digests(dockerd, "alpine:3.19")
    log = new_log(mirror, start)
    assert "/v2/library/alpine/manifests/3.19" in log, log[-3000:]
    daemon_log = dockerd.log_text()[daemon_start:]
    # Docker Hub itself was never tried (it would fail at the dead proxy)
    assert "registry-1.docker.io" not in daemon_log
    # dockerd stored the list and the amd64 manifest in containerd's content store, sizes verified
    assert "Error persisting manifest" not in daemon_log, daemon_log


def test_docker_host_port_form(mirror, upstream, dockerd):
    for repo, tag in (("library/alpine", "3.19"), ("team/ociapp", "1.0"), ("library/busybox", "latest")):
        ref = f"{mirror.host}/{repo}:{tag}"
        result = dockerd.docker("pull", ref, timeout=CLIENT_TIMEOUT)
        assert result.returncode == 0, result.stderr
        assert f"{mirror.host}/{repo}@{upstream.images[repo]['digest']}" in repo_digests(dockerd, ref)


def test_docker_login_and_private_pull(mirror, upstream, dockerd):
    password = upstream.users["alice"]
    secret = upstream.images["private/secret"]
    ref = f"{mirror.host}/private/secret:1.0"
    anonymous = dockerd.docker("pull", ref)
    assert anonymous.returncode != 0
    assert "denied" in anonymous.stderr, anonymous.stderr

    wrong = dockerd.docker("login", "-u", "alice", "--password-stdin", mirror.host, input="not-the-password\n")
    assert wrong.returncode != 0
    assert "incorrect username or password" in wrong.stderr, wrong.stderr
    login = dockerd.docker("login", "-u", "alice", "--password-stdin", mirror.host, input=password + "\n")
    assert login.returncode == 0, login.stderr
    assert "Login Succeeded" in login.stdout

    ok = dockerd.docker("pull", ref, timeout=CLIENT_TIMEOUT)
    assert ok.returncode == 0, ok.stderr
    assert f"{mirror.host}/private/secret@{secret['digest']}" in repo_digests(dockerd, ref)

    # credentials for the mirror host are not used for implicit registry-mirrors pulls:
    # the mirror refuses, dockerd falls back to Docker Hub, which is unreachable here
    implicit = dockerd.docker("pull", "private/secret:1.0", timeout=CLIENT_TIMEOUT)
    assert implicit.returncode != 0
    assert "proxyconnect" in implicit.stderr, implicit.stderr  # stopped at the dead proxy, no DNS lookup


def test_no_secret_in_mirror_log(mirror, upstream):
    """Runs last in this module: the clients' passwords stay out of the mirror log."""
    text = mirror.log_text()
    for password in upstream.users.values():
        assert password not in text
    assert "Traceback" not in text
