"""Shared S3 store benchmark: one big blob through mirror processes that share a
bucket (Ceph RGW), cold and warm, with and without the presigned redirect,
against the CDN itself and the local-disk cache alone.

    PYTHONPATH=. .venv/bin/python bench/bench_shared.py [--size-mib 1024] [--reps 3] [--json out.json]

Starts the fake Docker Hub (tests/support/upstream.py) and a single-node Ceph
RGW on bluestore (a sparse file: GiB-sized objects without the RAM;
tests/support/ceph.py) in a temporary directory, and pushes ``bench/big:1.0``
(one uncompressed layer of ``--size-mib`` MiB; bench/image_set.py). Every pull
is ``curl --http1.1 -L`` of that layer (a bearer token from the mirror's
/token). ``--reps`` repetitions, each with its own empty bucket and empty local
directories, run three groups in an order that rotates:

* ``cdn``: straight from a signed CDN URL (the reference);
* ``local``: process "A, no bucket" (``hub_cache_dir`` only, today's mirror):
  cold, then warm;
* ``shared``, one process after the other, all on the same bucket
  (``hub_store_url``), each with its own empty local directory:
  - A: cold (upstream -> local tier -> bucket, uploaded in the background;
    the pull's figures include the upload, waited for with boto3 HEADs);
  - B: warm from the bucket (bucket -> B's local tier, the client following),
    then again: warm from B's local tier;
  - C, with ``hub_store_presign=true``: warm, a 307 to a presigned URL of the
    object, which curl then downloads from RGW itself (A, B and C share a
    ``hub_blob_secret``: C presigns the object on the mark A made with it).

Per pull: MB/s, time to first byte (curl, summed over redirects), CPU seconds
per GiB and peak RSS (VmHWM, reset before each pull) of the mirror process,
CPU seconds per GiB of radosgw + the OSD, the CDN's requests and body bytes
(its access log), the bytes RGW took in and sent (its perf counters,
bench/rgw_stats.py) and the mirror's own count of bucket requests
(``hub_store_requests_total``). Every pull must answer 200 with the full size,
and one warm pull of each mirror path is hashed against the digest; anything
else fails the run (exit 1).

``HUB_BENCH_SCALE=smoke`` shrinks it to 16 MiB and 1 rep.
Units: MB = 10^6 bytes, MiB = 2^20 bytes, GiB = 2^30 bytes.
"""

from __future__ import annotations

import argparse
import re
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
for p in (str(REPO_ROOT), str(BENCH_DIR)):
    if p not in sys.path:
        sys.path.insert(0, p)

import httpx  # noqa: E402

from harness import (BenchError, apply_scale, blob_arguments, exact_command, log, machine_facts,  # noqa: E402
                     report_footer, run_benchmark, smoke_banner, tool_version, upstream_options)
from image_set import push_images  # noqa: E402
from procstat import cpu_seconds, peak_rss, reset_peak_rss, rss_bytes  # noqa: E402
from pulls import curl_pull, curl_sha256, registry_token  # noqa: E402
from rgw_stats import bucket_usage, counter_delta, rgw_counters  # noqa: E402
from tests.support.ceph import CephError, CephRGW  # noqa: E402
from tests.support.mirror import Mirror, MirrorError  # noqa: E402
from tests.support.upstream import Upstream  # noqa: E402
from upstream_logs import LogCursor, count_upstream  # noqa: E402

GROUPS = ("cdn", "local", "shared")
PATHS = ("cdn", "local_cold", "local_warm", "a_cold", "b_bucket", "b_local", "c_presign")
SHARED_PATHS = ("a_cold", "b_bucket", "b_local", "c_presign")  # their CDN bytes together: the layer, once
PROCESS = {"local_cold": "A, no bucket", "local_warm": "A, no bucket", "a_cold": "A", "b_bucket": "B",
           "b_local": "B", "c_presign": "C"}
