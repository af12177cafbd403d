"""Issue 17, item 13: HTTP/2 (``http2: true``) and the h2c upgrade.

With HTTP/2 on (the mirror serves HTTPS with ``--certs``; mitmproxy speaks
HTTP/2 over TLS only), a real HTTP/2 client (the ``h2`` package, frame by
frame) sends:

- requests whose HEADERS frame ends the stream but announce ``content-length:
  5`` (RFC 9113 §8.1.1: malformed): each is reset with PROTOCOL_ERROR, nothing
  reaches the upstream, the mirror's descriptors (its connections to its own
  loopback server) do not pile up, and the connection goes on serving;
- 20,000 HEADERS+RST_STREAM pairs on one connection ("rapid reset"): the
  upstream sees at most the requests the mirror holds before it closes the
  connection (a few dozen, not thousands), and another client's requests
  meanwhile are not slowed tenfold (median).

On the plain port, ``Upgrade: h2c`` (``curl --http2``) is ignored: the answer
comes in HTTP/1.1, as if the header were absent (RFC 9110 §7.8).
"""

from __future__ import annotations

import os
import secrets
import shutil
import statistics
import subprocess
import threading
import time

import h2.errors
import h2.events
import httpx
import pytest

from hubrewrite.connwork import MAX_HELD
from tests.support.certs import make_ca_and_server_cert
from tests.support.mirror import Mirror

from .h2wire import H2Client
from .helpers import UPSTREAM_TIMEOUT
from .setups import log_marks, upstream_saw
from .wire import Conn, request_head

MALFORMED_STREAMS = 300
BATCH = 50
RAPID_RESETS = 20_000


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_ca_and_server_cert(tmp_path_factory.mktemp("h2-certs"))


@pytest.fixture(scope="module")
def h2_mirror(upstream, certs, tmp_path_factory):
    """The mirror over HTTPS with HTTP/2 to clients turned on (mitm.conf turns it off)."""
    options = {"http2": "true", "hub_upstream_timeout": str(UPSTREAM_TIMEOUT)}
    with Mirror(tmp_path_factory.mktemp("h2-mirror"), upstream, tls=(certs["pem"], "*"), options=options) as m:
        yield m


def open_files(mirror) -> int:
    return len(os.listdir(f"/proc/{mirror.proc.pid}/fd"))


def v2_latency(mirror, certs) -> float:
    start = time.monotonic()
    r = httpx.get(f"{mirror.url}/v2/", verify=str(certs["ca"]), timeout=60)
    assert r.status_code == 401, r.text
    return time.monotonic() - start


def test_a_body_announced_but_never_sent_resets_the_stream(h2_mirror, upstream, certs):
    tag = "h17-" + secrets.token_hex(4)
    since = log_marks(upstream)
    files = open_files(h2_mirror)
    with H2Client(h2_mirror.port, certs["ca"]) as client:
        malformed = []
        for batch in range(0, MALFORMED_STREAMS, BATCH):  # within the 100 streams a client may have open
            streams = [client.request("GET", f"/v2/library/alpine/manifests/{tag}-{i}", ("content-length", "5"))
                       for i in range(batch, batch + BATCH)]
            if batch == 0:
                streams.append(client.request("POST", "/token", ("content-length", "5"),
                                              ("content-type", "application/x-www-form-urlencoded")))
            client.wait_for(lambda c: all(c.ending(s) for s in streams), 15)
            unended = [s for s in streams if not client.ending(s)]
            assert unended == [], f"{len(unended)} of {len(streams)} streams neither answered nor reset in 15 s"
            malformed += streams
        for s in malformed:
            ending = client.ending(s)
            assert isinstance(ending, h2.events.StreamReset), f"stream {s} answered {client.status(s)}"
            assert ending.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR, f"stream {s}: {ending}"
        valid = client.request("GET", "/v2/")  # a stream error, not a connection error: it goes on
        assert client.wait_for(lambda c: c.ending(valid), 15) and client.status(valid) == 401
    time.sleep(1)
    assert upstream_saw(upstream, since, tag) == []
    assert open_files(h2_mirror) - files < 10, f"descriptors {files} -> {open_files(h2_mirror)}"


def test_rapid_reset_starts_little_work_and_slows_nobody(h2_mirror, upstream, certs):
    baseline = statistics.median(v2_latency(h2_mirror, certs) for _ in range(7))
    tag = "h17-" + secrets.token_hex(4)
    since = log_marks(upstream)
    latencies: list[float] = []
    attack_over = threading.Event()

    def other_client() -> None:
        while not attack_over.is_set():
            latencies.append(v2_latency(h2_mirror, certs))
            time.sleep(0.1)

    probe = threading.Thread(target=other_client)
    probe.start()
    try:
        with H2Client(h2_mirror.port, certs["ca"]) as attacker:
            took = attacker.rapid_reset(f"/v2/library/alpine/manifests/{tag}", RAPID_RESETS)
            closed = attacker.wait_for(lambda c: c.closed, 15)
        time.sleep(3)
    finally:
        attack_over.set()
        probe.join(60)
    reached = [line for line in upstream_saw(upstream, since, tag) if line.startswith("edge:")]  # requests
    during = statistics.median(latencies)
    print(f"\nrapid reset: sent for {took:.1f} s, {len(reached)} upstream requests, closed: {closed}; "
          f"/v2/ latency baseline {baseline * 1000:.0f} ms, during {during * 1000:.0f} ms median, "
          f"{max(latencies) * 1000:.0f} ms max over {len(latencies)}")
    assert closed, "the mirror kept the connection of a client resetting thousands of streams"
    assert len(reached) <= MAX_HELD, f"{len(reached)} upstream requests for streams reset at once"
    assert during < max(5 * baseline, 0.3), f"other clients slowed from {baseline:.3f} s to {during:.3f} s"
    assert v2_latency(h2_mirror, certs) < 5


CURL = shutil.which("curl")


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_curl_http2_on_the_plain_port_gets_http11(mirror):
    """``curl --http2 http://mirror/v2/`` offers an h2c upgrade: it gets the registry's 401 in HTTP/1.1."""
    out = subprocess.run([CURL, "-sS", "--http2", "-o", "/dev/null", "-D", "-", "-w", "%{http_version}",
                          f"{mirror.url}/v2/"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    head = out.stdout.lower()
    assert head.startswith("http/1.1 401"), out.stdout
    assert f'www-authenticate: bearer realm="{mirror.url}/token"' in head, out.stdout
    assert out.stdout.rstrip().endswith("1.1"), out.stdout


def test_an_h2c_upgrade_is_answered_as_if_absent(mirror):
    with Conn.to(mirror.port) as conn:
        conn.send(request_head("GET", "/v2/", mirror.host, "Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c",
                               "HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA") + b"\r\n")
        first = conn.read_response()
        conn.send(request_head("GET", "/v2/", mirror.host) + b"\r\n")  # the connection stays HTTP/1.1
        second = conn.read_response()
    for resp in (first, second):
        assert resp.status == 401 and "realm=" in (resp.header("www-authenticate") or ""), resp.short()
