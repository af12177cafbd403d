"""The delaying TCP relay (tests/support/latency_relay.py), run as the test upstream runs it:
its own process, in front of a plain TCP server of this test."""

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support.common import read_json_lines
from tests.support.latency_relay import longest_chain, summarize_round_trips

REPO_ROOT = Path(__file__).resolve().parents[2]
RTT = 0.1


class EchoServer:
    """Echoes every byte back; on the client's half-close, sends "bye" and closes."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _serve(conn):
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
                conn.sendall(b"bye")  # the client half-closed; we may still talk
            except OSError:
                pass


@pytest.fixture
def relay(tmp_path):
    echo = EchoServer()
    ready, log = tmp_path / "relay.ready", tmp_path / "relay.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.latency_relay", "--target",
                             f"127.0.0.1:{echo.port}", "--rtt-ms", str(RTT * 1000), "--window", str(1 << 20),
                             "--log", str(log), "--ready-file", str(ready)], cwd=REPO_ROOT)
    try:
        deadline = time.monotonic() + 10
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        yield json.loads(ready.read_text())["port"], log
    finally:
        proc.terminate()
        proc.wait(5)
        echo.sock.close()


def closed_records(log, timeout=5.0):
    """The relay's log once it recorded a connection's close."""
    deadline = time.monotonic() + timeout
    while True:
        recs = read_json_lines(log)
        if any(r["event"] == "close" for r in recs) or time.monotonic() > deadline:
            return recs
        time.sleep(0.02)


def _recv_exactly(sock, n):
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, "closed early"
        out += chunk
    return bytes(out)


def test_delay_order_and_half_close(relay):
    port, log = relay
    with socket.create_connection(("127.0.0.1", port)) as s:
        t0 = time.monotonic()
        s.sendall(b"first")
        assert _recv_exactly(s, 5) == b"first"
        first = time.monotonic() - t0  # the handshake RTT is charged, then one RTT
        t0 = time.monotonic()
        s.sendall(b"second")
        assert _recv_exactly(s, 6) == b"second"
        again = time.monotonic() - t0
        payload = bytes(range(256)) * 16384  # 4 MiB: more than the 1 MiB window, in order
        sender = threading.Thread(target=s.sendall, args=(payload,))
        sender.start()
        assert _recv_exactly(s, len(payload)) == payload
        sender.join()
        s.shutdown(socket.SHUT_WR)  # half-close: the other way still works
        assert _recv_exactly(s, 3) == b"bye"
        assert s.recv(1) == b""  # and then the server's close comes through
    # the relay's clock for the connection starts at its accept, which may come a little before t0
    assert 2 * RTT - 0.01 <= first < 2 * RTT + 0.08, first
    assert RTT <= again < RTT + 0.08, again
    recs = closed_records(log)
    (close,) = [r for r in recs if r["event"] == "close"]
    assert close["to_target"] == close["to_client"] - 3 == 11 + len(payload)
    assert "error" not in close
    trips = [(r["start"], r["end"]) for r in recs if r["event"] == "round_trip"]
    assert len(trips) >= 4  # TCP, first, second, the payload (which may answer in pieces)
    assert all(end - start >= RTT - 0.005 for start, end in trips)
    assert trips[1][1] - trips[0][0] >= 2 * RTT - 0.005  # TCP, then the first exchange
    summary = summarize_round_trips(recs)
    assert (summary["connections"], summary["tls_handshakes"], summary["probes"]) == (1, 1, 0)
    # TCP, first, second in a row; while the payload streams, flights overlap their answers
    assert 4 <= summary["sequential_round_trips"] <= len(trips)


def test_back_pressure_holds_a_slow_reader(relay):
    """The relay holds at most its window (plus socket buffers): a writer to a reader that does
    not read is stopped, not buffered without bound."""
    port, _ = relay
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                sent += s.send(b"x" * 65536)
            except BlockingIOError:
                time.sleep(0.01)
        # echo server blocked by our not reading: relay window 1 MiB each way + kernel buffers
        assert sent < 64 << 20, sent


def test_a_probe_is_a_connection_without_data(relay):
    port, log = relay
    socket.create_connection(("127.0.0.1", port)).close()  # connect and close, as a reachability check
    recs = closed_records(log)
    assert summarize_round_trips(recs) == {"connections": 1, "tls_handshakes": 0, "probes": 1, "round_trips": 0,
                                           "sequential_round_trips": 0}


def test_a_refused_target_closes_the_client(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    ready = tmp_path / "r.ready"
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.latency_relay", "--target", f"127.0.0.1:{dead}",
                             "--rtt-ms", "10", "--ready-file", str(ready)], cwd=REPO_ROOT)
    try:
        while not ready.exists():
            assert proc.poll() is None
            time.sleep(0.02)
        with socket.create_connection(("127.0.0.1", json.loads(ready.read_text())["port"]), timeout=5) as s:
            try:
                assert s.recv(1) == b""
            except ConnectionResetError:
                pass
    finally:
        proc.terminate()
        proc.wait(5)


def test_longest_chain_counts_sequential_round_trips():
    # two in parallel, then one after both, then one overlapping it: 2 sequential
    assert longest_chain([(0, 1), (0.1, 1.1), (1.2, 2.2), (2.0, 3.0)]) == 2
    assert longest_chain([(0, 1), (1, 2), (2, 3)]) == 3
    assert longest_chain([]) == 0
    assert longest_chain([(0, 1), (0.999, 2)], slack=0.002) == 2
