"""Runs a real ``mitmdump`` with the hub-rewrite addon in front of an upstream.

    with Mirror(workdir, upstream_url) as mirror:
        mirror.url        # http://127.0.0.1:PORT
        mirror.log_text() # everything mitmdump printed
        mirror.peak_rss() # VmHWM of the mitmdump process, bytes

``plain=True`` starts mitmdump without the addon (a bare reverse proxy), the
baseline the benchmark compares against.

``mode="regular"`` runs mitmdump as a forward proxy (``--mode regular``) instead
of a reverse proxy; ``upstream_url`` is then ignored (the addon's
``hub_upstreams`` names the registries) and clients use ``mirror.proxy_url``
(``HTTPS_PROXY``).  They must trust mitmproxy's CA, which mitmdump creates at
start-up as ``mirror.confdir / "mitmproxy-ca-cert.pem"``.

Options that take a sequence are given by repeating ``--set key=value`` in
``extra_args``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.support.common import set_pdeathsig

REPO_ROOT = Path(__file__).resolve().parents[2]
MITMDUMP = Path(sys.executable).with_name("mitmdump")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MirrorError(RuntimeError):
    pass


class Mirror:
    def __init__(
        self,
        workdir: Path,
        upstream_url: str,
        *,
        options: dict[str, str] | None = None,
        extra_args: list[str] | None = None,
        plain: bool = False,
        tls: tuple[Path, str] | None = None,
        name: str = "mirror",
        env: dict[str, str] | None = None,
        mode: str = "reverse",
    ) -> None:
        """tls: (PEM with certificate and key, host pattern) served to clients over HTTPS.
        mode: "reverse" (to ``upstream_url``) or "regular" (a forward proxy; ``upstream_url`` unused)."""
        if mode not in ("reverse", "regular"):
            raise ValueError(f"mode must be 'reverse' or 'regular', not {mode!r}")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.mode = mode
        self.port = free_port()
        self.scheme = "https" if tls else "http"
        self.url = f"{self.scheme}://127.0.0.1:{self.port}"
        self.host = f"127.0.0.1:{self.port}"
        # a forward proxy is always spoken to in plain HTTP (CONNECT for https:// URLs)
        self.proxy_url = f"http://127.0.0.1:{self.port}" if mode == "regular" else ""
        self.log_path = self.workdir / f"{name}.log"
        self.confdir = self.workdir / f"{name}-confdir"
        if mode == "regular":
            mode_spec = f"regular@127.0.0.1:{self.port}"
        else:
            mode_spec = f"reverse:{upstream_url}@127.0.0.1:{self.port}"
        argv = [str(MITMDUMP), "--mode", mode_spec, "--set", f"confdir={self.confdir}"]
        if plain:
            # the same streaming and HTTP/1.1 settings mitm.conf gives the mirror
            argv += ["--set", "stream_large_bodies=1m", "--set", "http2=false", "--set", "connection_strategy=lazy"]
        else:
            argv += ["-s", str(REPO_ROOT / "addons" / "hub_rewrite.py")]
        if tls:
            argv += ["--certs", f"{tls[1]}={tls[0]}"]
        for key, value in (options or {}).items():
            argv += ["--set", f"{key}={value}"]
        argv += extra_args or []
        self.argv = argv
        self.env = env or {}
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Mirror:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 30) -> Mirror:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO_ROOT),
            env={**os.environ, **self.env},
            preexec_fn=set_pdeathsig,  # never outlive a killed test run
        )
        log.close()
        try:
            self._wait_ready(timeout)
        except BaseException:  # also Ctrl-C: `with Mirror(...)` runs no __exit__ when __enter__ fails
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        # Listening is not enough: the script loads after the listener opens.
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise MirrorError(f"mitmdump exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            text = self.log_text()
            if "listening at" in text and ("-s" not in self.argv or "Loading script" in text):
                if self._accepts():
                    time.sleep(0.3)  # let the script's configure() finish
                    return
            time.sleep(0.1)
        raise MirrorError(f"mitmdump did not start in {timeout}s:\n{self.log_text()[-4000:]}")

    @property
    def ca_cert(self) -> Path:
        """mitmproxy's CA certificate (PEM), created in the confdir when mitmdump starts."""
        return self.confdir / "mitmproxy-ca-cert.pem"

    def _accepts(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def peak_rss(self) -> int:
        """Peak resident memory of the running mitmdump (VmHWM), in bytes."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise MirrorError("no VmHWM")

    def reset_peak_rss(self) -> None:
        """Start a new peak measurement (Linux: writing 5 to clear_refs resets VmHWM)."""
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/clear_refs", "w") as f:
            f.write("5")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False
