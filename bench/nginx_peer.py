"""nginx ``proxy_cache`` as a pull-through registry mirror: the reference peer.

    with NginxPeer(workdir, up.api_url, up.token_realm, ca_cert=up.ca_cert) as peer:
        peer.url      # http://127.0.0.1:PORT, a registry API (docker://127.0.0.1:PORT/...)
        peer.pids()   # master, workers, cache manager: for CPU and memory figures

The peer a team would compare the mirror with (the style of
rpardini/docker-registry-proxy), set up as /shared/FACTS.md describes it,
with Debian's ``/usr/sbin/nginx`` (``apt-get install nginx``):

* ``/token`` is passed to the token service (query, method and body intact);
* ``/v2/`` is passed to the registry, its ``WWW-Authenticate`` challenge
  re-emitted with the realm pointing at this nginx's ``/token`` (a ``map`` on
  ``$upstream_http_www_authenticate``);
* blob GETs (``/v2/<name>/blobs/sha256:<hex>``) go through ``proxy_cache``
  keyed by ``$uri``: on a miss the registry's 307 is intercepted
  (``proxy_intercept_errors`` + ``error_page 307 = @follow``) and followed
  inside nginx without ``Authorization`` (storage services reject it), into
  the same cache under the same key; a hit is served from the cache file with
  ``sendfile`` without asking the registry. ``proxy_cache_lock`` with long
  timeouts: one upstream download per blob, later clients wait for it to
  finish (nginx does not stream an unfinished cache entry to them);
* upstream TLS is verified (``ca_cert``, default: the system's CA bundle): the
  registry, the token service and the CDN the blob redirects name
  (``proxy_ssl_trusted_certificate``, ``proxy_ssl_verify on``,
  ``proxy_ssl_server_name on``). nginx checks a server's name against the
  certificate's DNS names only, which is why the fake Hub's certificate also
  names ``127.0.0.1`` as a DNS name.

Not a model for access control: a cached blob is served to anyone who names
its repository and digest.

Everything nginx writes (config, pid, logs, temp files, cache) lives under
``workdir``. nginx runs in the foreground (``daemon off``) as our child with
PR_SET_PDEATHSIG, so it never outlives the process that started it; ``stop()``
ends it and its workers.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

from tests.support.common import set_pdeathsig

NGINX = "/usr/sbin/nginx"
SYSTEM_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
BLOB_LOCATION = r"^/v2/.+/blobs/sha256:[0-9a-f]{64}$"
URL_QUERY = re.compile(r"(https?://[^\s\"?]+)\?[^\s\"]*")
LOCK_SECONDS = 3600  # a waiting client waits this long for the one download of a blob

CONFIG = """\
# nginx as a pull-through registry mirror; written by bench/nginx_peer.py
daemon off;
master_process on;
worker_processes {workers};
pid {run}/nginx.pid;
error_log {logs}/error.log notice;
{user}
events {{
    worker_connections 1024;
}}

http {{
    log_format peer '$remote_addr "$request_method $uri" $status $body_bytes_sent '
                    'cache=$upstream_cache_status upstream=$upstream_status rt=$request_time';
    access_log {logs}/access.log peer;
    client_body_temp_path {tmp}/client;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;

    proxy_http_version 1.1;
    proxy_read_timeout 300s;
    proxy_ssl_verify on;
    proxy_ssl_server_name on;
    proxy_ssl_trusted_certificate {ca_cert};

    proxy_cache_path {cache} levels=1:2 keys_zone=blobs:16m max_size={cache_max} inactive=7d use_temp_path=off;

    # the registry's challenge, with the realm pointing at our /token
    map $upstream_http_www_authenticate $peer_www_authenticate {{
        '~^(.*realm=")[^"]*(".*)$' '$1$scheme://$http_host/token$2';
        default $upstream_http_www_authenticate;
    }}

    server {{
        listen 127.0.0.1:{port};

        location = /token {{
            proxy_pass {token_url};
        }}

        location /v2/ {{
            proxy_pass {registry};
            proxy_hide_header WWW-Authenticate;
            add_header WWW-Authenticate $peer_www_authenticate always;
        }}

        location ~ "{blob_location}" {{
            proxy_pass {registry};
            proxy_hide_header WWW-Authenticate;
            add_header WWW-Authenticate $peer_www_authenticate always;
            add_header X-Cache-Status $upstream_cache_status always;
            proxy_intercept_errors on;
            error_page 301 302 303 307 308 = @follow;
{cache_directives}
        }}

        # the storage service's signed URL, fetched by nginx itself
        location @follow {{
            set $blob_url $upstream_http_location;
            proxy_pass $blob_url;
            proxy_set_header Authorization "";
            add_header X-Cache-Status $upstream_cache_status always;
{cache_directives}
        }}
    }}
}}
"""

CACHE_DIRECTIVES = f"""\
            proxy_cache blobs;
            proxy_cache_key $uri;
            proxy_cache_valid 200 7d;
            proxy_cache_lock on;
            proxy_cache_lock_timeout {LOCK_SECONDS}s;
            proxy_cache_lock_age {LOCK_SECONDS}s;"""


class NginxError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _origin(url: str) -> str:
    """``scheme://host:port`` of a URL, which must be http(s) with a host."""
    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.netloc:
        raise ValueError(f"not an http(s) URL: {url!r}")
    return f"{u.scheme}://{u.netloc}"


