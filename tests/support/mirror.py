"""Runs a real ``mitmdump`` (or ``mitmweb``) with the hub-rewrite addon in front of an upstream.

    with Mirror(workdir, upstream) as mirror:      # an Upstream, or its API URL as a string
        mirror.url        # http://127.0.0.1:PORT
        mirror.log_text() # everything mitmdump printed
        mirror.peak_rss() # VmHWM of the mitmdump process, bytes

Given an HTTPS ``Upstream`` (tests/support/upstream.py), the mirror trusts its
test CA the way an operator would: ``--set ssl_verify_upstream_trusted_ca=<ca>``
on the command line (``upstream_ca=`` gives a CA for a URL, or for the
registries of a forward proxy's table). Nothing reaches it through the
environment.

``plain=True`` starts mitmdump without the addon (a bare reverse proxy), the
baseline the benchmark compares against.

``mode="regular"`` runs mitmdump as a forward proxy (``--mode regular``) instead
of a reverse proxy; ``upstream_url`` is then ignored (the addon's
``hub_upstreams`` names the registries) and clients use ``mirror.proxy_url``
(``HTTPS_PROXY``).  They must trust mitmproxy's CA, which mitmdump creates at
start-up as ``mirror.confdir / "mitmproxy-ca-cert.pem"``.

``tool="mitmweb"`` runs mitmweb instead: the same proxy, plus its web UI on a
free loopback port with a random password and no browser opened.  Then

    mirror.web_url    # http://127.0.0.1:WEB_PORT
    mirror.web_api    # MitmwebApi: flows(), content(flow_id, part, view), ui_url

Options that take a sequence are given by repeating ``--set key=value`` in
``extra_args``.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.support.common import read_log, set_pdeathsig
from tests.support.mitmweb_api import MitmwebApi
from tests.support.ports import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
MITMDUMP = Path(sys.executable).with_name("mitmdump")
MITMWEB = Path(sys.executable).with_name("mitmweb")
TOOLS = {"mitmdump": MITMDUMP, "mitmweb": MITMWEB}

# TODO(lead): set to True once the repository's mitm.conf loads under mitmweb
# (today it stops mitmweb with "unknown option(s): flow_detail": that option
# exists in mitmdump only).  Until then mitmweb runs with ``hub_config=``
# (no config file: mitmproxy's defaults, e.g. an eager upstream connection);
# afterwards it starts exactly as the README shows, mitm.conf and all.
MITMWEB_LOADS_MITM_CONF = True


class MirrorError(RuntimeError):
    pass


class Mirror:
    def __init__(
        self,
        workdir: Path,
        upstream_url: str | Any,
        *,
        upstream_ca: Path | None = None,
        options: dict[str, str] | None = None,
        extra_args: list[str] | None = None,
        plain: bool = False,
        tls: tuple[Path, str] | None = None,
        name: str = "mirror",
        env: dict[str, str] | None = None,
        mode: str = "reverse",
        tool: str = "mitmdump",
        listen_host: str = "127.0.0.1",
    ) -> None:
        """tls: (PEM with certificate and key, host pattern) served to clients over HTTPS.
        mode: "reverse" (to ``upstream_url``) or "regular" (a forward proxy; ``upstream_url`` unused).
        tool: "mitmdump" or "mitmweb" (adds the web UI and ``web_api``).
        listen_host: the address the proxy listens on (another than loopback: for clients in a
        network namespace, tests/support/netns.py).
        upstream_url: a URL, or an Upstream (its API URL; its CA is trusted unless upstream_ca says another).
        upstream_ca: the CA certificate to trust for upstream TLS (ssl_verify_upstream_trusted_ca)."""
        if hasattr(upstream_url, "api_url"):
            upstream_ca = upstream_ca or upstream_url.ca_cert
            upstream_url = upstream_url.api_url
        self.upstream_ca = upstream_ca
        if mode not in ("reverse", "regular"):
            raise ValueError(f"mode must be 'reverse' or 'regular', not {mode!r}")
        if tool not in TOOLS:
            raise ValueError(f"tool must be one of {sorted(TOOLS)}, not {tool!r}")
        self.tool = tool
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.mode = mode
        self.listen_host = listen_host
        self.port = free_port(listen_host)
        self.scheme = "https" if tls else "http"
        self.host = f"{listen_host}:{self.port}"
        self.url = f"{self.scheme}://{self.host}"
        # a forward proxy is always spoken to in plain HTTP (CONNECT for https:// URLs)
        self.proxy_url = f"http://{self.host}" if mode == "regular" else ""
        self.log_path = self.workdir / f"{name}.log"
        self.confdir = self.workdir / f"{name}-confdir"
        if mode == "regular":
            mode_spec = f"regular@{listen_host}:{self.port}"
        else:
            mode_spec = f"reverse:{upstream_url}@{listen_host}:{self.port}"
        argv = [str(TOOLS[tool]), "--mode", mode_spec, "--set", f"confdir={self.confdir}"]
        # mitmweb's UI; token_urlsafe never starts with "$" (which would make it an argon2 hash)
        self.web_host = "127.0.0.1"
        self.web_port = free_port() if tool == "mitmweb" else 0
        self.web_password = secrets.token_urlsafe(18) if tool == "mitmweb" else ""
        self.web_url = f"http://{self.web_host}:{self.web_port}" if tool == "mitmweb" else ""
        self.web_api: MitmwebApi | None = None  # set once mitmweb is up
        if tool == "mitmweb":
            argv += ["--set", "web_open_browser=false", "--set", f"web_host={self.web_host}",
                     "--set", f"web_port={self.web_port}", "--set", f"web_password={self.web_password}"]
            if not plain and not MITMWEB_LOADS_MITM_CONF and "hub_config" not in (options or {}):
                argv += ["--set", "hub_config="]
        if plain:
            # the same streaming and HTTP/1.1 settings mitm.conf gives the mirror
            argv += ["--set", "stream_large_bodies=1m", "--set", "http2=false", "--set", "connection_strategy=lazy"]
        else:
            argv += ["-s", str(REPO_ROOT / "addons" / "hub_rewrite.py")]
        if tls:
            argv += ["--certs", f"{tls[1]}={tls[0]}"]
        if upstream_ca:
            argv += ["--set", f"ssl_verify_upstream_trusted_ca={upstream_ca}"]
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
        """Start the tool and wait until the proxy, the addon and (mitmweb) the web UI are up."""
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
        if self.web_port:
            self.web_api = MitmwebApi(self.web_url, self.web_password)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        # Listening is not enough: the script loads after the listener opens.
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise MirrorError(f"{self.tool} exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            if self._ready(self.log_text()):
                time.sleep(0.3)  # let the script's configure() finish
                return
            time.sleep(0.1)
        raise MirrorError(f"{self.tool} did not start in {timeout}s:\n{self.log_text()[-4000:]}")

    def _ready(self, log: str) -> bool:
        # mitmweb's "Web server listening at" would satisfy a bare "listening at": look for the proxy's own line
        proxy_up = any("listening at" in line and "Web server" not in line for line in log.splitlines())
        script_up = "-s" not in self.argv or "Loading script" in log
        if not (proxy_up and script_up and self._accepts(self.listen_host, self.port)):
            return False
        return not self.web_port or ("Web server listening at" in log and self._accepts(self.web_host, self.web_port))

    @property
    def ca_cert(self) -> Path:
        """mitmproxy's CA certificate (PEM), created in the confdir when mitmdump starts."""
        return self.confdir / "mitmproxy-ca-cert.pem"

    @staticmethod
    def _accepts(host: str, port: int) -> bool:
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.web_api:
            self.web_api.close()
            self.web_api = None
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log_text(self) -> str:
        return read_log(self.log_path)

    def peak_rss(self) -> int:
        """Peak resident memory of the running mitmdump/mitmweb (VmHWM), in bytes."""
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
