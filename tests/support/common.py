"""Shared plumbing for the fake Docker Hub processes.

Every server in tests/support runs as its own process (``python -m
tests.support.<module>``).  They share:

* ``write_ready_file``: after binding (port 0 allowed) a server atomically
  writes ``{"port": ..., "pid": ...}`` to a file the orchestrator polls.
* ``JsonLog``: thread-safe JSON-lines access log (append mode, so the
  orchestrator may truncate it at any time).
* ``watch_parent``: the process exits when its parent goes away, so a
  killed pytest never leaves servers running.
* ``sign_cdn_path`` / ``verify_cdn_signature``: the shared-secret URL
  signature used between the edge (which signs) and the CDN (which checks).
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

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


class Server(ThreadingHTTPServer):
    """ThreadingHTTPServer with a deeper accept backlog and daemon threads."""

    request_queue_size = 256
    daemon_threads = True
    allow_reuse_address = True
