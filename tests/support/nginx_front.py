"""Debian's nginx running a configuration snippet for the ``http`` context, as a README shows one.

    with NginxFront(workdir, snippet, files={"fullchain.pem": ..., "privkey.pem": ...}, port=port) as nginx:
        ...   # nginx serves the snippet's servers

The snippet (``upstream``/``server`` blocks) is written unchanged to
``workdir/site.conf`` and included from a main configuration that keeps
everything nginx writes (pid, logs, temp files) under ``workdir``; ``files`` are
written next to it, where relative paths in the snippet (certificates) point.
nginx runs in the foreground (``daemon off``) as our child with
PR_SET_PDEATHSIG, as bench/nginx_peer.py runs it; ``stop()`` ends it and its
workers.
"""

from __future__ import annotations

import grp
import os
import pwd
import signal
import subprocess
import time
from pathlib import Path

from tests.support.common import set_pdeathsig
from tests.support.typed_shell import accepts

NGINX = "/usr/sbin/nginx"

MAIN_CONFIG = """\
daemon off;
master_process on;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/logs/error.log notice;
{user}
events {{
    worker_connections {worker_connections};
}}
http {{
    access_log {workdir}/logs/access.log;
    client_body_temp_path {workdir}/tmp/client;
    proxy_temp_path {workdir}/tmp/proxy;
    fastcgi_temp_path {workdir}/tmp/fastcgi;
    uwsgi_temp_path {workdir}/tmp/uwsgi;
    scgi_temp_path {workdir}/tmp/scgi;
    include {workdir}/site.conf;
}}
"""


class NginxError(RuntimeError):
    pass


class NginxFront:
    def __init__(self, workdir: Path, snippet: str, *, port: int, files: dict[str, bytes] | None = None,
                 worker_connections: int = 256) -> None:
        if not os.access(NGINX, os.X_OK):
            raise NginxError(f"{NGINX} not found (apt-get install nginx)")
        self.workdir = Path(workdir).resolve()
        self.snippet = snippet
        self.port = port
        self.files = files or {}
        self.worker_connections = worker_connections
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> NginxFront:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 15) -> NginxFront:
        for d in ("logs", "tmp"):
            (self.workdir / d).mkdir(parents=True, exist_ok=True)
        for name, data in self.files.items():
            (self.workdir / name).write_bytes(data)
        (self.workdir / "site.conf").write_text(self.snippet)
        # a root master would run its workers as "nobody", who cannot enter our private workdir
        user = (f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};"
                if os.geteuid() == 0 else "")
        conf = self.workdir / "nginx.conf"
        conf.write_text(MAIN_CONFIG.format(workdir=self.workdir, user=user,
                                           worker_connections=self.worker_connections))
        with open(self.workdir / "logs" / "stderr.log", "ab") as out:
            self.proc = subprocess.Popen(
                [NGINX, "-p", f"{self.workdir}/", "-e", str(self.workdir / "logs" / "error.log"), "-c", str(conf)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, preexec_fn=set_pdeathsig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NginxError(f"nginx exited with {self.proc.returncode}:\n{self.log_tail()}")
            if accepts(self.port):
                return self
            time.sleep(0.05)
        self.stop()
        raise NginxError(f"nginx did not start in {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # fast shutdown: the master ends its workers
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def log_tail(self, chars: int = 3000) -> str:
        parts = []
        for name in ("error.log", "stderr.log"):
            try:
                parts.append((self.workdir / "logs" / name).read_text(errors="replace")[-chars:])
            except FileNotFoundError:
                pass
        return "\n".join(p for p in parts if p.strip()) or "(no nginx output)"