class NginxPeer:
    """One nginx master (plus workers) serving ``registry_url`` through its blob cache.

    ``registry_url``: the registry API (the fake Hub's edge); ``token_realm``:
    its token service URL, as the registry's challenge announces it;
    ``ca_cert``: the CA bundle upstream certificates are verified against.
    """

    def __init__(self, workdir: Path, registry_url: str, token_realm: str, *, ca_cert: Path | None = None,
                 workers: str = "auto", cache_max_bytes: int = 64 << 30) -> None:
        if not os.access(NGINX, os.X_OK):
            raise NginxError(f"{NGINX} not found (apt-get install nginx)")
        self.workdir = Path(workdir).resolve()
        self.registry = _origin(registry_url)
        token = urlsplit(token_realm)
        self.token_url = _origin(token_realm) + (token.path or "/")
        self.ca_cert = Path(ca_cert or SYSTEM_CA_BUNDLE).resolve()
        self.workers = workers
        self.cache_max_bytes = cache_max_bytes
        self.cache_dir = self.workdir / "cache"
        self.conf_path = self.workdir / "nginx.conf"
        self.error_log = self.workdir / "logs" / "error.log"
        self.access_log = self.workdir / "logs" / "access.log"
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> NginxPeer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def config(self) -> str:
        # a root master would run its workers as "nobody", who cannot enter our private workdir
        user = (f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};"
                if os.geteuid() == 0 else "")
        return CONFIG.format(
            workers=self.workers, run=self.workdir, logs=self.workdir / "logs", tmp=self.workdir / "tmp",
            user=user, ca_cert=self.ca_cert, cache=self.cache_dir, cache_max=self.cache_max_bytes,
            port=self.port, token_url=self.token_url, registry=self.registry, blob_location=BLOB_LOCATION,
            cache_directives=CACHE_DIRECTIVES)

    def start(self, timeout: float = 15.0) -> NginxPeer:
        for d in ("logs", "tmp", "cache"):
            (self.workdir / d).mkdir(parents=True, exist_ok=True)
        tries = 3  # the free port may be taken by someone else before nginx binds it
        while True:
            tries -= 1
            self.port = _free_port()
            self.conf_path.write_text(self.config())
            try:
                self._launch(timeout)
                return self
            except NginxError as e:
                if "Address already in use" not in str(e) or not tries:
                    raise
            except BaseException:  # Ctrl-C while starting: no nginx left behind
                self.stop()
                raise

    def _launch(self, timeout: float) -> None:
        with open(self.workdir / "logs" / "stderr.log", "ab") as out:
            self.proc = subprocess.Popen(
                [NGINX, "-p", f"{self.workdir}/", "-e", str(self.error_log), "-c", str(self.conf_path)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, preexec_fn=set_pdeathsig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NginxError(f"nginx exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self._accepts() and self.pids()[1:]:  # listening, and a worker to answer
                return
            time.sleep(0.05)
        self.stop()
        raise NginxError(f"nginx did not start in {timeout}s:\n{self.log_tail()}")

    def _accepts(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def pids(self) -> list[int]:
        """The master, then its children (workers, cache manager and loader)."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except OSError:
            return []
        return [self.proc.pid, *map(int, children)]

    def stop(self, timeout: float = 10.0) -> None:
        """Fast shutdown (SIGTERM: open connections are closed); SIGKILL for all if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        pids = self.pids()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait(5)

    def log_tail(self, chars: int = 3000) -> str:
        """The end of nginx's error log, URL queries (signatures of signed URLs) blanked out."""
        parts = []
        for path in (self.error_log, self.workdir / "logs" / "stderr.log"):
            try:
                parts.append(URL_QUERY.sub(r"\1?...", path.read_text(errors="replace")[-chars:]))
            except FileNotFoundError:
                pass
        return "\n".join(p for p in parts if p.strip()) or "(no nginx output)"
