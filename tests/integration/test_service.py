"""The mirror as a service, with a real mitmdump: certificates renewed under it, restarts that
lose no pull, the cache's version stamp, the check command, JSON logs.

* a certificate file replaced under a running mirror (a new certificate from the
  test CA, through a new intermediate): new connections to the mirror's port and to
  the blob listener get it, with its chain; a connection opened before keeps its
  certificate and still works; a half-written file keeps the previous certificate,
  with one log line, until it is whole;
* SIGTERM during a download that several clients follow: their transfers end short,
  the process exits 0 at once, nothing partial stays in the cache, and the next
  process serves the blob whole; SIGKILL (a crash) leaves a partial download file,
  which is never served;
* a cache of an unknown newer layout stops the mirror with a line that says so; one
  from before the stamp is adopted and served from;
* the check command next to a running mirror on the same port and cache;
* a whole pull's log as JSON lines, and not a secret in it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.hardening.test_log_secrets import SERVICE, assert_nothing_grants_access, skopeo_copy
from tests.support.certs import issue_server_cert, make_ca_and_server_cert, serial_of
from tests.support.images import make_big_layer, push_image, sha256_digest
from tests.support.mirror import REPO_ROOT, Mirror
from tests.support.ports import free_port
from tests.support.throttle import throttled_port


def fresh_blob(upstream, tmp_path: Path, repo: str, size: int) -> str:
    layer = tmp_path / f"{repo.replace('/', '_')}-{time.monotonic_ns()}.tar"
    digest, _ = make_big_layer(layer, size, seed=os.urandom(8))
    push_image(upstream, repo, "1", [layer], media="oci")
    return digest


def token_for(url: str, repo: str, **kw) -> str:
    r = httpx.get(f"{url}/token", params={"service": SERVICE, "scope": f"repository:{repo}:pull"}, timeout=30, **kw)
    assert r.status_code == 200, r.text
    return r.json()["token"]


def blob_path(cache: Path, digest: str) -> Path:
    return cache / "blobs" / "sha256" / digest[7:9] / digest[7:]


# ---------------------------------------------------------------- certificates


def tls_connect(port: int, ca: Path) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return ssl.create_default_context(cafile=str(ca)).wrap_socket(raw, server_hostname="127.0.0.1")


def serial_on(port: int, ca: Path) -> int:
    with tls_connect(port, ca) as tls:
        return serial_of(tls.getpeercert(binary_form=True))


def served_within(ports: list[int], ca: Path, serial: int, seconds: float = 5) -> dict[int, int]:
    """The serial each port serves to a new connection, once all serve ``serial`` (or time is up)."""
    deadline = time.monotonic() + seconds
    while True:
        seen = {port: serial_on(port, ca) for port in ports}
        if set(seen.values()) == {serial} or time.monotonic() > deadline:
            return seen
        time.sleep(0.3)


def still_answers(tls: ssl.SSLSocket, path: str) -> bytes:
    tls.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    answer = b""
    while chunk := tls.recv(65536):
        answer += chunk
    return answer


def replace_atomically(path: Path, pem: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(pem)
    os.replace(tmp, path)


def test_a_renewed_certificate_reaches_new_connections_on_both_ports(upstream, tmp_path):
    made = make_ca_and_server_cert(tmp_path / "ca")
    served = tmp_path / "mirror.pem"
    served.write_bytes(made["pem"].read_bytes())
    listen = free_port()
    options = {"hub_cache_dir": str(tmp_path / "cache"), "hub_blob_listen": f"127.0.0.1:{listen}"}
    with Mirror(tmp_path / "m", upstream, tls=(served, "*"), options=options) as m:
        old_main, old_listener = tls_connect(m.port, made["ca"]), tls_connect(listen, made["ca"])
        first = serial_of(made["cert"].read_bytes())
        assert serial_of(old_main.getpeercert(binary_form=True)) == first
        renewed = issue_server_cert(tmp_path / "renewed", tmp_path / "ca", intermediate="R11")
        replace_atomically(served, renewed["pem"].read_bytes())
        second = serial_of(renewed["cert"].read_bytes())
        # verified against the root only: the new intermediate comes with the new certificate
        assert served_within([m.port, listen], made["ca"], second) == {m.port: second, listen: second}
        assert b" 200 " in still_answers(old_main, "/_hub/health").split(b"\r\n", 1)[0]  # opened before, still served
        assert still_answers(old_listener, "/blobs/x").startswith(b"HTTP/1.1 4")  # answered, over the old session
        half = issue_server_cert(tmp_path / "half", tmp_path / "ca")["pem"].read_bytes()
        served.write_bytes(half[: len(half) // 2])  # written in place, and not finished yet
        time.sleep(1.5)
        assert served_within([m.port, listen], made["ca"], second, seconds=2.5) == {m.port: second, listen: second}
        whole = issue_server_cert(tmp_path / "whole", tmp_path / "ca")
        served.write_bytes(whole["pem"].read_bytes())
        third = serial_of(whole["cert"].read_bytes())
        assert served_within([m.port, listen], made["ca"], third) == {m.port: third, listen: third}
        log = m.log_text()
    assert log.count("cannot be used") == 1 and "still serving the previous one" in log
    assert log.count("renewed: serial") == 2 and "Traceback" not in log


# ---------------------------------------------------------------- stopping and crashing


def follow(url: str, bearer: str, results: dict, name: str) -> None:
    got = bytearray()
    try:
        with httpx.stream("GET", url, headers={"Authorization": f"Bearer {bearer}"}, timeout=60) as r:
            for chunk in r.iter_raw(65536):
                got.extend(chunk)
        results[name] = (r.status_code, bytes(got), None)
    except httpx.HTTPError as e:
        results[name] = (None, bytes(got), e)


def cold_pull_interrupted(m: Mirror, cache: Path, upstream, digest: str, repo: str, sig: int,
                          followers: int = 3) -> dict:
    """``followers`` clients of one download (the CDN slowed to 4 MB/s); ``sig`` to mitmdump after 1 MiB."""
    results: dict = {}
    url, bearer = f"{m.url}/v2/{repo}/blobs/{digest}", token_for(m.url, repo)
    with throttled_port(int(urlsplit(upstream.cdn_url).port), 4):
        threads = [threading.Thread(target=follow, args=(url, bearer, results, f"c{i}")) for i in range(followers)]
        for t in threads:
            t.start()
            time.sleep(0.2)
        deadline = time.monotonic() + 30
        while m.proc.poll() is None and time.monotonic() < deadline:
            part = cache / "tmp" / f"{digest[7:]}.download"
            if part.exists() and part.stat().st_size > (1 << 20):
                break
            time.sleep(0.05)
        m.proc.send_signal(sig)
        for t in threads:
            t.join(60)
    return results


def test_sigterm_during_a_download_with_followers(upstream, tmp_path):
    size = 24 * 1024 * 1024
    digest = fresh_blob(upstream, tmp_path, "team/v-sigterm", size)
    cache = tmp_path / "cache"
    m = Mirror(tmp_path / "m", upstream, options={"hub_cache_dir": str(cache)}).start()
    try:
        stopped_at = time.monotonic()
        results = cold_pull_interrupted(m, cache, upstream, digest, "team/v-sigterm", signal.SIGTERM)
        assert m.proc.wait(15) == 0, m.log_text()[-3000:]
        assert time.monotonic() - stopped_at < 30
    finally:
        m.stop()
    assert len(results) == 3
    for status, got, _error in results.values():
        assert len(got) < size and sha256_digest(got) != digest  # short: a clean failure, never a wrong blob
    assert not blob_path(cache, digest).exists() and list((cache / "tmp").glob("*.download")) == []
    assert "Traceback" not in m.log_text()
    with Mirror(tmp_path / "next", upstream, options={"hub_cache_dir": str(cache)}) as after:
        retry = httpx.get(f"{after.url}/v2/team/v-sigterm/blobs/{digest}", timeout=120,
                          headers={"Authorization": f"Bearer {token_for(after.url, 'team/v-sigterm')}"})
        assert retry.status_code == 200 and sha256_digest(retry.content) == digest
    assert blob_path(cache, digest).exists()


def test_a_crash_during_a_download_leaves_nothing_that_is_served(upstream, tmp_path):
    size = 16 * 1024 * 1024
    digest = fresh_blob(upstream, tmp_path, "team/v-sigkill", size)
    cache = tmp_path / "cache"
    m = Mirror(tmp_path / "m", upstream, options={"hub_cache_dir": str(cache)}).start()
    try:
        cold_pull_interrupted(m, cache, upstream, digest, "team/v-sigkill", signal.SIGKILL, followers=1)
        m.proc.wait(10)
    finally:
        m.stop()
    partial = cache / "tmp" / f"{digest[7:]}.download"
    assert partial.exists() and 0 < partial.stat().st_size < size and not blob_path(cache, digest).exists()
    with Mirror(tmp_path / "next", upstream, options={"hub_cache_dir": str(cache)}) as after:
        url, bearer = f"{after.url}/v2/team/v-sigkill/blobs/{digest}", token_for(after.url, "team/v-sigkill")
        for _ in range(2):  # the download, then a hit
            r = httpx.get(url, headers={"Authorization": f"Bearer {bearer}"}, timeout=120)
            assert r.status_code == 200 and sha256_digest(r.content) == digest
        assert r.headers["x-hub-cache"] == "hit"


# ---------------------------------------------------------------- the cache across versions


def test_a_cache_of_a_newer_layout_stops_the_mirror_with_a_clear_line(upstream, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "hub-rewrite-cache.json").write_text(json.dumps({"layout": 2, "written_by": "0.9.0"}))
    m = Mirror(tmp_path / "m", upstream, options={"hub_cache_dir": str(cache)})
    done = subprocess.run(m.argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert f"hub_rewrite: hub_cache_dir: cache {cache} has layout 2 (written by hub-rewrite 0.9.0)" in done.stdout
    assert "refusing to start rather than misread it" in done.stdout and "Traceback" not in done.stdout + done.stderr
    assert sorted(p.name for p in cache.iterdir()) == ["hub-rewrite-cache.json"]


def test_a_cache_from_before_the_stamp_is_adopted_and_served_from(upstream, tmp_path):
    cache = tmp_path / "cache"
    repo, digest = "library/alpine", upstream.images["library/alpine"]["manifests"]["amd64"]["layer_digests"][0]
    with Mirror(tmp_path / "old", upstream, options={"hub_cache_dir": str(cache)}) as old:
        r = httpx.get(f"{old.url}/v2/{repo}/blobs/{digest}", timeout=60,
                      headers={"Authorization": f"Bearer {token_for(old.url, repo)}"})
        assert r.status_code == 200
    (cache / "hub-rewrite-cache.json").unlink()  # as a version before the stamp left it
    before = len(upstream.cdn_requests())
    with Mirror(tmp_path / "new", upstream, options={"hub_cache_dir": str(cache)}) as new:
        r = httpx.get(f"{new.url}/v2/{repo}/blobs/{digest}", timeout=60,
                      headers={"Authorization": f"Bearer {token_for(new.url, repo)}"})
        log = new.log_text()
    assert r.status_code == 200 and r.headers["x-hub-cache"] == "hit" and sha256_digest(r.content) == digest
    assert len(upstream.cdn_requests()) == before
    assert "written before version stamps: adopted as layout 1" in log
    assert json.loads((cache / "hub-rewrite-cache.json").read_text())["layout"] == 1


# ---------------------------------------------------------------- the check, beside the mirror it is about


def check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hubrewrite.check", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)


def test_the_check_runs_beside_the_running_mirror(upstream, tmp_path):
    """Same port, same cache, same blob listener port: the check binds nothing, writes nothing."""
    cache, listen = tmp_path / "cache", free_port()
    options = {"hub_cache_dir": str(cache), "hub_blob_listen": f"127.0.0.1:{listen}"}
    with Mirror(tmp_path / "m", upstream, options=options) as m:
        before = sorted(str(p.relative_to(cache)) for p in cache.rglob("*"))
        args = ["--mode", f"reverse:{upstream.api_url}@127.0.0.1:{m.port}", *[f"--set={k}={v}" for k, v in options.items()]]
        ok = check(*args)
        assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
        assert f"would listen at 127.0.0.1:{m.port}" in ok.stdout and f"blob listener: would listen at 127.0.0.1:{listen}" in ok.stdout
        assert "check: configuration OK" in ok.stdout
        refused = check(*args, "--set", "hub_upstream_timeout=0")
        assert refused.returncode == 1 and "check: hub_upstream_timeout must be at least 1 second" in refused.stdout
        assert "Traceback" not in refused.stdout + refused.stderr
        assert sorted(str(p.relative_to(cache)) for p in cache.rglob("*")) == before
        assert httpx.get(f"{m.url}/_hub/health", timeout=10).status_code == 200


# ---------------------------------------------------------------- JSON logs


def test_a_whole_pull_logs_json_lines_without_a_secret(upstream, tmp_path):
    password = upstream.users["alice"]
    options = {"hub_cache_dir": str(tmp_path / "cache"), "hub_log_format": "json", "flow_detail": "2"}
    with Mirror(tmp_path / "m", upstream, options=options, env={"COLUMNS": "4000"}) as m:
        for run in ("cold", "warm"):
            result = skopeo_copy(m, "private/secret:1.0", tmp_path / run, f"alice:{password}")
            assert result.returncode == 0, result.stderr
        grants = [httpx.get(f"{m.url}/token", params={"service": SERVICE, "scope": "repository:private/secret:pull"},
                            auth=("alice", password)).json()]
        log = m.log_text()
    lines = [line for line in log.splitlines() if line.strip()]
    assert lines[0].endswith(f"Loading script {REPO_ROOT / 'addons' / 'hub_rewrite.py'}")
    entries = [json.loads(line) for line in lines[1:]]  # every other line is one JSON object
    pulls = [e for e in entries if e.get("event") == "pull"]
    assert {e["cache"] for e in pulls if e["kind"] == "blob"} == {"miss", "hit"}
    assert {e["logger"] for e in entries} >= {"hub_rewrite", "mitmproxy.dumper", "mitmproxy.proxy.mode_servers"}
    assert all(e["time"].endswith("Z") and e["level"] in ("debug", "info", "warning", "error") for e in entries)
    assert_nothing_grants_access(log, password, grants)
    assert "?" not in "".join(e["message"] for e in pulls)  # no query in a pull line
