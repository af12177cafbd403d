"""A big blob pulled through a CDN that cuts it, against the same blob uncut, in one run.

    PYTHONPATH=. .venv/bin/python bench/bench_resume.py [--size-mib 1024] [--reps 3] [--json out.json]

Starts the fake Docker Hub (tests/support/upstream.py, HTTPS like Docker Hub unless
``--plain-upstream``) in a temporary directory and pushes ``bench/resume:1.0``, one
uncompressed layer of ``--size-mib`` MiB. Then ``--reps`` rounds of three cold pulls of that
blob (the order rotates each round), each with ``curl --http1.1 -L`` through a fresh mirror
with an empty cache (``hub_cache_dir``):

* ``uncut``: the CDN serves the blob whole;
* ``one cut``: the CDN cuts the connection once at 50% of the blob (its ``cutat`` fault:
  headers with the full length, half the bytes, close), the mirror resumes with a ``Range``
  request from the byte it reached;
* ``two cuts``: cut at 33% and at 67% (what issue 20 asks the benchmark for).

Every pull must answer 200 with the full size (curl), the mirror must have committed the blob
to its cache (only done after its sha256 matched the digest), and the CDN's log must show the
cuts and the resumes from exactly the cut bytes, with no byte fetched twice. Anything else
fails the run (exit 1). The report gives the median seconds per mode, the ratio of each cut
mode to the uncut pull (target: at most 1.2x), and the load around the run.

``HUB_BENCH_SCALE=smoke`` shrinks it to 16 MiB and 1 rep. Units: MB = 10^6 bytes, MiB = 2^20 bytes.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
for p in (str(REPO_ROOT), str(BENCH_DIR)):
    if p not in sys.path:
        sys.path.insert(0, p)

from harness import (BenchError, curl_blob_main, loadavg, log, report_footer,  # noqa: E402
                     smoke_banner, upstream_options)
from pulls import curl_pull, registry_token  # noqa: E402
from tests.support.images import make_big_layer, push_image  # noqa: E402
from tests.support.mirror import Mirror  # noqa: E402
from tests.support.upstream import Upstream  # noqa: E402
from upstream_logs import LogCursor  # noqa: E402

REPO, TAG = "bench/resume", "1.0"
MODES = {"uncut": None, "one cut": "0.5", "two cuts": "0.33,0.67"}  # mode -> the CDN's cut positions
TARGET_RATIO = 1.2
MB = 1e6


def push_blob(up: Upstream, workdir: Path, size_mib: int) -> tuple[str, int]:
    layer = workdir / "layer.tar"
    log(f"writing and pushing a {size_mib} MiB layer")
    digest, size = make_big_layer(layer, size_mib << 20, seed=b"bench-resume")
    try:
        push_image(up, REPO, TAG, [layer], media="oci")
    finally:
        layer.unlink(missing_ok=True)  # the registry has its own copy
    return digest, size


def check_cdn(records: list[dict[str, Any]], up: Upstream, digest: str, size: int, cuts: str | None) -> dict[str, Any]:
    """The CDN's view of one pull: one GET per cut more than uncut, each resume from a cut byte, every byte once."""
    path = up.blob_storage_path(digest)
    gets = [r for r in records if r.get("method") == "GET" and r.get("path") == path]
    positions = sorted(int(float(x) * size) for x in cuts.split(",")) if cuts else []
    want_ranges = [None] + [f"bytes={p}-" for p in positions]
    ranges = [r.get("range") for r in gets]
    sent = sum(int(r.get("bytes") or 0) for r in gets)
    if ranges != want_ranges or sent != size:
        raise BenchError(f"the CDN saw ranges {ranges} and sent {sent} bytes; expected {want_ranges} and {size}")
    return {"cdn_gets": len(gets), "cdn_bytes": sent, "cuts": sum(r.get("fault") == "cutat" for r in gets)}


