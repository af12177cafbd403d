"""The page people see when they open the mirror in a browser: how to use it, the cache, the rate limit."""

from __future__ import annotations

import html
import json


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def status_page(
    mirror_url: str,
    upstream: str,
    registry_name: str,
    registry_names: list[str],
    cache_dir: str,
    cache_bytes: int | None,
    cache_limit: str,
    hit_rate: float | None,
    ratelimits: dict[str, str],
    requests_served: float,
) -> bytes:
    """The page itself. No external assets."""
    e = html.escape
    host = mirror_url.split("://", 1)[1].rstrip("/")
    insecure = mirror_url.startswith("http://")
    if ratelimits:
        # per upstream: who the upstream counted (an address, an account) is not for a public page
        rate_rows = "".join(
            f"<tr><td>{e(up)}</td><td>{e(rem.split(';')[0])}</td></tr>" for up, rem in sorted(ratelimits.items())
        )
        rate = f"<table><tr><th>upstream</th><th>pulls left</th></tr>{rate_rows}</table>"
    else:
        rate = "<p>No rate-limit headers seen yet.</p>"
    if cache_dir:
        rate_text = "no lookups yet" if hit_rate is None else f"{hit_rate * 100:.0f}% hits"
        cache = (
            f"<p>Pull-through cache: <b>{_fmt_bytes(cache_bytes or 0)}</b> of {e(cache_limit)} used, {rate_text}.</p>"
        )
    else:
        cache = "<p>The cache is off (set <code>hub_cache_dir</code>).</p>"
    daemon_json = json.dumps({"registry-mirrors": [mirror_url]} | ({"insecure-registries": [host]} if insecure else {}), indent=2)
    others = [name for name in registry_names if name != registry_name]
    registries_conf = (
        f'[[registry]]\nprefix = "{registry_name}"\nlocation = "{registry_name}"\n\n'
        f'[[registry.mirror]]\nlocation = "{host}"\n' + ("insecure = true\n" if insecure else "")
    )
    for name in others[:1]:  # one example: the others follow the same pattern
        registries_conf += (
            f'\n[[registry]]\nprefix = "{name}"\nlocation = "{name}"\n\n'
            f'[[registry.mirror]]\nlocation = "{host}/{name}"\n' + ("insecure = true\n" if insecure else "")
        )
    server = "https://registry-1.docker.io" if registry_name == "docker.io" else f"https://{registry_name}"
    hosts_toml = f'server = "{server}"\n\n[host."{mirror_url}"]\n  capabilities = ["pull", "resolve"]\n'
    served = ", ".join(f"<b>{e(name)}</b>" for name in [registry_name, *others])
    prefix_example = f"{host}/{others[0]}/OWNER/IMAGE" if others else ""
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>hub-rewrite mirror</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, sans-serif; max-width: 52rem; margin: 2rem auto; padding: 0 1rem; color: #1b1f24; }}
h1 {{ font-size: 1.6rem; }} h2 {{ font-size: 1.15rem; margin-top: 1.8rem; border-bottom: 1px solid #d0d7de; }}
pre {{ background: #f6f8fa; padding: .8rem; border-radius: 6px; overflow-x: auto; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #d0d7de; padding: .3rem .6rem; text-align: left; }}
.muted {{ color: #57606a; }}
</style></head>
<body>
<h1>hub-rewrite: a mirror of {e(registry_name)}</h1>
<p>This mirror at <code>{e(mirror_url)}</code> serves {served}, read-only; names without a registry go to <b>{e(registry_name)}</b> (upstream <code>{e(upstream)}</code>).
<span class="muted">{requests_served:.0f} requests answered since start.</span></p>
<h2>Cache</h2>
{cache}
<h2>Docker Hub rate limit</h2>
{rate}
<h2>docker</h2>
<p>Pull by name: <code>docker pull {e(host)}/library/nginx</code>, or make it the mirror for every pull in <code>/etc/docker/daemon.json</code>:</p>
<pre>{e(daemon_json)}</pre>
<h2>containerd</h2>
<p><code>/etc/containerd/certs.d/{e(registry_name)}/hosts.toml</code> (the same with another
directory name and server for each other registry: containerd names it in <code>?ns=</code>):</p>
<pre>{e(hosts_toml)}</pre>
<h2>podman, skopeo, buildah</h2>
<p><code>/etc/containers/registries.conf</code>:</p>
<pre>{e(registries_conf)}</pre>
{f"<p>Other registries by path prefix: <code>{e(prefix_example)}</code>.</p>" if prefix_example else ""}
<p class="muted">Metrics: <a href="/_hub/metrics">/_hub/metrics</a> · Health: <a href="/_hub/health">/_hub/health</a></p>
</body></html>
"""
    return page.encode()
