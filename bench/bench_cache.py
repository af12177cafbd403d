"""Pull-through cache benchmark: skopeo pulls direct vs. mirror cold vs. mirror warm,
upstream traffic per pull, and the mirror's memory under 8 concurrent pulls.

    PYTHONPATH=. .venv/bin/python bench/bench_cache.py [--size-mib 1024] [--reps 3] [--json out.json]

Starts the fake Docker Hub (tests/support/upstream.py) in a temporary
directory and pushes two images:

* ``bench/big:1.0``: one uncompressed layer of ``--size-mib`` MiB;
* ``bench/multi:1.0``: a Docker manifest list, amd64 + arm64, each image with
  two uncompressed layers (4 MiB and 1 MiB of random data) and its config.

Then, ``--reps`` times:

* ``direct``: ``skopeo copy`` of each image straight from the fake Hub's API
  (the edge, which redirects blobs to the CDN): the reference;
* ``cold``:   a fresh mitmdump + addon with a fresh, empty ``hub_cache_dir``;
  ``skopeo copy`` of each image through it;
* ``warm``:   the same mirror (same cache) again.

Every pull is timed (wall clock around skopeo) and must succeed with every
blob present at its size in the ``dir:`` output (skopeo verifies digests
itself), or the benchmark fails with exit code 1.  For each pull the deltas of
the fake Hub's access logs give the CDN requests and the body bytes the CDN
sent, and the edge's manifest GETs/HEADs and blob requests.

Finally, with one fresh mirror: 8 concurrent ``curl`` GETs of the big blob
with a cold cache, then 8 more with the now warm cache; the mirror's peak RSS
(VmHWM, reset before each phase) is recorded for each.

Units: MB = 10^6 bytes, MiB = 2^20 bytes.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
for p in (str(REPO_ROOT), str(BENCH_DIR)):
    if p not in sys.path:
        sys.path.insert(0, p)

from harness import (BenchError, apply_scale, blob_arguments, exact_command, log, machine_facts,  # noqa: E402
                     report_footer, run_benchmark, smoke_banner, tool_version, upstream_options)
from image_set import push_images  # noqa: E402
from procstat import rss_bytes  # noqa: E402
from pulls import CURL_TIMEOUT, registry_token, skopeo_pull  # noqa: E402
from tests.support.mirror import Mirror  # noqa: E402
from tests.support.upstream import Upstream  # noqa: E402
from upstream_logs import LogCursor, count_upstream  # noqa: E402

IMAGES = ("big", "multi")
PATHS = ("direct", "cold", "warm")
PATH_LABELS = {"direct": "direct (edge + CDN)", "cold": "mirror, cold cache", "warm": "mirror, warm cache"}
CONCURRENCY = 8
RSS_TARGET = 150_000_000  # bytes
MB = 1e6


# ---------------------------------------------------------------- helpers


def concurrent_pulls(mirror: Mirror, token: str, repo: str, digest: str, size: int, n: int,
                     tmp: Path) -> dict[str, Any]:
    """``n`` simultaneous curl GETs of one blob through the mirror; the first one is
    piped into sha256sum.  Raises BenchError unless all got 200 with ``size`` bytes."""
    url = f"{mirror.url}/v2/{repo}/blobs/{digest}"
    procs: list[tuple[subprocess.Popen, subprocess.Popen | None, Path]] = []
    t0 = time.monotonic()
    try:
        for i in range(n):
            hdr = tmp / f"headers-{i}.txt"
            base = ["curl", "-sS", "--http1.1", "--max-time", str(CURL_TIMEOUT), "-D", str(hdr),
                    "-H", f"Authorization: Bearer {token}"]
            if i == 0:
                curl = subprocess.Popen(base + ["-o", "-", "-w", "%{stderr}\nW %{http_code} %{size_download} %{time_total}\n",
                                                url], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                sha = subprocess.Popen(["sha256sum"], stdin=curl.stdout, stdout=subprocess.PIPE)
                assert curl.stdout is not None
                curl.stdout.close()  # sha256sum owns the pipe now
                procs.append((curl, sha, hdr))
            else:
                curl = subprocess.Popen(base + ["-o", "/dev/null", "-w", "\nW %{http_code} %{size_download} %{time_total}\n",
                                                url], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                procs.append((curl, None, hdr))
        results = []
        for i, (curl, sha, hdr) in enumerate(procs):
            out, err = curl.communicate(timeout=CURL_TIMEOUT + 30)
            text = (err if sha is not None else out).decode(errors="replace")
            wline = [ln for ln in text.splitlines() if ln.startswith("W ")]
            rec: dict[str, Any] = {"client": i, "curl_rc": curl.returncode}
            if wline:
                _, code, got, total = wline[-1].split()
                rec.update(status=int(code), bytes=int(got), time_total=float(total))
            if sha is not None:
                sha_out, _ = sha.communicate(timeout=60)
                rec["sha256"] = "sha256:" + sha_out.decode().split()[0] if sha_out else None
            cache = [ln.split(":", 1)[1].strip() for ln in (hdr.read_text(errors="replace").splitlines()
                                                             if hdr.exists() else [])
                     if ln.lower().startswith("x-hub-cache:")]
            rec["x_hub_cache"] = cache[-1] if cache else None
            rec["curl_stderr"] = err.decode(errors="replace").strip()[-300:] if curl.returncode else ""
            results.append(rec)
        wall = time.monotonic() - t0
    finally:
        for curl, sha, _ in procs:
            for p in (curl, sha):
                if p is not None and p.poll() is None:
                    p.kill()
                    p.wait()
    bad = [r for r in results if r["curl_rc"] != 0 or r.get("status") != 200 or r.get("bytes") != size]
    if bad:
        raise BenchError(f"{len(bad)} of {n} concurrent pulls failed: {bad}")
    if results[0].get("sha256") != digest:
        raise BenchError(f"concurrent pull 0 hashed to {results[0].get('sha256')}, expected {digest}")
    states: dict[str, int] = {}
    for r in results:
        states[str(r["x_hub_cache"])] = states.get(str(r["x_hub_cache"]), 0) + 1
    return {"clients": results, "wall_seconds": wall, "x_hub_cache": states,
            "aggregate_mb_per_s": n * size / wall / MB, "digest_verified": True}


# ---------------------------------------------------------------- the run


def run(args: argparse.Namespace, workdir: Path, result: dict[str, Any]) -> None:
    with Upstream(workdir / "hub", **upstream_options(args, result)) as up:
        images = push_images(up, workdir, args.size_mib)
        result["images"] = images
        cdn_log, edge_log, token_log = (LogCursor(up.cdn_requests), LogCursor(up.edge_requests),
                                        LogCursor(up.token_requests))

        def measured(label: str, fn: Callable[[], float], mirror: Mirror | None) -> dict[str, Any]:
            cdn_log.take(settle=0.1)
            edge_log.take(settle=0.0)
            token_log.take(settle=0.0)
            if mirror is not None:
                mirror.reset_peak_rss()
            try:
                seconds = fn()
            except BenchError as e:
                raise BenchError(f"{label}: {e}") from None
            rec: dict[str, Any] = {"seconds": seconds}
            if mirror is not None:
                rec["peak_rss"] = mirror.peak_rss()
                if mirror.proc.poll() is not None:
                    raise BenchError(f"{label}: mitmdump exited:\n{mirror.log_text()[-2000:]}")
            rec.update(count_upstream(cdn_log.take(), edge_log.take(settle=0.0), token_log.take(settle=0.0)))
            return rec

        def pull(image: str, host: str, mirror: Mirror | None, label: str) -> dict[str, Any]:
            info = images[image]
            dest = workdir / "out"
            shutil.rmtree(dest, ignore_errors=True)
            try:
                rec = measured(label, lambda: skopeo_pull(host, info["repo"], info["tag"], dest, info["blobs"],
                                                          info["multi"], up.cert_dir if mirror is None else None),
                               mirror)
            finally:
                shutil.rmtree(dest, ignore_errors=True)
            rec["mb_per_s"] = info["blob_bytes"] / rec["seconds"] / MB
            extra = f", peak RSS {rec['peak_rss'] / MB:.1f} MB" if "peak_rss" in rec else ""
            log(f"{label}: {rec['seconds']:.2f}s, CDN {rec['cdn_requests']} req / {rec['cdn_bytes']} B, "
                f"edge manifest GET {rec['edge_manifest_get']} HEAD {rec['edge_manifest_head']}{extra}")
            return rec

        samples: dict[str, dict[str, list[dict[str, Any]]]] = {i: {p: [] for p in PATHS} for i in IMAGES}
        for rep in range(1, args.reps + 1):
            for image in IMAGES:
                rec = pull(image, up.api_host, None, f"rep {rep}/{args.reps} {image} direct")
                samples[image]["direct"].append(rec | {"rep": rep})
            cache_dir = workdir / f"cache-{rep}"
            with Mirror(workdir / f"mirror-{rep}", up, options={"hub_cache_dir": str(cache_dir)}) as mirror:
                for path in ("cold", "warm"):
                    for image in IMAGES:
                        rec = pull(image, mirror.host, mirror, f"rep {rep}/{args.reps} {image} {path}")
                        samples[image][path].append(rec | {"rep": rep})
            shutil.rmtree(cache_dir, ignore_errors=True)
            shutil.rmtree(workdir / f"mirror-{rep}", ignore_errors=True)
        result["samples"] = samples

        # ---- 8 concurrent pulls of the big blob: cold, then warm
        big = images["big"]
        digest, size = big["layer_digest"], big["layer_size"]
        storage_path = up.blob_storage_path(digest)
        cache_dir = workdir / "cache-concurrent"
        conc: dict[str, Any] = {}
        with Mirror(workdir / "mirror-concurrent", up, options={"hub_cache_dir": str(cache_dir)}) as mirror:
            time.sleep(1.0)
            conc["idle_rss"] = rss_bytes(mirror.proc.pid)
            token = registry_token(mirror.url, up.service, big["repo"])
            for phase in ("cold", "warm"):
                label = f"{CONCURRENCY} concurrent pulls, {phase} cache"
                cdn_log.take(settle=0.1)
                edge_log.take(settle=0.0)
                mirror.reset_peak_rss()
                tmp = workdir / f"curl-{phase}"
                tmp.mkdir()
                try:
                    rec = concurrent_pulls(mirror, token, big["repo"], digest, size, CONCURRENCY, tmp)
                except BenchError as e:
                    raise BenchError(f"{label}: {e}") from None
                rec["peak_rss"] = mirror.peak_rss()
                if mirror.proc.poll() is not None:
                    raise BenchError(f"{label}: mitmdump exited:\n{mirror.log_text()[-2000:]}")
                cdn = cdn_log.take()
                rec.update(count_upstream(cdn, edge_log.take(settle=0.0), []))
                rec.pop("token_requests")
                rec["cdn_blob_gets"] = sum(1 for r in cdn if r.get("method") == "GET" and r.get("path") == storage_path)
                rec["cdn_blob_full_200"] = sum(1 for r in cdn if r.get("path") == storage_path
                                               and r.get("status") == 200 and r.get("bytes") == size)
                log(f"{label}: {rec['wall_seconds']:.2f}s, {rec['aggregate_mb_per_s']:.0f} MB/s aggregate, "
                    f"X-Hub-Cache {rec['x_hub_cache']}, CDN {rec['cdn_requests']} req, "
                    f"peak RSS {rec['peak_rss'] / MB:.1f} MB")
                conc[phase] = rec
            conc["final_rss"] = rss_bytes(mirror.proc.pid)
        result["concurrent"] = conc


# ---------------------------------------------------------------- report


def fmt_counts(values: list[Any]) -> str:
    """One value when all reps agree, else all of them."""
    return str(values[0]) if len(set(values)) == 1 else "/".join(str(v) for v in values)


def report(args: argparse.Namespace, result: dict[str, Any]) -> bool:
    images, samples, conc = result["images"], result["samples"], result["concurrent"]
    targets: list[tuple[str, str, bool]] = []
    summary: dict[str, Any] = {}
    for image in IMAGES:
        blob_bytes, n_blobs = images[image]["blob_bytes"], len(images[image]["blobs"])
        s = {p: statistics.median(r["seconds"] for r in samples[image][p]) for p in PATHS}
        summary[image] = {"median_seconds": s}
        cold, warm = samples[image]["cold"], samples[image]["warm"]
        cdn_cold = [r["cdn_bytes"] for r in cold]
        targets.append((f"{image}: cold pull CDN bytes == image blob bytes ({blob_bytes}), every rep",
                        fmt_counts(cdn_cold), all(b == blob_bytes for b in cdn_cold)))
        targets.append((f"{image}: cold pull fetches each of the {n_blobs} blobs from the CDN exactly once",
                        f"{fmt_counts([r['cdn_gets'] for r in cold])} GETs, "
                        f"max {fmt_counts([r['cdn_max_gets_per_blob'] for r in cold])} per blob",
                        all(r["cdn_gets"] == n_blobs and r["cdn_max_gets_per_blob"] == 1 for r in cold)))
        targets.append((f"{image}: warm pull makes 0 CDN requests",
                        fmt_counts([r["cdn_requests"] for r in warm]), all(r["cdn_requests"] == 0 for r in warm)))
        targets.append((f"{image}: warm pull makes 0 upstream manifest GETs",
                        fmt_counts([r["edge_manifest_get"] for r in warm]),
                        all(r["edge_manifest_get"] == 0 for r in warm)))
        targets.append((f"{image}: warm pull faster than cold (medians)",
                        f"{s['warm']:.2f}s vs {s['cold']:.2f}s", s["warm"] < s["cold"]))
    for phase in ("cold", "warm"):
        c = conc[phase]
        if phase == "cold":
            targets.append((f"{CONCURRENCY} concurrent, cold: exactly 1 CDN request for the blob",
                            f"{c['cdn_requests']} CDN requests ({c['cdn_blob_full_200']} full 200)",
                            c["cdn_requests"] == 1 and c["cdn_blob_full_200"] == 1))
        else:
            targets.append((f"{CONCURRENCY} concurrent, warm: 0 CDN requests", str(c["cdn_requests"]),
                            c["cdn_requests"] == 0))
        targets.append((f"{CONCURRENCY} concurrent, {phase}: mirror peak RSS < {RSS_TARGET / MB:.0f} MB",
                        f"{c['peak_rss'] / MB:.1f} MB", c["peak_rss"] < RSS_TARGET))
    all_ok = all(ok for _, _, ok in targets)
    result["summary"] = {"per_image": summary, "targets": [{"target": t, "value": v, "ok": ok} for t, v, ok in targets],
                         "all_targets_ok": all_ok}

    facts = result["machine"]
    big, multi = images["big"], images["multi"]
    out = smoke_banner(result) + ["## hub-rewrite pull-through cache benchmark\n"]
    out.append(f"Images: `{big['repo']}:{big['tag']}` (OCI, 1 layer of {big['layer_size']} bytes = "
               f"{big['layer_size'] / 2**20:.1f} MiB, blobs {big['blob_bytes']} bytes); "
               f"`{multi['repo']}:{multi['tag']}` (Docker manifest list, amd64 + arm64, "
               f"{len(multi['blobs'])} blobs, {multi['blob_bytes']} bytes, pulled with `--all`). "
               f"Client: {facts.get('skopeo', 'skopeo')} `copy --src-tls-verify=false --src-no-creds ... dir:`, "
               f"loopback. {args.reps} reps; each rep: direct pull, then a fresh mirror + empty cache dir "
               f"(cold pull of each image), then the same mirror again (warm). Times are medians over the reps; "
               f"counts show one value when all reps agree, else each rep's.\n")
    out.append("| image | path | median s | min s | max s | MB/s (median) | CDN requests | CDN bytes "
               "| edge manifest GET | edge manifest HEAD | edge blob GET/HEAD | mirror peak RSS |")
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for image in IMAGES:
        for p in PATHS:
            rs = samples[image][p]
            secs = [r["seconds"] for r in rs]
            med = statistics.median(secs)
            rss = f"{max(r['peak_rss'] for r in rs) / MB:.1f} MB" if "peak_rss" in rs[0] else "n/a"
            out.append(f"| {image} | {PATH_LABELS[p]} | {med:.2f} | {min(secs):.2f} | {max(secs):.2f} | "
                       f"{images[image]['blob_bytes'] / med / MB:.1f} | {fmt_counts([r['cdn_requests'] for r in rs])} | "
                       f"{fmt_counts([r['cdn_bytes'] for r in rs])} | {fmt_counts([r['edge_manifest_get'] for r in rs])} | "
                       f"{fmt_counts([r['edge_manifest_head'] for r in rs])} | "
                       f"{fmt_counts([r['edge_blob_get'] for r in rs])}/{fmt_counts([r['edge_blob_head'] for r in rs])} "
                       f"| {rss} |")
    out.append("")
    out.append(f"Concurrent pulls: {CONCURRENCY} simultaneous `curl --http1.1` GETs of the "
               f"{big['layer_size'] / 2**20:.0f} MiB blob through one fresh mirror (one bearer token from its "
               f"`/token`), first with an empty cache, then again with the cache filled; every client got 200 "
               f"with the full size, client 0's bytes were piped through sha256sum and matched the digest.\n")
    out.append("| cache | wall s | aggregate MB/s | X-Hub-Cache | CDN requests | CDN bytes | edge blob GET/HEAD "
               "| mirror peak RSS |")
    out.append("|---|---:|---:|---|---:|---:|---:|---:|")
    for phase in ("cold", "warm"):
        c = conc[phase]
        states = ", ".join(f"{k} x{v}" for k, v in sorted(c["x_hub_cache"].items()))
        out.append(f"| {phase} | {c['wall_seconds']:.2f} | {c['aggregate_mb_per_s']:.0f} | {states} | "
                   f"{c['cdn_requests']} | {c['cdn_bytes']} | {c['edge_blob_get']}/{c['edge_blob_head']} | "
                   f"{c['peak_rss'] / MB:.1f} MB |")
    out.append("")
    out.append(f"Mirror RSS: idle {conc['idle_rss'] / MB:.1f} MB after startup, {conc['final_rss'] / MB:.1f} MB "
               f"after the concurrent pulls. Peak RSS = VmHWM of mitmdump, reset before each pull/phase. "
               f"MB = 10^6 bytes.\n")
    out.append("| target | measured | result |")
    out.append("|---|---|---|")
    for t, v, ok in targets:
        out.append(f"| {t} | {v} | {'PASS' if ok else 'FAIL'} |")
    out.append("")
    out += report_footer(result, [facts["curl"], facts.get("skopeo", "?")])
    print("\n".join(out), flush=True)
    return all_ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    blob_arguments(ap, 3, "direct/cold/warm repetitions")
    args = ap.parse_args(argv)
    if args.size_mib < 1 or args.reps < 1:
        ap.error("--size-mib and --reps must be at least 1")
    for tool in ("curl", "skopeo", "sha256sum"):
        if shutil.which(tool) is None:
            ap.error(f"{tool} is required")
    scale = apply_scale(ap, args, {"size_mib": 16, "reps": 1})

    started = time.monotonic()
    facts = machine_facts()
    facts["skopeo"] = tool_version("skopeo", "--version")
    result: dict[str, Any] = {"command": exact_command(), "machine": facts, "scale": scale, "size_mib": args.size_mib,
                              "reps": args.reps, "concurrency": CONCURRENCY,
                              "units": {"seconds": "wall clock", "mb_per_s": "10^6 bytes/s", "rss": "bytes",
                                        "cdn_bytes": "body bytes the CDN sent"}}
    workdir = Path(tempfile.mkdtemp(prefix="hubrewrite-bench-cache-"))

    def finish(result: dict[str, Any]) -> int:
        return 0 if report(args, result) or not args.strict else 2

    return run_benchmark(args, result, started, workdir, run, finish,
                         lambda w: sorted(w.glob("mirror-*/mirror.log")),
                         ("hub/storage/**/data", "cache-*/blobs/**/*", "out/*"))


if __name__ == "__main__":
    sys.exit(main())
