"""Connections and request heads: bounded before mitmproxy buffers them.

Huge request heads are answered 431 with memory staying flat; connections that
trickle a head byte by byte are closed after hub_head_timeout; beyond
hub_max_connections (or what the open-file limit allows) connections are
refused at once; the log says so once per cause, never with a traceback; and
the mirror keeps serving throughout (conftest.keeps_serving)."""

from __future__ import annotations

import resource
import socket
import threading
import time

import pytest

from tests.support.mirror import Mirror

from .helpers import UPSTREAM_TIMEOUT, get, raw_request

HEAD_TIMEOUT = 3
MAX_CONNECTIONS = 60


@pytest.fixture(scope="module")
def mirror(upstream, cache_dir, tmp_path_factory):
    """A mirror with small connection limits (and the cache, as in the rest of the suite)."""
    options = {"hub_cache_dir": str(cache_dir), "hub_upstream_timeout": str(UPSTREAM_TIMEOUT),
               "hub_head_timeout": str(HEAD_TIMEOUT), "hub_max_connections": str(MAX_CONNECTIONS)}
    with Mirror(tmp_path_factory.mktemp("connections-mirror"), upstream.api_url, options=options) as m:
        yield m


def rss_mb(mirror) -> float:
    return mirror.peak_rss() / 1e6


def test_huge_request_heads_get_431_with_flat_memory(mirror):
    mirror.reset_peak_rss()
    before = rss_mb(mirror)
    header = b"X-Junk: " + b"a" * (100 * 1024 * 1024) + b"\r\n"
    results = []

    def send_huge():
        with socket.create_connection(("127.0.0.1", mirror.port), timeout=15) as s:
            s.settimeout(15)
            try:
                s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n")
            except OSError:
                pass  # closed by the mirror mid-send: expected
            try:
                results.append(s.recv(65536))
            except OSError as e:
                results.append(repr(e).encode())

    threads = [threading.Thread(target=send_huge) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 4
    answered = [r for r in results if r.startswith(b"HTTP/1.1 431")]
    assert answered, f"no 431 for a 100 MiB head: {[r[:80] for r in results]}"
    assert rss_mb(mirror) - before < 50, f"peak RSS grew from {before:.0f} to {rss_mb(mirror):.0f} MB"
    assert "request head too large" in mirror.log_text()


def test_a_head_just_under_the_limit_is_served(mirror, upstream):
    r = raw_request(mirror.port, get("/v2/", mirror.port, "X-Padding: " + "p" * 40_000))
    assert r.status == 401, r.short()


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


def test_connections_beyond_the_limit_are_refused_at_once(mirror, upstream):
    socks = []
    try:
        for _ in range(MAX_CONNECTIONS * 3):
            socks.append(socket.create_connection(("127.0.0.1", mirror.port), timeout=5))
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
    assert "too many connections" in mirror.log_text()


def test_a_low_open_file_limit_is_respected_without_tracebacks(upstream, tmp_path):
    """With 256 open files and the default hub_max_connections (1000), the mirror serves
    what the files allow and refuses the rest: no 'Too many open files' tracebacks."""
    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    m = Mirror(tmp_path / "m", upstream.api_url)
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
