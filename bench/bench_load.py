"""Load benchmark: many concurrent registry clients against one caching mirror.

    PYTHONPATH=. .venv/bin/python bench/bench_load.py [--clients 50] [--seconds 120] [--json out.json]

Starts the fake Docker Hub (tests/support/upstream.py), pushes the standard
test images (``standard_images`` with an 8 MiB big layer, minus
``private/*``) plus ``bench/extra:1.0`` (OCI, two uncompressed layers of
2 and 4 MiB), and starts one mitmdump + hub-rewrite addon with an empty
pull-through cache (``hub_cache_dir``).

Then ``--clients`` asyncio clients (one ``httpx.AsyncClient`` each, HTTP/1.1,
its own connection pool) loop for ``--seconds`` over a weighted random mix:

* manifest HEAD by tag (weight 3): 200 and the expected Docker-Content-Digest;
* manifest GET by tag (2) and by digest (2, top-level and per-arch
  manifests): 200 and the body's sha256 equal to the digest;
* blob GET, full (2): 200, streamed into sha256, must equal the digest;
* blob GET with a random ``Range`` (1): 206 and the bytes equal to the
  same slice of the blob (fetched once straight from the fake Hub first).

Each client gets an anonymous token per repository from the mirror's
``/token`` and caches it.  Anything else (other status, exception, wrong
digest/bytes) is an error; the target is zero, and any error makes the exit
code 1.  The mirror starts cold, so the first seconds exercise concurrent
cache fills.

The mirror's RSS (VmRSS) is sampled every 0.5 s during the load; VmHWM is
reset just before it.  Manifest HEAD latency is measured sequentially
(``--latency-n`` HEADs, keep-alive) straight against the fake Hub and through
the mirror, before and after the load, and also during the load (the HEADs
of the mix).  MB = 10^6 bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
for p in (REPO_ROOT, REPO_ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import httpx  # noqa: E402

from harness import (BenchError, apply_scale, exact_command, log, machine_facts, report_footer,  # noqa: E402
                     run_benchmark, smoke_banner, upstream_argument, upstream_options)
from procstat import rss_bytes  # noqa: E402
from pulls import registry_token  # noqa: E402
from tests.support.images import make_big_layer, push_image, standard_images  # noqa: E402
from tests.support.mirror import Mirror  # noqa: E402
from tests.support.upstream import Upstream  # noqa: E402

MB = 1e6
RSS_TARGET = 200_000_000  # mirror peak RSS below this (bytes)
ACCEPT = ", ".join([
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
])
MIX = [("head_tag", 3), ("get_tag", 2), ("get_digest", 2), ("blob_full", 2), ("blob_range", 1)]
HEAD_REPO = "library/alpine"  # the repo/tag used for the sequential latency runs
HEAD_TAG = "3.19"
MAX_ERRORS_KEPT = 50


# ---------------------------------------------------------------- setup


def push_all(up: Upstream, workdir: Path, big_size: int) -> dict[str, Any]:
    """Push the images; returns the work set: tags, manifests and blobs (with their bytes)."""
    images = standard_images(up, big_size=big_size)
    images.pop("private/secret")  # anonymous clients may not pull it
    layers = []
    for i, mib in enumerate((2, 4)):
        path = workdir / f"extra{i}.tar"
        make_big_layer(path, mib << 20, seed=f"extra{i}")
        layers.append(path)
    info = push_image(up, "bench/extra", "1.0", layers, media="oci")
    info["ref"] = "bench/extra:1.0"
    images["bench/extra"] = info
    for path in layers:
        path.unlink(missing_ok=True)

    tags, manifests, blobs = [], [], {}
    for repo, top in images.items():
        tags.append((repo, top["tag"], top["digest"]))
        manifests.append((repo, top["digest"]))
        for img in (top.get("manifests") or {"": top}).values():
            if img is not top:
                manifests.append((repo, img["digest"]))
            for d in [img["config_digest"], *img["layer_digests"]]:
                blobs[(repo, d)] = None
    # every blob's bytes, once, straight from the fake Hub (to check Range answers against)
    with up.http(timeout=60, follow_redirects=True) as c:
        tokens = {repo: up.get_token(f"repository:{repo}:pull") for repo in images}
        for repo, d in list(blobs):
            r = c.get(f"{up.api_url}/v2/{repo}/blobs/{d}", headers={"Authorization": f"Bearer {tokens[repo]}"})
            if r.status_code != 200 or "sha256:" + hashlib.sha256(r.content).hexdigest() != d:
                raise BenchError(f"direct GET of {repo}@{d} failed: HTTP {r.status_code}")
            blobs[(repo, d)] = r.content
    return {"tags": tags, "manifests": manifests, "blobs": [(r, d, b) for (r, d), b in blobs.items()]}


def head_latencies(base: str, token: str, n: int, expect_digest: str, verify: Any = True) -> list[float]:
    """``n`` sequential manifest HEADs over one keep-alive connection; seconds each."""
    out = []
    with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {token}", "Accept": ACCEPT},
                      verify=verify) as c:
        url = f"{base}/v2/{HEAD_REPO}/manifests/{HEAD_TAG}"
        c.head(url)  # connection set up, not timed
        for _ in range(n):
            t = time.perf_counter()
            r = c.head(url)
            out.append(time.perf_counter() - t)
            if r.status_code != 200 or r.headers.get("Docker-Content-Digest") != expect_digest:
                raise BenchError(f"HEAD {url}: HTTP {r.status_code}, digest {r.headers.get('Docker-Content-Digest')}")
    return out


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s)) - 1))] if s else float("nan")


def lat_summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50_ms": pct(values, 50) * 1000, "p99_ms": pct(values, 99) * 1000,
            "mean_ms": statistics.fmean(values) * 1000 if values else float("nan")}


# ---------------------------------------------------------------- the load


class Load:
    def __init__(self, mirror: Mirror, service: str, work: dict[str, Any], seconds: float, seed: int):
        self.mirror, self.service, self.work, self.seconds = mirror, service, work, seconds
        self.rng = random.Random(seed)
        self.ops = Counter()
        self.errors = Counter()
        self.error_samples: list[str] = []
        self.head_lat: list[float] = []
        self.bytes = 0
        self.cache_answers = Counter()

    def error(self, kind: str, msg: str) -> None:
        self.errors[kind] += 1
        if len(self.error_samples) < MAX_ERRORS_KEPT:
            self.error_samples.append(f"{kind}: {msg}")

    async def token(self, c: httpx.AsyncClient, tokens: dict[str, tuple[str, float]], repo: str) -> str:
        tok = tokens.get(repo)
        if tok and tok[1] > time.monotonic():
            return tok[0]
        r = await c.get("/token", params={"service": self.service, "scope": f"repository:{repo}:pull"})
        self.ops["token"] += 1
        if r.status_code != 200:
            raise BenchError(f"/token {repo}: HTTP {r.status_code}")
        body = r.json()
        ttl = min(float(body.get("expires_in") or 60), 300) * 0.8
        tokens[repo] = (body["token"], time.monotonic() + ttl)
        return body["token"]

    async def one(self, c: httpx.AsyncClient, tokens: dict, op: str) -> None:
        rng = self.rng
        if op in ("head_tag", "get_tag"):
            repo, tag, digest = rng.choice(self.work["tags"])
            ref = tag
        elif op == "get_digest":
            repo, digest = rng.choice(self.work["manifests"])
            ref = digest
        else:
            repo, digest, data = rng.choice(self.work["blobs"])
        auth = {"Authorization": f"Bearer {await self.token(c, tokens, repo)}"}
        if op == "head_tag":
            t = time.perf_counter()
            r = await c.head(f"/v2/{repo}/manifests/{ref}", headers={**auth, "Accept": ACCEPT})
            self.head_lat.append(time.perf_counter() - t)
            if r.status_code != 200 or r.headers.get("Docker-Content-Digest") != digest:
                raise BenchError(f"HEAD {repo}:{ref}: HTTP {r.status_code}, "
                                 f"digest {r.headers.get('Docker-Content-Digest')}")
        elif op in ("get_tag", "get_digest"):
            r = await c.get(f"/v2/{repo}/manifests/{ref}", headers={**auth, "Accept": ACCEPT})
            got = "sha256:" + hashlib.sha256(r.content).hexdigest()
            if r.status_code != 200 or got != digest:
                raise BenchError(f"GET manifest {repo}:{ref}: HTTP {r.status_code}, body {got}")
            self.bytes += len(r.content)
        elif op == "blob_full":
            h, n = hashlib.sha256(), 0
            async with c.stream("GET", f"/v2/{repo}/blobs/{digest}", headers=auth) as r:
                if r.status_code != 200:
                    raise BenchError(f"GET blob {repo}@{digest[:19]}: HTTP {r.status_code}")
                self.cache_answers[r.headers.get("X-Hub-Cache", "-")] += 1
                async for chunk in r.aiter_bytes(1 << 20):
                    h.update(chunk)
                    n += len(chunk)
            self.bytes += n
            if "sha256:" + h.hexdigest() != digest:
                raise BenchError(f"GET blob {repo}@{digest[:19]}: {n} bytes, sha256 mismatch")
        else:  # blob_range
            start = rng.randrange(len(data))
            end = min(len(data) - 1, start + rng.randrange(1, 256 << 10))
            r = await c.get(f"/v2/{repo}/blobs/{digest}", headers={**auth, "Range": f"bytes={start}-{end}"})
            if r.status_code != 206 or r.content != data[start:end + 1]:
                raise BenchError(f"GET blob {repo}@{digest[:19]} bytes={start}-{end}: HTTP {r.status_code}, "
                                 f"{len(r.content)} bytes, content {'ok' if r.content == data[start:end + 1] else 'WRONG'}")
            self.bytes += len(r.content)
        self.ops[op] += 1

    async def client(self, i: int, deadline: float) -> None:
        names, weights = zip(*MIX)
        tokens: dict[str, tuple[str, float]] = {}
        async with httpx.AsyncClient(base_url=self.mirror.url, http1=True, http2=False, timeout=60,
                                     limits=httpx.Limits(max_connections=4)) as c:
            while time.monotonic() < deadline:
                op = self.rng.choices(names, weights)[0]
                try:
                    await self.one(c, tokens, op)
                except BenchError as e:
                    self.error(op, str(e))
                except (httpx.HTTPError, OSError, ValueError, KeyError) as e:
                    self.error(op, f"client {i}: {type(e).__name__}: {e}")

    async def sample_rss(self, stop: asyncio.Event, out: list[tuple[float, int]]) -> None:
        t0 = time.monotonic()
        while not stop.is_set():
            try:
                out.append((time.monotonic() - t0, rss_bytes(self.mirror.proc.pid)))
            except (OSError, BenchError):
                break
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except asyncio.TimeoutError:
                pass

    async def run(self, n_clients: int) -> dict[str, Any]:
        samples: list[tuple[float, int]] = []
        stop = asyncio.Event()
        sampler = asyncio.create_task(self.sample_rss(stop, samples))
        t0 = time.monotonic()
        deadline = t0 + self.seconds
        await asyncio.gather(*(self.client(i, deadline) for i in range(n_clients)))
        elapsed = time.monotonic() - t0
        stop.set()
        await sampler
        return {"elapsed_s": elapsed, "rss_samples": samples}


# ---------------------------------------------------------------- the run


def run(args: argparse.Namespace, workdir: Path, result: dict[str, Any]) -> None:
    t0 = time.monotonic()
    with Upstream(workdir / "hub", **upstream_options(args, result)) as up:
        log(f"fake Hub up ({time.monotonic() - t0:.1f}s); pushing images")
        work = push_all(up, workdir, args.big_mib << 20)
        result["work_set"] = {"tags": len(work["tags"]), "manifests": len(work["manifests"]),
                              "blobs": len(work["blobs"]),
                              "blob_bytes": sum(len(b) for _, _, b in work["blobs"])}
        log(f"pushed ({time.monotonic() - t0:.1f}s): {result['work_set']}")
        head_digest = next(d for r, _, d in work["tags"] if r == HEAD_REPO)

        cache_dir = workdir / "cache"
        with Mirror(workdir / "mirror", up, options={"hub_cache_dir": str(cache_dir)}) as mirror:
            pid = mirror.proc.pid
            time.sleep(1.0)
            result["idle_rss"] = rss_bytes(pid)
            up_tok = up.get_token(f"repository:{HEAD_REPO}:pull")
            mi_tok = registry_token(mirror.url, up.service, HEAD_REPO)

            def latency(phase: str) -> None:
                log(f"latency ({phase}): {args.latency_n} sequential manifest HEADs direct, then via the mirror")
                direct = head_latencies(up.api_url, up_tok, args.latency_n, head_digest, up.verify)
                via = head_latencies(mirror.url, mi_tok, args.latency_n, head_digest)
                result.setdefault("latency", {})[phase] = {
                    "direct": lat_summary(direct), "mirror": lat_summary(via),
                    "raw_direct_s": direct, "raw_mirror_s": via}

            latency("before")
            log(f"load: {args.clients} clients for {args.seconds:.0f}s (cold cache)")
            mirror.reset_peak_rss()
            load = Load(mirror, up.service, work, args.seconds, args.seed)
            res = asyncio.run(load.run(args.clients))
            result["peak_rss_hwm"] = mirror.peak_rss()
            if mirror.proc.poll() is not None:
                raise BenchError(f"mitmdump exited during the load:\n{mirror.log_text()[-2000:]}")
            n_ok = sum(v for k, v in load.ops.items() if k != "token")
            result["load"] = {
                "clients": args.clients, "seconds": args.seconds, "elapsed_s": res["elapsed_s"],
                "requests_ok": n_ok, "token_requests": load.ops["token"],
                "requests_per_s": (n_ok + load.ops["token"]) / res["elapsed_s"],
                "ops": dict(load.ops), "errors": sum(load.errors.values()), "errors_by_op": dict(load.errors),
                "error_samples": load.error_samples, "bytes_received": load.bytes,
                "x_hub_cache_full_blob_gets": dict(load.cache_answers),
                "head_latency": lat_summary(load.head_lat),
                "rss_samples": res["rss_samples"],
                "peak_rss_sampled": max((r for _, r in res["rss_samples"]), default=0),
            }
            log(f"load done: {n_ok} ok, {result['load']['errors']} errors, "
                f"peak RSS {result['load']['peak_rss_sampled'] / MB:.1f} MB")
            latency("after")
            result["final_rss"] = rss_bytes(pid)


def report(result: dict[str, Any]) -> None:
    L, lat = result["load"], result["latency"]
    peak = max(L["peak_rss_sampled"], result["peak_rss_hwm"])
    rss_ok = peak < RSS_TARGET
    err_ok = L["errors"] == 0
    result["summary"] = {"errors_ok": err_ok, "peak_rss_ok": rss_ok, "peak_rss_max_bytes": RSS_TARGET}
    ws = result["work_set"]

    def ms(x: float) -> str:
        return f"{x:.2f} ms"

    out = smoke_banner(result) + ["## hub-rewrite load benchmark\n",
           f"{L['clients']} concurrent clients (asyncio + httpx, HTTP/1.1, one client each) for "
           f"{L['seconds']:.0f}s against one mirror with a cold pull-through cache; work set "
           f"{ws['tags']} tags, {ws['manifests']} manifests, {ws['blobs']} blobs "
           f"({ws['blob_bytes'] / MB:.1f} MB). Mix: " + ", ".join(f"{n} x{w}" for n, w in MIX) + ".\n",
           "| metric | value |", "|---|---:|",
           f"| requests completed OK (excl. /token) | {L['requests_ok']} |",
           f"| /token requests | {L['token_requests']} |",
           f"| requests/s (all, incl. /token) | {L['requests_per_s']:.1f} |",
           "| by op | " + ", ".join(f"{k} {v}" for k, v in sorted(L["ops"].items())) + " |",
           f"| bytes received | {L['bytes_received'] / MB:.1f} MB |",
           "| X-Hub-Cache on full blob GETs | "
           + ", ".join(f"{k} {v}" for k, v in sorted(L["x_hub_cache_full_blob_gets"].items())) + " |",
           f"| **errors** | **{L['errors']}** |",
           f"| mirror RSS idle / after | {result['idle_rss'] / MB:.1f} MB / {result['final_rss'] / MB:.1f} MB |",
           f"| mirror peak RSS, sampled VmRSS (0.5 s) | {L['peak_rss_sampled'] / MB:.1f} MB |",
           f"| mirror peak RSS, VmHWM over the load | {result['peak_rss_hwm'] / MB:.1f} MB |",
           f"| manifest HEAD during load, p50 / p99 (n={L['head_latency']['n']}) | "
           f"{ms(L['head_latency']['p50_ms'])} / {ms(L['head_latency']['p99_ms'])} |"]
    for phase in ("before", "after"):
        d, m = lat[phase]["direct"], lat[phase]["mirror"]
        out += [f"| HEAD {phase} load, direct p50 / p99 (n={d['n']}) | {ms(d['p50_ms'])} / {ms(d['p99_ms'])} |",
                f"| HEAD {phase} load, mirror p50 / p99 (n={m['n']}) | {ms(m['p50_ms'])} / {ms(m['p99_ms'])} |",
                f"| HEAD {phase} load, added by mirror p50 / p99 | {ms(m['p50_ms'] - d['p50_ms'])} / "
                f"{ms(m['p99_ms'] - d['p99_ms'])} |"]
    out.append("")
    out.append("Targets:")
    out.append(f"- zero errors: {L['errors']} -> {'PASS' if err_ok else 'FAIL'}")
    out.append(f"- mirror peak RSS < {RSS_TARGET / MB:.0f} MB: {peak / MB:.1f} MB -> {'PASS' if rss_ok else 'FAIL'}\n")
    if L["error_samples"]:
        out.append("First errors:")
        out += [f"- {e}" for e in L["error_samples"][:10]]
        out.append("")
    out.append(f"Sequential HEADs: `{HEAD_REPO}:{HEAD_TAG}`, one keep-alive connection, direct = the fake Hub's "
               f"API host with an upstream token. MB = 10^6 bytes.")
    out += report_footer(result, [f"httpx {httpx.__version__}"], "(clients, mirror and fake Hub share the same CPUs)")
    print("\n".join(out), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=50, help="concurrent clients (default 50)")
    ap.add_argument("--seconds", type=float, default=120, help="load duration (default 120)")
    ap.add_argument("--latency-n", type=int, default=200, help="sequential HEADs per path and phase (default 200)")
    ap.add_argument("--big-mib", type=int, default=8, help="size of library/big's layer in MiB (default 8)")
    ap.add_argument("--seed", type=int, default=1, help="random seed of the request mix")
    ap.add_argument("--json", type=Path, help="write raw numbers to this file")
    ap.add_argument("--keep-workdir", action="store_true", help="keep the temp dir (logs, cache)")
    upstream_argument(ap)
    args = ap.parse_args(argv)
    if args.clients < 1 or args.seconds <= 0 or args.latency_n < 1:
        ap.error("--clients, --seconds and --latency-n must be positive")
    scale = apply_scale(ap, args, {"clients": 5, "seconds": 5.0, "latency_n": 20})

    started = time.monotonic()
    result: dict[str, Any] = {"command": exact_command(), "machine": machine_facts(), "scale": scale,
                              "units": {"rss": "bytes", "latency": "ms (raw_*: seconds)"}}
    workdir = Path(tempfile.mkdtemp(prefix="hubrewrite-load-"))

    def finish(result: dict[str, Any]) -> int:
        report(result)
        return 0 if result["load"]["errors"] == 0 else 1

    return run_benchmark(args, result, started, workdir, run, finish, lambda w: [w / "mirror" / "mirror.log"])


if __name__ == "__main__":
    sys.exit(main())
