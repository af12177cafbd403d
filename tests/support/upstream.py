"""Orchestrates the fake Docker Hub: token server, CDN, distribution, edge.

    from tests.support.upstream import Upstream
    with Upstream(Path("/tmp/hub")) as up:
        up.api_url        # "registry-1.docker.io" (https://127.0.0.1:PORT): point the mirror here
        up.registry_url   # distribution directly (plain HTTP on loopback: pushes)
        up.ca_cert        # the CA to trust: the mirror's ssl_verify_upstream_trusted_ca, curl --cacert
        up.verify         # the same as an ssl.SSLContext, for httpx (verify=up.verify)
        up.cert_dir       # a directory holding only ca.crt (skopeo --src-cert-dir)
        ...

Transport, as Docker Hub's: the edge, the token service and the CDN speak HTTPS
only, with certificates for 127.0.0.1/localhost from a CA of the test session
(``ca=``, a ``tests.support.certs.TestCA``; by default one of the Upstream's own);
the edge and the token service offer HTTP/1.1 by ALPN, the CDN (nginx in front of
the Python CDN, tests/support/cdn_front.py) HTTP/2 and HTTP/1.1. Distribution
behind the edge stays plain HTTP on loopback, like Docker Hub's internal network.
``tls=False`` gives the plain-HTTP shape (some registries and in-house mirrors).

``rtt_ms=50`` puts a delaying relay (tests/support/latency_relay.py) in front of
the edge, the token service and the CDN, and every URL a client learns (the API
URL, the realm in the challenge, the CDN redirect base) points at a relay; the
services' own URLs stay reachable without delay (``service_url``). ``rtt_ms=0``
relays without delay (for counting connections). ``up.relay_records()`` reads
what the relays logged.

Misbehaving on purpose (see the servers' docstrings for details)::

    up.set_cdn_fault("cut", after=1000)           # next blob GET truncated after 1000 bytes
    up.set_cdn_fault("cutat", times=0, at="0.1,0.5,0.99")  # every blob cut once at 10%, 50%, 99%
    up.set_cdn_fault("corrupt", times=2)          # next 2 blob GETs: one byte flipped
    up.set_edge_fault("status429", path_contains="/manifests/")
    up.set_token_fault("hang", times=0)           # every /token request hangs until cleared
    up.clear_faults()
    up.stop_service("registry"); ...; up.start_service("registry")   # same port
    with up.service_stopped("cdn"): ...

Can also be run by hand:  python -m tests.support.upstream WORKDIR
(prints the URLs and users as JSON, then runs until interrupted).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlencode, urlsplit

import httpx

from tests.support.auth import basic
from tests.support.cdn_front import CdnFront
from tests.support.certs import TestCA
from tests.support.common import read_json_lines, set_pdeathsig, sign_cdn_path
from tests.support.ports import free_port
from tests.support.token_server import DEFAULT_ACL, DEFAULT_ISSUER, DEFAULT_SERVICE, ensure_signing_cert

REPO_ROOT = Path(__file__).resolve().parents[2]
REGISTRY_BIN = "/usr/bin/docker-registry"
SERVICES = ("token", "cdn", "registry", "edge")
RELAYED = ("token", "cdn", "edge")  # the hosts Docker Hub sends a client to


class UpstreamError(RuntimeError):
    pass


def _processes_of(service: str) -> tuple[str, ...]:
    """The processes a service is made of: the CDN is nginx in front of the Python CDN."""
    return ("cdn-front", "cdn") if service == "cdn" else (service,)


def _base(url: str) -> str:
    u = urlsplit(url)
    return f"{u.scheme}://{u.netloc}"


def _tail(path: Path, lines: int = 40) -> str:
    try:
        data = path.read_bytes()[-16384:].decode("utf-8", "replace")
    except FileNotFoundError:
        return "(no log file)"
    return "\n".join(data.splitlines()[-lines:]) or "(empty log)"


class _Proc:
    """One child process with its stdout/stderr going to a log file."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str], pdeathsig: bool = False):
        self.name, self.argv, self.log_path = name, argv, log_path
        self._log = open(log_path, "ab")
        self.popen = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            cwd=str(REPO_ROOT), env=env, preexec_fn=set_pdeathsig if pdeathsig else None, close_fds=True)

    def check_alive(self) -> None:
        rc = self.popen.poll()
        if rc is not None:
            raise UpstreamError(f"{self.name} exited with code {rc} during startup; "
                                f"command: {' '.join(self.argv)}\n--- {self.log_path} (tail) ---\n"
                                f"{_tail(self.log_path)}")

    def stop(self, timeout: float = 5.0) -> None:
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(signal.SIGTERM)
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)
            except ProcessLookupError:
                pass
        self._log.close()


