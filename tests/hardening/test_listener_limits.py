"""Issue 17, item 1: the blob listener is bounded like the main port.

The mirror runs with 1,024 open files (soft and hard, as on many VPS images).
A flood of connections on the listener that each send one byte (no signature
needed) must leave the main port serving a manifest at once: the listener holds
its share of the open files and closes the rest at once; what it holds is
closed after hub_head_timeout. The other way round, a flood on the main port
leaves the listener serving. Slow clients on the listener (one byte then
silence, a trickled head, an idle kept-alive connection, nothing at all, a TLS
handshake never finished) are closed within the head timeout, and a client
that stops reading its answer within tcp_timeout. The mirror keeps serving
throughout (conftest.keeps_serving).
"""

from __future__ import annotations

import socket
import ssl
import threading
import time

import pytest

from tests.support.certs import make_ca_and_server_cert

from .conftest import healthy
from .listener import (BLOB_SIZE, FILE_LIMIT, HEAD_TIMEOUT, STALL_TIMEOUT, cached_blob, close_all, connect, ended,
                       listener_mirror, request)

FLOOD = 1100  # the issue's: more connections than the process has files
SLACK = 1.5  # seconds beyond a timeout for the mirror to act and the close to arrive


@pytest.fixture(scope="module")
def mirror(upstream, cache_dir, tmp_path_factory):
    with listener_mirror(tmp_path_factory.mktemp("listener-limits"), upstream, cache_dir) as m:
        yield m


@pytest.fixture(scope="module")
def blob(mirror, upstream, tmp_path_factory):
    return cached_blob(mirror, upstream, tmp_path_factory.mktemp("listener-limits-blob"))


@pytest.fixture(scope="module")
def tls_setup(upstream, tmp_path_factory):
    """A mirror serving HTTPS (its listener too, with the same certificate), and a client context."""
    base = tmp_path_factory.mktemp("listener-limits-tls")
    certs = make_ca_and_server_cert(base / "certs")
    context = ssl.create_default_context(cafile=str(certs["ca"]))
    with listener_mirror(base / "m", upstream, base / "cache", tls=(certs["pem"], "*")) as m:
        yield m, cached_blob(m, upstream, base, verify=context), context


def open_many(port: int, count: int, first: bytes = b"") -> list[socket.socket]:
    """``count`` connections (those the kernel did not take within 3 s are left out)."""
    socks = []
    for _ in range(count):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=3)
        except OSError:
            continue  # a full backlog: the server stopped accepting
        if first:
            try:
                s.sendall(first)
            except OSError:
                pass  # refused at once, before the byte went
        socks.append(s)
    return socks


def count_ended(socks: list[socket.socket]) -> int:
    return sum(ended(s)[0] for s in socks)


def test_a_flood_on_the_listener_leaves_the_main_port_serving(mirror, upstream, blob):
    start_log = len(mirror.log_text())
    socks = open_many(mirror.listener_port, FLOOD, b"G")  # one byte of a head, then silence
    try:
        started = time.monotonic()
        problem = healthy(mirror, upstream)
        took = time.monotonic() - started
        assert not problem, f"the main port stopped serving during a flood on the listener: {problem}"
        assert took < 5, f"a manifest took {took:.1f} s during a flood on the listener"
        refused = count_ended(socks)
        assert len(socks) == FLOOD, f"only {len(socks)} of {FLOOD} connections accepted: the listener stopped accepting"
        assert refused >= FLOOD - FILE_LIMIT // 3, f"only {refused} of {FLOOD} connections beyond the listener's share closed"
        time.sleep(HEAD_TIMEOUT + SLACK)
        assert count_ended(socks) == FLOOD, "connections the listener held outlived the head timeout"
    finally:
        close_all(socks)
    log = mirror.log_text()[start_log:]
    assert "blob listener closed a client connection: too many connections" in log
    assert "Too many open files" not in log and "out of open files" not in log, log[-2000:]


def test_a_flood_on_the_main_port_leaves_the_listener_serving(mirror, blob):
    target = blob.target()  # signed before the main port is flooded
    socks = open_many(mirror.port, FLOOD)
    try:
        time.sleep(0.5)
        with connect(mirror.listener_port) as s:
            s.sendall(request(target, "Range: bytes=0-99", "Connection: close"))
            closed, answer = ended(s, 5)
        assert closed and answer.startswith(b"HTTP/1.1 206") and answer.endswith(blob.data[:100]), answer[:200]
    finally:
        close_all(socks)


