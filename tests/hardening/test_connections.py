"""Connections and request heads: bounded before mitmproxy buffers them.

Huge request heads are answered 431 with memory staying flat; connections that
trickle a head byte by byte are closed after hub_head_timeout; beyond
hub_max_connections (or what the open-file limit allows) connections are
refused at once; the log says so once per cause, never with a traceback; and
the mirror keeps serving throughout (conftest.keeps_serving).

The same as a forward proxy, for each head a proxy client sends: a request in
absolute form (the registry's https:// API URL, no tunnel), a CONNECT head, and a
request inside a CONNECT tunnel (TLS with mitmproxy's CA, where an answer in
plain text would be garbage to the client: a close is the answer there)."""

from __future__ import annotations

import resource
import socket
import ssl
import threading
import time

import pytest

from tests.support.certs import make_ca_and_server_cert
from tests.support.mirror import Mirror

from .helpers import UPSTREAM_TIMEOUT, get, raw_request
from .setups import PROXY_REGISTRY
from .wire import Conn, request_head

HEAD_TIMEOUT = 3
MAX_CONNECTIONS = 60
LIMITS = {"hub_head_timeout": str(HEAD_TIMEOUT), "hub_max_connections": str(MAX_CONNECTIONS)}
PROXY_FORMS = ("absolute-form", "CONNECT", "in a CONNECT tunnel")
HUGE = b"X-Junk: " + b"a" * (100 * 1024 * 1024) + b"\r\n"


@pytest.fixture(scope="module")
def mirror(upstream, cache_dir, tmp_path_factory):
    """A mirror with small connection limits (and the cache, as in the rest of the suite)."""
    options = {"hub_cache_dir": str(cache_dir), "hub_upstream_timeout": str(UPSTREAM_TIMEOUT), **LIMITS}
    with Mirror(tmp_path_factory.mktemp("connections-mirror"), upstream, options=options) as m:
        yield m


@pytest.fixture(scope="module")
def forward_proxy(upstream, tmp_path_factory):
    """The mirror as a forward proxy with the same limits, serving the upstream as hub.test."""
    with Mirror(tmp_path_factory.mktemp("connections-proxy"), "", mode="regular", upstream_ca=upstream.ca_cert,
                options=LIMITS,
                extra_args=["--set", f"hub_upstreams={PROXY_REGISTRY}={upstream.api_url}"]) as m:
        yield m


@pytest.fixture
def proxy(forward_proxy, upstream):
    """The forward proxy, checked after the test as conftest checks the mirror."""
    log_start = len(forward_proxy.log_text())
    yield forward_proxy
    r = raw_request(forward_proxy.port, request_head("GET", f"{upstream.api_url}/v2/", upstream.api_host,
                                                     "Connection: close") + b"\r\n")
    assert r.status == 401, f"the proxy no longer serves: {r.short()}"
    assert "Traceback" not in forward_proxy.log_text()[log_start:]


def rss_mb(mirror) -> float:
    return mirror.peak_rss() / 1e6


def proxy_head(proxy, upstream, form: str) -> tuple[socket.socket, bytes]:
    """A connection to the proxy, ready for a request head in ``form``; the head's first lines."""
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=HEAD_TIMEOUT * 4)
    if form == "absolute-form":
        return sock, f"GET {upstream.api_url}/v2/ HTTP/1.1\r\nHost: {upstream.api_host}\r\n".encode()
    if form == "CONNECT":
        return sock, f"CONNECT {PROXY_REGISTRY}:443 HTTP/1.1\r\nHost: {PROXY_REGISTRY}:443\r\n".encode()
    conn = Conn(sock, HEAD_TIMEOUT * 4).tunnel(f"{PROXY_REGISTRY}:443", proxy.ca_cert)
    return conn.sock, f"GET /v2/ HTTP/1.1\r\nHost: {PROXY_REGISTRY}\r\n".encode()


def first_answer(sock: socket.socket) -> bytes:
    """What the server sends first: b"" for a close; a TLS error (other than the peer
    closing) means bytes that were not TLS records."""
    try:
        return sock.recv(65536)
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError, BrokenPipeError):
        return b""
    except ssl.SSLError as e:
        return f"not TLS on a TLS connection: {e!r}".encode()
    except OSError as e:
        return repr(e).encode()


