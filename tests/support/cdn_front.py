"""The CDN's TLS front: Debian's nginx with HTTP/2 and HTTP/1.1 (ALPN), as Cloudflare offers.

    front = CdnFront(workdir, port, backend_port, cert, key).start()
    ...   # https://127.0.0.1:PORT/ serves what http://127.0.0.1:BACKEND/ (tests/support/cdn_server.py) serves
    front.stop()

Python's http.server cannot speak HTTP/2, so nginx terminates TLS and proxies
every request to the Python CDN, which keeps its signature checks, its refusal
of ``Authorization``, its fault injection and its access log. The proxy is as
thin as nginx allows: no buffering in either direction (a ``cut`` fault reaches
the client as a truncated body, a ``hang`` as silence), no retry on another
attempt (a fault is applied once), request headers passed intact (``Host``,
``Authorization``, ``Range``, ``If-None-Match``), one backend connection per
request. Its access log (``logs/access.log``, JSON lines) records per request the
client connection's number and request count on it, the protocol (``HTTP/2.0`` or
``HTTP/1.1``) and the TLS version.
"""

from __future__ import annotations

from pathlib import Path

from tests.support.nginx_front import NginxFront

SNIPPET = """\
log_format cdn_front escape=json '{{"ts":$msec,"connection":$connection,"connection_requests":$connection_requests,'
    '"protocol":"$server_protocol","tls":"$ssl_protocol","method":"$request_method","uri":"$uri",'
    '"status":$status,"bytes":$body_bytes_sent,"request_time":$request_time}}';

server {{
    listen 127.0.0.1:{port} ssl http2;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache shared:cdn:1m;
    access_log {workdir}/logs/access.log cdn_front;
    keepalive_timeout 75s;
    keepalive_requests 10000;

    location / {{
        proxy_pass http://127.0.0.1:{backend_port};
        proxy_http_version 1.1;
        proxy_set_header Host $http_host;
        proxy_set_header Connection "";
        proxy_buffering off;
        proxy_request_buffering off;
        proxy_buffer_size 1m;
        proxy_buffers 4 1m;
        proxy_busy_buffers_size 2m;
        proxy_next_upstream off;
        proxy_connect_timeout 10s;
        proxy_read_timeout 600s;
        proxy_send_timeout 600s;
    }}
}}
"""


class CdnFront(NginxFront):
    def __init__(self, workdir: Path, port: int, backend_port: int, cert: Path, key: Path):
        workdir = Path(workdir).resolve()
        snippet = SNIPPET.format(port=port, backend_port=backend_port, cert=cert, key=key, workdir=workdir)
        super().__init__(workdir, snippet, port=port, worker_connections=2048)
        self.access_log_path = workdir / "logs" / "access.log"
