"""Blob pull benchmark: the mirror vs. a plain mitmdump relay vs. the CDN itself.

    PYTHONPATH=. .venv/bin/python bench/bench_pull.py [--size-mib 1024] [--reps 5] [--json out.json]

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

Every pull must answer 200 with the full size, or the benchmark fails (exit 1)
instead of averaging it in.  Before the timed repetitions each path is pulled
once untimed (warm-up: page cache, connections, imports); the mirror's
warm-up pull is hashed and must match the layer digest.

Peak RSS (VmHWM, reset before each pull) is recorded for both mitmdump
processes; idle RSS is read after startup.  Units: MB = 10^6 bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import httpx  # noqa: E402

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
CURL_FORMAT = "%{http_code} %{size_download} %{time_total} %{speed_download} %{time_starttransfer}"
MB = 1e6


class BenchError(RuntimeError):
    pass


# ---------------------------------------------------------------- helpers


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"no {field} for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def curl_pull(url: str, size: int, headers: list[str] = (), timeout: float = 900) -> dict[str, Any]:
    """One timed pull to /dev/null; raises BenchError unless 200 and ``size`` bytes."""
    argv = ["curl", "-sS", "--http1.1", "--max-time", str(int(timeout)), "-o", "/dev/null", "-w", CURL_FORMAT]
    for h in headers:
        argv += ["-H", h]
    argv.append(url)
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30)
    fields = p.stdout.split()
    if p.returncode != 0 or len(fields) != 5:
        raise BenchError(f"curl exited {p.returncode} ({p.stderr.strip()!r}, -w output {p.stdout!r})")
    status, got, total, speed, ttfb = int(fields[0]), int(fields[1]), float(fields[2]), float(fields[3]), float(fields[4])
    if status != 200:
        raise BenchError(f"HTTP {status} (expected 200), {got} bytes")
    if got != size:
        raise BenchError(f"downloaded {got} bytes, expected {size}")
    return {"status": status, "bytes": got, "time_total": total, "time_starttransfer": ttfb,
            "curl_speed_download": speed, "mb_per_s": got / total / MB}


def curl_sha256(url: str, headers: list[str] = (), timeout: float = 900) -> tuple[str, int]:
    """Pull through curl into a streaming sha256 (constant memory)."""
    argv = ["curl", "-sS", "--fail", "--http1.1", "--max-time", str(int(timeout)), "-o", "-"]
    for h in headers:
        argv += ["-H", h]
    argv.append(url)
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


def mirror_token(mirror: Mirror, up: Upstream) -> str:
    """An anonymous pull token, asked from the mirror's /token like a client would."""
    q = urlencode({"service": up.service, "scope": f"repository:{REPO}:pull"})
    r = httpx.get(f"{mirror.url}/token?{q}", timeout=30)
    if r.status_code != 200:
        raise BenchError(f"mirror /token answered {r.status_code}: {r.text[:300]}")
    return r.json()["token"]


