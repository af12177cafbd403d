"""Shared plumbing for the fake Docker Hub processes.

Every server in tests/support runs as its own process (``python -m
tests.support.<module>``).  They share:

* ``write_ready_file``: after binding (port 0 allowed) a server atomically
  writes ``{"port": ..., "pid": ...}`` to a file the orchestrator polls.
* ``JsonLog``: thread-safe JSON-lines access log (append mode, so the
  orchestrator may truncate it at any time); ``read_json_lines`` reads one,
  ``read_log`` any process's text log.
* ``watch_parent``: the process exits when its parent goes away, so a
  killed pytest never leaves servers running.
* ``sign_cdn_path`` / ``verify_cdn_signature``: the shared-secret URL
  signature used between the edge (which signs) and the CDN (which checks).
* ``serve`` / ``tls_args``: a threading HTTP server, over TLS when started with
  ``--tls-cert``/``--tls-key`` (as the edge and the token service are, like
  Docker Hub's hosts).
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import json
import os
import select
import socket
import signal
import ssl
import threading
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, quote

# ---------------------------------------------------------------- ready file


def write_ready_file(path: str | os.PathLike, **info: Any) -> None:
    """Atomically write ``info`` (plus our pid) as JSON to ``path``."""
    path = Path(path)
    info.setdefault("pid", os.getpid())
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)


# ---------------------------------------------------------------- logging


class JsonLog:
    """Append one JSON object per line; safe to share between threads.

    The file is opened in O_APPEND mode, so another process truncating it
    (``Upstream.clear_logs``) simply makes the next record start at offset 0.
    """

    def __init__(self, path: str | os.PathLike | None):
        self._lock = threading.Lock()
        self._fh = open(path, "a", buffering=1, encoding="utf-8") if path else None

    def write(self, record: dict[str, Any]) -> None:
        if self._fh is None:
            return
        record = {"ts": round(time.time(), 6), **record}
        line = json.dumps(record, separators=(",", ":"), sort_keys=False)
        with self._lock:
            self._fh.write(line + "\n")
            self._fh.flush()


def read_json_lines(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Parse a JsonLog file; a torn last line (being written) is skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def read_log(path: str | os.PathLike) -> str:
    """A process's text log as written so far ("" before the process made it)."""
    try:
        return Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return ""


def auth_summary(header_value: str | None) -> dict[str, Any]:
    """Describe an Authorization header without ever recording the secret."""
    if header_value is None:
        return {"authorization": False, "auth_scheme": None}
    scheme = header_value.strip().split(" ", 1)[0] if header_value.strip() else ""
    return {"authorization": True, "auth_scheme": scheme}


# ---------------------------------------------------------------- lifetime


_PR_SET_PDEATHSIG = 1


def set_pdeathsig(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies.

    Used as ``preexec_fn`` for children (docker-registry cannot watch its
    parent itself).  Silently does nothing where prctl is unavailable.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except Exception:  # pragma: no cover - non-Linux
        pass


def watch_parent(interval: float = 1.0) -> None:
    """Exit this process as soon as the parent process is gone."""
    parent = os.getppid()

    def loop() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=loop, name="watch-parent", daemon=True).start()


def install_term_handler() -> None:
    """Make SIGTERM exit immediately (daemon threads, open sockets and all)."""
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))


# ---------------------------------------------------------------- signing


def load_secret(path: str | os.PathLike) -> bytes:
    data = Path(path).read_bytes().strip()
    if not data:
        raise SystemExit(f"empty secret file {path}")
    return data


def _cdn_mac(secret: bytes, path: str, expires: int) -> str:
    msg = f"{path}\n{expires}".encode()
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()


def sign_cdn_path(secret: bytes, path: str, ttl: float = 1200, now: float | None = None) -> str:
    """Return ``expires=<unix>&signature=<hex>`` for a CDN path.

    ``path`` is the URL path exactly as it will be requested (still
    percent-encoded, no query).
    """
    now = time.time() if now is None else now
    expires = int(now + ttl)
    return f"expires={expires}&signature={quote(_cdn_mac(secret, path, expires))}"


def verify_cdn_signature(secret: bytes, path: str, expires: str | None, signature: str | None,
                         now: float | None = None) -> str | None:
    """Return None if valid, else a short reason string."""
    if not expires or not signature:
        return "missing signature"
    try:
        exp = int(expires)
    except ValueError:
        return "malformed expires"
    want = _cdn_mac(secret, path, exp)
    if not hmac.compare_digest(want, signature.lower()):
        return "signature mismatch"
    now = time.time() if now is None else now
    if exp < now:
        return "request has expired"
    return None


# ---------------------------------------------------------------- server base

from http.server import ThreadingHTTPServer  # noqa: E402

TLS_HANDSHAKE_TIMEOUT = 30.0