class _NginxProc:
    """The CDN's nginx front, looked after like a _Proc."""

    def __init__(self, name: str, front: CdnFront):
        self.name, self.front = name, front
        self.argv = ["nginx", "-c", str(front.workdir / "nginx.conf")]
        self.log_path = front.workdir / "logs" / "error.log"
        front.start()
        self.popen = front.proc

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise UpstreamError(f"{self.name} exited with code {self.popen.returncode}\n{self.front.log_tail()}")

    def stop(self, timeout: float = 5.0) -> None:
        self.front.stop()


def _stop_all(procs: list[_Proc]) -> None:
    for p in reversed(procs):
        try:
            p.stop()
        except Exception:
            pass
    procs.clear()


class Upstream:
    """The whole fake Docker Hub, as four local processes.

    ``users``: name -> password.  Default: ``alice`` and ``admin`` with random
    passwords.  An ``admin`` user is always needed by the push helpers (give
    it explicitly, or a random one is added).  ``acl``: token-server rules
    (see token_server.py); default: anonymous pulls everything except
    ``private/*``, alice pulls everything, admin may do anything.

    Children never outlive us: ``stop()``, a finalizer at exit, the Python
    servers watch their parent pid, and docker-registry gets PR_SET_PDEATHSIG
    (``die_with_parent``).  Linux sends that signal when the *thread* that
    started it exits, so call ``start()`` from a thread that lives as long as
    the Upstream (the main thread normally) or pass ``die_with_parent=False``.
    """

    def __init__(self, workdir: Path | str, users: dict[str, str] | None = None, *,
                 acl: list[dict[str, Any]] | None = None, service: str = DEFAULT_SERVICE,
                 issuer: str = DEFAULT_ISSUER, token_expires_in: int = 300, cdn_sign_ttl: float = 1200,
                 ratelimit: int = 100, enforce_ratelimit: bool = False, registry_log_level: str = "info",
                 startup_timeout: float = 30.0, die_with_parent: bool = True, tls: bool = True,
                 ca: TestCA | None = None, rtt_ms: float | None = None):
        self.workdir = Path(workdir).resolve()
        self.tls, self.rtt_ms = tls, rtt_ms
        self.ca: TestCA | None = (ca or TestCA(self.workdir / "ca")) if tls else None
        self.users: dict[str, str] = dict(users) if users is not None else {
            "alice": secrets.token_urlsafe(12), "admin": secrets.token_urlsafe(12)}
        self.users.setdefault("admin", secrets.token_urlsafe(12))
        self.acl = acl if acl is not None else DEFAULT_ACL
        self.service, self.issuer = service, issuer
        self.token_expires_in, self.cdn_sign_ttl = token_expires_in, cdn_sign_ttl
        self.ratelimit, self.enforce_ratelimit = ratelimit, enforce_ratelimit
        self.registry_log_level = registry_log_level
        self.startup_timeout = startup_timeout
        self.die_with_parent = die_with_parent

        self.storage_root = self.workdir / "storage"
        self.logs_dir = self.workdir / "logs"
        self.run_dir = self.workdir / "run"
        self.cdn_log_path = self.logs_dir / "cdn.jsonl"
        self.token_log_path = self.logs_dir / "token.jsonl"
        self.edge_log_path = self.logs_dir / "edge.jsonl"
        self.registry_log_path = self.logs_dir / "registry.log"

        self.api_url = self.registry_url = self.token_realm = self.cdn_url = ""
        self._direct: dict[str, str] = {}  # service -> its own base URL (no relay)
        self._cdn_backend_port = 0
        self._verify: Any = None
        self._procs: list[_Proc] = []
        self._spawn_args: dict[str, tuple[str, list[str]]] = {}  # python service -> (module, args)
        self._stopped: set[str] = set()  # services taken down by stop_service()
        self._secret = b""
        # runs at garbage collection or, at the latest, at interpreter exit
        self._finalizer = weakref.finalize(self, _stop_all, self._procs)

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> "Upstream":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def service_pids(self, name: str) -> list[int]:
        """The pids of a service's running processes (the CDN: its nginx front's master and the
        Python CDN; their children not included)."""
        names = _processes_of(name)
        return [p.popen.pid for p in self._procs if p.name in names and p.popen.poll() is None]

    @property
    def running(self) -> bool:
        return bool(self._procs) and not self._stopped and all(p.popen.poll() is None for p in self._procs)

    def start(self) -> "Upstream":
        if self._procs:
            raise UpstreamError("already started")
        if not os.path.exists(REGISTRY_BIN):
            raise UpstreamError(f"{REGISTRY_BIN} not found (apt-get install docker-registry)")
        for d in (self.storage_root, self.logs_dir, self.run_dir):
            d.mkdir(parents=True, exist_ok=True)
        for ready in self.run_dir.glob("*.ready"):
            ready.unlink()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _spawn_py(self, name: str, module: str, args: list[str]) -> dict[str, Any]:
        self._spawn_args[name] = (module, list(args))
        ready = self.run_dir / f"{name}.ready"
        ready.unlink(missing_ok=True)
        argv = [sys.executable, "-m", f"tests.support.{module}", *args, "--ready-file", str(ready)]
        proc = _Proc(name, argv, self.logs_dir / f"{name}.stderr.log", self._env())
        self._procs.append(proc)
        deadline = time.monotonic() + self.startup_timeout
        while not ready.exists():
            proc.check_alive()
            if time.monotonic() > deadline:
                raise UpstreamError(f"{name} not ready after {self.startup_timeout}s\n"
                                    f"--- {proc.log_path} (tail) ---\n{_tail(proc.log_path)}")
            time.sleep(0.05)
        return json.loads(ready.read_text())

    def _start(self) -> None:
        env = self._env()
        key, cert = self.run_dir / "token.key", self.run_dir / "token.crt"
        ensure_signing_cert(key, cert)
        self.token_cert_path = cert
        secret_file = self.run_dir / "cdn.secret"
        if not secret_file.exists():
            secret_file.write_text(secrets.token_hex(32))
            os.chmod(secret_file, 0o600)
        self._secret = secret_file.read_bytes().strip()
        users_file = self.run_dir / "users.json"
        users_file.write_text(json.dumps({"users": self.users, "acl": self.acl}))
        os.chmod(users_file, 0o600)
        tls_args: list[str] = []
        if self.ca is not None:
            # "127.0.0.1" as a DNS name too: nginx (the benchmarks' reference peer) checks a server's
            # name with X509_check_host, which never looks at IP address entries
            self._tls_files = self.ca.issue(self.run_dir / "tls", "upstream", hosts=("localhost", "127.0.0.1"),
                                            ips=("127.0.0.1",))
            tls_args = ["--tls-cert", str(self._tls_files["cert"]), "--tls-key", str(self._tls_files["key"])]

        # 1. token server
        info = self._spawn_py("token", "token_server", [
            "--key", str(key), "--cert", str(cert), "--config", str(users_file),
            "--service", self.service, "--issuer", self.issuer,
            "--expires-in", str(self.token_expires_in), "--log", str(self.token_log_path), *tls_args])
        self._direct["token"] = _base(info["url"])
        self.token_realm = self._public("token") + "/token"

        # 2. CDN: the Python CDN, behind nginx for TLS (h2 and http/1.1)
        info = self._spawn_py("cdn", "cdn_server", [
            "--root", str(self.storage_root), "--secret-file", str(secret_file), "--log", str(self.cdn_log_path)])
        self._cdn_backend_port = info["port"]
        if self.ca is not None:
            self._start_cdn_front(free_port())
        else:
            self._direct["cdn"] = _base(info["url"])
        self.cdn_url = self._public("cdn")

        # 3. distribution (port chosen here; retried if somebody grabbed it)
        last_err: Exception | None = None
        for _ in range(3):
            port = free_port()
            try:
                self._start_registry(port, cert, env)
                break
            except UpstreamError as exc:
                last_err = exc
                if "address already in use" not in str(exc):
                    raise
        else:
            raise last_err  # type: ignore[misc]

        # 4. edge
        info = self._spawn_py("edge", "edge", [
            "--upstream", self.registry_url, "--cdn-base", self.cdn_url, "--secret-file", str(secret_file),
            "--sign-ttl", str(self.cdn_sign_ttl), "--ratelimit", str(self.ratelimit),
            *(["--enforce-ratelimit"] if self.enforce_ratelimit else []), "--log", str(self.edge_log_path),
            *tls_args])
        self._direct["edge"] = _base(info["url"])
        self.api_url = self._public("edge")
        self._wait_http(self.api_url + "/v2/", 401, "edge")

    def _start_cdn_front(self, port: int) -> None:
        front = CdnFront(self.run_dir / "cdn-front", port, self._cdn_backend_port,
                         self._tls_files["cert"], self._tls_files["key"])
        self._procs.append(_NginxProc("cdn-front", front))
        self._direct["cdn"] = f"https://127.0.0.1:{port}"

    def _public(self, name: str) -> str:
        """The base URL clients are told for a service: a relay's, with ``rtt_ms``."""
        if self.rtt_ms is None:
            return self._direct[name]
        target = urlsplit(self._direct[name]).netloc
        info = self._spawn_py(f"relay-{name}", "latency_relay", [
            "--target", target, "--rtt-ms", str(self.rtt_ms), "--log", str(self.relay_log_path(name))])
        return f"{urlsplit(self._direct[name]).scheme}://127.0.0.1:{info['port']}"

    def relay_log_path(self, name: str) -> Path:
        return self.logs_dir / f"relay-{name}.jsonl"

    def relay_records(self) -> dict[str, list[dict[str, Any]]]:
        """What each relay logged (one record per ended connection), by service; {} without relays."""
        if self.rtt_ms is None:
            return {}
        return {name: read_json_lines(self.relay_log_path(name)) for name in RELAYED}

    def _start_registry(self, port: int, cert: Path, env: dict[str, str]) -> None:
        config = {
            "version": 0.1,
            "log": {"level": self.registry_log_level, "formatter": "text",
                    "fields": {"service": "registry"}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_root)},
                "delete": {"enabled": True},
                "redirect": {"disable": False},
                "cache": {"blobdescriptor": "inmemory"},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": f"127.0.0.1:{port}", "secret": secrets.token_hex(16),
                     "headers": {"X-Content-Type-Options": ["nosniff"]}},
            "auth": {"token": {"realm": self.token_realm, "service": self.service, "issuer": self.issuer,
                               "rootcertbundle": str(cert)}},
            "middleware": {"storage": [{"name": "redirect", "options": {"baseurl": self.cdn_url}}]},
            "health": {"storagedriver": {"enabled": False}},
        }
        cfg_path = self.run_dir / "registry.yml"
        cfg_path.write_text(json.dumps(config, indent=2))  # JSON is valid YAML
        self.registry_url = self._direct["registry"] = f"http://127.0.0.1:{port}"
        self._launch_registry(cfg_path, env)

    def _launch_registry(self, cfg_path: Path, env: dict[str, str]) -> None:
        """Run docker-registry with this config until it answers /v2/ (401: token auth)."""
        proc = _Proc("registry", [REGISTRY_BIN, "serve", str(cfg_path)], self.registry_log_path, env,
                     pdeathsig=self.die_with_parent)
        self._procs.append(proc)
        try:
            self._wait_http(self.registry_url + "/v2/", 401, "registry", proc)
        except UpstreamError:
            proc.stop()
            self._procs.remove(proc)
            raise

    def _wait_http(self, url: str, status: int, name: str, proc: _Proc | None = None) -> None:
        deadline = time.monotonic() + self.startup_timeout
        last = "no answer"
        while time.monotonic() < deadline:
            for p in ([proc] if proc else self._procs):
                p.check_alive()
            try:
                r = httpx.get(url, timeout=2, verify=self.verify)
                if r.status_code == status:
                    return
                last = f"HTTP {r.status_code}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.05)
        log = proc.log_path if proc else self.logs_dir
        raise UpstreamError(f"{name} at {url} not ready after {self.startup_timeout}s (last: {last})\n"
                            f"--- {log} (tail) ---\n{_tail(log) if proc else ''}")

    def stop(self) -> None:
        _stop_all(self._procs)
        self._stopped.clear()

    # ------------------------------------------------------------ one service down / up

    def _proc(self, name: str) -> _Proc | None:
        for p in self._procs:
            if p.name == name:
                return p
        return None

    def service_url(self, name: str) -> str:
        """Base URL (``https://127.0.0.1:PORT``) of one service itself, never a relay."""
        return self._direct[name]

    def stop_service(self, name: str) -> None:
        """Take one of "edge", "cdn", "token", "registry" down (its port then
        refuses connections; through a relay, connections are closed at once).
        Idempotent.  Its armed faults are lost."""
        if name not in SERVICES:
            raise ValueError(f"unknown service {name!r}; expected one of {SERVICES}")
        if not self._procs:
            raise UpstreamError("upstream not started")
        for proc_name in _processes_of(name):
            proc = self._proc(proc_name)
            if proc is not None:
                proc.stop()
                self._procs.remove(proc)
        self._stopped.add(name)

    def start_service(self, name: str, timeout: float = 10.0) -> None:
        """Bring a service stopped by ``stop_service`` back on the SAME port
        (same URL, same storage/keys/config; in-memory state such as the
        edge's rate-limit counter, refresh tokens and faults starts fresh).
        Retries for ``timeout`` seconds if the port is still busy."""
        if name not in SERVICES:
            raise ValueError(f"unknown service {name!r}; expected one of {SERVICES}")
        if self._proc(name) is not None:
            return  # running already
        if name not in self._stopped:
            raise UpstreamError("upstream not started")
        port = self._cdn_backend_port if name == "cdn" else urlsplit(self.service_url(name)).port
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._restart(name, port)
                break
            except UpstreamError as exc:
                for proc_name in _processes_of(name):
                    proc = self._proc(proc_name)
                    if proc is not None:
                        proc.stop()
                        self._procs.remove(proc)
                if "address already in use" not in str(exc).lower() or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self._stopped.discard(name)

    def _restart(self, name: str, port: int) -> None:
        if name == "registry":
            self._launch_registry(self.run_dir / "registry.yml", self._env())
            return
        module, args = self._spawn_args[name]
        info = self._spawn_py(name, module, [*args, "--port", str(port)])
        if info["port"] != port:  # cannot happen: --port is explicit
            raise UpstreamError(f"{name} came back on port {info['port']}, not {port}")
        if name == "cdn" and self.ca is not None:
            try:
                self._start_cdn_front(urlsplit(self.service_url("cdn")).port)
            except Exception as exc:  # nginx's "Address already in use" is in its log
                raise UpstreamError(str(exc)) from exc

    def restart_service(self, name: str) -> None:
        self.stop_service(name)
        self.start_service(name)

    @contextmanager
    def service_stopped(self, name: str) -> Iterator[None]:
        """``with up.service_stopped("registry"): ...`` -- down inside, back up after."""
        self.stop_service(name)
        try:
            yield
        finally:
            self.start_service(name)

    # ------------------------------------------------------------ convenience

    @property
    def ca_cert(self) -> Path | None:
        """The CA certificate (PEM) the services' certificates come from; None for plain HTTP."""
        return self.ca.cert_path if self.ca else None

    @property
    def cert_dir(self) -> Path | None:
        """A directory with only ``ca.crt`` in it (skopeo ``--src-cert-dir``, docker ``certs.d``)."""
        return self.ca.directory if self.ca else None

    @property
    def verify(self) -> Any:
        """``verify=`` for httpx: an SSLContext trusting only the test CA (True for plain HTTP)."""
        if self._verify is None:
            self._verify = self.ca.client_context() if self.ca else True
        return self._verify

    def http(self, **kw: Any) -> httpx.Client:
        """An httpx client that trusts the upstream's CA."""
        return httpx.Client(verify=self.verify, **kw)

    def skopeo_tls_args(self, direction: str = "src") -> list[str]:
        """skopeo's options for talking to this upstream directly (``--src-cert-dir DIR``, or
        ``--src-tls-verify=false`` for plain HTTP); ``direction`` is "src", "dest" or "" (inspect)."""
        prefix = f"--{direction}-" if direction else "--"
        if self.ca is None:
            return [f"{prefix}tls-verify=false"]
        return [f"{prefix}cert-dir", str(self.cert_dir)]

    @property
    def api_host(self) -> str:
        """``127.0.0.1:<port>`` of the edge (for ``docker://HOST/...`` refs)."""
        return urlsplit(self.api_url).netloc

    @property
    def registry_host(self) -> str:
        return urlsplit(self.registry_url).netloc

    def sign_cdn_url(self, path: str, ttl: float | None = None) -> str:
        """A signed CDN URL for a storage path (``/docker/registry/v2/...``)."""
        return f"{self.cdn_url}{path}?{sign_cdn_path(self._secret, path, self.cdn_sign_ttl if ttl is None else ttl)}"

    @staticmethod
    def blob_storage_path(digest: str) -> str:
        algo, hexd = digest.split(":", 1)
        return f"/docker/registry/v2/blobs/{algo}/{hexd[:2]}/{hexd}/data"

    def get_token(self, scopes: list[str] | str = (), user: str | None = None, *,
                  service: str | None = None) -> str:
        """A bearer token from the token server (``user`` None = anonymous)."""
        if isinstance(scopes, str):
            scopes = [scopes]
        params = [("service", service or self.service)] + [("scope", s) for s in scopes]
        auth = (user, self.users[user]) if user else None
        r = httpx.get(f"{self.token_realm}?{urlencode(params)}", auth=auth, timeout=10, verify=self.verify)
        r.raise_for_status()
        return r.json()["token"]

    def basic_auth_header(self, user: str) -> str:
        return basic(user, self.users[user])

    # ------------------------------------------------------------ logs

    def _read_log(self, path: Path, min_count: int, timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            recs = read_json_lines(path)
            if len(recs) >= min_count or time.monotonic() >= deadline:
                return recs
            time.sleep(0.02)

    def cdn_requests(self, min_count: int = 0, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Parsed CDN access log.  CDN records are written *after* the body was
        sent, so pass ``min_count`` to wait (up to ``timeout``) for them."""
        return self._read_log(self.cdn_log_path, min_count, timeout)

    def cdn_gets(self, digest: str) -> int:
        """How many GETs of this blob the CDN has answered so far."""
        return len([r for r in self.cdn_requests() if digest[7:] in r.get("path", "") and r.get("method") == "GET"])

    def token_requests(self, min_count: int = 0, timeout: float = 5.0) -> list[dict[str, Any]]:
        return self._read_log(self.token_log_path, min_count, timeout)

    def edge_requests(self, min_count: int = 0, timeout: float = 5.0) -> list[dict[str, Any]]:
        return self._read_log(self.edge_log_path, min_count, timeout)

    def clear_logs(self) -> None:
        for p in (self.cdn_log_path, self.token_log_path, self.edge_log_path,
                  *(self.relay_log_path(n) for n in RELAYED)):
            if p.exists():
                with open(p, "r+b") as f:
                    f.truncate(0)

    # ------------------------------------------------------------ rate limit

    def set_ratelimit(self, remaining: int, *, limit: int | None = None, enforce: bool | None = None) -> dict:
        params: dict[str, Any] = {"remaining": remaining}
        if limit is not None:
            params["limit"] = limit
        if enforce is not None:
            params["enforce"] = int(enforce)
        r = httpx.post(f"{self.service_url('edge')}/_edge/ratelimit", params=params, timeout=5, verify=self.verify)
        r.raise_for_status()
        return r.json()

    def get_ratelimit(self) -> dict:
        r = httpx.get(f"{self.service_url('edge')}/_edge/ratelimit", timeout=5, verify=self.verify)
        r.raise_for_status()
        return r.json()

    # ------------------------------------------------------------ fault injection

    def _fault_post(self, service: str, path: str, mode: str, times: int, **params: Any) -> dict:
        q: dict[str, Any] = {"mode": mode, "times": times}
        q.update({k: v for k, v in params.items() if v is not None})
        r = httpx.post(self._control_url(service) + path, params=q, timeout=5, verify=self.verify)
        if r.status_code != 200:
            raise UpstreamError(f"{service} fault control {q}: HTTP {r.status_code} {r.text}")
        return r.json()

    def _control_url(self, service: str) -> str:
        """Where a service's control endpoint is asked: the Python CDN itself, not its nginx front."""
        return f"http://127.0.0.1:{self._cdn_backend_port}" if service == "cdn" else self.service_url(service)

    def set_cdn_fault(self, mode: str, times: int = 1, after: int | None = None,
                      seconds: float | None = None, at: str | None = None) -> dict:
        """Next ``times`` (0 = until cleared) CDN blob GETs misbehave.  ``mode``:
        "cut" (full Content-Length, only ``after`` bytes, then close), "cutat"
        (every blob cut once at each fraction of ``at``, e.g. "0.1,0.5,0.99",
        of the whole blob, ``seconds`` of silence before the close; use times=0),
        "cutrefuse" (cut as "cut"; every resume, a GET with Range, answered 503; use times=0),
        "corrupt" (one byte, at body offset ``after`` or the middle, inverted),
        "status403" (S3 "Request has expired"), "hang" (no answer until the
        client leaves or ``seconds``, default 60), "none".  Returns the state."""
        return self._fault_post("cdn", "/_cdn/fault", mode, times, after=after, seconds=seconds, at=at)

    def set_edge_fault(self, mode: str, times: int = 1, path_contains: str | None = None,
                       method: str | None = None, seconds: float | None = None) -> dict:
        """Next ``times`` (0 = until cleared) edge requests whose path+query
        contains ``path_contains`` (and with ``method``, if given) get
        "status500" (UNKNOWN), "status503" (UNAVAILABLE), "status429" (TOOMANYREQUESTS, Retry-After: 7),
        "hang" or "close" instead of being proxied; "none" clears."""
        return self._fault_post("edge", "/_edge/fault", mode, times, path_contains=path_contains,
                                method=method, seconds=seconds)

    def set_token_fault(self, mode: str, times: int = 1, seconds: float | None = None) -> dict:
        """Next ``times`` (0 = until cleared) ``/token`` requests get "status500",
        "hang" or "close"; "none" clears."""
        return self._fault_post("token", "/_token/fault", mode, times, seconds=seconds)

    def faults(self) -> dict[str, dict]:
        """Current fault state of each running Python service."""
        out = {}
        for name, path in (("cdn", "/_cdn/fault"), ("edge", "/_edge/fault"), ("token", "/_token/fault")):
            if name not in self._stopped:
                r = httpx.get(self._control_url(name) + path, timeout=5, verify=self.verify)
                r.raise_for_status()
                out[name] = r.json()
        return out

    def clear_faults(self) -> None:
        """Disarm every fault (services that are stopped are skipped)."""
        for name, path in (("cdn", "/_cdn/fault"), ("edge", "/_edge/fault"), ("token", "/_token/fault")):
            if name not in self._stopped:
                self._fault_post(name, path, "none", 0)

    def describe(self) -> dict[str, Any]:
        return {"api_url": self.api_url, "registry_url": self.registry_url, "token_realm": self.token_realm,
                "service": self.service, "cdn_url": self.cdn_url, "storage_root": str(self.storage_root),
                "ca_cert": str(self.ca_cert) if self.ca_cert else None, "rtt_ms": self.rtt_ms,
                "logs": str(self.logs_dir), "users": sorted(self.users)}


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="run the fake Docker Hub until interrupted")
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--push-standard", action="store_true", help="push the standard image set")
    ap.add_argument("--big-size", type=int, default=256 << 20)
    ap.add_argument("--print-passwords", action="store_true")
    ap.add_argument("--plain", action="store_true", help="plain HTTP instead of HTTPS")
    ap.add_argument("--rtt-ms", type=float, help="put relays adding this round-trip time in front")
    args = ap.parse_args(argv)
    with Upstream(args.workdir, tls=not args.plain, rtt_ms=args.rtt_ms) as up:
        if args.push_standard:
            from tests.support.images import standard_images
            standard_images(up, big_size=args.big_size)
        info = up.describe()
        if args.print_passwords:
            info["users"] = up.users
        print(json.dumps(info, indent=2), flush=True)
        sigs = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
        signal.sigwait(sigs)


if __name__ == "__main__":
    main()
