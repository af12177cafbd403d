"""Pulls over a distant upstream: ``skopeo copy --all`` of the small two-arch image with a
round-trip time between the mirror and the fake Docker Hub (the VPS case).

    PYTHONPATH=. .venv/bin/python bench/bench_rtt.py [--rtt-ms 50] [--reps 3] [--json out.json] [--plain-upstream]

Starts the fake Docker Hub (HTTPS, like Docker Hub) with a delaying relay
(tests/support/latency_relay.py) in front of its edge, token service and CDN:
every URL a client learns (the API, the realm in the challenge, the CDN redirect)
points at a relay, which adds ``--rtt-ms`` to every round trip and one RTT to
every connection's set-up. The client sits next to the mirror (loopback, no delay).
It pushes ``bench/multi:1.0`` (a Docker manifest list, amd64 + arm64, each two
uncompressed layers of 4 MiB and 1 MiB) and pulls it with ``skopeo copy --all``
over four paths, each repetition once over every path, the order rotating:

* ``straight``: skopeo at the fake Hub itself (through the relays), trusting its CA;
* ``mitmdump``: through a plain ``mitmdump --mode reverse:<api>`` without the addon
  (skopeo follows the blob redirects to the CDN itself);
* ``cold``: through a freshly started mirror with an empty cache;
* ``warm``: through the same mirror again, everything cached;
* ``cold_own``, ``warm_own``: the same with ``hub_fetch_ahead=false`` (the mirror
  fetches only what the client asks for).

Beside each time: the upstream requests of the pull (the edge's, the token
service's and the CDN's access logs; of them, those the mirror made ahead of
the client, from its ``hub_ahead_requests_total``), the connections opened to the upstream and
TLS handshakes (every relayed service is HTTPS: one per connection that carried
data), connections opened and closed without data (the mirror's reachability
probes; free here, one RTT each on a real network), and the sequential round
trips: the longest chain of upstream round trips each of which started after the
previous one was answered (bench/README.md, "Counting round trips").
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import httpx

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
for p in (str(REPO_ROOT), str(BENCH_DIR)):
    if p not in sys.path:
        sys.path.insert(0, p)

from harness import (BenchError, apply_scale, exact_command, log, machine_facts, report_footer,  # noqa: E402
                     run_benchmark, smoke_banner, tool_version, upstream_argument, upstream_options)
from image_set import MULTI, MULTI_LAYERS, image_blobs  # noqa: E402
from pulls import skopeo_pull  # noqa: E402
from tests.support.common import read_json_lines  # noqa: E402
from tests.support.images import push_image, push_index  # noqa: E402
from tests.support.latency_relay import summarize_round_trips  # noqa: E402
from tests.support.mirror import Mirror  # noqa: E402
from tests.support.upstream import RELAYED, Upstream  # noqa: E402

PATHS = ("straight", "mitmdump", "cold", "warm", "cold_own", "warm_own")
LABELS = {
    "straight": "skopeo straight at the upstream",
    "mitmdump": "through plain mitmdump (no addon)",
    "cold": "through the mirror, cold cache",
    "warm": "through the mirror, warm cache",
    "cold_own": "through the mirror without fetch ahead, cold cache",
    "warm_own": "through the mirror without fetch ahead, warm cache",
}
MIRRORS = {"mirror": ("cold", "warm", {}), "mirror_own": ("cold_own", "warm_own", {"hub_fetch_ahead": "false"})}
COUNTS = ("seconds", "requests", "edge", "token", "cdn", "ahead", "connections", "tls_handshakes", "tls_edge",
          "tls_token", "tls_cdn", "probes", "round_trips", "sequential_round_trips")
COLD_VS_STRAIGHT = 0.5  # the mirror's cold pull at most this x the straight one's time
WARM_VS_STRAIGHT = 0.15  # the warm one



def push_multi(up: Upstream) -> dict[str, Any]:
    arch_images = []
    for arch in ("amd64", "arm64"):
        layers = [{f"data/{arch}-{i}.bin": os.urandom(n)} for i, n in enumerate(MULTI_LAYERS)]
        arch_images.append(push_image(up, MULTI[0], None, layers, media="docker", arch=arch, compress=False))
    push_index(up, MULTI[0], MULTI[1], arch_images, media="docker")
    blobs = image_blobs(arch_images)
    return {"repo": MULTI[0], "tag": MULTI[1], "blobs": blobs, "blob_bytes": sum(blobs.values())}


class Counter:
    """The upstream's work during one pull: new lines of the services' and the relays' logs."""

    def __init__(self, up: Upstream):
        self.up = up
        self.paths = {"edge": up.edge_log_path, "token": up.token_log_path, "cdn": up.cdn_log_path,
                      **{f"relay-{n}": up.relay_log_path(n) for n in RELAYED}}
        self.pos = self._lengths()

    def _lengths(self) -> dict[str, int]:
        return {name: len(read_json_lines(path)) for name, path in self.paths.items()}

    def take(self, settle: float = 0.5) -> dict[str, Any]:
        time.sleep(settle)  # the CDN logs after the body went out; relays log a close when it comes
        new = {name: read_json_lines(path)[self.pos[name]:] for name, path in self.paths.items()}
        self.pos = self._lengths()
        services = {name: [r for r in new[name] if not r.get("path", "").startswith(("/_edge/", "/_token/"))]
                    for name in ("edge", "token", "cdn")}
        relayed = [r for n in RELAYED for r in new[f"relay-{n}"]]
        counts = {name: len(recs) for name, recs in services.items()}
        handshakes = {n: summarize_round_trips(new[f"relay-{n}"])["tls_handshakes"] for n in RELAYED}
        return {"requests": sum(counts.values()), **counts, **summarize_round_trips(relayed),
                **{f"tls_{n}": k for n, k in handshakes.items()}}