def server_tls_context(cert: str | os.PathLike, key: str | os.PathLike,
                       alpn: tuple[str, ...] = ("http/1.1",)) -> ssl.SSLContext:
    """A server context for our test certificates; ALPN offers ``alpn`` (Docker Hub's
    registry and token hosts: HTTP/1.1 only)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    ctx.set_alpn_protocols(list(alpn))
    return ctx


class Server(ThreadingHTTPServer):
    """ThreadingHTTPServer with a deeper accept backlog and daemon threads.

    With ``tls`` set, every accepted connection is wrapped in TLS; the handshake
    runs in the connection's own thread (not in the accept loop, where one silent
    client would stall everyone), and a failed handshake just closes that connection.
    """

    request_queue_size = 256
    daemon_threads = True
    allow_reuse_address = True
    tls: ssl.SSLContext | None = None

    def get_request(self):
        sock, addr = super().get_request()
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def finish_request(self, request, client_address) -> None:
        if isinstance(request, ssl.SSLSocket):
            try:
                request.settimeout(TLS_HANDSHAKE_TIMEOUT)
                request.do_handshake()
            except (OSError, ValueError):
                return  # shutdown_request closes it
        super().finish_request(request, client_address)


# ---------------------------------------------------------------- fault injection (shared)

_FAULT_OFF = ("none", "off", "clear", "")


class FaultSwitch:
    """One armed fault at a time, switched at runtime through a control endpoint.

    ``params`` names the extra query parameters a server accepts, with their
    converters (e.g. ``{"after": int}``).  ``times`` > 0 counts down and then
    clears itself; ``times=0`` keeps the fault until ``mode=none``.
    """

    def __init__(self, modes: set[str] | frozenset[str], params: dict[str, Callable[[str], Any]] | None = None):
        self.modes = frozenset(modes)
        self.param_types = {"seconds": float, **(params or {})}
        self._lock = threading.Lock()
        self._mode: str | None = None
        self._times = 0
        self._remaining = 0
        self._params: dict[str, Any] = {}
        self._applied = 0  # faults applied since the process started (any mode)

    def configure(self, query: dict[str, str]) -> dict[str, Any]:
        """Apply a control request; raises ValueError on bad input."""
        mode = query.get("mode", "").strip().lower()
        unknown = set(query) - {"mode", "times", *self.param_types}
        if unknown:
            raise ValueError(f"unknown parameter(s): {', '.join(sorted(unknown))}")
        if mode in _FAULT_OFF:
            with self._lock:
                self._mode, self._times, self._remaining, self._params = None, 0, 0, {}
            return self.snapshot()
        if mode not in self.modes:
            raise ValueError(f"unknown mode {mode!r}; expected one of {sorted(self.modes)} or none")
        times = int(query.get("times", "1"))
        if times < 0:
            raise ValueError("times must be >= 0")
        params: dict[str, Any] = {}
        for k, conv in self.param_types.items():
            if query.get(k) not in (None, ""):
                params[k] = conv(query[k])
        with self._lock:
            self._mode, self._times, self._remaining, self._params = mode, times, times, params
        return self.snapshot()

    def take(self, match: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any] | None:
        """Consume one application of the armed fault if ``match(params)``
        allows it; returns ``{"mode": ..., **params}`` or None."""
        with self._lock:
            if self._mode is None or (match is not None and not match(self._params)):
                return None
            fault = {"mode": self._mode, **self._params}
            self._applied += 1
            if self._times:
                self._remaining -= 1
                if self._remaining <= 0:
                    self._mode, self._times, self._remaining, self._params = None, 0, 0, {}
            return fault

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"mode": self._mode or "none", "times": self._times,
                    "remaining": self._remaining if self._times else (None if self._mode else 0),
                    "params": dict(self._params), "applied": self._applied}


def fault_control(switch: FaultSwitch, command: str, query: str) -> tuple[int, dict[str, Any]]:
    """Handle ``GET``/``POST`` on a fault control endpoint -> (status, JSON body)."""
    if command == "GET":
        return 200, switch.snapshot()
    if command != "POST":
        return 405, {"error": "use GET or POST"}
    q = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    try:
        return 200, switch.configure(q)
    except ValueError as exc:
        return 400, {"error": str(exc)}


def is_loopback(host: str) -> bool:
    return host.startswith("127.") or host in ("::1", "::ffff:127.0.0.1")


def hang_until_disconnect(sock: socket.socket, seconds: float | None = None) -> str:
    """Answer nothing until the peer closes the connection or ``seconds``
    (default 60) pass.  Returns "client_disconnected" or "timeout"."""
    deadline = time.monotonic() + (60.0 if seconds is None else seconds)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return "timeout"
        try:
            readable, _, _ = select.select([sock], [], [], min(left, 0.1))
            if readable:
                data = sock.recv(65536)  # EOF, or more (pipelined) data we discard
                if not data:
                    return "client_disconnected"
        except (OSError, ValueError):
            return "client_disconnected"


def add_tls_args(ap) -> None:
    """``--tls-cert``/``--tls-key`` on a server's command line (both, or neither: plain HTTP)."""
    ap.add_argument("--tls-cert", type=Path, help="serve HTTPS with this certificate (PEM)")
    ap.add_argument("--tls-key", type=Path, help="the certificate's private key (PEM)")


def tls_from_args(args) -> ssl.SSLContext | None:
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("--tls-cert and --tls-key go together")
    return server_tls_context(args.tls_cert, args.tls_key) if args.tls_cert else None


def serve(handler: type, host: str, port: int, ready_file: Path | None, url_path: str = "",
          tls: ssl.SSLContext | None = None) -> None:
    """Run a test server until terminated (over TLS with ``tls``), announcing its port in ready_file."""
    httpd = Server((host, port), handler)
    httpd.tls = tls
    port = httpd.server_address[1]
    if ready_file:
        scheme = "https" if tls else "http"
        write_ready_file(ready_file, port=port, url=f"{scheme}://{host}:{port}{url_path}")
    httpd.serve_forever(poll_interval=0.5)