PROCESSES = ("A, no bucket", "A", "B", "C")
LABELS = {"cdn": "straight from the CDN (signed URL)",
          "local_cold": "local disk only, cold", "local_warm": "local disk only, warm",
          "a_cold": "bucket, cold (upstream -> local -> bucket)",
          "b_bucket": "bucket, warm from the bucket (bucket -> B's local)",
          "b_local": "bucket, warm from B's local tier",
          "c_presign": "bucket, warm, presigned 307 to RGW"}
PREFIX = "hub"  # hub_store_url = s3://<bucket>/hub
RSS_TARGET = 150_000_000  # bytes, per mirror process
UPLOAD_TIMEOUT = 600.0  # seconds for A's background upload to reach the bucket
MB = 1e6
GIB = 2**30
STORE_REQUESTS_RE = re.compile(r'^hub_store_requests_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$', re.M)


# ---------------------------------------------------------------- the mirror processes


@contextmanager
def mirror_process(name: str, workdir: Path, up: Upstream, rgw: CephRGW, bucket: str | None,
                   presign: bool = False) -> Iterator[Mirror]:
    """A fresh mirror with an empty local directory (deleted when it stops, the log stays);
    on ``bucket`` unless None."""
    cache = workdir / "cache"
    options = {"hub_cache_dir": str(cache)}
    env: dict[str, str] = {}
    if bucket is not None:
        # one key of their own (not the bucket's), so C presigns the object A uploaded and marked
        secret = workdir.parent / "blob-secret"
        if not secret.exists():
            secret.write_text(secrets.token_hex(32))
        options |= {"hub_store_url": f"s3://{bucket}/{PREFIX}", "hub_store_endpoint": rgw.endpoint_url,
                    "hub_store_addressing": "path", "hub_store_presign": "true" if presign else "false",
                    "hub_blob_secret": str(secret)}
        env = {"AWS_ACCESS_KEY_ID": rgw.access_key, "AWS_SECRET_ACCESS_KEY": rgw.secret_key}  # never on argv
    try:
        with Mirror(workdir, up, options=options, env=env, name="mirror") as m:
            yield m
    except MirrorError as e:
        raise BenchError(f"mirror {name} did not start: {e}") from None
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def store_requests(mirror: Mirror) -> dict[str, float]:
    """The mirror's ``hub_store_requests_total`` by ``what/kind`` (e.g. ``read/blob-head``)."""
    try:
        text = httpx.get(f"{mirror.url}/_hub/metrics", timeout=30).text
    except httpx.HTTPError as e:
        raise BenchError(f"{mirror.url}/_hub/metrics: {type(e).__name__}: {e}") from None
    out = {}
    for m in STORE_REQUESTS_RE.finditer(text):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group("labels")))
        out[f"{labels.get('what')}/{labels.get('kind')}"] = float(m.group("value"))
    return out


def wait_in_bucket(rgw: CephRGW, bucket: str, digest: str, timeout: float = UPLOAD_TIMEOUT) -> None:
    """Until the blob's object is in the bucket (A uploads it in the background)."""
    from botocore.exceptions import BotoCoreError

    try:
        if rgw.wait_for_blob(bucket, PREFIX, digest, timeout):
            return
    except BotoCoreError as e:
        raise BenchError(f"HEAD of the blob's object: {type(e).__name__}") from None
    raise BenchError(f"the blob was not in the bucket {timeout:.0f}s after the cold pull (A's upload)")


# ---------------------------------------------------------------- the run


def rotated(items: tuple[str, ...], rep: int) -> tuple[str, ...]:
    k = rep % len(items)
    return items[k:] + items[:k]