def pull(up: Upstream, workdir: Path, name: str, mode: str, digest: str, size: int,
         cdn_log: LogCursor) -> dict[str, Any]:
    """One cold pull of the blob through a fresh mirror, the CDN cutting as ``mode`` says."""
    cache = workdir / f"cache-{name}"
    cuts = MODES[mode]
    with Mirror(workdir / f"mirror-{name}", up, options={"hub_cache_dir": str(cache)}) as mirror:
        token = registry_token(mirror.url, up.service, REPO)
        if cuts:
            up.set_cdn_fault("cutat", times=0, at=cuts)  # armed again: every position cut once more
        cdn_log.take(settle=0.1)
        load = loadavg()
        try:
            rec = curl_pull(f"{mirror.url}/v2/{REPO}/blobs/{digest}", size,
                            [f"Authorization: Bearer {token}"], follow=True)
        finally:
            up.clear_faults()
        blob = cache / "blobs" / "sha256" / digest[7:9] / digest[7:]
        deadline = time.monotonic() + 10
        while not blob.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if not blob.exists():
            raise BenchError(f"{name}: the mirror did not cache the blob (its digest did not match?)")
        rec.update(check_cdn(cdn_log.take(), up, digest, size, cuts), mode=mode, loadavg_before=load)
        if cuts and f"resuming from byte {int(float(cuts.split(',')[0]) * size)}" not in mirror.log_text():
            raise BenchError(f"{name}: the mirror's log shows no resume")
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(workdir / f"mirror-{name}", ignore_errors=True)
    log(f"{name}: {rec['time_total']:.2f}s ({rec['mb_per_s']:.0f} MB/s), CDN {rec['cdn_gets']} GETs, "
        f"{rec['cuts']} cuts, load {load}")
    return rec


def run(args: argparse.Namespace, workdir: Path, result: dict[str, Any]) -> None:
    with Upstream(workdir / "hub", **upstream_options(args, result)) as up:
        digest, size = push_blob(up, workdir, args.size_mib)
        result["blob"] = {"digest": digest, "size": size}
        cdn_log = LogCursor(up.cdn_requests)
        order = list(MODES)
        samples: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
        for rep in range(1, args.reps + 1):
            for mode in order[rep - 1:] + order[:rep - 1]:
                samples[mode].append(pull(up, workdir, f"{rep}-{mode.replace(' ', '-')}", mode, digest, size,
                                          cdn_log) | {"rep": rep})
        result["samples"] = samples


def report(args: argparse.Namespace, result: dict[str, Any]) -> bool:
    samples, size = result["samples"], result["blob"]["size"]
    median = {m: statistics.median(r["time_total"] for r in samples[m]) for m in MODES}
    out = smoke_banner(result) + ["## hub-rewrite: a blob cut by the CDN, resumed, against the same blob uncut\n"]
    out.append(f"Blob: one layer of {size} bytes ({size / 2**20:.0f} MiB), pulled cold with `curl --http1.1 -L` "
               f"through a fresh mirror with an empty cache each time; {args.reps} rounds of the three modes, "
               f"order rotating. The CDN cuts the connection at the given fractions of the blob (once each); "
               f"the mirror resumes with `Range` from the byte it reached. Every pull: 200 with the full size, "
               f"blob cached (its digest matched), the CDN sent each byte once.\n")
    out.append("| mode | CDN GETs | median s | min s | max s | MB/s (median) | vs uncut |")
    out.append("|---|---:|---:|---:|---:|---:|---:|")
    targets = []
    for m in MODES:
        secs = [r["time_total"] for r in samples[m]]
        ratio = median[m] / median["uncut"]
        out.append(f"| {m} | {samples[m][0]['cdn_gets']} | {median[m]:.2f} | {min(secs):.2f} | {max(secs):.2f} | "
                   f"{size / median[m] / MB:.0f} | {ratio:.2f}x |")
        if m != "uncut":
            targets.append((f"{m} / uncut <= {TARGET_RATIO}x (medians)", f"{ratio:.2f}x", ratio <= TARGET_RATIO))
    out.append("")
    out.append("| target | measured | result |")
    out.append("|---|---|---|")
    for t, v, ok in targets:
        out.append(f"| {t} | {v} | {'PASS' if ok else 'FAIL'} |")
    out.append("")
    loads = ", ".join(f"{r['rep']}/{m}: {r['loadavg_before'].split()[0]}" for m in MODES for r in samples[m])
    out += report_footer(result, [result["machine"]["curl"]], f"(1-minute load before each pull: {loads})")
    print("\n".join(out), flush=True)
    result["summary"] = {"median_seconds": median, "targets": [{"target": t, "value": v, "ok": ok}
                                                                for t, v, ok in targets]}
    return all(ok for _, _, ok in targets)


def main(argv: list[str] | None = None) -> int:
    return curl_blob_main(__doc__, argv, (3, "rounds of the three modes"),
                          {"time_total": "seconds, curl's", "mb_per_s": "10^6 bytes/s"}, "hubrewrite-bench-resume-",
                          run, report, lambda w: sorted(w.glob("mirror-*/mirror.log")),
                          ("hub/storage/**/data", "cache-*/blobs/**/*"))


if __name__ == "__main__":
    sys.exit(main())