def machine_facts() -> dict[str, Any]:
    import mitmproxy.version

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) // 1024} MiB"
    except OSError:
        pass
    curl = subprocess.run(["curl", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "mem_total": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "mitmproxy": mitmproxy.version.VERSION,
        "curl": " ".join(curl.split()[:2]),
        "git": git_state(),
    }


def git_state() -> str:
    """HEAD commit, plus "+dirty" when hubrewrite/ or addons/ differ from it (what was measured)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "hubrewrite", "addons", "mitm.conf"],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return (head or "?") + ("+dirty" if dirty else "")


def exact_command() -> str:
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    prefix = f"PYTHONPATH={shlex.quote(os.environ['PYTHONPATH'])} " if os.environ.get("PYTHONPATH") else ""
    return prefix + shlex.join(argv)


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
    with Upstream(workdir / "hub") as up:
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

        with Mirror(workdir / "plain", up.cdn_url, plain=True, name="plain") as plain, \
                Mirror(workdir / "mirror", up.api_url, name="mirror") as mirror:
            time.sleep(1.0)  # let both settle before reading idle RSS
            result["idle_rss"] = {"plain": rss_bytes(plain.proc.pid), "mirror": rss_bytes(mirror.proc.pid)}
            procs = {"plain": plain, "mirror": mirror}

            def pull(path: str, timed: bool = True) -> dict[str, Any]:
                if path == "cdn":
                    return curl_pull(up.sign_cdn_url(storage_path), size)
                if path == "plain":
                    signed = up.sign_cdn_url(storage_path)
                    parts = urlsplit(signed)
                    return curl_pull(f"{plain.url}{parts.path}?{parts.query}", size)
                token = mirror_token(mirror, up)
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
            token = mirror_token(mirror, up)
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
                        cpu0 = cpu_seconds(proc.proc.pid)
                    try:
                        rec = pull(path)
                    except BenchError as e:
                        raise BenchError(f"rep {rep + 1} {path}: {e}") from None
                    if proc is not None:
                        rec["peak_rss"] = proc.peak_rss()
                        rec["proxy_cpu_s"] = cpu_seconds(proc.proc.pid) - cpu0
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
    out = []
    out.append(f"## hub-rewrite blob pull benchmark\n")
    out.append(f"Blob: `{blob['repo']}:{blob['tag']}` layer {blob['digest'][:19]}..., {blob['size']} bytes "
               f"({blob['size'] / 2**20:.1f} MiB); {args.reps} timed reps per path, interleaved, "
               f"after one untimed warm-up pull each; curl client, HTTP/1.1, loopback.\n")
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
    out.append(f"Machine: nproc {facts['nproc']}, {facts['cpu']}, {facts['mem_total']} RAM, "
               f"Linux {facts['kernel']}; Python {facts['python']}, mitmproxy {facts['mitmproxy']}, {facts['curl']}; "
               f"repo {facts['git']}")
    out.append(f"Load average (1/5/15 min): {result['loadavg_start']} at start, {result['loadavg_end']} at end "
               f"(the run itself keeps about 2 CPUs busy; a high start value means other work was running).")
    out.append(f"Command: `{result['command']}`")
    out.append(f"Wall time: {result['wall_seconds']:.0f}s")
    print("\n".join(out), flush=True)
    return tput_ok and rss_ok


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _sigterm(signum, frame):  # turn SIGTERM into the same clean unwind as Ctrl-C
    raise KeyboardInterrupt


def run_benchmark(args, result: dict[str, Any], started: float, workdir: Path, measure, finish,
                  log_paths, kept_data_patterns: tuple[str, ...] = ()) -> int:
    """The part of every benchmark's main() around its measurements.

    measure(args, workdir, result) runs the benchmark; finish(result) reports
    and returns the exit code. A failed pull (BenchError) prints the tails of
    log_paths(workdir); Ctrl-C or SIGTERM exits 130; either way the temporary
    directory goes (or only its blob data, with --keep-workdir) and --json is
    written.
    """
    signal.signal(signal.SIGTERM, _sigterm)
    rc = 1
    try:
        result["loadavg_start"] = loadavg()
        measure(args, workdir, result)
        result["loadavg_end"] = loadavg()
        result["wall_seconds"] = time.monotonic() - started
        rc = finish(result)
    except BenchError as e:
        result["error"] = str(e)
        log(f"FAILED: {e}")
        for lp in log_paths(workdir):
            if lp.exists():
                log(f"--- {lp.relative_to(workdir)} (tail) ---\n" + lp.read_text(errors="replace")[-3000:])
    except KeyboardInterrupt:
        result["error"] = "interrupted"
        log("interrupted; cleaning up")
        rc = 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # do not interrupt the cleanup itself
        if args.keep_workdir:
            for pattern in kept_data_patterns:
                for f in workdir.glob(pattern):
                    if f.is_file():
                        f.unlink(missing_ok=True)
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        result.setdefault("wall_seconds", time.monotonic() - started)
        result["exit_code"] = rc
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return rc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="layer size in MiB (default 1024)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per path (default 5)")
    ap.add_argument("--json", type=Path, help="write raw numbers to this file")
    ap.add_argument("--strict", action="store_true", help="also exit 2 when a target is missed")
    ap.add_argument("--keep-workdir", action="store_true", help="keep the temp dir (logs; the blob is deleted)")
    args = ap.parse_args(argv)
    if args.size_mib < 1 or args.reps < 1:
        ap.error("--size-mib and --reps must be at least 1")
    if shutil.which("curl") is None:
        ap.error("curl is required")

    started = time.monotonic()
    result: dict[str, Any] = {"command": exact_command(), "machine": machine_facts(),
                              "size_mib": args.size_mib, "reps": args.reps,
                              "units": {"mb_per_s": "10^6 bytes/s", "rss": "bytes"}}
    workdir = Path(tempfile.mkdtemp(prefix="hubrewrite-bench-"))

    def finish(result: dict[str, Any]) -> int:
        return 0 if report(args, result) or not args.strict else 2

    return run_benchmark(args, result, started, workdir, run, finish,
                         lambda w: [w / name / f"{name}.log" for name in ("mirror", "plain")],
                         ("hub/storage/**/data",))


if __name__ == "__main__":
    sys.exit(main())