def run(args: argparse.Namespace, workdir: Path, result: dict[str, Any]) -> None:
    with Upstream(workdir / "hub", **upstream_options(args, result)) as up, ceph_cluster(workdir / "ceph", args) as rgw:
        big = push_images(up, workdir, args.size_mib)["big"]
        result["image"] = big
        digest, size = big["layer_digest"], big["layer_size"]
        storage_path = up.blob_storage_path(digest)
        cdn_log, edge_log = LogCursor(up.cdn_requests), LogCursor(up.edge_requests)
        rgw_port = int(rgw.endpoint_url.rsplit(":", 1)[1])

        log("warm-up: one untimed pull straight from the CDN, hashed")
        got, n = curl_sha256(up.sign_cdn_url(storage_path), cacert=up.ca_cert)
        if (got, n) != (digest, size):
            raise BenchError(f"the CDN served {n} bytes hashing to {got}, expected {size} bytes {digest}")

        def measured(mirror: Mirror | None, label: str, pull: Callable[[], dict[str, Any]],
                     after: Callable[[], None] | None = None) -> dict[str, Any]:
            """One pull, with the mirror's CPU, peak RSS and bucket requests, radosgw's and the
            OSD's CPU and bytes, and the CDN's log around it; ``after`` (A's upload) counts in."""
            cdn_log.take(settle=0.1)
            edge_log.take(settle=0.0)
            pids = [mirror.proc.pid] if mirror else []
            ceph_pids = [pid for name, pid in rgw.pids().items() if name in ("rgw", "osd")]
            store0 = store_requests(mirror) if mirror else {}
            rgw0, ceph_cpu0 = rgw_counters(rgw), cpu_seconds(ceph_pids)
            reset_peak_rss(pids)
            cpu0 = cpu_seconds(pids)
            try:
                rec = pull()
                if mirror:
                    rec["cpu_s_pull"], rec["peak_rss_pull"] = cpu_seconds(pids) - cpu0, peak_rss(pids)
                if after is not None:
                    t0 = time.monotonic()
                    after()
                    rec["after_pull_s"] = time.monotonic() - t0
            except BenchError as e:
                raise BenchError(f"{label}: {e}") from None
            if mirror:
                rec["cpu_s"] = cpu_seconds(pids) - cpu0
                rec["peak_rss"] = peak_rss(pids)
                if mirror.proc.poll() is not None:
                    raise BenchError(f"{label}: mitmdump exited:\n{mirror.log_text()[-3000:]}")
                store1 = store_requests(mirror)
                rec["store_requests"] = {k: v - store0.get(k, 0) for k, v in store1.items() if v != store0.get(k, 0)}
            rec["ceph_cpu_s"] = cpu_seconds(ceph_pids) - ceph_cpu0
            rgw_delta = counter_delta(rgw0, rgw_counters(rgw))
            rec |= {"rgw": rgw_delta, "bucket_bytes_written": rgw_delta["put_b"], "bucket_bytes_read": rgw_delta["get_b"]}
            counts = count_upstream(cdn_log.take(), edge_log.take(settle=0.0), [])
            counts.pop("token_requests")
            rec |= counts | {"from_bucket": rec.get("num_redirects", 0) > 0 and rec.get("final_port") == rgw_port}
            return rec

        samples: dict[str, list[dict[str, Any]]] = {p: [] for p in PATHS}
        idle_rss: dict[str, list[int]] = {p: [] for p in PROCESSES}
        verified: dict[str, bool] = {}
        buckets: dict[str, Any] = {}

        def record(path: str, rep: int, rec: dict[str, Any]) -> None:
            samples[path].append(rec | {"rep": rep})
            extra = ""
            if "peak_rss" in rec:
                extra = (f", {rec['cpu_s']:.2f} CPU s, peak RSS {rec['peak_rss'] / MB:.0f} MB, "
                         f"bucket {rec['bucket_bytes_written'] / MB:.0f} MB in / {rec['bucket_bytes_read'] / MB:.0f} MB out")
            if "after_pull_s" in rec:
                extra += f", in the bucket {rec['after_pull_s']:.1f}s after the pull"
            log(f"rep {rep}/{args.reps} {path}: {rec['mb_per_s']:.0f} MB/s, CDN {rec['cdn_requests']} req{extra}")

        def pull_through(mirror: Mirror) -> Callable[[], dict[str, Any]]:
            url = f"{mirror.url}/v2/{big['repo']}/blobs/{digest}"
            headers = [f"Authorization: Bearer {registry_token(mirror.url, up.service, big['repo'])}"]
            return lambda: curl_pull(url, size, headers, follow=True)

        def check_digest(mirror: Mirror, path: str) -> None:
            """Hash one warm pull per path (untimed, once per run)."""
            if path in verified:
                return
            url = f"{mirror.url}/v2/{big['repo']}/blobs/{digest}"
            headers = [f"Authorization: Bearer {registry_token(mirror.url, up.service, big['repo'])}"]
            got, n = curl_sha256(url, headers, follow=True)
            if (got, n) != (digest, size):
                raise BenchError(f"{path}: a warm pull gave {n} bytes hashing to {got}, expected {size} bytes {digest}")
            verified[path] = True

        def note_idle_rss(name: str, mirror: Mirror) -> None:
            time.sleep(0.5)  # let start-up settle
            idle_rss[name].append(rss_bytes(mirror.proc.pid))

        for rep in range(1, args.reps + 1):
            for group in rotated(GROUPS, rep - 1):
                tag = f"rep {rep}/{args.reps} {group}"
                if group == "cdn":
                    record("cdn", rep, measured(None, tag, lambda: curl_pull(up.sign_cdn_url(storage_path), size,
                                                                             cacert=up.ca_cert)))
                elif group == "local":
                    with mirror_process("A, no bucket", workdir / f"local-{rep}", up, rgw, None) as m:
                        note_idle_rss("A, no bucket", m)
                        for path in ("local_cold", "local_warm"):
                            record(path, rep, measured(m, f"{tag} {path}", pull_through(m)))
                        check_digest(m, "local_warm")
                else:
                    bucket = rgw.make_bucket(f"bench-shared-{rep}")
                    with mirror_process("A", workdir / f"a-{rep}", up, rgw, bucket) as a:
                        note_idle_rss("A", a)
                        record("a_cold", rep, measured(a, f"{tag} a_cold", pull_through(a),
                                                       after=lambda: wait_in_bucket(rgw, bucket, digest)))
                    with mirror_process("B", workdir / f"b-{rep}", up, rgw, bucket) as b:
                        note_idle_rss("B", b)
                        for path in ("b_bucket", "b_local"):
                            record(path, rep, measured(b, f"{tag} {path}", pull_through(b)))
                        check_digest(b, "b_local")
                    with mirror_process("C", workdir / f"c-{rep}", up, rgw, bucket, presign=True) as c:
                        note_idle_rss("C", c)
                        record("c_presign", rep, measured(c, f"{tag} c_presign", pull_through(c)))
                        check_digest(c, "c_presign")
                    buckets[bucket] = bucket_usage(rgw, bucket)
        result.update(samples=samples, idle_rss=idle_rss, digest_verified=verified, buckets=buckets,
                      ceph_start_seconds=rgw.start_seconds)