def slow_clients(port: int, target: str, tls: ssl.SSLContext | None) -> dict[str, list[socket.socket]]:
    """Connections that hold the listener without asking anything of it."""
    clients: dict[str, list[socket.socket]] = {"one byte": [], "trickled": [], "nothing": [], "idle": []}
    for _ in range(10):
        s = connect(port, tls)
        s.sendall(b"G")
        clients["one byte"].append(s)
        s = connect(port, tls)
        s.sendall(b"GET / HTTP/1.1\r\n")
        clients["trickled"].append(s)
        clients["nothing"].append(connect(port, tls))
    for _ in range(5):
        s = connect(port, tls)
        s.sendall(request(target, method="HEAD"))  # served, then kept alive and left idle
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        clients["idle"].append(s)
    return clients


def check_closed_in_time(clients: dict[str, list[socket.socket]]) -> None:
    """Trickling two bytes a second, every slow client must be closed within the head timeout,
    a started head with a registry-style 408."""
    started = time.monotonic()
    answers: dict[str, list[bytes]] = {kind: [] for kind in clients}
    pending = {kind: list(socks) for kind, socks in clients.items()}
    while any(pending.values()) and time.monotonic() - started < HEAD_TIMEOUT + SLACK:
        time.sleep(0.5)
        for kind, socks in pending.items():
            for s in list(socks):
                closed, answer = ended(s)
                if closed:
                    answers[kind].append(answer)
                    socks.remove(s)
                elif kind == "trickled":
                    try:
                        s.sendall(b"X")
                    except OSError:
                        pass
    left = {kind: len(socks) for kind, socks in pending.items() if socks}
    assert not left, f"still open after {HEAD_TIMEOUT + SLACK} s (head timeout {HEAD_TIMEOUT} s): {left}"
    for kind in ("one byte", "trickled"):
        assert all(a.startswith(b"HTTP/1.1 408") and b'"errors"' in a for a in answers[kind]), (kind, answers[kind][:2])
    assert all(a == b"" for kind in set(answers) - {"one byte", "trickled"} for a in answers[kind]), answers


def test_slow_clients_are_closed_within_the_head_timeout(mirror, blob):
    clients = slow_clients(mirror.listener_port, blob.target(), None)
    try:
        check_closed_in_time(clients)
    finally:
        close_all([s for socks in clients.values() for s in socks])


def test_over_tls_slow_clients_and_unfinished_handshakes_are_closed_within_the_head_timeout(upstream, tls_setup):
    m, blob, context = tls_setup
    clients = slow_clients(m.listener_port, blob.target(), context)
    clients["no handshake"] = open_many(m.listener_port, 10)
    clients["half a handshake"] = open_many(m.listener_port, 10, b"\x16\x03\x01\x02\x00\x01")
    try:
        check_closed_in_time(clients)
    finally:
        close_all([s for socks in clients.values() for s in socks])
    problem = blob.main_port_serves()
    assert not problem, problem
    assert "Traceback" not in m.log_text()


def test_over_tls_a_flood_is_refused_beyond_the_share(upstream, tls_setup):
    m, blob, _ = tls_setup
    socks = open_many(m.listener_port, FLOOD)  # no handshake at all
    try:
        problem = blob.main_port_serves()
        assert not problem, f"the main port stopped serving during a TLS flood on the listener: {problem}"
        assert len(socks) == FLOOD and count_ended(socks) >= FLOOD - FILE_LIMIT // 3
        time.sleep(HEAD_TIMEOUT + SLACK)
        assert count_ended(socks) == FLOOD
    finally:
        close_all(socks)


def stalled_reader(port: int, target: str, tls: ssl.SSLContext | None) -> int:
    """Ask for the whole blob, read nothing for a while, then all there is: the bytes received."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # the stall shows sooner
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    if tls:
        sock = tls.wrap_socket(sock, server_hostname="127.0.0.1")
    with sock:
        sock.sendall(request(target))
        time.sleep(STALL_TIMEOUT + 4)
        received = 0
        try:
            while chunk := sock.recv(1 << 20):
                received += len(chunk)
        except OSError:
            pass
        return received


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_client_that_stops_reading_is_cut_after_tcp_timeout(request, mirror, blob, scheme):
    if scheme == "https":
        m, tls_blob, context = request.getfixturevalue("tls_setup")
        port, target = m.listener_port, tls_blob.target()
    else:
        port, target, context = mirror.listener_port, blob.target(), None
    results: list[int] = []
    readers = [threading.Thread(target=lambda: results.append(stalled_reader(port, target, context)))
               for _ in range(3)]
    for t in readers:
        t.start()
    for t in readers:
        t.join(60)
    assert len(results) == 3 and all(r < BLOB_SIZE for r in results), (
        f"answers left unread for {STALL_TIMEOUT + 4} s (tcp_timeout {STALL_TIMEOUT}) were still sent whole: {results}")
