"""Blob path benchmark: the mirror (blob listener off and on) side by side with
nginx proxy_cache, the reference peer, and with the CDN itself.

    PYTHONPATH=. .venv/bin/python bench/bench_blobpath.py [--size-mib 1024] [--reps 3] [--json out.json]

Starts the fake Docker Hub (tests/support/upstream.py) in a temporary
directory and pushes ``bench/big:1.0`` (one uncompressed layer of
``--size-mib`` MiB) and ``bench/multi:1.0`` (a two-arch manifest list of about
10 MB). These servers are compared, each started fresh with an empty cache:

* ``nginx``: nginx ``proxy_cache`` set up as a pull-through mirror
  (bench/nginx_peer.py);
* ``relay``: the mirror with ``hub_cache_dir`` and the blob listener OFF,
  every byte relayed by mitmproxy (today's path);
* ``listener``: the same with ``--set hub_blob_listen=127.0.0.1:<port>``: a
  cached blob is answered with a 307 to that listener, which serves the file
  with sendfile. mitmproxy keeps an option no addon claims without a word, so
  before the listener exists this row measures the relay again; the report
  says so when no pull was redirected to another port;
* ``listener_tls``: the same served over HTTPS (``--certs``, a test CA curl
  trusts): the listener then serves with the mirror's certificate, and
  asyncio encrypts in user space instead of ``sendfile``. Blob pulls only.

``--reps`` interleaved repetitions (the order of the groups rotates), each:

* ``cdn``: the big blob with curl straight from a signed CDN URL (curl's own CPU
  is what receiving it over TLS costs; with sha256's rate, the floor of a
  verifying cache's cold CPU), and
  ``skopeo copy --all`` of the multi image straight from the fake Hub (direct)
  and through mitmdump without the addon (the floor of anything built on
  mitmproxy: skopeo follows the blob redirects to the CDN itself), and through
  the mirror with ``hub_side_flows=on`` (what mitmweb turns on: the cost of
  recording the mirror's own exchanges as flows);
* per server, fresh with an empty cache: the big blob with curl (following
  redirects, a bearer token from the server's /token), cold, then warm; then
  (not ``listener_tls``) a cold ``skopeo copy --all`` of the multi image and a
  warm one; after nginx's, the same warm copy through mitmdump without the
  addon in front of that nginx (what mitmproxy alone adds to a pull served from
  a cache: the floor of the warm copy).

Then ``--reps`` rounds of the throttled scenario per server: the CDN's answers
throttled to ``--throttle-mb-s`` with tc (tests/support/throttle.py), a fresh
server, 4 curl clients of the big blob started 0.3 s apart.

Per pull: MB/s, time to first byte (curl, summed over redirects), CPU seconds
of the serving processes per GiB (utime+stime of the process tree: mitmdump,
or nginx's master, workers and cache processes), peak RSS (VmHWM, reset before
every pull; for nginx the sum over its processes), and the CDN's requests and
body bytes from its access log. Every pull must answer 200 with the full size
(skopeo: every blob at its size, digests checked by skopeo); one warm pull per
server is hashed and must match the digest. Anything else fails the run (exit 1).

``HUB_BENCH_SCALE=smoke`` shrinks it to 16 MiB, 1 rep and an 8 MB/s throttle.
Units: MB = 10^6 bytes, MiB = 2^20 bytes, GiB = 2^30 bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
for p in (str(REPO_ROOT), str(BENCH_DIR)):
    if p not in sys.path:
        sys.path.insert(0, p)

from harness import (BenchError, apply_scale, blob_arguments, exact_command, log, machine_facts,  # noqa: E402
                     report_footer, run_benchmark, smoke_banner, tool_version, upstream_options)
from image_set import push_images  # noqa: E402
from nginx_peer import NGINX, NginxError, NginxPeer  # noqa: E402
from procstat import cpu_seconds, peak_rss, process_tree, reset_peak_rss  # noqa: E402
from pulls import CURL_TIMEOUT, curl_argv, curl_pull, curl_result, curl_sha256, registry_token, skopeo_pull  # noqa: E402
from tests.support.certs import make_ca_and_server_cert  # noqa: E402
from tests.support.mirror import Mirror, MirrorError  # noqa: E402
from tests.support.ports import free_port  # noqa: E402
from tests.support.throttle import ThrottleError, throttled_port  # noqa: E402
from tests.support.upstream import Upstream  # noqa: E402
from upstream_logs import LogCursor  # noqa: E402

SERVERS = ("nginx", "relay", "listener")
GROUPS = ("cdn", *SERVERS, "listener_tls")  # listener_tls: blob pulls only (what TLS costs the listener)
MIRRORS = ("listener", "relay")  # the targets are for the listener; the relay's are for comparison
LABELS = {"cdn": "straight from the CDN", "nginx": "nginx proxy_cache (peer)",
          "floor": "mitmdump without the addon in front of the warm nginx",
          "relay": "mirror, listener off", "listener": "mirror, listener on",
          "listener_tls": "mirror over HTTPS, listener on (same certificate)",
          "bare": "mitmdump without the addon", "side_flows": "mirror, listener off, side flows on (as mitmweb)"}
PULL_PATHS = ("cdn", "nginx_cold", "nginx_warm", "relay_cold", "relay_warm", "listener_cold", "listener_warm",
              "listener_tls_cold", "listener_tls_warm")
SKOPEO_PATHS = ("direct", "bare", *SERVERS, "side_flows")
# warm: the same copy again, everything cached; "floor": mitmdump without the addon in front of the
# warm nginx (what mitmproxy alone adds to a pull served from a cache)
SKOPEO_WARM = ("nginx_warm", "floor_warm", "relay_warm", "listener_warm")
THROTTLE_CLIENTS = 4
THROTTLE_STAGGER = 0.3  # seconds between client starts

WARM_VS_NGINX = 1.0  # mirror warm MB/s >= this x nginx warm
WARM_CPU_PER_GIB = 0.5  # mirror CPU s per GiB served warm, at most
COLD_VS_NGINX = 1.0  # mirror cold MB/s >= this x nginx cold
COLD_CPU_PER_GIB = 1.5  # mirror CPU s per GiB downloaded cold (and served), at most
SKOPEO_VS_BARE = 1.2  # mirror cold skopeo time <= this x mitmdump without the addon
SKOPEO_WARM_VS_NGINX = 1.5  # mirror warm skopeo time <= this x nginx warm
THROTTLE_FIRST_BYTE = 2.0  # every client's first byte within this many seconds of its start
THROTTLE_LAST_VS_FIRST = 1.15  # the last client done within this x the first client's time
# the Python driving a cold download above its floor parts (perf: 0.1 for 65,536 TLS records
# in the reading thread, 0.1 for the event loop's wakes and the writer's 1,024 buffers)
REACHABLE_MARGIN = 0.25  # CPU s per GiB
SETTLE_SECONDS = 10.0  # freed memory is handed back to the VM's host within this (measured: 5 to 8 s)
RSS_TARGET = 150_000_000  # mirror peak RSS below this, throughout (bytes)
MB = 1e6
NOT_IMPLEMENTED = "listener option not implemented yet"


# ---------------------------------------------------------------- the servers


@dataclass
class Served:
    """A server under test, as the measurements see it."""

    kind: str
    url: str
    host: str
    port: int
    pids: Callable[[], list[int]]
    alive: Callable[[], bool]
    log_tail: Callable[[], str]


@contextmanager
def serving(kind: str, workdir: Path, up: Upstream, certs: dict[str, Path] | None = None) -> Iterator[Served]:
    """A fresh ``kind`` server with an empty cache under ``workdir``; the cache is
    deleted when it stops (1 GiB each), the logs stay. ``certs`` (make_ca_and_server_cert):
    the certificate of ``listener_tls``."""
    try:
        if kind == "nginx":
            with NginxPeer(workdir, up.api_url, up.token_realm, ca_cert=up.ca_cert) as peer:
                yield Served(kind, peer.url, peer.host, peer.port, peer.pids,
                             lambda: peer.proc is not None and peer.proc.poll() is None, peer.log_tail)
        else:
            options = {"hub_cache_dir": str(workdir / "cache")}
            if kind in ("listener", "listener_tls"):
                options["hub_blob_listen"] = f"127.0.0.1:{free_port()}"
            tls = (certs["pem"], "*") if kind == "listener_tls" and certs else None
            if kind == "side_flows":
                options["hub_side_flows"] = "on"  # as in mitmweb: every exchange of the mirror's a flow
            with Mirror(workdir, up, options=options, name="mirror", tls=tls) as m:
                yield Served(kind, m.url, m.host, m.port, lambda: process_tree(m.proc.pid),
                             lambda: m.proc.poll() is None, lambda: m.log_text()[-3000:])
    except (NginxError, MirrorError) as e:
        raise BenchError(f"{LABELS[kind]} did not start: {e}") from None
    finally:
        shutil.rmtree(workdir / "cache", ignore_errors=True)


@contextmanager
def bare_mitmdump(workdir: Path, up: Upstream | str) -> Iterator[Served]:
    """mitmdump in front of the upstream (or another server's URL) without the addon: what
    mitmproxy alone costs a pull (the client follows the blob redirects to the CDN itself)."""
    try:
        with Mirror(workdir, up, plain=True, name="bare") as m:
            yield Served("bare", m.url, m.host, m.port, lambda: process_tree(m.proc.pid),
                         lambda: m.proc.poll() is None, lambda: m.log_text()[-3000:])
    except MirrorError as e:
        raise BenchError(f"mitmdump without the addon did not start: {e}") from None


def check_alive(served: Served, label: str) -> None:
    if not served.alive():
        raise BenchError(f"{label}: {LABELS[served.kind]} exited:\n{served.log_tail()}")


# ---------------------------------------------------------------- measurements


def cdn_counts(records: list[dict[str, Any]]) -> dict[str, int]:
    return {"cdn_requests": len(records), "cdn_bytes": sum(int(r.get("bytes") or 0) for r in records)}


def measured(served: Served | None, cdn_log: LogCursor, label: str, pull: Callable[[], dict[str, Any]],
             cdn_pids: Callable[[], list[int]] = list) -> dict[str, Any]:
    """Run one pull with the server's CPU, peak RSS and the CDN's log around it; with ``cdn_pids``
    also the CPU of the others on the path (``others_cpu_s``: the CDN's processes and the client's)."""
    cdn_log.take(settle=0.1)
    pids = served.pids() if served else []
    others = [p for pid in cdn_pids() for p in process_tree(pid)]
    reset_peak_rss(pids)
    cpu0, others0 = cpu_seconds(pids), cpu_seconds(others) + children_cpu()
    try:
        rec = pull()
    except BenchError as e:
        raise BenchError(f"{label}: {e}") from None
    if others:
        rec["others_cpu_s"] = cpu_seconds(others) + children_cpu() - others0
    if served is not None:
        rec["cpu_s"] = cpu_seconds(pids) - cpu0
        rec["peak_rss"] = peak_rss(pids)
        check_alive(served, label)
    rec.update(cdn_counts(cdn_log.take()))
    return rec


def listener_used(served: Served, rec: dict[str, Any]) -> bool:
    """The bytes came from another port than the server's: the mirror redirected to its listener."""
    return rec["num_redirects"] > 0 and rec["final_port"] != served.port


def throttled_clients(served: Served, url: str, headers: list[str], size: int, cdn_log: LogCursor,
                      storage_path: str, label: str) -> dict[str, Any]:
    """``THROTTLE_CLIENTS`` curls of one blob, ``THROTTLE_STAGGER`` s apart; times relative to
    the first client's start."""
    cdn_log.take(settle=0.1)
    pids = served.pids()
    reset_peak_rss(pids)
    procs: list[tuple[float, subprocess.Popen]] = []
    t0 = time.monotonic()
    try:
        for i in range(THROTTLE_CLIENTS):
            time.sleep(max(0.0, t0 + i * THROTTLE_STAGGER - time.monotonic()))
            procs.append((time.monotonic() - t0, subprocess.Popen(
                curl_argv(url, headers, follow=True), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
        clients = []
        for i, (start, proc) in enumerate(procs):
            out, err = proc.communicate(timeout=CURL_TIMEOUT + 30)
            try:
                r = curl_result(proc.returncode, out, err, size)
            except BenchError as e:
                raise BenchError(f"{label}, client {i}: {e}") from None
            clients.append({"start_s": start, "first_byte_s": r["time_starttransfer"],
                            "done_s": start + r["time_total"], "mb_per_s": r["mb_per_s"],
                            "listener_used": listener_used(served, r)})
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    rec: dict[str, Any] = {"clients": clients, "peak_rss": peak_rss(pids)}
    check_alive(served, label)
    cdn = cdn_log.take()
    rec.update(cdn_counts(cdn))
    rec["cdn_blob_requests"] = sum(1 for r in cdn if r.get("path") == storage_path)
    rec["max_first_byte_s"] = max(c["first_byte_s"] for c in clients)
    rec["last_vs_first"] = max(c["done_s"] for c in clients) / clients[0]["done_s"]
    return rec


# ---------------------------------------------------------------- the run


def sha256_rate(size: int) -> float:
    """MB per CPU second (this thread's) of hashlib's sha256 over ``size`` bytes (1 MiB updates, as
    the mirror hashes a download): CPU, not wall time, for other work on the machine takes turns
    with it; a cache that verifies what it stores cannot send a blob's last byte sooner."""
    block, hasher = os.urandom(1 << 20), hashlib.sha256()
    t0 = time.thread_time()
    for _ in range(size >> 20):
        hasher.update(block)
    return (size >> 20 << 20) / (time.thread_time() - t0) / MB


def write_cpu(directory: Path, size: int) -> float:
    """CPU seconds (this thread's, user + system) of writing ``size`` bytes to a new file in
    ``directory`` as a download writes a blob into the cache's file system (1 MiB per write, into
    the page cache: on this VM a page from memory handed back to the host costs a fault in the
    host, which shows as system time); the file is deleted after."""
    block, path = os.urandom(1 << 20), directory / "write-floor.tmp"
    try:
        with open(path, "wb", buffering=0) as f:
            t0 = time.thread_time()
            for _ in range(size >> 20):
                f.write(block)
            return time.thread_time() - t0
    finally:
        path.unlink(missing_ok=True)


def settle_memory() -> None:
    """Wait until memory freed lately (the previous server's deleted cache, a file written to
    measure) is no longer hot: this VM hands free memory back to its host (free page reporting)
    within seconds, and a page cache page taken from it then costs a fault in the host, about
    1.5 CPU s per GiB written, against 0.2 for a page freed a moment ago (measured). nginx starts
    in a tenth of a second and mitmdump in two, so without this wait a server's cold pull would
    pay for its file according to how fast it starts."""
    time.sleep(SETTLE_SECONDS)


def children_cpu() -> float:
    """CPU seconds of this process's waited-for children (a curl run, once it ended)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def rotated(items: tuple[str, ...], rep: int) -> tuple[str, ...]:
    k = rep % len(items)
    return items[k:] + items[:k]


def run(args: argparse.Namespace, workdir: Path, result: dict[str, Any]) -> None:
    with Upstream(workdir / "hub", **upstream_options(args, result)) as up:
        images = push_images(up, workdir, args.size_mib)
        result["images"] = images
        big, multi = images["big"], images["multi"]
        digest, size = big["layer_digest"], big["layer_size"]
        storage_path = up.blob_storage_path(digest)
        cdn_port = urlsplit(up.cdn_url).port
        cdn_log = LogCursor(up.cdn_requests)

        certs = make_ca_and_server_cert(workdir / "certs")  # listener_tls's; curl trusts its CA

        def blob_headers(served: Served) -> list[str]:
            return [f"Authorization: Bearer {registry_token(served.url, up.service, big['repo'], certs['ca'])}"]

        log("warm-up: one untimed pull straight from the CDN, hashed")
        got, n = curl_sha256(up.sign_cdn_url(storage_path), cacert=up.ca_cert)
        if (got, n) != (digest, size):
            raise BenchError(f"the CDN served {n} bytes hashing to {got}, expected {size} bytes {digest}")

        samples: dict[str, list[dict[str, Any]]] = {p: [] for p in PULL_PATHS}
        skopeo: dict[str, list[dict[str, Any]]] = {p: [] for p in SKOPEO_PATHS + SKOPEO_WARM}
        verified: dict[str, bool] = {}
        sha256_rates: list[float] = []
        write_cpus: list[float] = []  # CPU s per GiB of writing a new file into the page cache

        def skopeo_copy(served: Served | None, host: str, label: str) -> dict[str, Any]:
            dest = workdir / "out"
            shutil.rmtree(dest, ignore_errors=True)
            try:
                return measured(served, cdn_log, label, lambda: {"seconds": skopeo_pull(
                    host, multi["repo"], multi["tag"], dest, multi["blobs"], multi=True,
                    cert_dir=up.cert_dir if served is None else None)})
            finally:
                shutil.rmtree(dest, ignore_errors=True)

        for rep in range(1, args.reps + 1):
            for group in rotated(GROUPS, rep - 1):
                tag = f"rep {rep}/{args.reps} {group}"
                if group == "cdn":
                    cpu0 = children_cpu()
                    rec = measured(None, cdn_log, tag,
                                   lambda: curl_pull(up.sign_cdn_url(storage_path), size, cacert=up.ca_cert))
                    rec["client_cpu_s"] = children_cpu() - cpu0  # curl's: receiving over TLS, nothing else
                    samples["cdn"].append(rec | {"rep": rep})
                    log(f"{tag}: {rec['mb_per_s']:.0f} MB/s, curl {rec['client_cpu_s']:.2f} CPU s")
                    sha256_rates.append(sha256_rate(size))
                    settle_memory()
                    write_cpus.append(write_cpu(workdir, size) / (size / 2**30))
                    log(f"{tag}: sha256 at {sha256_rates[-1]:.0f} MB/s, writing a file {write_cpus[-1]:.2f} CPU s/GiB")
                    rec = skopeo_copy(None, up.api_host, f"{tag} skopeo")
                    skopeo["direct"].append(rec | {"rep": rep})
                    log(f"{tag} skopeo --all direct: {rec['seconds']:.2f}s")
                    with bare_mitmdump(workdir / f"bare-{rep}", up) as bare:
                        rec = skopeo_copy(bare, bare.host, f"{tag} skopeo, mitmdump without the addon")
                    skopeo["bare"].append(rec | {"rep": rep})
                    log(f"{tag} skopeo --all through mitmdump without the addon: {rec['seconds']:.2f}s")
                    with serving("side_flows", workdir / f"side-flows-{rep}", up) as served:
                        rec = skopeo_copy(served, served.host, f"{tag} skopeo, side flows on")
                    skopeo["side_flows"].append(rec | {"rep": rep})
                    log(f"{tag} skopeo --all cold, side flows on: {rec['seconds']:.2f}s")
                    continue
                with serving(group, workdir / f"{group}-{rep}", up, certs) as served:
                    url, headers = f"{served.url}/v2/{big['repo']}/blobs/{digest}", blob_headers(served)
                    for phase in ("cold", "warm"):
                        if phase == "cold":
                            settle_memory()
                        rec = measured(served, cdn_log, f"{tag} {phase}",
                                       lambda: curl_pull(url, size, headers, follow=True, cacert=certs["ca"]),
                                       lambda: up.service_pids("cdn"))
                        rec |= {"rep": rep, "listener_used": listener_used(served, rec)}
                        samples[f"{group}_{phase}"].append(rec)
                        log(f"{tag} {phase}: {rec['mb_per_s']:.0f} MB/s, {rec['cpu_s']:.2f} CPU s "
                            f"(CDN + curl {rec['others_cpu_s']:.2f}), "
                            f"peak RSS {rec['peak_rss'] / MB:.0f} MB, CDN {rec['cdn_requests']} req"
                            + (", via the listener" if rec["listener_used"] else ""))
                    if group not in verified:
                        got, n = curl_sha256(url, headers, follow=True, cacert=certs["ca"])
                        if (got, n) != (digest, size):
                            raise BenchError(f"{tag}: a warm pull gave {n} bytes hashing to {got}, "
                                             f"expected {size} bytes {digest}")
                        verified[group] = True
                    if group not in SKOPEO_PATHS:
                        continue  # listener_tls: the blob's bytes only
                    rec = skopeo_copy(served, served.host, f"{tag} skopeo")
                    skopeo[group].append(rec | {"rep": rep})
                    log(f"{tag} skopeo --all cold: {rec['seconds']:.2f}s, CDN {rec['cdn_requests']} req")
                    rec = skopeo_copy(served, served.host, f"{tag} skopeo warm")
                    skopeo[f"{group}_warm"].append(rec | {"rep": rep})
                    log(f"{tag} skopeo --all warm: {rec['seconds']:.2f}s, CDN {rec['cdn_requests']} req")
                    if group == "nginx":
                        with bare_mitmdump(workdir / f"floor-{rep}", served.url) as front:
                            rec = skopeo_copy(front, front.host, f"{tag} skopeo warm, mitmdump in front of nginx")
                        skopeo["floor_warm"].append(rec | {"rep": rep})
                        log(f"{tag} skopeo --all warm, mitmdump without the addon in front: {rec['seconds']:.2f}s")
        result.update(samples=samples, skopeo=skopeo, digest_verified=verified,
                      sha256_mb_per_s=sha256_rates, write_cpu_s_per_gib=write_cpus)

        throttled: dict[str, list[dict[str, Any]]] = {s: [] for s in SERVERS}
        for rep in range(1, args.reps + 1):
            for kind in rotated(SERVERS, rep - 1):
                tag = f"throttled rep {rep}/{args.reps} {kind}"
                with serving(kind, workdir / f"throttled-{kind}-{rep}", up) as served:
                    url, headers = f"{served.url}/v2/{big['repo']}/blobs/{digest}", blob_headers(served)
                    try:
                        with throttled_port(cdn_port, args.throttle_mb_s):
                            rec = throttled_clients(served, url, headers, size, cdn_log, storage_path, tag)
                    except ThrottleError as e:
                        raise BenchError(f"{tag}: {e}") from None
                throttled[kind].append(rec | {"rep": rep})
                log(f"{tag}: CDN {rec['cdn_blob_requests']} req, first bytes "
                    + " ".join(f"{c['first_byte_s']:.2f}" for c in rec["clients"]) + " s, done "
                    + " ".join(f"{c['done_s']:.2f}" for c in rec["clients"]) + " s")
        result["throttled"] = throttled


# ---------------------------------------------------------------- the report


def med(values: list[float]) -> float:
    return statistics.median(values)


def pull_stats(recs: list[dict[str, Any]]) -> dict[str, Any]:
    speeds = [r["mb_per_s"] for r in recs]
    out = {"median_mb_per_s": med(speeds), "min_mb_per_s": min(speeds), "max_mb_per_s": max(speeds),
           "median_ttfb_ms": med([r["time_starttransfer"] for r in recs]) * 1000,
           "median_cdn_requests": med([r["cdn_requests"] for r in recs]),
           "median_cdn_bytes": med([r["cdn_bytes"] for r in recs]),
           "listener_used": sum(1 for r in recs if r.get("listener_used"))}
    if "others_cpu_s" in recs[0]:
        out["median_others_cpu_s_per_gib"] = med([r["others_cpu_s"] / (r["bytes"] / 2**30) for r in recs])
    if "cpu_s" in recs[0]:
        out["median_cpu_s_per_gib"] = med([r["cpu_s"] / (r["bytes"] / 2**30) for r in recs])
        out["max_peak_rss"] = max(r["peak_rss"] for r in recs)
    return out


def listener_works(result: dict[str, Any]) -> bool:
    """Did any pull through the listener-on mirror come from another port?"""
    pulls = result["samples"]["listener_cold"] + result["samples"]["listener_warm"]
    clients = [c for r in result["throttled"]["listener"] for c in r["clients"]]
    return any(r["listener_used"] for r in pulls) or any(c["listener_used"] for c in clients)


def reachable(mirror: str, stats: dict[str, Any], floor: dict[str, float]) -> dict[str, float]:
    """The closest the cold targets can be reached here, from what was measured in the same run.

    CPU: a verifying cache that stores what it serves cannot spend less per GiB than sha256, receiving
    over TLS (curl's CPU from the CDN), writing the file into the page cache and serving it (the same
    mirror's warm pull), plus REACHABLE_MARGIN for the Python that drives them (65,536 TLS records and
    1,024 buffers per GiB). Throughput: on 2 cores shared by the CDN, curl and the server, the pull is
    CPU-bound, so it goes as the inverse of the CPU that everyone on the path spends per GiB: nginx's
    cold rate scaled by (nginx's CPU + the others') / (the reachable CPU + the others' in the mirror's pull)."""
    cold, nginx = stats[f"{mirror}_cold"], stats["nginx_cold"]
    cpu = (floor["sha256_cpu_s_per_gib"] + floor["tls_receive_cpu_s_per_gib"] + floor["write_cpu_s_per_gib"]
           + stats[f"{mirror}_warm"]["median_cpu_s_per_gib"] + REACHABLE_MARGIN)
    path_nginx = nginx["median_cpu_s_per_gib"] + nginx["median_others_cpu_s_per_gib"]
    path_mirror = cpu + cold["median_others_cpu_s_per_gib"]
    return {"cpu_s_per_gib": cpu, "mb_per_s": nginx["median_mb_per_s"] * path_nginx / path_mirror,
            "nginx_path_cpu_s_per_gib": path_nginx, "mirror_path_cpu_s_per_gib": path_mirror}


def faster_than(target: str, path: dict[str, Any], peer: dict[str, Any], factor: float) -> tuple[str, str, bool]:
    """A throughput target against a peer's median: (the target, what was measured, met)."""
    got, theirs = path["median_mb_per_s"], peer["median_mb_per_s"]
    return target, f"{got:.0f} vs {theirs:.0f} MB/s = {got / theirs:.2f}x", got >= factor * theirs


def quicker_than(target: str, seconds: float, peer_seconds: float, factor: float) -> tuple[str, str, bool]:
    """A time target against a peer's median: (the target, what was measured, met)."""
    return (target, f"{seconds:.2f} vs {peer_seconds:.2f} s = {seconds / peer_seconds:.2f}x",
            seconds <= factor * peer_seconds)


def targets_for(mirror: str, stats: dict[str, Any], skopeo_med: dict[str, float],
                thr: dict[str, Any], peak: dict[str, int], floor: dict[str, float]) -> list[tuple[str, str, bool]]:
    reach = reachable(mirror, stats, floor)
    warm, nginx_warm = stats[f"{mirror}_warm"], stats["nginx_warm"]
    cold, nginx_cold = stats[f"{mirror}_cold"], stats["nginx_cold"]
    small_cold, small_warm = skopeo_med[mirror], skopeo_med[f"{mirror}_warm"]
    t = thr[mirror]
    return [
        faster_than(f"warm blob: throughput >= {WARM_VS_NGINX}x nginx's", warm, nginx_warm, WARM_VS_NGINX),
        (f"warm blob: CPU <= {WARM_CPU_PER_GIB} s per GiB", f"{warm['median_cpu_s_per_gib']:.2f} s/GiB",
         warm["median_cpu_s_per_gib"] <= WARM_CPU_PER_GIB),
        faster_than(f"cold blob, fresh caches: throughput >= {COLD_VS_NGINX}x nginx's cold", cold, nginx_cold,
                    COLD_VS_NGINX),
        (f"cold blob: CPU <= {COLD_CPU_PER_GIB} s per GiB", f"{cold['median_cpu_s_per_gib']:.2f} s/GiB",
         cold["median_cpu_s_per_gib"] <= COLD_CPU_PER_GIB),
        (f"cold blob, closest reachable: CPU <= {reach['cpu_s_per_gib']:.2f} s per GiB (sha256 + TLS receive + "
         f"write + warm serve + {REACHABLE_MARGIN})", f"{cold['median_cpu_s_per_gib']:.2f} s/GiB",
         cold["median_cpu_s_per_gib"] <= reach["cpu_s_per_gib"]),
        (f"cold blob, closest reachable: throughput >= {reach['mb_per_s']:.0f} MB/s (nginx's cold x "
         f"{reach['nginx_path_cpu_s_per_gib']:.2f} / {reach['mirror_path_cpu_s_per_gib']:.2f} CPU s per GiB on the path)",
         f"{cold['median_mb_per_s']:.0f} MB/s", cold["median_mb_per_s"] >= reach["mb_per_s"]),
        quicker_than(f"cold skopeo copy --all: <= {SKOPEO_VS_BARE}x mitmdump without the addon", small_cold,
                     skopeo_med["bare"], SKOPEO_VS_BARE),
        quicker_than(f"warm skopeo copy --all: <= {SKOPEO_WARM_VS_NGINX}x nginx's warm", small_warm,
                     skopeo_med["nginx_warm"], SKOPEO_WARM_VS_NGINX),
        (f"throttled CDN, {THROTTLE_CLIENTS} clients: one CDN request (every rep)",
         "/".join(str(n) for n in t["cdn_blob_requests"]), all(n == 1 for n in t["cdn_blob_requests"])),
        (f"throttled CDN: every client's first byte within {THROTTLE_FIRST_BYTE:.0f} s",
         f"slowest {t['median_max_first_byte_s']:.2f} s", t["median_max_first_byte_s"] <= THROTTLE_FIRST_BYTE),
        (f"throttled CDN: last done within {THROTTLE_LAST_VS_FIRST}x the first's time",
         f"{t['median_last_vs_first']:.2f}x", t["median_last_vs_first"] <= THROTTLE_LAST_VS_FIRST),
        (f"peak RSS < {RSS_TARGET / MB:.0f} MB throughout", f"{peak[mirror] / MB:.1f} MB", peak[mirror] < RSS_TARGET),
    ]


def floors(result: dict[str, Any], skopeo_med: dict[str, float]) -> dict[str, float]:
    """What no verifying cache (cold CPU) and no server built on mitmproxy (a warm pull) can go
    below here, measured in the same run."""
    sha256, size = med(result["sha256_mb_per_s"]), result["images"]["big"]["layer_size"]
    hashing = 2**30 / (sha256 * MB)  # CPU s per GiB
    receiving = med([r["client_cpu_s"] / (r["bytes"] / 2**30) for r in result["samples"]["cdn"]])
    return {"sha256_mb_per_s": sha256, "sha256_cpu_s_per_gib": hashing, "tls_receive_cpu_s_per_gib": receiving,
            "write_cpu_s_per_gib": med(result["write_cpu_s_per_gib"]),
            "verified_download_cpu_s_per_gib": hashing + receiving, "blob_seconds_hashing": size / (sha256 * MB),
            "warm_small_pull_floor_s": skopeo_med["floor_warm"],
            "warm_small_pull_floor_vs_nginx": skopeo_med["floor_warm"] / skopeo_med["nginx_warm"]}


def report(args: argparse.Namespace, result: dict[str, Any]) -> bool:
    samples, skopeo, throttled = result["samples"], result["skopeo"], result["throttled"]
    stats = {p: pull_stats(samples[p]) for p in PULL_PATHS}
    skopeo_med = {p: med([r["seconds"] for r in skopeo[p]]) for p in SKOPEO_PATHS + SKOPEO_WARM}
    thr = {}
    for kind, recs in throttled.items():
        thr[kind] = {"cdn_blob_requests": [r["cdn_blob_requests"] for r in recs],
                     "median_max_first_byte_s": med([r["max_first_byte_s"] for r in recs]),
                     "median_last_vs_first": med([r["last_vs_first"] for r in recs]),
                     "median_first_byte_s": [med([r["clients"][i]["first_byte_s"] for r in recs])
                                             for i in range(THROTTLE_CLIENTS)],
                     "median_done_s": [med([r["clients"][i]["done_s"] for r in recs]) for i in range(THROTTLE_CLIENTS)],
                     "max_peak_rss": max(r["peak_rss"] for r in recs)}
    peak = {m: max([stats[f"{m}_cold"]["max_peak_rss"], stats[f"{m}_warm"]["max_peak_rss"], thr[m]["max_peak_rss"],
                    *(r["peak_rss"] for r in skopeo[m] + skopeo[f"{m}_warm"])]) for m in MIRRORS}
    works = listener_works(result)
    floor = floors(result, skopeo_med)
    targets = {m: targets_for(m, stats, skopeo_med, thr, peak, floor) for m in MIRRORS}
    all_ok = all(ok for _, _, ok in targets["listener"])
    result["summary"] = {"pulls": stats, "skopeo_median_s": skopeo_med, "throttled": thr, "mirror_peak_rss": peak,
                         "floors": floor, "reachable": {m: reachable(m, stats, floor) for m in MIRRORS},
                         "listener_implemented": works, "targets_ok": all_ok,
                         "targets": {m: [{"target": t, "value": v, "ok": ok} for t, v, ok in targets[m]]
                                     for m in MIRRORS}}

    def note(kind: str) -> str:
        return f" ({NOT_IMPLEMENTED})" if kind == "listener" and not works else ""

    big, multi, facts = result["images"]["big"], result["images"]["multi"], result["machine"]
    out = smoke_banner(result) + ["## hub-rewrite blob path benchmark: the mirror vs. nginx proxy_cache\n"]
    out.append(f"Blob: `{big['repo']}:{big['tag']}` layer, {big['layer_size']} bytes "
               f"({big['layer_size'] / 2**20:.0f} MiB); curl over HTTP/1.1 following redirects, bearer token from "
               f"each server's /token; {args.reps} interleaved reps; every server fresh with an empty cache per rep "
               f"(cold pull, then warm). Loopback, fake Docker Hub (distribution 2.8, token server, signed-URL CDN; "
               f"{'plain HTTP' if result.get('upstream_transport') == 'http' else 'HTTPS like Docker Hub'}).\n")
    if not works:
        out.append(f"**The mirror ignored `hub_blob_listen`: no pull was redirected to another port "
                   f"({NOT_IMPLEMENTED}); the listener-on rows measure the relay again.**\n")
    out.append("| path | median MB/s | min | max | median TTFB ms | CPU s/GiB | peak RSS MB | CDN requests | CDN MB |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for p in PULL_PATHS:
        s = stats[p]
        kind, phase = p.rsplit("_", 1) if p.endswith(("_cold", "_warm")) else (p, "")
        name = LABELS[kind] + (f", {phase}" if phase else "") + note(kind)
        cpu = f"{s['median_cpu_s_per_gib']:.2f}" if "median_cpu_s_per_gib" in s else "n/a"
        rss = f"{s['max_peak_rss'] / MB:.1f}" if "max_peak_rss" in s else "n/a"
        out.append(f"| {name} | {s['median_mb_per_s']:.0f} | {s['min_mb_per_s']:.0f} | {s['max_mb_per_s']:.0f} | "
                   f"{s['median_ttfb_ms']:.1f} | {cpu} | {rss} | {s['median_cdn_requests']:g} | "
                   f"{s['median_cdn_bytes'] / MB:.1f} |")
    out.append("")
    out.append(f"A cache that verifies what it stores hashes every byte before it sends the last one, and over "
               f"HTTPS decrypts every byte first: here sha256 ran at {floor['sha256_mb_per_s']:.0f} MB/s "
               f"({floor['sha256_cpu_s_per_gib']:.2f} CPU s per GiB, median) and curl took "
               f"{floor['tls_receive_cpu_s_per_gib']:.2f} CPU s per GiB to receive the blob over TLS from the CDN: "
               f"{floor['verified_download_cpu_s_per_gib']:.2f} CPU s per GiB before a byte is written or served "
               f"(the cold target allows {COLD_CPU_PER_GIB}). Writing a new 1 GiB file into the cache's file system "
               f"took {floor['write_cpu_s_per_gib']:.2f} CPU s per GiB (median; per rep "
               + ", ".join(f"{x:.2f}" for x in result["write_cpu_s_per_gib"]) + ") and the listener's warm pull "
               f"{stats['listener_warm']['median_cpu_s_per_gib']:.2f}: the closest reachable cold CPU is "
               f"{result['summary']['reachable']['listener']['cpu_s_per_gib']:.2f} s per GiB with a margin of "
               f"{REACHABLE_MARGIN} for the Python that drives them. The CDN's processes and curl spent "
               f"{stats['nginx_cold']['median_others_cpu_s_per_gib']:.2f} CPU s per GiB in nginx's cold pull and "
               f"{stats['listener_cold']['median_others_cpu_s_per_gib']:.2f} in the mirror's (listener on).\n")
    tls, plain = stats["listener_tls_warm"], stats["listener_warm"]
    out.append(f"What HTTPS costs the listener (same certificate as the mirror; asyncio encrypts in user space "
               f"where plain HTTP uses `sendfile`): warm {tls['median_mb_per_s']:.0f} MB/s at "
               f"{tls['median_cpu_s_per_gib']:.2f} CPU s/GiB against {plain['median_mb_per_s']:.0f} MB/s at "
               f"{plain['median_cpu_s_per_gib']:.2f} over HTTP; cold {stats['listener_tls_cold']['median_mb_per_s']:.0f} "
               f"against {stats['listener_cold']['median_mb_per_s']:.0f} MB/s.\n")
    out.append(f"`skopeo copy --all` of `{multi['repo']}:{multi['tag']}` (two arches, {len(multi['blobs'])} blobs, "
               f"{multi['blob_bytes'] / MB:.1f} MB) into a `dir:`: cold (a fresh server, empty cache), then warm (the "
               f"same server again):\n")
    out.append("| path | median s | min | max | vs direct | CDN requests | peak RSS MB |")
    out.append("|---|---:|---:|---:|---:|---:|---:|")
    names = {"direct": "direct (edge + CDN)", "bare": "mitmdump without the addon (floor: blobs from the CDN)",
             "nginx_warm": "nginx proxy_cache (peer), warm", "floor_warm": LABELS["floor"] + " (floor), warm",
             "relay_warm": LABELS["relay"] + ", warm", "listener_warm": LABELS["listener"] + ", warm"}
    for p in SKOPEO_PATHS + SKOPEO_WARM:
        secs = [r["seconds"] for r in skopeo[p]]
        rss = f"{max(r['peak_rss'] for r in skopeo[p]) / MB:.1f}" if "peak_rss" in skopeo[p][0] else "n/a"
        name = names.get(p) or LABELS[p] + note(p)
        out.append(f"| {name} | {med(secs):.2f} | {min(secs):.2f} | {max(secs):.2f} | "
                   f"{med(secs) / skopeo_med['direct']:.2f}x | {med([r['cdn_requests'] for r in skopeo[p]]):g} | {rss} |")
    out.append("")
    out.append(f"The warm copy's floor: mitmdump without the addon in front of the warm nginx took "
               f"{floor['warm_small_pull_floor_s']:.2f} s, {floor['warm_small_pull_floor_vs_nginx']:.2f}x nginx's "
               f"warm copy: what mitmproxy alone adds to a pull served from a cache (skopeo speaks TLS to "
               f"mitmproxy, which offers it on its port, and plain HTTP to nginx).\n")
    out.append(f"CDN throttled to {args.throttle_mb_s:g} MB/s (tc on its port), {THROTTLE_CLIENTS} curl clients "
               f"{THROTTLE_STAGGER} s apart, fresh cache; medians over {args.reps} reps; times in seconds from the first "
               f"client's start (first byte: from each client's own start):\n")
    out.append("| server | CDN requests per rep | first byte per client | done per client | last / first | peak RSS MB |")
    out.append("|---|---:|---:|---:|---:|---:|")
    for kind in SERVERS:
        t = thr[kind]
        out.append(f"| {LABELS[kind]}{note(kind)} | {'/'.join(map(str, t['cdn_blob_requests']))} | "
                   f"{' '.join(f'{x:.2f}' for x in t['median_first_byte_s'])} | "
                   f"{' '.join(f'{x:.2f}' for x in t['median_done_s'])} | {t['median_last_vs_first']:.2f}x | "
                   f"{t['max_peak_rss'] / MB:.1f} |")
    out.append("")
    for m in MIRRORS:
        title = ("Targets (the mirror with the blob listener on)" + note(m) if m == "listener"
                 else "The same targets for the mirror with the listener off (today's relay; for comparison)")
        out.append(f"{title}:")
        out += [f"- {t}: {v} -> {'PASS' if ok else 'FAIL'}" for t, v, ok in targets[m]]
        out.append("")
    out.append("CPU = utime+stime of the serving process tree per GiB served (nginx: master, workers, cache "
               "processes). Peak RSS = VmHWM reset before each pull, max over reps (nginx: the sum over its "
               "processes). MB = 10^6 bytes. Digest of a warm pull checked per server: "
               + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in result["digest_verified"].items()) + ".")
    out += report_footer(result, [facts["curl"], facts["nginx"], facts["skopeo"]])
    print("\n".join(out), flush=True)
    return all_ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    blob_arguments(ap, 3, "interleaved repetitions")
    ap.add_argument("--throttle-mb-s", type=float, default=50, help="CDN rate in the throttled scenario (default 50)")
    args = ap.parse_args(argv)
    if args.size_mib < 1 or args.reps < 1 or args.throttle_mb_s <= 0:
        ap.error("--size-mib, --reps and --throttle-mb-s must be positive")
    for tool in ("curl", "skopeo", "tc", NGINX):
        if shutil.which(tool) is None:
            ap.error(f"{tool} is required (apt-get install curl skopeo iproute2 nginx)")
    if os.geteuid() != 0:
        ap.error("the throttled scenario changes tc on lo: run as root")
    scale = apply_scale(ap, args, {"size_mib": 16, "reps": 1, "throttle_mb_s": 8.0})

    started = time.monotonic()
    facts = machine_facts() | {"skopeo": tool_version("skopeo", "--version"), "nginx": tool_version(NGINX, "-v")}
    result: dict[str, Any] = {"command": exact_command(), "machine": facts, "scale": scale,
                              "size_mib": args.size_mib, "reps": args.reps, "throttle_mb_s": args.throttle_mb_s,
                              "units": {"mb_per_s": "10^6 bytes/s", "rss": "bytes", "cpu_s": "seconds",
                                        "times": "seconds", "cdn_bytes": "body bytes the CDN sent"}}
    workdir = Path(tempfile.mkdtemp(prefix="hubrewrite-bench-blobpath-"))

    def finish(result: dict[str, Any]) -> int:
        return 0 if report(args, result) or not args.strict else 2

    return run_benchmark(args, result, started, workdir, run, finish,
                         lambda w: sorted(w.glob("*/mirror.log")),  # nginx's log names signed URLs: not printed
                         ("hub/storage/**/data",))


if __name__ == "__main__":
    sys.exit(main())