@contextmanager
def ceph_cluster(workdir: Path, args: argparse.Namespace) -> Iterator[CephRGW]:
    """Ceph RGW on bluestore, its sparse file big enough for every rep's object (only
    what is written takes disk space)."""
    log("starting Ceph RGW (bluestore on a sparse file)")
    block = max(16 << 30, 2 * args.reps * (args.size_mib << 20) + (4 << 30))
    try:
        with CephRGW(workdir, "bluestore", bluestore_bytes=block) as rgw:
            log(f"Ceph RGW up in {rgw.start_seconds:.1f}s")
            yield rgw
    except CephError as e:
        raise BenchError(f"Ceph RGW: {e}") from None


# ---------------------------------------------------------------- the report


def med(values: list[float]) -> float:
    return statistics.median(values)


def path_stats(recs: list[dict[str, Any]]) -> dict[str, Any]:
    speeds = [r["mb_per_s"] for r in recs]
    out = {"median_mb_per_s": med(speeds), "min_mb_per_s": min(speeds), "max_mb_per_s": max(speeds),
           "median_ttfb_ms": med([r["time_starttransfer"] for r in recs]) * 1000,
           "median_cdn_requests": med([r["cdn_requests"] for r in recs]),
           "median_cdn_bytes": med([r["cdn_bytes"] for r in recs]),
           "median_bucket_bytes_written": med([r["bucket_bytes_written"] for r in recs]),
           "median_bucket_bytes_read": med([r["bucket_bytes_read"] for r in recs]),
           "median_ceph_cpu_s_per_gib": med([r["ceph_cpu_s"] / (r["bytes"] / GIB) for r in recs]),
           "from_bucket": sum(1 for r in recs if r["from_bucket"])}
    if "cpu_s" in recs[0]:
        out["median_cpu_s_per_gib"] = med([r["cpu_s"] / (r["bytes"] / GIB) for r in recs])
        out["max_peak_rss"] = max(r["peak_rss"] for r in recs)
        out["store_requests"] = recs[0]["store_requests"]
    if "after_pull_s" in recs[0]:
        out["median_after_pull_s"] = med([r["after_pull_s"] for r in recs])
        out["median_cpu_s_pull_per_gib"] = med([r["cpu_s_pull"] / (r["bytes"] / GIB) for r in recs])
        out["max_peak_rss_pull"] = max(r["peak_rss_pull"] for r in recs)
    return out


