"""Private container-engine daemons for the real-client tests.

    with Containerd(workdir) as ctd:
        ctd.ctr("images", "pull", ...)        # ctr against this daemon only
    with Containerd(a) as ctd, Dockerd(b, ctd.address, config={...}) as dockerd:
        dockerd.docker("pull", "alpine:3.19")  # docker CLI against this daemon only

Everything a daemon writes lives under its workdir (sockets under a short
directory in /tmp: a unix socket path must stay under 108 bytes).  Nothing
touches the machine's own containerd/docker: no default socket, no iptables,
no bridge.  The daemons get SIGTERM when the test process dies
(PR_SET_PDEATHSIG); ``stop()`` ends them with SIGTERM, then SIGKILL, and
lazily unmounts anything a daemon left mounted under its directories.

``NO_NETWORK_ENV``: proxy variables pointing at a dead loopback port.  Go
clients (dockerd, ctr, podman) then never resolve or dial a non-loopback host
(e.g. registry-1.docker.io when dockerd falls back from a failed mirror):
loopback addresses always bypass the proxy, anything else fails on the proxy
connect before any DNS lookup. ``through_proxy(url)``: the environment of a
client whose only proxy is ``url``; ``without_proxies()``: one with none.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.support.common import read_log, set_pdeathsig
from tests.support.ports import free_port

_DEAD_PROXY = f"http://127.0.0.1:{free_port()}"
NO_NETWORK_ENV = {
    "HTTP_PROXY": _DEAD_PROXY,
    "HTTPS_PROXY": _DEAD_PROXY,
    "http_proxy": _DEAD_PROXY,
    "https_proxy": _DEAD_PROXY,
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}

PROXY_VARS = {"http_proxy", "https_proxy", "no_proxy", "all_proxy", "ftp_proxy"}  # either case


def without_proxies() -> dict[str, str]:
    """This process's environment without any proxy variable."""
    return {k: v for k, v in os.environ.items() if k.lower() not in PROXY_VARS}


def through_proxy(proxy_url: str) -> dict[str, str]:
    """The environment of a client whose only proxy is ``proxy_url`` (HTTPS_PROXY; no NO_PROXY)."""
    return {**without_proxies(), "HTTPS_PROXY": proxy_url}


_MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    # Linux delivers this when the thread that forked us exits: fixtures start
    # daemons from pytest's main thread.  SIGTERM, not SIGKILL: dockerd then
    # still undoes its bind mount of --data-root on the way out.
    set_pdeathsig(signal.SIGTERM)


def unmount_below(path: Path) -> list[str]:
    """Lazily unmount whatever is still mounted at or below ``path``; returns the mount points."""
    prefix = str(path).rstrip("/") + "/"
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == str(path) or point.startswith(prefix):
                points.append(point)
    for point in sorted(points, key=len, reverse=True):
        _libc.umount2(point.encode(), _MNT_DETACH)
    return points


class DaemonError(RuntimeError):
    pass


