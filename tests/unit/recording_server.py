"""A real HTTP server on loopback that stands in for an upstream registry in
unit tests: it answers from a table and records what it received."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Canned:
    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    delay_forever: bool = False


@dataclass
class Received:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


class RecordingServer:
    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Canned] = {}
        self.received: list[Received] = []
        self._stop = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                outer.received.append(Received(self.command, self.path, list(self.headers.items()), body))
                path = self.path.partition("?")[0]
                canned = outer.routes.get((self.command, path)) or outer.routes.get(("*", path))
                if canned is None:
                    canned = Canned(404, [("Content-Type", "application/json")], b'{"errors":[{"code":"NOT_FOUND"}]}')
                if canned.delay_forever:
                    outer._stop.wait(30)
                    return
                self.send_response(canned.status)
                names = {k.lower() for k, _ in canned.headers}
                for k, v in canned.headers:
                    self.send_header(k, v)
                if "content-length" not in names:
                    self.send_header("Content-Length", str(len(canned.body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(canned.body)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> RecordingServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()