def targets(result: dict[str, Any], stats: dict[str, Any], peaks: dict[str, int]) -> list[tuple[str, str, bool]]:
    size, samples, reps = result["image"]["layer_size"], result["samples"], result["reps"]
    per_rep = [(sum(r["cdn_gets"] for p in SHARED_PATHS for r in samples[p] if r["rep"] == rep),
                sum(r["cdn_bytes"] for p in SHARED_PATHS for r in samples[p] if r["rep"] == rep))
               for rep in range(1, reps + 1)]
    presigned = stats["c_presign"]["from_bucket"]
    return [
        (f"upstream: the layer once ({size} bytes, one CDN GET) across A, B and C, every rep",
         "; ".join(f"{gets} GET, {nbytes} bytes" for gets, nbytes in per_rep),
         all(gets == 1 and nbytes == size for gets, nbytes in per_rep)),
        (f"peak RSS < {RSS_TARGET / MB:.0f} MB per mirror process",
         ", ".join(f"{name} {peaks[name] / MB:.1f} MB" for name in PROCESSES),
         all(v < RSS_TARGET for v in peaks.values())),
        ("C: every pull answered with a 307 to the bucket (presigned)",
         f"{presigned} of {len(samples['c_presign'])}", presigned == len(samples["c_presign"])),
    ]


def store_summary(requests: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(requests.items())) or "none"


