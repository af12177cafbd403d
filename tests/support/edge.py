"""The "registry-1.docker.io" edge: a transparent reverse proxy to distribution.

Run:  python -m tests.support.edge --upstream http://127.0.0.1:REG --cdn-base http://127.0.0.1:CDN \
          --secret-file F --ready-file R [--port 0] [--log L] [--sign-ttl 1200] [--ratelimit 100] \
          [--tls-cert CRT --tls-key KEY]

With ``--tls-cert``/``--tls-key`` it serves HTTPS only (HTTP/1.1 by ALPN), as
registry-1.docker.io does; distribution behind it stays plain HTTP on loopback,
like Docker Hub's internal network.

Every request is forwarded intact (method, path+query, all end-to-end headers
in order, repeated ones included, Host too, body streamed) over a keep-alive
connection per client connection, and the response comes back intact (status,
reason, all headers, body with Content-Length or re-chunked).  Hop-by-hop
headers (Connection, Keep-Alive, TE, Trailer, Transfer-Encoding, Upgrade,
Proxy-Connection, Expect) are not forwarded, as RFC 9110 requires.

The only changes:

* over TLS, ``X-Forwarded-Proto: https`` is set (as a TLS-terminating front
  does), so distribution's absolute URLs (upload ``Location``) say https.

* 3xx whose ``Location`` starts with ``--cdn-base``: the CDN signature query
  (``expires=&signature=``) is appended, like Docker Hub's signed blob URLs.
* ``/v2/<name>/manifests/<ref>`` GET/HEAD answers (except 401) get Docker
  Hub's rate-limit headers ``ratelimit-limit: 100;w=21600``,
  ``ratelimit-remaining: N;w=21600``, ``docker-ratelimit-source`` (like Docker
  Hub: whom the pull counts for, the account of a token issued to one, else the
  client's address).  Each
  successful manifest GET (not HEAD) decrements N.  With enforcement on
  (``--enforce-ratelimit`` or the control endpoint), a manifest GET when N is
  0 gets Docker Hub's 429 TOOMANYREQUESTS instead.

Control endpoints (not part of Docker Hub; faults for loopback clients only):

* ``POST /_edge/ratelimit?remaining=N[&limit=N][&enforce=0|1]`` resets the
  counter; ``GET /_edge/ratelimit`` reads it.
* ``POST /_edge/fault?mode=M[&times=N][&path_contains=S][&method=GET][&seconds=S]``
  makes the next ``N`` (default 1; 0 = until cleared) proxied requests whose
  path+query contains ``S`` (and whose method is ``method``, if given) fail
  instead of being forwarded; ``mode=none`` clears, ``GET /_edge/fault`` reads
  the state.  Modes: ``status500`` (500, registry error ``UNKNOWN``), ``status503``
  (503, ``UNAVAILABLE``, as a registry behind a load balancer with no backend),
  ``status429`` (429, ``Retry-After: 7``, ``TOOMANYREQUESTS``), ``hang`` (no
  answer until the client goes away or ``seconds``, default 60, pass; other
  connections unaffected), ``close`` (connection closed without an answer).
  The log record of a faulted request has ``"fault": "<mode>"``.

One JSON line per request goes to ``--log`` before the response is sent:
method, path, query_keys, status, authorization/auth_scheme (never the
credential), accept (list of Accept values), host, ratelimit_remaining (manifest
requests), signed_redirect (bool), upstream_ms.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import http.client
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs, urlsplit

from tests.support.common import (FaultSwitch, JsonLog, add_tls_args, auth_summary, fault_control,
                                  hang_until_disconnect, install_term_handler, is_loopback, load_secret, serve,
                                  sign_cdn_path, tls_from_args, watch_parent)

EDGE_FAULT_MODES = frozenset({"status500", "status503", "status429", "hang", "close"})
TOOMANYREQUESTS_MESSAGE = ("You have reached your pull rate limit. You may increase the limit by "
                           "authenticating and upgrading: https://www.docker.com/increase-rate-limit")

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
              "upgrade", "expect"}
MANIFEST_RE = re.compile(r"^/v2/(.+)/manifests/([^/]+)$")
BUFFER_LIMIT = 16 << 20  # request bodies up to this are buffered (and retryable)
CHUNK = 256 << 10


class RateLimit:
    def __init__(self, limit: int, window: int, enforce: bool):
        self.limit, self.window, self.enforce = limit, window, enforce
        self.remaining = limit
        self.lock = threading.Lock()

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {"limit": self.limit, "remaining": self.remaining, "window": self.window,
                    "enforce": self.enforce}


class UpstreamError(Exception):
    pass


def _token_account(authorization: str | None) -> str:
    """The account a bearer token was issued to (its ``sub``), '' for anonymous ones.
    Read, not verified: distribution behind the edge verifies it."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or token.count(".") != 2:
        return ""
    payload = token.split(".")[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (binascii.Error, ValueError):
        return ""
    sub = claims.get("sub") if isinstance(claims, dict) else None
    return sub if isinstance(sub, str) else ""


def _iter_chunked(rfile) -> Iterator[bytes]:
    """Decode a chunked request body from the client."""
    while True:
        line = rfile.readline(65537)
        if not line:
            raise UpstreamError("client closed connection inside chunked body")
        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while True:  # trailers
                t = rfile.readline(65537)
                if t in (b"\r\n", b"\n", b""):
                    return
        remaining = size
        while remaining:
            data = rfile.read(min(remaining, CHUNK))
            if not data:
                raise UpstreamError("client closed connection inside chunk")
            remaining -= len(data)
            yield data
        rfile.readline(3)


def _iter_exact(rfile, length: int) -> Iterator[bytes]:
    remaining = length
    while remaining:
        data = rfile.read(min(remaining, CHUNK))
        if not data:
            raise UpstreamError("client closed connection inside body")
        remaining -= len(data)
        yield data


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # TCP_NODELAY, as Docker Hub's servers and CDNs have it: with Nagle on, a body written
    # after its headers waits for a keep-alive client's delayed ACK (40 ms per answer)
    disable_nagle_algorithm = True
    server_version = "fake-registry-edge"
    timeout = 300
    upstream_host: str
    upstream_port: int
    cdn_base: str
    secret: bytes
    sign_ttl: float
    rl: RateLimit
    jlog: JsonLog
    faults: FaultSwitch
    tls: bool = False

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self._up: http.client.HTTPConnection | None = None

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            if self._up is not None:
                self._up.close()

    # ------------------------------------------------------------ upstream

    def _conn(self) -> http.client.HTTPConnection:
        if self._up is None:
            self._up = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=120)
        return self._up

    def _drop_conn(self) -> None:
        if self._up is not None:
            self._up.close()
            self._up = None

    def _send_upstream(self, headers: list[tuple[str, str]], body: bytes | Iterator[bytes] | None,
                       chunked: bool) -> http.client.HTTPResponse:
        conn = self._conn()
        conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        for k, v in headers:
            conn.putheader(k, v)
        if chunked:
            conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        if isinstance(body, bytes):
            if body:
                conn.send(body)
        elif body is not None:
            for piece in body:
                if chunked:
                    conn.send(b"%x\r\n" % len(piece) + piece + b"\r\n")
                else:
                    conn.send(piece)
            if chunked:
                conn.send(b"0\r\n\r\n")
        return conn.getresponse()

    # ------------------------------------------------------------ main

    def _proxy(self) -> None:
        t0 = time.monotonic()
        url = urlsplit(self.path)
        rec: dict[str, Any] = {
            "method": self.command,
            "path": url.path,
            "query_keys": sorted(parse_qs(url.query, keep_blank_values=True)),
            **auth_summary(self.headers.get("Authorization")),
            "accept": self.headers.get_all("Accept") or [],
            "host": self.headers.get("Host"),
        }
        if url.path.startswith("/_edge/"):
            self._control(url, rec)
            return

        # ---- request headers (order and repeats preserved)
        conn_tokens = {t.strip().lower() for v in (self.headers.get_all("Connection") or []) for t in v.split(",")}
        headers = [(k, v) for k, v in self.headers.items()
                   if k.lower() not in HOP_BY_HOP and k.lower() not in conn_tokens]
        if self.headers.get("Host") is None:
            headers.insert(0, ("Host", f"{self.upstream_host}:{self.upstream_port}"))
        if self.tls:  # as a TLS-terminating front tells distribution, so its absolute URLs say https
            headers = [(k, v) for k, v in headers if k.lower() != "x-forwarded-proto"]
            headers.append(("X-Forwarded-Proto", "https"))

        # ---- request body
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        body: bytes | Iterator[bytes] | None = None
        chunked = False
        if "chunked" in te:
            body, chunked = _iter_chunked(self.rfile), True
        else:
            cl = self.headers.get("Content-Length")
            if cl is not None:
                n = int(cl)
                body = self.rfile.read(n) if n <= BUFFER_LIMIT else _iter_exact(self.rfile, n)
                if isinstance(body, bytes) and len(body) != n:
                    self.close_connection = True
                    return

        # ---- injected fault
        fault = self.faults.take(self._fault_matches)
        if fault is not None:
            self._apply_fault(fault, rec, streaming_body=not (body is None or isinstance(body, bytes)))
            return

        # ---- rate limit (manifest GET when exhausted and enforced)
        is_manifest = bool(MANIFEST_RE.match(url.path)) and self.command in ("GET", "HEAD")
        if is_manifest and self.command == "GET" and self.headers.get("Authorization"):
            with self.rl.lock:
                exhausted = self.rl.enforce and self.rl.remaining <= 0
            if exhausted:
                if not isinstance(body, bytes) and body is not None:
                    self.close_connection = True
                err = {"errors": [{"code": "TOOMANYREQUESTS", "message": TOOMANYREQUESTS_MESSAGE}]}
                data = json.dumps(err).encode()
                self.send_response(429)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self._ratelimit_headers(rec)
                self.end_headers()
                rec.update(status=429, upstream_ms=0)
                self.jlog.write(rec)
                self.wfile.write(data)
                return

        # ---- forward (one retry on a stale keep-alive connection if replayable)
        resp = None
        for attempt in (1, 2):
            try:
                resp = self._send_upstream(headers, body, chunked)
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                    ConnectionRefusedError, http.client.CannotSendRequest, OSError) as exc:
                self._drop_conn()
                if attempt == 2 or not (body is None or isinstance(body, bytes)) \
                        or isinstance(exc, ConnectionRefusedError):
                    rec.update(status=502, error=f"{type(exc).__name__}: {exc}")
                    self.jlog.write(rec)
                    self._bad_gateway(str(exc))
                    if not (body is None or isinstance(body, bytes)):
                        self.close_connection = True
                    return
        assert resp is not None
        rec["upstream_ms"] = round((time.monotonic() - t0) * 1000, 2)
        rec["status"] = resp.status

        # ---- response headers
        resp_conn_tokens = {t.strip().lower() for v in (resp.msg.get_all("Connection") or []) for t in v.split(",")}
        out: list[tuple[str, str]] = []
        for k, v in resp.msg.items():
            kl = k.lower()
            if kl in HOP_BY_HOP or kl in resp_conn_tokens:
                continue
            if kl == "location" and 300 <= resp.status < 400 and v.startswith(self.cdn_base):
                loc = urlsplit(v)
                sig = sign_cdn_path(self.secret, loc.path, self.sign_ttl)
                v = v + ("&" if loc.query else "?") + sig
                rec["signed_redirect"] = True
            out.append((k, v))

        no_body = self.command == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200
        if is_manifest and resp.status != 401:
            with self.rl.lock:
                if self.command == "GET" and 200 <= resp.status < 300 and self.rl.remaining > 0:
                    self.rl.remaining -= 1
        self.send_response_only(resp.status, resp.reason)
        for k, v in out:
            self.send_header(k, v)
        if is_manifest and resp.status != 401:
            self._ratelimit_headers(rec)
        reencode = False
        if not no_body and resp.length is None:  # upstream chunked or close-delimited
            if self.request_version == "HTTP/1.1":
                self.send_header("Transfer-Encoding", "chunked")
                reencode = True
            else:
                self.close_connection = True
        if resp.will_close and not reencode and not no_body and resp.length is None:
            self.close_connection = True
        self.jlog.write(rec)
        self.end_headers()

        # ---- response body
        try:
            if no_body:
                resp.read()
            else:
                while True:
                    data = resp.read1(CHUNK) if reencode else resp.read(CHUNK)
                    if not data:
                        break
                    if reencode:
                        self.wfile.write(b"%x\r\n" % len(data) + data + b"\r\n")
                    else:
                        self.wfile.write(data)
                if reencode:
                    self.wfile.write(b"0\r\n\r\n")
        except (http.client.IncompleteRead, ConnectionResetError, TimeoutError):
            self._drop_conn()
            self.close_connection = True
            return
        if resp.will_close:
            self._drop_conn()

    def _fault_matches(self, params: dict[str, Any]) -> bool:
        if params.get("path_contains") and params["path_contains"] not in self.path:
            return False
        return not params.get("method") or params["method"].upper() == self.command

    def _apply_fault(self, fault: dict[str, Any], rec: dict[str, Any], streaming_body: bool) -> None:
        mode = fault["mode"]
        rec.update(fault=mode, upstream_ms=0)
        if streaming_body:  # request body not read: the connection cannot be reused
            self.close_connection = True
        if mode in ("hang", "close"):
            rec["status"] = None
            self.jlog.write(rec)
            if mode == "hang":
                hang_until_disconnect(self.connection, fault.get("seconds"))
            self.close_connection = True
            return
        if mode == "status429":
            status, extra = 429, [("Retry-After", "7")]
            err = {"code": "TOOMANYREQUESTS", "message": TOOMANYREQUESTS_MESSAGE}
        elif mode == "status503":
            status, extra = 503, []
            err = {"code": "UNAVAILABLE", "message": "service unavailable", "detail": "injected fault"}
        else:
            status, extra = 500, []
            err = {"code": "UNKNOWN", "message": "unknown error", "detail": "injected fault"}
        data = json.dumps({"errors": [err]}).encode()
        rec["status"] = status
        self.jlog.write(rec)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Docker-Distribution-Api-Version", "registry/2.0")
        for k, v in extra:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _ratelimit_headers(self, rec: dict[str, Any]) -> None:
        snap = self.rl.snapshot()
        self.send_header("ratelimit-limit", f"{snap['limit']};w={snap['window']}")
        self.send_header("ratelimit-remaining", f"{snap['remaining']};w={snap['window']}")
        self.send_header("docker-ratelimit-source", _token_account(self.headers.get("Authorization"))
                         or self.client_address[0])
        rec["ratelimit_remaining"] = snap["remaining"]

    def _bad_gateway(self, msg: str) -> None:
        data = json.dumps({"errors": [{"code": "UNAVAILABLE", "message": "edge: upstream unavailable",
                                       "detail": msg}]}).encode()
        self.send_response(502)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _control(self, url, rec: dict[str, Any]) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            self.rfile.read(n)
        status, obj = 200, None
        if url.path == "/_edge/fault":
            if is_loopback(self.client_address[0]):
                status, obj = fault_control(self.faults, self.command, url.query)
            else:
                status, obj = 403, {"error": "fault control is loopback-only"}
        elif url.path == "/_edge/ratelimit" and self.command == "POST":
            q = {k: v[0] for k, v in parse_qs(url.query).items()}
            with self.rl.lock:
                if "limit" in q:
                    self.rl.limit = int(q["limit"])
                self.rl.remaining = int(q.get("remaining", self.rl.limit))
                if "enforce" in q:
                    self.rl.enforce = q["enforce"] not in ("0", "false", "")
        elif not (url.path == "/_edge/ratelimit" and self.command == "GET"):
            status = 404
        if obj is None:
            obj = self.rl.snapshot() if status == 200 else {"error": "not found"}
        data = json.dumps(obj).encode()
        rec["status"] = status
        self.jlog.write(rec)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _entry(self) -> None:
        try:
            self._proxy()
        except (BrokenPipeError, ConnectionResetError, TimeoutError, UpstreamError):
            self._drop_conn()
            self.close_connection = True

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _entry

    def handle_expect_100(self) -> bool:
        # Answer "100 Continue" ourselves; the Expect header is not forwarded.
        return super().handle_expect_100()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="fake Docker Hub registry edge")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--upstream", required=True, help="distribution base URL, http://host:port")
    ap.add_argument("--cdn-base", required=True, help="CDN base URL as configured in the redirect middleware")
    ap.add_argument("--secret-file", required=True, type=Path)
    ap.add_argument("--sign-ttl", type=float, default=1200)
    ap.add_argument("--ratelimit", type=int, default=100)
    ap.add_argument("--ratelimit-window", type=int, default=21600)
    ap.add_argument("--enforce-ratelimit", action="store_true")
    ap.add_argument("--log", type=Path)
    ap.add_argument("--ready-file", type=Path)
    add_tls_args(ap)
    args = ap.parse_args(argv)

    install_term_handler()
    watch_parent()
    up = urlsplit(args.upstream)
    if up.scheme != "http" or not up.hostname or not up.port:
        raise SystemExit("--upstream must be http://host:port")
    attrs = {
        "upstream_host": up.hostname, "upstream_port": up.port,
        "cdn_base": args.cdn_base.rstrip("/") + "/",
        "secret": load_secret(args.secret_file), "sign_ttl": args.sign_ttl,
        "rl": RateLimit(args.ratelimit, args.ratelimit_window, args.enforce_ratelimit),
        "jlog": JsonLog(args.log),
        "faults": FaultSwitch(EDGE_FAULT_MODES, {"path_contains": str, "method": str}),
    }
    tls = tls_from_args(args)
    attrs["tls"] = tls is not None
    serve(type("BoundHandler", (Handler,), attrs), args.host, args.port, args.ready_file, tls=tls)


if __name__ == "__main__":
    main()
