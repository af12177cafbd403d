"""Options that stop the start: one clear line, exit status 1, and nothing served meanwhile.

mitmproxy opens its listeners before the addon reads its options, and exits only once
its start-up is over: a client connecting in between used to reach hooks that found no
mirror (two tracebacks, ``'NoneType' object has no attribute 'settings'``), and its
request went on to the reverse target unchecked. Here the target is a loopback canary
and clients knock on the port all through the start: the canary must see nothing.
"""

from __future__ import annotations

import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.hardening.helpers import EvilListener
from tests.support.mirror import MITMDUMP, REPO_ROOT
from tests.support.ports import free_port


def knocking(port: int, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"GET /v2/library/x/manifests/1 HTTP/1.1\r\nHost: x\r\n\r\n")
                s.recv(100)
        except OSError:
            pass
        time.sleep(0.01)


@pytest.mark.parametrize("bad", [
    "hub_upstreams=docker.io=https://registry-1.docker.io,ftp://mirror.example.org",
    "hub_upstreams=docker.io=https://registry-1.docker.io,https://registry-1.docker.io",
    "hub_source_backoff=0",
])
def test_a_bad_option_stops_with_one_line_and_passes_nothing(tmp_path: Path, bad: str):
    canary, port, stop = EvilListener(), free_port(), threading.Event()
    argv = [str(MITMDUMP), "-s", str(REPO_ROOT / "addons" / "hub_rewrite.py"), "--mode",
            f"reverse:http://{canary.host}@127.0.0.1:{port}", "--set", f"confdir={tmp_path / 'conf'}", "--set", bad]
    knocker = threading.Thread(target=knocking, args=(port, stop), daemon=True)
    knocker.start()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, cwd=REPO_ROOT)
    finally:
        stop.set()
        knocker.join()
        reached = canary.connections()
        canary.close()
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert len(re.findall(r"hub_rewrite: .*; stopping", output)) == 1, output
    assert "Traceback" not in output and "Addon error" not in output, output
    assert reached == [], "a request went on to the reverse target while the start failed"