def ahead_requests(mirror: Mirror | None) -> float:
    """The upstream requests a mirror made ahead of its clients so far (its metrics)."""
    if mirror is None:
        return 0.0
    text = httpx.get(f"{mirror.url}/_hub/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("hub_ahead_requests_total{"))


def run(args: argparse.Namespace, workdir: Path, result: dict[str, Any]) -> None:
    t0 = time.monotonic()
    with Upstream(workdir / "hub", rtt_ms=args.rtt_ms, **upstream_options(args, result)) as up:
        image = push_multi(up)
        log(f"fake Hub up with {args.rtt_ms} ms RTT, {image['repo']}:{image['tag']} pushed "
            f"({time.monotonic() - t0:.1f}s)")
        result["image"] = {k: v for k, v in image.items() if k != "blobs"} | {"blobs": len(image["blobs"])}
        counter = Counter(up)

        def pull(host: str, cert_dir: Path | None, label: str, mirror: Mirror | None = None) -> dict[str, Any]:
            dest = workdir / "out"
            shutil.rmtree(dest, ignore_errors=True)
            counter.take(settle=0.2)
            ahead = ahead_requests(mirror)
            try:
                seconds = skopeo_pull(host, image["repo"], image["tag"], dest, image["blobs"], True, cert_dir)
            except BenchError as e:
                raise BenchError(f"{label}: {e}") from None
            finally:
                shutil.rmtree(dest, ignore_errors=True)
            rec = {"seconds": seconds, **counter.take()}
            rec["ahead"] = ahead_requests(mirror) - ahead
            log(f"{label}: {seconds:.2f}s, {rec['requests']} upstream requests ({rec['ahead']:g} ahead of the "
                f"client), {rec['tls_handshakes']} TLS handshakes, {rec['sequential_round_trips']} sequential "
                f"round trips")
            return rec

        samples: dict[str, list[dict[str, Any]]] = {p: [] for p in PATHS}
        groups = ("straight", "mitmdump", *MIRRORS)
        for rep in range(1, args.reps + 1):
            k = (rep - 1) % len(groups)
            for group in groups[k:] + groups[:k]:
                tag = f"rep {rep}/{args.reps}"
                with_rep: Callable[[dict], dict] = lambda rec: rec | {"rep": rep}  # noqa: E731
                if group == "straight":
                    samples["straight"].append(with_rep(pull(up.api_host, up.cert_dir, f"{tag} straight")))
                elif group == "mitmdump":
                    with Mirror(workdir / f"mitmdump-{rep}", up, plain=True, name="plain") as m:
                        samples["mitmdump"].append(with_rep(pull(m.host, None, f"{tag} mitmdump")))
                else:
                    cache = workdir / f"cache-{group}-{rep}"
                    *phases, options = MIRRORS[group]
                    with Mirror(workdir / f"{group}-{rep}", up, options={"hub_cache_dir": str(cache), **options},
                                name="mirror") as m:
                        for phase in phases:
                            samples[phase].append(with_rep(pull(m.host, None, f"{tag} {LABELS[phase]}", m)))
                    shutil.rmtree(cache, ignore_errors=True)
        result["samples"] = samples


def targets(samples: dict[str, list[dict[str, Any]]],
            medians: dict[str, dict[str, float]]) -> list[tuple[str, str, bool]]:
    straight = medians["straight"]["seconds"]
    cold, warm = medians["cold"]["seconds"], medians["warm"]["seconds"]
    own = [s["requests"] for s in samples["cold_own"] + samples["warm_own"]]
    most = max(s["requests"] for s in samples["straight"])
    return [
        (f"cold pull at most {COLD_VS_STRAIGHT}x the straight one", f"{cold:.2f} vs {straight:.2f} s = "
         f"{cold / straight:.2f}x", cold <= COLD_VS_STRAIGHT * straight),
        (f"warm pull at most {WARM_VS_STRAIGHT}x the straight one", f"{warm:.2f} vs {straight:.2f} s = "
         f"{warm / straight:.2f}x", warm <= WARM_VS_STRAIGHT * straight),
        ("without fetch ahead, never more upstream requests than the straight pull (every pull)",
         f"at most {max(own):g} vs {min(s['requests'] for s in samples['straight']):g}-{most:g}",
         all(n <= min(s["requests"] for s in samples["straight"]) for n in own)),
    ]


def report(args: argparse.Namespace, result: dict[str, Any]) -> None:
    samples = result["samples"]
    medians = {p: {k: statistics.median(s[k] for s in samples[p]) for k in COUNTS} for p in PATHS}
    checked = targets(samples, medians)
    result["summary"] = {"medians": medians, "targets": [{"target": t, "value": v, "ok": ok} for t, v, ok in checked]}
    image = result["image"]
    out = smoke_banner(result)
    out.append(f"## Pulls over a distant upstream: {args.rtt_ms:g} ms RTT\n")
    out.append(f"`skopeo copy --all` of `{image['repo']}:{image['tag']}` (2 architectures, {image['blobs']} blobs, "
               f"{image['blob_bytes'] / 2**20:.0f} MiB); {args.rtt_ms:g} ms round-trip time between the puller "
               f"(skopeo, or the proxy it talks to) and every upstream host, the client next to the proxy; "
               f"{args.reps} repetitions, medians. The mirror runs with a cache (`hub_cache_dir`), with its "
               f"defaults (fetch ahead on) and with `hub_fetch_ahead=false`.\n")
    out.append("| path | time s | vs straight | upstream requests (edge/token/CDN) | of which ahead of the client "
               "| connections | TLS handshakes (edge/token/CDN) | probes | round trips | sequential round trips |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for p in PATHS:
        m = medians[p]
        out.append(f"| {LABELS[p]} | {m['seconds']:.2f} | {m['seconds'] / medians['straight']['seconds']:.2f}x | "
                   f"{m['requests']:g} ({m['edge']:g}/{m['token']:g}/{m['cdn']:g}) | {m['ahead']:g} | "
                   f"{m['connections']:g} | {m['tls_handshakes']:g} ({m['tls_edge']:g}/{m['tls_token']:g}/"
                   f"{m['tls_cdn']:g}) | {m['probes']:g} | {m['round_trips']:g} | {m['sequential_round_trips']:g} |")
    out.append("")
    out.append("Connections and round trips are the upstream side only (through the relays). Probes: connections "
               "opened and closed without data (free through the relay, one RTT each on a real network). "
               "Sequential round trips: see bench/README.md. Ahead of the client: the mirror's own count "
               "(`hub_ahead_requests_total`), part of the upstream requests.\n")
    out.append("Targets:")
    out += [f"- {t}: {v} -> {'PASS' if ok else 'FAIL'}" for t, v, ok in checked]
    out.append("")
    out += report_footer(result, [tool_version("skopeo", "--version")])
    print("\n".join(out), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rtt-ms", type=float, default=50, help="round-trip time to the upstream (default 50)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per path (default 3)")
    ap.add_argument("--json", type=Path, help="write raw numbers to this file")
    ap.add_argument("--keep-workdir", action="store_true", help="keep the temp dir (logs)")
    upstream_argument(ap)
    args = ap.parse_args(argv)
    if args.reps < 1 or args.rtt_ms < 0:
        ap.error("--reps must be at least 1 and --rtt-ms not negative")
    if shutil.which("skopeo") is None:
        ap.error("skopeo is required")
    scale = apply_scale(ap, args, {"reps": 1})
    started = time.monotonic()
    result: dict[str, Any] = {"command": exact_command(), "machine": machine_facts(), "scale": scale,
                              "rtt_ms": args.rtt_ms, "reps": args.reps}
    workdir = Path(tempfile.mkdtemp(prefix="hubrewrite-bench-rtt-"))

    def finish(result: dict[str, Any]) -> int:
        report(args, result)
        return 0

    return run_benchmark(args, result, started, workdir, run, finish,
                         lambda w: [*w.glob("mirror*-*/mirror.log"), *w.glob("mitmdump-*/plain.log")])


if __name__ == "__main__":
    sys.exit(main())
