"""Blob pull benchmark: the mirror vs. a plain mitmdump relay vs. the CDN itself.

    PYTHONPATH=. .venv/bin/python bench/bench_pull.py [--size-mib 1024] [--reps 5] [--json out.json] [--plain-upstream]

Starts the fake Docker Hub (tests/support/upstream.py) in a temporary
directory, pushes one image ``bench/big:1.0`` with a single uncompressed layer
of ``--size-mib`` MiB, then pulls that layer with curl over three paths,
interleaved (each repetition pulls once over every path, the order rotating
from one repetition to the next):

* ``cdn``:    the signed CDN URL, straight from the CDN (upper bound);
* ``plain``:  the same signed URL through ``mitmdump --mode reverse:<cdn>``
              without the addon, with the mirror's streaming settings
              (the baseline the 0.85x target refers to);
* ``mirror``: ``GET /v2/bench/big/blobs/<digest>`` with a bearer token through
              mitmdump + the hub-rewrite addon, pointed at the fake Hub's API
              (cold: the addon probes the registry, follows the 307 to the
              CDN and streams; nothing is cached).

The fake Hub speaks HTTPS like Docker Hub (``--plain-upstream``: plain HTTP):
the ``cdn`` pull verifies the test CA, ``plain`` and ``mirror`` trust it with
``ssl_verify_upstream_trusted_ca``; the client side of both proxies is plain HTTP.

Every pull must answer 200 with the full size, or the benchmark fails (exit 1)
instead of averaging it in.  Before the timed repetitions each path is pulled
once untimed (warm-up: page cache, connections, imports); the mirror's
warm-up pull is hashed and must match the layer digest.

Peak RSS (VmHWM, reset before each pull) is recorded for both mitmdump
processes; idle RSS is read after startup.  Units: MB = 10^6 bytes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
for p in (str(REPO_ROOT), str(BENCH_DIR)):
    if p not in sys.path:
        sys.path.insert(0, p)

from harness import (BenchError, curl_blob_main, log, report_footer,  # noqa: E402
                     smoke_banner, upstream_options)
from procstat import cpu_seconds, rss_bytes  # noqa: E402
from pulls import curl_pull, curl_sha256, registry_token  # noqa: E402
from tests.support.images import make_big_layer, push_image  # noqa: E402
from tests.support.mirror import Mirror  # noqa: E402
from tests.support.upstream import Upstream  # noqa: E402

REPO = "bench/big"
TAG = "1.0"
PATHS = ("cdn", "plain", "mirror")
LABELS = {
    "cdn": "direct from CDN (upper bound)",
    "plain": "plain mitmdump reverse relay (baseline)",
    "mirror": "hub-rewrite mirror, cold",
}
THROUGHPUT_TARGET = 0.85  # mirror median >= this x plain relay median
RSS_TARGET = 150_000_000  # mirror peak RSS below this (bytes)
MB = 1e6


# ---------------------------------------------------------------- helpers


def summarize(samples: list[dict[str, Any]]) -> dict[str, float]:
    speeds = [s["mb_per_s"] for s in samples]
    out = {"median": statistics.median(speeds), "min": min(speeds), "max": max(speeds),
           "median_ttfb_ms": statistics.median(s["time_starttransfer"] for s in samples) * 1000}
    if all("proxy_cpu_s" in s for s in samples):
        # CPU seconds of the mitmdump process per GiB relayed
        out["median_proxy_cpu_s_per_gib"] = statistics.median(s["proxy_cpu_s"] / (s["bytes"] / 2**30) for s in samples)
    return out


# ---------------------------------------------------------------- the run


def run(args: argparse.Namespace, workdir: Path, result: dict[str, Any]) -> None:
    size_bytes = args.size_mib << 20
    t0 = time.monotonic()
    with Upstream(workdir / "hub", **upstream_options(args, result)) as up:
        log(f"fake Hub up ({time.monotonic() - t0:.1f}s); writing a {args.size_mib} MiB layer")
        layer = workdir / "layer.tar"
        digest, size = make_big_layer(layer, size_bytes, seed=b"bench")
        log(f"layer {digest} ({size} bytes) written ({time.monotonic() - t0:.1f}s); pushing {REPO}:{TAG}")
        try:
            push_image(up, REPO, TAG, [layer], media="oci")
        finally:
            layer.unlink(missing_ok=True)  # the registry has its own copy
        log(f"pushed ({time.monotonic() - t0:.1f}s)")
        result["blob"] = {"repo": REPO, "tag": TAG, "digest": digest, "size": size}
        storage_path = up.blob_storage_path(digest)
        if not (up.storage_root / storage_path.lstrip("/")).is_file():
            raise BenchError(f"blob not found in registry storage at {storage_path}")

        with Mirror(workdir / "plain", up.cdn_url, plain=True, name="plain", upstream_ca=up.ca_cert) as plain, \
                Mirror(workdir / "mirror", up, name="mirror") as mirror:
            time.sleep(1.0)  # let both settle before reading idle RSS
            result["idle_rss"] = {"plain": rss_bytes(plain.proc.pid), "mirror": rss_bytes(mirror.proc.pid)}
            procs = {"plain": plain, "mirror": mirror}

            def pull(path: str, timed: bool = True) -> dict[str, Any]:
                if path == "cdn":
                    return curl_pull(up.sign_cdn_url(storage_path), size, cacert=up.ca_cert)
                if path == "plain":
                    signed = up.sign_cdn_url(storage_path)
                    parts = urlsplit(signed)
                    return curl_pull(f"{plain.url}{parts.path}?{parts.query}", size)
                token = registry_token(mirror.url, up.service, REPO)
                n_cdn = len(up.cdn_requests())
                rec = curl_pull(f"{mirror.url}/v2/{REPO}/blobs/{digest}", size,
                                headers=[f"Authorization: Bearer {token}"])
                # the bytes must have come from the CDN, without the client's credentials
                cdn = up.cdn_requests(min_count=n_cdn + 1, timeout=10)[n_cdn:]
                if not any(r.get("status") == 200 and r.get("bytes") == size and not r.get("authorization_present")
                           for r in cdn):
                    raise BenchError(f"mirror pull did not show up as a full CDN GET: {cdn}")
                return rec

            # warm-up, untimed; the mirror's warm-up pull is hashed
            log("warm-up: one untimed pull per path; hashing the mirror's")
            for path in ("cdn", "plain"):
                pull(path)
            token = registry_token(mirror.url, up.service, REPO)
            got, n = curl_sha256(f"{mirror.url}/v2/{REPO}/blobs/{digest}", [f"Authorization: Bearer {token}"])
            if got != digest or n != size:
                raise BenchError(f"mirror served {n} bytes hashing to {got}, expected {size} bytes {digest}")
            result["mirror_digest_verified"] = True
            log("mirror bytes hash to the layer digest")

            samples: dict[str, list[dict[str, Any]]] = {p: [] for p in PATHS}
            for rep in range(args.reps):
                order = PATHS[rep % len(PATHS):] + PATHS[:rep % len(PATHS)]
                for path in order:
                    proc = procs.get(path)
                    if proc is not None:
                        proc.reset_peak_rss()
                        cpu0 = cpu_seconds([proc.proc.pid])
                    try:
                        rec = pull(path)
                    except BenchError as e:
                        raise BenchError(f"rep {rep + 1} {path}: {e}") from None
                    if proc is not None:
                        rec["peak_rss"] = proc.peak_rss()
                        rec["proxy_cpu_s"] = cpu_seconds([proc.proc.pid]) - cpu0
                    rec["rep"] = rep + 1
                    samples[path].append(rec)
                    extra = f", peak RSS {rec['peak_rss'] / MB:.1f} MB" if "peak_rss" in rec else ""
                    log(f"rep {rep + 1}/{args.reps} {path:6s} {rec['mb_per_s']:8.1f} MB/s "
                        f"({rec['time_total']:.2f}s{extra})")
            result["samples"] = samples
            for name, m in procs.items():
                if m.proc.poll() is not None:
                    raise BenchError(f"{name} mitmdump exited during the run:\n{m.log_text()[-2000:]}")
            result["final_rss"] = {"plain": rss_bytes(plain.proc.pid), "mirror": rss_bytes(mirror.proc.pid)}


def report(args: argparse.Namespace, result: dict[str, Any]) -> bool:
    samples = result["samples"]
    stats = {p: summarize(samples[p]) for p in PATHS}
    peak = {p: max(s["peak_rss"] for s in samples[p]) for p in ("plain", "mirror")}
    plain_median = stats["plain"]["median"]
    ratio = stats["mirror"]["median"] / plain_median
    rss_ok = peak["mirror"] < RSS_TARGET
    tput_ok = ratio >= THROUGHPUT_TARGET
    result["summary"] = {"stats": stats, "peak_rss": peak,
                         "ratio_mirror_vs_plain": ratio,
                         "targets": {"throughput_ratio_min": THROUGHPUT_TARGET, "throughput_ok": tput_ok,
                                     "peak_rss_max_bytes": RSS_TARGET, "peak_rss_ok": rss_ok}}

    blob = result["blob"]
    facts = result["machine"]
    out = smoke_banner(result)
    out.append("## hub-rewrite blob pull benchmark\n")
    out.append(f"Blob: `{blob['repo']}:{blob['tag']}` layer {blob['digest'][:19]}..., {blob['size']} bytes "
               f"({blob['size'] / 2**20:.1f} MiB); {args.reps} timed reps per path, interleaved, "
               f"after one untimed warm-up pull each; curl client, HTTP/1.1, loopback; "
               f"upstream {result.get('upstream_transport', 'http').upper()}.\n")
    out.append("| path | median MB/s | min | max | ratio vs plain relay | median TTFB ms "
               "| mitmdump CPU s/GiB | peak RSS |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for p in PATHS:
        s = stats[p]
        rss = f"{peak[p] / MB:.1f} MB" if p in peak else "n/a"
        cpu = f"{s['median_proxy_cpu_s_per_gib']:.2f}" if "median_proxy_cpu_s_per_gib" in s else "n/a"
        out.append(f"| {LABELS[p]} | {s['median']:.1f} | {s['min']:.1f} | {s['max']:.1f} | "
                   f"{s['median'] / plain_median:.2f}x | {s['median_ttfb_ms']:.1f} | {cpu} | {rss} |")
    out.append("")
    idle, final = result["idle_rss"], result["final_rss"]
    out.append(f"Idle RSS after startup: mirror {idle['mirror'] / MB:.1f} MB, plain relay {idle['plain'] / MB:.1f} MB; "
               f"after the run: mirror {final['mirror'] / MB:.1f} MB, plain relay {final['plain'] / MB:.1f} MB.")
    out.append(f"Mirror bytes verified against the digest (sha256 of a full pull): "
               f"{'yes' if result.get('mirror_digest_verified') else 'NO'}.")
    out.append("Peak RSS = max over the timed reps of VmHWM, reset before each pull. MB = 10^6 bytes.\n")
    out.append("Targets:")
    out.append(f"- mirror throughput >= {THROUGHPUT_TARGET}x plain relay: {ratio:.2f}x -> "
               f"{'PASS' if tput_ok else 'FAIL'}")
    out.append(f"- mirror peak RSS < {RSS_TARGET / MB:.0f} MB: {peak['mirror'] / MB:.1f} MB -> "
               f"{'PASS' if rss_ok else 'FAIL'}\n")
    out += report_footer(result, [facts["curl"]],
                         "(the run itself keeps about 2 CPUs busy; a high start value means other work was running)")
    print("\n".join(out), flush=True)
    return tput_ok and rss_ok


def main(argv: list[str] | None = None) -> int:
    return curl_blob_main(__doc__, argv, (5, "timed repetitions per path"), {"mb_per_s": "10^6 bytes/s", "rss": "bytes"},
                          "hubrewrite-bench-", run, report,
                          lambda w: [w / name / f"{name}.log" for name in ("mirror", "plain")], ("hub/storage/**/data",))


if __name__ == "__main__":
    sys.exit(main())