class _Daemon:
    name = "daemon"
    stop_timeout = 20.0

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{self.name}.log"
        self.sockdir = Path(tempfile.mkdtemp(prefix=f"hub-{self.name}-", dir="/tmp"))
        self.proc: subprocess.Popen | None = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def argv(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return {**os.environ, **NO_NETWORK_ENV}

    def ready(self) -> bool:
        raise NotImplementedError

    def start(self, timeout: float = 30.0):
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self.env(), cwd=str(self.workdir), preexec_fn=_die_with_parent,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise DaemonError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
                if self.ready():
                    return self
                time.sleep(0.2)
            raise DaemonError(f"{self.name} not ready after {timeout}s:\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        try:
            if self.proc and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
        finally:
            # a daemon that did not shut down cleanly may leave mounts behind (dockerd: --data-root)
            unmount_below(self.workdir)
            unmount_below(self.sockdir)
            shutil.rmtree(self.sockdir, ignore_errors=True)

    def log_text(self) -> str:
        return read_log(self.log_path)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_text()[-chars:]


class Containerd(_Daemon):
    """A private containerd: own root, state, sockets; CRI and the /opt plugin off."""

    name = "containerd"

    def __init__(self, workdir: Path, binary: str = "containerd", ctr_binary: str = "ctr") -> None:
        super().__init__(workdir)
        self.binary, self.ctr_binary = binary, ctr_binary
        self.address = str(self.sockdir / "c.sock")
        self.config_path = self.workdir / "config.toml"
        disabled = [
            "io.containerd.grpc.v1.cri",
            "io.containerd.internal.v1.opt",  # would create /opt/containerd
            "io.containerd.snapshotter.v1.aufs",
            "io.containerd.snapshotter.v1.btrfs",
            "io.containerd.snapshotter.v1.devmapper",
            "io.containerd.snapshotter.v1.zfs",
        ]
        self.config_path.write_text(
            "version = 2\n"
            f'root = "{self.workdir / "root"}"\n'
            f'state = "{self.sockdir / "state"}"\n'
            f"disabled_plugins = {json.dumps(disabled)}\n"
            "[grpc]\n"
            f'  address = "{self.address}"\n'
            "[ttrpc]\n"
            f'  address = "{self.address}.ttrpc"\n'
        )

    def argv(self) -> list[str]:
        return [self.binary, "--config", str(self.config_path), "--log-level", "info"]

    def ready(self) -> bool:
        if not os.path.exists(self.address):
            return False
        return self.ctr("version", timeout=10).returncode == 0

    def ctr(self, *args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """ctr against this daemon; unpacks (and checks) with the native snapshotter, which
        works on any filesystem (overlayfs does not nest in an overlay root, for instance)."""
        return subprocess.run(
            [self.ctr_binary, "--address", self.address, *args],
            capture_output=True, text=True, timeout=timeout,
            env={**os.environ, **NO_NETWORK_ENV, "CONTAINERD_SNAPSHOTTER": "native", **(env or {})},
        )


class Dockerd(_Daemon):
    """dockerd 20.10 with no host networking changes, on an existing containerd.

    ``config``: extra daemon.json keys (registry-mirrors, insecure-registries...).
    """

    name = "dockerd"

    def __init__(self, workdir: Path, containerd_address: str, config: dict | None = None,
                 binary: str = "dockerd", cli: str = "docker") -> None:
        super().__init__(workdir)
        self.binary, self.cli = binary, cli
        self.containerd_address = containerd_address
        self.socket = str(self.sockdir / "d.sock")
        self.host = f"unix://{self.socket}"
        self.cli_config = self.workdir / "cli-config"  # DOCKER_CONFIG: login credentials go here
        self.cli_config.mkdir(exist_ok=True)
        self.config_path = self.workdir / "daemon.json"
        self.config_path.write_text(json.dumps({
            "storage-driver": "vfs",
            # the default is /etc/docker/key.json
            "deprecated-key-path": str(self.workdir / "key.json"),
            **(config or {}),
        }, indent=2))
        # dockerd creates /run/docker/plugins whatever --exec-root says; tidy it if it was not there
        self._created_run_docker = not os.path.exists("/run/docker")

    def argv(self) -> list[str]:
        return [
            self.binary,
            "--config-file", str(self.config_path),
            "--data-root", str(self.workdir / "data"),
            "--exec-root", str(self.sockdir / "exec"),
            "--pidfile", str(self.workdir / "dockerd.pid"),
            "-H", self.host,
            "--containerd", self.containerd_address,
            "--iptables=false", "--ip6tables=false", "--bridge=none", "--ip-masq=false",
        ]

    def ready(self) -> bool:
        if not os.path.exists(self.socket):
            return False
        try:
            with httpx.Client(transport=httpx.HTTPTransport(uds=self.socket), timeout=5) as c:
                return c.get("http://docker/_ping").status_code == 200
        except httpx.HTTPError:
            return False

    def docker(self, *args: str, input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self.cli, *args],
            capture_output=True, text=True, timeout=timeout, input=input,
            env={**os.environ, **NO_NETWORK_ENV, "DOCKER_HOST": self.host, "DOCKER_CONFIG": str(self.cli_config)},
        )

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            if self._created_run_docker:
                for d in ("/run/docker/plugins", "/run/docker"):
                    try:
                        os.rmdir(d)
                    except OSError:
                        pass


@contextmanager
def dockerd_on_containerd(base: Path, config: dict, cli: str = "docker") -> Iterator[Dockerd]:
    """A private dockerd with its own containerd under ``base``; ``config``: daemon.json keys."""
    with Containerd(base / "containerd") as ctd:
        with Dockerd(base / "dockerd", ctd.address, config=config, cli=cli) as daemon:
            yield daemon