def send_huge_heads(connect, count: int = 4) -> list[bytes]:
    """``count`` connections at once each send a 100 MiB head; what each got back.
    ``connect()`` -> (a connection, the head's first lines)."""
    results = []

    def send_huge():
        sock, start = connect()
        with sock:
            sock.settimeout(15)
            try:
                sock.sendall(start + HUGE + b"\r\n")
            except OSError:
                pass  # closed by the mirror mid-send: expected
            results.append(first_answer(sock))

    threads = [threading.Thread(target=send_huge) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == count
    return results


def test_huge_request_heads_get_431_with_flat_memory(mirror):
    mirror.reset_peak_rss()
    before = rss_mb(mirror)
    results = send_huge_heads(lambda: (socket.create_connection(("127.0.0.1", mirror.port), timeout=15),
                                       b"GET /v2/ HTTP/1.1\r\nHost: x\r\n"))
    answered = [r for r in results if r.startswith(b"HTTP/1.1 431")]
    assert answered, f"no 431 for a 100 MiB head: {[r[:80] for r in results]}"
    assert rss_mb(mirror) - before < 50, f"peak RSS grew from {before:.0f} to {rss_mb(mirror):.0f} MB"
    assert "request head too large" in mirror.log_text()


@pytest.mark.parametrize("form", PROXY_FORMS)
def test_huge_heads_through_the_proxy_get_431_or_a_close_with_flat_memory(proxy, upstream, form):
    proxy.reset_peak_rss()
    before = rss_mb(proxy)
    results = send_huge_heads(lambda: proxy_head(proxy, upstream, form))
    if form == "in a CONNECT tunnel":
        assert all(r == b"" for r in results), f"not a close: {[r[:80] for r in results]}"
    else:
        assert all(r.startswith(b"HTTP/1.1 431") or r == b"" for r in results), [r[:80] for r in results]
        assert any(r.startswith(b"HTTP/1.1 431") for r in results), f"no 431: {[r[:80] for r in results]}"
    assert rss_mb(proxy) - before < 50, f"peak RSS grew from {before:.0f} to {rss_mb(proxy):.0f} MB"
    assert "request head too large" in proxy.log_text()  # once a minute: maybe from another form


def test_a_head_just_under_the_limit_is_served(mirror, upstream):
    r = raw_request(mirror.port, get("/v2/", mirror.port, "X-Padding: " + "p" * 40_000))
    assert r.status == 401, r.short()


@pytest.mark.parametrize("form", PROXY_FORMS)
def test_a_head_just_under_the_limit_is_served_by_the_proxy(proxy, upstream, form):
    sock, start = proxy_head(proxy, upstream, form)
    with Conn(sock) as conn:
        conn.send(start + b"X-Padding: " + b"p" * 40_000 + b"\r\n\r\n")
        r = conn.read_response("CONNECT" if form == "CONNECT" else "GET")
    assert r.status == (200 if form == "CONNECT" else 401), r.short()


def test_trickled_heads_and_idle_connections_are_closed_after_the_head_timeout(mirror):
    start_log = len(mirror.log_text())
    socks = []
    for _ in range(30):
        s = socket.create_connection(("127.0.0.1", mirror.port), timeout=HEAD_TIMEOUT * 4)
        s.sendall(b"GET /v2/ HTTP/1.1\r\n")  # a head that never ends
        socks.append(s)
    idle = socket.create_connection(("127.0.0.1", mirror.port), timeout=HEAD_TIMEOUT * 4)
    started = time.monotonic()
    try:
        # keep trickling: a byte now and then must not keep a connection open forever
        for _ in range(HEAD_TIMEOUT * 2 + 2):
            time.sleep(1)
            for s in socks:
                try:
                    s.sendall(b"X")
                except OSError:
                    pass
        answers = []
        for s in socks:
            try:
                answers.append(s.recv(4096))
            except OSError as e:
                answers.append(repr(e).encode())
        assert all(a.startswith(b"HTTP/1.1 408") or a == b"" for a in answers), answers[:3]
        assert sum(a.startswith(b"HTTP/1.1 408") for a in answers) >= 25
        assert idle.recv(4096) == b""  # an idle connection is closed, without an answer
        assert time.monotonic() - started < HEAD_TIMEOUT * 4
    finally:
        for s in [*socks, idle]:
            s.close()
    log = mirror.log_text()[start_log:]
    assert 1 <= log.count("request head not sent in time") <= 2, "one log line per cause and minute"


def test_trickled_heads_through_the_proxy_are_closed_after_the_head_timeout(proxy, upstream):
    """Ten heads of each form trickled at once, and idle connections: one to the proxy,
    one a tunnel whose TLS is set up and then nothing is sent."""
    start_log = len(proxy.log_text())
    trickled = {form: [] for form in PROXY_FORMS}
    for form in PROXY_FORMS:
        for _ in range(10):
            sock, start = proxy_head(proxy, upstream, form)
            sock.sendall(start.split(b"\r\n", 1)[0] + b"\r\n")  # a head that never ends
            trickled[form].append(sock)
    idle = socket.create_connection(("127.0.0.1", proxy.port), timeout=HEAD_TIMEOUT * 4)
    idle_tunnel, _ = proxy_head(proxy, upstream, "in a CONNECT tunnel")
    started = time.monotonic()
    socks = [*trickled["absolute-form"], *trickled["CONNECT"], *trickled["in a CONNECT tunnel"], idle, idle_tunnel]
    try:
        for _ in range(HEAD_TIMEOUT * 2 + 2):
            time.sleep(1)
            for s in socks[:-2]:
                try:
                    s.sendall(b"X")
                except OSError:
                    pass
        answers = {form: [first_answer(s) for s in trickled[form]] for form in PROXY_FORMS}
        for form in ("absolute-form", "CONNECT"):
            assert all(a.startswith(b"HTTP/1.1 408") or a == b"" for a in answers[form]), (form, answers[form][:3])
            assert sum(a.startswith(b"HTTP/1.1 408") for a in answers[form]) >= 8, (form, answers[form][:3])
        assert all(a == b"" for a in answers["in a CONNECT tunnel"]), answers["in a CONNECT tunnel"][:3]
        assert first_answer(idle) == b"" and first_answer(idle_tunnel) == b""
        assert time.monotonic() - started < HEAD_TIMEOUT * 4
    finally:
        for s in socks:
            s.close()
    log = proxy.log_text()[start_log:]
    assert 1 <= log.count("request head not sent in time") <= 2, "one log line per cause and minute"


def test_over_tls_a_close_is_the_answer(upstream, tmp_path):
    """A reverse-mode mirror serving HTTPS: a huge head and a trickled one, each sent over
    TLS, are closed, without a plain-text answer in the TLS stream."""
    certs = make_ca_and_server_cert(tmp_path / "certs")
    with Mirror(tmp_path / "m", upstream, tls=(certs["pem"], "*"), options=LIMITS) as m:
        context = ssl.create_default_context(cafile=str(certs["ca"]))

        def connect() -> tuple[socket.socket, bytes]:
            sock = socket.create_connection(("127.0.0.1", m.port), timeout=HEAD_TIMEOUT * 4)
            return context.wrap_socket(sock, server_hostname="127.0.0.1"), b"GET /v2/ HTTP/1.1\r\nHost: x\r\n"

        trickled, start = connect()
        with trickled:
            trickled.sendall(start)
            assert send_huge_heads(connect, 2) == [b"", b""]
            started = time.monotonic()
            assert first_answer(trickled) == b"", "a trickled head over TLS"
            assert time.monotonic() - started < HEAD_TIMEOUT * 2
        assert "Traceback" not in m.log_text()


@pytest.mark.parametrize("mode", ["reverse", "forward proxy"])
def test_connections_beyond_the_limit_are_refused_at_once(request, mirror, upstream, mode):
    served = mirror if mode == "reverse" else request.getfixturevalue("proxy")
    socks = []
    try:
        for _ in range(MAX_CONNECTIONS * 3):
            socks.append(socket.create_connection(("127.0.0.1", served.port), timeout=5))
        time.sleep(1)
        closed = 0
        for s in socks:
            s.setblocking(False)
            try:
                closed += s.recv(1) == b""
            except BlockingIOError:
                pass
            except OSError:
                closed += 1
        assert closed >= MAX_CONNECTIONS * 2 - 5, f"only {closed} of {len(socks)} refused"
    finally:
        for s in socks:
            s.close()
    time.sleep(0.5)
    assert "too many connections" in served.log_text()


def test_a_low_open_file_limit_is_respected_without_tracebacks(upstream, tmp_path):
    """With 256 open files and the default hub_max_connections (1000), the mirror serves
    what the files allow and refuses the rest: no 'Too many open files' tracebacks."""
    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    m = Mirror(tmp_path / "m", upstream)
    import subprocess

    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        inner = kwargs.pop("preexec_fn", None)

        def both():
            if inner:
                inner()
            low_limit()

        return real_popen(*args, preexec_fn=both, **kwargs)

    subprocess.Popen = popen
    try:
        m.start()
    finally:
        subprocess.Popen = real_popen
    socks = []
    try:
        for _ in range(600):
            try:
                socks.append(socket.create_connection(("127.0.0.1", m.port), timeout=5))
            except OSError:
                break
        time.sleep(1)
        for s in socks:
            s.close()
        socks.clear()
        time.sleep(0.5)
        r = raw_request(m.port, get("/v2/", m.port))
        assert r.status == 401, r.short()
        log = m.log_text()
        assert "Traceback" not in log and "Too many open files" not in log, log[-3000:]
        assert "too many connections" in log
    finally:
        for s in socks:
            s.close()
        m.stop()


def _serve_once(handler) -> int:
    """A one-connection server on loopback for ``handler(sock)``, in a thread: the port."""
    server = socket.create_server(("127.0.0.1", 0))

    def run():
        with server:
            conn, _ = server.accept()
            with conn:
                handler(conn)

    threading.Thread(target=run, daemon=True).start()
    return server.getsockname()[1]


def _echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def _receive(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count and (chunk := sock.recv(65536)):
        data += chunk
    return data


def test_a_tunnel_passed_through_is_no_request_head(proxy):
    """A CONNECT to a host outside the table (allowed: the client is on loopback) carries
    bytes of another protocol: more than a head's limit, and silence longer than the head
    timeout, are the tunnel's business, not a head's."""
    port = _serve_once(_echo)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=HEAD_TIMEOUT * 4) as sock:
        sock.sendall(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        answer = b""
        while not answer.endswith(b"\r\n\r\n"):
            answer += sock.recv(1)
        assert answer.startswith(b"HTTP/1.1 200"), answer
        payload = bytes(range(256)) * 1024  # 256 KiB, not TLS, not HTTP
        sock.sendall(payload)
        assert _receive(sock, len(payload)) == payload
        time.sleep(HEAD_TIMEOUT * 2)
        sock.sendall(b"still there?")
        assert _receive(sock, 12) == b"still there?"


def test_websocket_messages_are_no_request_head(proxy):
    """A websocket to a host outside the table, through the proxy: its messages after the
    101 are not a request head, however many bytes and however slow."""
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, BytesMessage, Request

    def ws_echo(conn: socket.socket) -> None:
        ws = WSConnection(ConnectionType.SERVER)
        while data := conn.recv(65536):
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, Request):
                    conn.sendall(ws.send(AcceptConnection()))
                elif isinstance(event, BytesMessage):
                    conn.sendall(ws.send(BytesMessage(data=event.data, message_finished=event.message_finished)))

    port = _serve_once(ws_echo)
    ws = WSConnection(ConnectionType.CLIENT)
    received = bytearray()

    def pump(sock: socket.socket, until) -> None:
        while not until():
            ws.receive_data(sock.recv(65536))
            for event in ws.events():
                if isinstance(event, BytesMessage):
                    received.extend(event.data)
                elif isinstance(event, AcceptConnection):
                    received.extend(b"")  # the upgrade answer: nothing to keep

    with socket.create_connection(("127.0.0.1", proxy.port), timeout=HEAD_TIMEOUT * 4) as sock:
        opening = ws.send(Request(host=f"127.0.0.1:{port}", target="/echo"))
        # absolute form: the proxy's request line names the target
        sock.sendall(opening.replace(b"GET /echo ", f"GET http://127.0.0.1:{port}/echo ".encode(), 1))
        pump(sock, lambda: ws.state.name == "OPEN")
        payload = bytes(range(256)) * 1024
        for i in range(0, len(payload), 16384):
            sock.sendall(ws.send(BytesMessage(data=payload[i:i + 16384])))
        pump(sock, lambda: len(received) >= len(payload))
        assert bytes(received) == payload
        time.sleep(HEAD_TIMEOUT * 2)
        sock.sendall(ws.send(BytesMessage(data=b"still there?")))
        pump(sock, lambda: len(received) >= len(payload) + 12)
        assert bytes(received[len(payload):]) == b"still there?"


SLOW_HOOKS = '''
import asyncio


async def requestheaders(flow):
    # before the mirror's addons: its body arrives while the hooks are still running
    if "x-slow-hooks" in flow.request.headers:
        await asyncio.sleep(1)
'''


def test_a_body_arriving_before_the_hooks_ran_is_no_request_head(upstream, tmp_path):
    """mitmproxy parses a head, then runs the addons' requestheaders hooks; a body that
    arrives meanwhile is the request's body, not more head, however long the hooks take
    (on a loaded machine, a 2 MiB PUT got 431 instead of the mirror's own answer)."""
    slow = tmp_path / "slow_hooks.py"
    slow.write_text(SLOW_HOOKS)
    mirror = Mirror(tmp_path / "mirror", upstream, options=LIMITS)
    first_script = mirror.argv.index("-s")
    mirror.argv[first_script:first_script] = ["-s", str(slow)]
    with mirror, Conn.to(mirror.port) as conn:
        body = b"{" + b" " * (2 * 1024 * 1024) + b"}"
        head = request_head("PUT", "/v2/library/alpine/manifests/1", mirror.host, "X-Slow-Hooks: 1",
                            "Content-Type: application/vnd.oci.image.manifest.v1+json")
        resp = conn.exchange("PUT", head, body, "content-length")
    assert resp.status == 405, resp.short()  # a read-only mirror's answer, not 431
