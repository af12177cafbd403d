"""The clients a benchmark pulls with: curl (timed, or hashed), skopeo, and an
anonymous registry token asked from a mirror's /token like a client would.

Every pull either succeeds whole or raises BenchError: a failed pull is never
averaged in. Signed URLs and tokens are never put into an error message.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx

from harness import BenchError

MB = 1e6
CURL_TIMEOUT = 900
SKOPEO_TIMEOUT = 900


def curl_argv(url: str, headers: list[str] = (), follow: bool = False, timeout: float = CURL_TIMEOUT,
              cacert: Path | None = None) -> list[str]:
    """curl to /dev/null over HTTP/1.1, printing its transfer figures as JSON.

    ``follow``: follow redirects like a registry client (curl drops
    Authorization when the host or port changes). ``cacert``: the CA an https:// server is verified with."""
    return ["curl", "-sS", "-o", "/dev/null", "-w", "%{json}", *_curl_request(url, headers, follow, timeout, cacert)]


def _curl_request(url: str, headers: list[str], follow: bool, timeout: float, cacert: Path | None) -> list[str]:
    """What every curl of the benchmarks asks: HTTP/1.1, a time limit, redirects, the CA, headers, the URL."""
    argv = ["--http1.1", "--max-time", str(int(timeout))]
    if follow:
        argv.append("-L")
    if cacert:
        argv += ["--cacert", str(cacert)]
    for h in headers:
        argv += ["-H", h]
    return argv + [url]


def curl_result(rc: int, stdout: str, stderr: str, size: int) -> dict[str, Any]:
    """The figures of one finished ``curl_argv`` run; BenchError unless 200 with ``size`` bytes."""
    try:
        w = json.loads(stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise BenchError(f"curl exited {rc} without its figures ({stderr.strip()[-300:]!r})") from None
    if rc != 0:
        raise BenchError(f"curl exited {rc}: {w.get('errormsg') or stderr.strip()[-300:]}")
    status, got = int(w["http_code"]), int(w["size_download"])
    if status != 200:
        raise BenchError(f"HTTP {status} (expected 200), {got} bytes")
    if got != size:
        raise BenchError(f"downloaded {got} bytes, expected {size}")
    total = float(w["time_total"])
    return {"status": status, "bytes": got, "time_total": total,
            "time_starttransfer": float(w["time_starttransfer"]),  # summed over redirects
            "curl_speed_download": float(w["speed_download"]), "mb_per_s": got / total / MB,
            "num_redirects": int(w["num_redirects"]), "final_port": int(w["remote_port"])}


def curl_pull(url: str, size: int, headers: list[str] = (), follow: bool = False,
              timeout: float = CURL_TIMEOUT, cacert: Path | None = None) -> dict[str, Any]:
    """One timed pull to /dev/null; raises BenchError unless 200 and ``size`` bytes."""
    p = subprocess.run(curl_argv(url, headers, follow, timeout, cacert), capture_output=True, text=True,
                       timeout=timeout + 30)
    return curl_result(p.returncode, p.stdout, p.stderr, size)


def curl_sha256(url: str, headers: list[str] = (), follow: bool = False,
                timeout: float = CURL_TIMEOUT, cacert: Path | None = None) -> tuple[str, int]:
    """Pull through curl into a streaming sha256 (constant memory)."""
    argv = ["curl", "-sS", "--fail", "-o", "-", *_curl_request(url, headers, follow, timeout, cacert)]
    h = hashlib.sha256()
    n = 0
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        while chunk := proc.stdout.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
        rc = proc.wait(timeout)
        err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if rc != 0:
        raise BenchError(f"curl exited {rc}: {err}")
    return "sha256:" + h.hexdigest(), n


def registry_token(base_url: str, service: str, repo: str, cacert: Path | None = None) -> str:
    """An anonymous pull token from ``base_url``/token (a mirror's, or its peer's)."""
    q = urlencode({"service": service, "scope": f"repository:{repo}:pull"})
    try:
        r = httpx.get(f"{base_url}/token?{q}", timeout=30, verify=str(cacert) if cacert else True)
    except httpx.HTTPError as e:
        raise BenchError(f"{base_url}/token: {type(e).__name__}: {e}") from None
    if r.status_code != 200:
        raise BenchError(f"{base_url}/token answered {r.status_code}: {r.text[:300]}")
    return r.json()["token"]


def skopeo_pull(host: str, repo: str, tag: str, dest: Path, blobs: dict[str, int], multi: bool,
                cert_dir: Path | None = None) -> float:
    """One timed ``skopeo copy`` into ``dir:dest``; raises BenchError unless every blob arrived whole.

    ``cert_dir``: a directory with the CA of an HTTPS registry (the fake Hub straight); without
    it, TLS is not required (a mirror on plain HTTP, or the plain fake Hub)."""
    tls = ["--src-cert-dir", str(cert_dir)] if cert_dir else ["--src-tls-verify=false"]
    argv = ["skopeo", "copy", *tls, "--src-no-creds"]
    if multi:
        argv.append("--all")
    argv += [f"docker://{host}/{repo}:{tag}", f"dir:{dest}"]
    t0 = time.monotonic()
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=SKOPEO_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise BenchError(f"skopeo timed out after {SKOPEO_TIMEOUT}s: {shlex.join(argv)}") from None
    seconds = time.monotonic() - t0
    if p.returncode != 0:
        raise BenchError(f"skopeo exited {p.returncode}: {p.stderr.strip()[-1500:]}")
    if not (dest / "manifest.json").is_file():
        raise BenchError(f"skopeo wrote no manifest.json to {dest}")
    for digest, size in blobs.items():
        f = dest / digest.split(":", 1)[1]
        got = f.stat().st_size if f.is_file() else None
        if got != size:
            raise BenchError(f"skopeo output: blob {digest[:19]}... has {got} bytes, expected {size}")
    return seconds
