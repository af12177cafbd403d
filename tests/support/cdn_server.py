"""Signed-URL blob CDN in front of the registry's storage directory.

Run:  python -m tests.support.cdn_server --root STORAGE_ROOT --secret-file F \
          --ready-file R [--port 0] [--log L]

``GET``/``HEAD /docker/registry/v2/blobs/sha256/ab/<hex>/data?expires=&signature=``
serves ``STORAGE_ROOT/docker/registry/v2/...`` with ``os.sendfile`` (never
reads the blob into memory).  Behaviour, modelled on Docker Hub's S3 /
Cloudflare blob hosts:

* any ``Authorization`` header -> 400, S3-style XML "Only one auth mechanism allowed"
* missing / bad signature -> 403, expired -> 403
* a single ``Range: bytes=a-b|a-|-n`` -> 206 + Content-Range, unsatisfiable -> 416;
  multi-range requests are answered with the whole blob (200)
* ``If-None-Match`` matching the ETag -> 304
* Content-Length, ``Content-Type: application/octet-stream``, ETag, Accept-Ranges

One JSON line per request is appended to ``--log`` *after* the response was
sent: method, path, has_query_signature, authorization_present, range,
status, bytes (body bytes actually sent), reason, and ``fault`` (the injected
fault's mode) when one was applied.

Fault injection (not part of Docker Hub; loopback clients only, no signature,
never logged): ``POST /_cdn/fault?mode=M[&times=N][&after=BYTES][&seconds=S]``
arms fault ``M`` for the next ``N`` (default 1; 0 = until cleared) blob GETs
that would otherwise be answered 200/206 with a body; ``mode=none`` clears;
``GET /_cdn/fault`` reads the state.  Modes:

* ``cut``: headers with the full Content-Length, then only the first ``after``
  body bytes (default: half; always fewer than the full length), then close;
* ``corrupt``: the full body, valid framing, with the byte at body offset
  ``after`` (default: the middle) inverted, so it no longer matches the digest;
* ``status403``: 403 with S3's "Request has expired" XML (an expired signed URL);
* ``hang``: never answer; the connection is closed when the client goes away
  or after ``seconds`` (default 60).  Other requests are not affected.
* ``cutat``: every blob is cut once at each position ``at`` names, as fractions
  of the whole blob (``at=0.1,0.5,0.99``): an answer whose range crosses a
  position not yet cut there sends the bytes up to it, waits ``seconds``
  (default 0: a reset connection; longer: a signed URL can expire meanwhile)
  and closes.  A resume from that byte on is served (and cut at the next
  position).  Arm it with ``times=0``; re-arming forgets the positions cut.
* ``cutrefuse``: a blob GET without ``Range`` is cut as by ``cut``; one with
  ``Range`` (a resume) is answered 503 (S3's SlowDown): a storage that fails
  in the middle of transfers.  Arm it with ``times=0``.

``FaultSwitch``, ``fault_control`` and ``hang_until_disconnect`` are shared
with edge.py and token_server.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from tests.support.common import (FaultSwitch, JsonLog, fault_control, hang_until_disconnect, install_term_handler,
                                  is_loopback, load_secret, serve, verify_cdn_signature, watch_parent)

_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.I)
_BLOB_RE = re.compile(r"/blobs/sha256/[0-9a-f]{2}/([0-9a-f]{64})/data$")

S3_MULTI_AUTH = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    "<Error><Code>InvalidArgument</Code><Message>Only one auth mechanism allowed; only the "
    "X-Amz-Algorithm query parameter, Signature query string parameter or the Authorization header "
    "should be specified</Message><ArgumentName>Authorization</ArgumentName>"
    "<ArgumentValue>{scheme}</ArgumentValue><RequestId>{rid}</RequestId></Error>"
)
S3_DENIED = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    "<Error><Code>AccessDenied</Code><Message>{msg}</Message><RequestId>{rid}</RequestId></Error>"
)


S3_SLOW_DOWN = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    "<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
    "<RequestId>{rid}</RequestId></Error>"
)


S3_EXPIRED = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    "<Error><Code>AccessDenied</Code><Message>Request has expired</Message>"
    "<X-Amz-Expires>1200</X-Amz-Expires><Expires>{expires}</Expires><ServerTime>{now}</ServerTime>"
    "<RequestId>{rid}</RequestId></Error>"
)

CDN_FAULT_MODES = frozenset({"cut", "cutat", "cutrefuse", "corrupt", "status403", "hang"})


def parse_range(value: str, size: int) -> tuple[int, int] | None | str:
    """Return (start, end_inclusive), None to ignore the header, or "416"."""
    if "," in value:
        return None  # multiple ranges: we may ignore Range entirely (RFC 9110)
    m = _RANGE_RE.match(value)
    if not m:
        return None  # not a bytes range we understand: ignore
    a, b = m.group(1), m.group(2)
    if a == "" and b == "":
        return None
    if a == "":  # suffix: last n bytes
        n = int(b)
        if n == 0 or size == 0:
            return "416"
        return max(0, size - n), size - 1
    start = int(a)
    end = int(b) if b != "" else size - 1
    if b != "" and end < start:
        return None  # invalid: ignore
    if start >= size:
        return "416"
    return start, min(end, size - 1)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # TCP_NODELAY, as Docker Hub's servers and CDNs have it: with Nagle on, a body written
    # after its headers waits for a keep-alive client's delayed ACK (40 ms per answer)
    disable_nagle_algorithm = True
    server_version = "fake-cdn"
    timeout = 300
    root: Path
    secret: bytes
    jlog: JsonLog
    faults: FaultSwitch
    cut_done: dict[str, set[int]]  # cutat: the positions each blob was cut at
    cut_lock: threading.Lock

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _error(self, status: int, body: str, ctype: str = "application/xml") -> int:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
            return len(data)
        return 0

    def _serve(self) -> dict[str, Any]:
        rid = uuid.uuid4().hex[:16].upper()
        url = urlsplit(self.path)
        q = parse_qs(url.query, keep_blank_values=True)
        rec: dict[str, Any] = {
            "method": self.command,
            "path": url.path,
            "has_query_signature": "signature" in q,
            "authorization_present": self.headers.get("Authorization") is not None,
            "range": self.headers.get("Range"),
        }
        if self.command not in ("GET", "HEAD"):
            rec.update(status=405, reason="method not allowed")
            self.close_connection = True  # we never read a request body
            rec["bytes"] = self._error(405, S3_DENIED.format(msg="Method Not Allowed", rid=rid))
            return rec
        auth = self.headers.get("Authorization")
        if auth is not None:
            scheme = auth.strip().split(" ", 1)[0] or "(empty)"
            rec.update(status=400, reason="only one auth mechanism allowed")
            rec["bytes"] = self._error(400, S3_MULTI_AUTH.format(scheme=scheme[:20], rid=rid))
            return rec
        reason = verify_cdn_signature(self.secret, url.path, (q.get("expires") or [None])[0],
                                      (q.get("signature") or [None])[0])
        if reason:
            rec.update(status=403, reason=reason)
            rec["bytes"] = self._error(403, S3_DENIED.format(msg=reason, rid=rid))
            return rec

        rel = unquote(url.path).lstrip("/")
        target = (self.root / rel).resolve()
        if self.root not in target.parents or not target.is_file():
            rec.update(status=404, reason="no such key")
            rec["bytes"] = self._error(404, S3_DENIED.format(msg="The specified key does not exist.", rid=rid)
                                       .replace("AccessDenied", "NoSuchKey"))
            return rec

        with open(target, "rb") as f:
            st = os.fstat(f.fileno())
            size = st.st_size
            m = _BLOB_RE.search(url.path)
            etag = f'"{m.group(1)}"' if m else f'"{size:x}-{st.st_mtime_ns:x}"'
            inm = self.headers.get("If-None-Match")
            if inm and (inm.strip() == "*" or etag in [t.strip() for t in inm.split(",")]):
                self.send_response(304)
                self.send_header("ETag", etag)
                self.end_headers()
                rec.update(status=304, bytes=0)
                return rec
            start, end, status = 0, size - 1, 200
            rng = self.headers.get("Range")
            if rng is not None:
                if_range = self.headers.get("If-Range")
                parsed = parse_range(rng, size) if (if_range is None or if_range.strip() == etag) else None
                if parsed == "416":
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Type", "application/xml")
                    body = S3_DENIED.format(msg="The requested range is not satisfiable", rid=rid) \
                        .replace("AccessDenied", "InvalidRange").encode()
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(body)
                    rec.update(status=416, bytes=0 if self.command == "HEAD" else len(body))
                    return rec
                if parsed is not None:
                    start, end = parsed
                    status = 206
            length = end - start + 1 if size else 0
            fault = None
            if self.command == "GET" and length and m:
                fault = self._cut_position(self.faults.take(), m.group(1), start, end, size)
            if fault is not None:
                rec["fault"] = fault["mode"]
                if fault["mode"] == "status403":
                    now = time.time()
                    body = S3_EXPIRED.format(
                        rid=rid, expires=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 60)),
                        now=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)))
                    rec.update(status=403, reason="injected fault: request has expired")
                    rec["bytes"] = self._error(403, body)
                    return rec
                if fault["mode"] == "cutrefuse" and rng is not None:
                    rec.update(status=503, reason="injected fault: the resume refused")
                    rec["bytes"] = self._error(503, S3_SLOW_DOWN.format(rid=rid))
                    return rec
                if fault["mode"] == "hang":
                    rec.update(status=None, bytes=0)
                    rec["reason"] = "injected hang: " + hang_until_disconnect(self.connection, fault.get("seconds"))
                    self.close_connection = True
                    return rec
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", etag)
            self.send_header("Cache-Control", "public, max-age=14400")
            self.send_header("x-amz-request-id", rid)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()  # flushes headers (wfile is unbuffered)
            sent = 0
            rec["status"] = status
            if fault is not None and fault["mode"] in ("cut", "cutat", "cutrefuse"):
                n = fault.get("after")
                n = max(0, min(length // 2 if n is None else n, length - 1))
                try:
                    sent = self.connection.sendfile(f, offset=start, count=n) if n else 0
                    if fault["mode"] == "cutat" and fault.get("seconds"):
                        time.sleep(fault["seconds"])
                finally:
                    rec["bytes"] = sent
                self.close_connection = True
            elif fault is not None and fault["mode"] == "corrupt":
                off = fault.get("after")
                off = max(0, min(length // 2 if off is None else off, length - 1))
                rec["fault_offset"] = start + off
                try:
                    if off:
                        sent += self.connection.sendfile(f, offset=start, count=off)
                    byte = os.pread(f.fileno(), 1, start + off)
                    self.wfile.write(bytes([byte[0] ^ 0xFF]))
                    sent += 1
                    if length - off - 1:
                        sent += self.connection.sendfile(f, offset=start + off + 1, count=length - off - 1)
                finally:
                    rec["bytes"] = sent
                if sent != length:
                    self.close_connection = True
            elif self.command == "GET" and length:
                try:
                    sent = self.connection.sendfile(f, offset=start, count=length)
                finally:
                    rec["bytes"] = sent
                if sent != length:
                    self.close_connection = True
            else:
                rec["bytes"] = 0
            return rec

    def _cut_position(self, fault: dict[str, Any] | None, hexd: str, start: int, end: int,
                      size: int) -> dict[str, Any] | None:
        """A ``cutat`` fault as the cut this answer gets (``after``: its bytes before the cut), or
        None when the range crosses no position of this blob not yet cut; other faults as they are."""
        if fault is None or fault["mode"] != "cutat":
            return fault
        positions = sorted(int(float(x) * size) for x in str(fault.get("at") or "0.5").split(","))
        with self.cut_lock:
            done = self.cut_done.setdefault(hexd, set())
            todo = [p for p in positions if start < p <= end and p not in done]
            if not todo:
                return None
            done.add(todo[0])
        return {**fault, "after": todo[0] - start}

    def _control(self) -> None:
        url = urlsplit(self.path)
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            self.rfile.read(n)
        if not is_loopback(self.client_address[0]):
            status, obj = 403, {"error": "control endpoint is loopback-only"}
        elif url.path == "/_cdn/fault":
            status, obj = fault_control(self.faults, self.command, url.query)
            if self.command == "POST":
                with self.cut_lock:
                    self.cut_done.clear()  # a cutat fault armed again cuts every position again
        else:
            status, obj = 404, {"error": "not found"}
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _handle(self) -> None:
        if self.path.startswith("/_cdn/"):
            try:
                self._control()
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                self.close_connection = True
            return
        rec: dict[str, Any] = {"method": self.command, "path": self.path}
        try:
            rec = self._serve()
        except (BrokenPipeError, ConnectionResetError, TimeoutError) as exc:
            rec.setdefault("status", None)
            rec["error"] = type(exc).__name__
            self.close_connection = True
        finally:
            self.jlog.write(rec)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

    def handle_expect_100(self) -> bool:  # never invite a body
        return True


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="fake blob CDN")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--root", required=True, type=Path, help="registry storage root directory")
    ap.add_argument("--secret-file", required=True, type=Path)
    ap.add_argument("--log", type=Path)
    ap.add_argument("--ready-file", type=Path)
    args = ap.parse_args(argv)

    install_term_handler()
    watch_parent()
    args.root.mkdir(parents=True, exist_ok=True)
    attrs = {"root": args.root.resolve(), "secret": load_secret(args.secret_file), "jlog": JsonLog(args.log),
             "faults": FaultSwitch(CDN_FAULT_MODES, {"after": int, "at": str}),
             "cut_done": {}, "cut_lock": threading.Lock()}
    serve(type("BoundHandler", (Handler,), attrs), args.host, args.port, args.ready_file)


if __name__ == "__main__":
    main()
