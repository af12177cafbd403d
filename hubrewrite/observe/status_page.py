"""The page people see when they open the mirror in a browser: how to use it, the cache, the rate limit.

No external assets, no identity (whom an upstream counted for its rate limit is
an address or an account: not for a public page).
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass, field
from string import Template

MIRROR_USAGE = Template("""<h2>docker</h2>
<p>Pull by name: <code>docker pull $host/library/nginx</code>, or make it the mirror for every pull in <code>/etc/docker/daemon.json</code>:</p>
<pre>$daemon_json</pre>
<h2>containerd</h2>
<p><code>/etc/containerd/certs.d/$registry/hosts.toml</code> (the same with another
directory name and server for each other registry: containerd names it in <code>?ns=</code>):</p>
<pre>$hosts_toml</pre>
<h2>podman, skopeo, buildah</h2>
<p><code>/etc/containers/registries.conf</code>:</p>
<pre>$registries_conf</pre>
$prefix_example""")

# a forward proxy: clients keep the registries' own names and reach them through it
PROXY_USAGE = Template("""<h2>Use it as a proxy</h2>
<p>Clients keep pulling by the registries' own names and send their traffic through
<code>$proxy_url</code>; they must trust mitmproxy's CA (<code>~/.mitmproxy/mitmproxy-ca-cert.pem</code> on the mirror):</p>
<pre>$proxy_env</pre>
""")

PAGE = Template("""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>hub-rewrite mirror</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font-family: system-ui, sans-serif; max-width: 52rem; margin: 2rem auto; padding: 0 1rem; color: #1b1f24; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.15rem; margin-top: 1.8rem; border-bottom: 1px solid #d0d7de; }
pre { background: #f6f8fa; padding: .8rem; border-radius: 6px; overflow-x: auto; }
table { border-collapse: collapse; } td, th { border: 1px solid #d0d7de; padding: .3rem .6rem; text-align: left; }
.muted { color: #57606a; }
</style></head>
<body>
<h1>hub-rewrite: a mirror of $registry</h1>
<p>$intro
<span class="muted">$requests requests answered since start.</span></p>
<h2>Cache</h2>
$cache
$prefetch
$sources
<h2>Docker Hub rate limit</h2>
$rate
$usage
<p class="muted">Metrics: <a href="/_hub/metrics">/_hub/metrics</a> · Health: <a href="/_hub/health">/_hub/health</a></p>
</body></html>
""")


@dataclass(frozen=True)
class RegistrySources:
    """One registry's URLs as hubrewrite/sources.py knows them."""

    name: str
    urls: list[tuple[str, bool, float, str]]  # (URL, answering, seconds until tried again, last error)
    unreachable_since: float | None  # wall clock: every URL failing since then
    stale_served: str  # what the cache served meanwhile, in words


@dataclass(frozen=True)
class StatusFacts:
    mirror_url: str
    upstream: str  # the default registry's API
    registry_name: str  # the default registry
    registry_names: list[str]  # every registry served
    cache_dir: str  # "" when the cache is off
    cache_bytes: int | None
    cache_limit: str
    hit_rate: float | None
    ratelimits: dict[str, str]  # upstream -> latest ratelimit-remaining
    requests_served: float
    store: str = ""  # the shared store (bucket) and its state, if any
    proxy_url: str = ""  # a forward proxy: the address clients set as their proxy
    # hub_prefetch: what its last round did, and per image (name, state, digest, blobs cached, blobs, checked, problem)
    prefetch_note: str = ""
    prefetch: tuple[tuple[str, str, str, int, int, float | None, str], ...] = ()
    sources: list[RegistrySources] = field(default_factory=list)


def status_page(facts: StatusFacts) -> bytes:
    e = html.escape
    others = [name for name in facts.registry_names if name != facts.registry_name]
    page = PAGE.substitute(
        registry=e(facts.registry_name),
        intro=_intro(facts, others),
        requests=f"{facts.requests_served:.0f}",
        cache=_cache(facts),
        prefetch=_prefetch(facts) if facts.prefetch_note else "",
        rate=_rate(facts.ratelimits),
        sources=_sources(facts.sources),
        usage=_proxy_usage(facts.proxy_url) if facts.proxy_url else _mirror_usage(facts, others),
    )
    return page.encode()


def _intro(facts: StatusFacts, others: list[str]) -> str:
    e = html.escape
    served = ", ".join(f"<b>{e(name)}</b>" for name in [facts.registry_name, *others])
    if facts.proxy_url:
        return (f"This forward proxy at <code>{e(facts.proxy_url)}</code> serves {served}, read-only, "
                "to clients that name them as usual.")
    return (f"This mirror at <code>{e(facts.mirror_url)}</code> serves {served}, read-only; names without a "
            f"registry go to <b>{e(facts.registry_name)}</b> (upstream <code>{e(facts.upstream)}</code>).")


def _mirror_usage(facts: StatusFacts, others: list[str]) -> str:
    e = html.escape
    host = facts.mirror_url.split("://", 1)[1].rstrip("/")
    insecure = facts.mirror_url.startswith("http://")
    return MIRROR_USAGE.substitute(
        registry=e(facts.registry_name),
        host=e(host),
        daemon_json=e(json.dumps({"registry-mirrors": [facts.mirror_url]}
                                 | ({"insecure-registries": [host]} if insecure else {}), indent=2)),
        hosts_toml=e(_hosts_toml(facts.registry_name, facts.mirror_url)),
        registries_conf=e(_registries_conf(facts.registry_name, others, host, insecure)),
        prefix_example=f"<p>Other registries by path prefix: <code>{e(host)}/{e(others[0])}/OWNER/IMAGE</code>.</p>"
        if others else "",
    )


def _proxy_usage(proxy_url: str) -> str:
    env = (f"# dockerd, containerd (their service's environment), podman, skopeo (the shell's)\n"
           f"HTTPS_PROXY={proxy_url}\nHTTP_PROXY={proxy_url}")
    return PROXY_USAGE.substitute(proxy_url=html.escape(proxy_url), proxy_env=html.escape(env))


def _sources(registries: list[RegistrySources]) -> str:
    """Registries with several URLs or a failing one: which URL answers, and since when none does."""
    shown = [r for r in registries if len(r.urls) > 1 or r.unreachable_since or not all(u[1] for u in r.urls)]
    if not shown:
        return ""
    e, parts = html.escape, ["<h2>Upstream URLs</h2>"]
    for registry in shown:
        if registry.unreachable_since is not None:
            parts.append(f"<p><b>{e(registry.name)} is unreachable since {_time(registry.unreachable_since)}</b> "
                         f"({time.time() - registry.unreachable_since:.0f} s): serving what the cache holds; "
                         f"served from the cache meanwhile: {e(registry.stale_served)}.</p>")
        rows = "".join(
            f"<tr><td>{e(url)}</td><td>{'answers' if up else f'failed, tried again in {wait:.0f} s'}</td>"
            f"<td>{e(error)}</td></tr>" for url, up, wait, error in registry.urls)
        parts.append(f"<p>{e(registry.name)}, in order of preference:</p>"
                     f"<table><tr><th>URL</th><th>state</th><th>last failure</th></tr>{rows}</table>")
    return "\n".join(parts)


def _rate(ratelimits: dict[str, str]) -> str:
    if not ratelimits:
        return "<p>No rate-limit headers seen yet.</p>"
    rows = "".join(f"<tr><td>{html.escape(up)}</td><td>{html.escape(rem.split(';')[0])}</td></tr>"
                   for up, rem in sorted(ratelimits.items()))
    return f"<table><tr><th>upstream</th><th>pulls left</th></tr>{rows}</table>"


def _cache(facts: StatusFacts) -> str:
    if not facts.cache_dir:
        return "<p>The cache is off (set <code>hub_cache_dir</code>).</p>"
    rate_text = "no lookups yet" if facts.hit_rate is None else f"{facts.hit_rate * 100:.0f}% hits"
    line = (f"<p>Pull-through cache: <b>{_fmt_bytes(facts.cache_bytes or 0)}</b> of "
            f"{html.escape(facts.cache_limit)} used, {rate_text}.</p>")
    if facts.store:
        line += f"<p>Shared store: {html.escape(facts.store)}.</p>"
    return line


def _prefetch(facts: StatusFacts) -> str:
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(name)}</td><td>{e(state)}</td><td><code>{e(digest[:19])}</code></td>"
        f"<td>{cached}/{blobs}</td><td>{e(_time(checked))}</td><td>{e(problem)}</td></tr>"
        for name, state, digest, cached, blobs, checked, problem in facts.prefetch)
    return (f"<h2>Images kept warm</h2><p>{e(facts.prefetch_note)}.</p><table><tr><th>image</th><th>state</th>"
            f"<th>digest</th><th>blobs cached</th><th>checked</th><th>problem</th></tr>{rows}</table>")


def _time(when: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when)) if when is not None else "not yet"


def _hosts_toml(registry_name: str, mirror_url: str) -> str:
    server = "https://registry-1.docker.io" if registry_name == "docker.io" else f"https://{registry_name}"
    return f'server = "{server}"\n\n[host."{mirror_url}"]\n  capabilities = ["pull", "resolve"]\n'


def _registries_conf(registry_name: str, others: list[str], host: str, insecure: bool) -> str:
    def entry(prefix: str, location: str) -> str:
        return (f'[[registry]]\nprefix = "{prefix}"\nlocation = "{prefix}"\n\n'
                f'[[registry.mirror]]\nlocation = "{location}"\n' + ("insecure = true\n" if insecure else ""))

    # one example of another registry: the others follow the same pattern
    return "\n".join([entry(registry_name, host), *(entry(name, f"{host}/{name}") for name in others[:1])])


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