def report(args: argparse.Namespace, result: dict[str, Any]) -> bool:
    samples = result["samples"]
    stats = {p: path_stats(samples[p]) for p in PATHS}
    peaks = {name: max(stats[p]["max_peak_rss"] for p in PATHS if PROCESS.get(p) == name) for name in PROCESSES}
    checks = targets(result, stats, peaks)
    ok = all(passed for _, _, passed in checks)
    result["summary"] = {"paths": stats, "peak_rss_per_process": peaks, "targets_ok": ok,
                         "targets": [{"target": t, "value": v, "ok": passed} for t, v, passed in checks]}

    big, facts = result["image"], result["machine"]
    out = smoke_banner(result) + ["## hub-rewrite shared S3 store benchmark: mirror processes on one bucket\n"]
    out.append(f"Blob: `{big['repo']}:{big['tag']}` layer, {big['layer_size']} bytes "
               f"({big['layer_size'] / 2**20:.0f} MiB); curl over HTTP/1.1 following redirects, bearer token from "
               f"each mirror's /token; {args.reps} reps, groups rotating; per rep a new bucket and empty local "
               f"directories. Loopback: fake Docker Hub (distribution 2.8, token server, signed-URL CDN), "
               f"Ceph RGW on bluestore (a sparse file).\n")
    out.append("| path | process | median MB/s | min | max | median TTFB ms | CPU s/GiB | peak RSS MB | "
               "CDN requests | CDN MB | bucket MB in | bucket MB out | RGW+OSD CPU s/GiB |")
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for p in PATHS:
        s = stats[p]
        cpu = f"{s['median_cpu_s_per_gib']:.2f}" if "median_cpu_s_per_gib" in s else "n/a"
        rss = f"{s['max_peak_rss'] / MB:.1f}" if "max_peak_rss" in s else "n/a"
        out.append(f"| {LABELS[p]} | {PROCESS.get(p, 'none')} | {s['median_mb_per_s']:.0f} | {s['min_mb_per_s']:.0f} | "
                   f"{s['max_mb_per_s']:.0f} | {s['median_ttfb_ms']:.1f} | {cpu} | {rss} | "
                   f"{s['median_cdn_requests']:g} | {s['median_cdn_bytes'] / MB:.1f} | "
                   f"{s['median_bucket_bytes_written'] / MB:.1f} | {s['median_bucket_bytes_read'] / MB:.1f} | "
                   f"{s['median_ceph_cpu_s_per_gib']:.2f} |")
    out.append("")
    a = stats["a_cold"]
    out.append(f"A's background upload: the object was in the bucket {a['median_after_pull_s']:.1f} s (median) after "
               f"the cold pull ended; for the pull alone A took {a['median_cpu_s_pull_per_gib']:.2f} CPU s/GiB and "
               f"peaked at {a['max_peak_rss_pull'] / MB:.1f} MB (the table's figures include the upload, and so do "
               f"its bucket bytes).")
    out.append("Bucket requests per pull, as the mirror counts them (`hub_store_requests_total`, rep 1): "
               + "; ".join(f"{p} {store_summary(stats[p]['store_requests'])}" for p in SHARED_PATHS) + ".")
    out.append("Each rep's bucket afterwards (`radosgw-admin bucket stats`): " + "; ".join(
        f"{name} {u['bytes']} bytes in {u['objects']} objects" for name, u in result["buckets"].items()) + ".")
    out.append("Idle RSS after start-up (median): " + ", ".join(
        f"{name} {med(v) / MB:.1f} MB" for name, v in result["idle_rss"].items() if v) + ".")
    out.append("")
    out.append("Targets:")
    out += [f"- {t}: {v} -> {'PASS' if passed else 'FAIL'}" for t, v, passed in checks]
    out.append("")
    out.append("CPU = utime+stime of the mirror process per GiB pulled; RGW+OSD = radosgw and ceph-osd. Peak RSS = "
               "VmHWM reset before each pull, max over reps. CDN = the fake Hub's CDN access log. Bucket MB in/out = "
               "radosgw's perf counters put_b/get_b (every client: the mirror, or curl itself after a presigned "
               "307). MB = 10^6 bytes. Digest of a warm pull checked: "
               + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in result["digest_verified"].items()) + ".")
    out += report_footer(result, [facts["curl"], facts["ceph"], f"boto3 {facts['boto3']}"])
    print("\n".join(out), flush=True)
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    blob_arguments(ap, 3, "repetitions, groups rotating")
    args = ap.parse_args(argv)
    if args.size_mib < 1 or args.reps < 1:
        ap.error("--size-mib and --reps must be positive")
    for tool in ("curl", "ceph", "ceph-mon", "ceph-osd", "radosgw", "radosgw-admin"):
        if shutil.which(tool) is None:
            ap.error(f"{tool} is required (apt-get install curl ceph-mon ceph-osd radosgw ceph-common)")
    scale = apply_scale(ap, args, {"size_mib": 16, "reps": 1})

    import boto3

    started = time.monotonic()
    facts = machine_facts() | {"ceph": " ".join(tool_version("ceph", "--version").split()[:3]),
                               "boto3": boto3.__version__}
    result: dict[str, Any] = {"command": exact_command(), "machine": facts, "scale": scale,
                              "size_mib": args.size_mib, "reps": args.reps,
                              "units": {"mb_per_s": "10^6 bytes/s", "rss": "bytes", "cpu_s": "seconds",
                                        "times": "seconds", "cdn_bytes": "body bytes the CDN sent",
                                        "bucket_bytes": "radosgw perf counters put_b (in) / get_b (out)"}}
    workdir = Path(tempfile.mkdtemp(prefix="hubrewrite-bench-shared-"))

    def finish(result: dict[str, Any]) -> int:
        return 0 if report(args, result) or not args.strict else 2

    return run_benchmark(args, result, started, workdir, run, finish,
                         lambda w: sorted(w.glob("*/mirror.log")),
                         ("hub/storage/**/data", "ceph/osd/block"))


if __name__ == "__main__":
    sys.exit(main())
