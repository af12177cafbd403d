"""Metrics, health and the status page of a running mirror; the page is
rendered by headless Chromium and looked at as a screenshot."""

from __future__ import annotations

import shutil

import httpx
import pytest

from tests.support.browser import Chromium, screenshot_path
from tests.support.mirror import Mirror
from tests.support.ports import free_port
from tests.support.png import assert_not_blank

from .test_mirror import copy


@pytest.fixture(scope="module")
def mirror(upstream, tmp_path_factory):
    cache = tmp_path_factory.mktemp("obs-cache")
    metrics_port = free_port()
    options = {"hub_cache_dir": str(cache), "hub_metrics_listen": f"127.0.0.1:{metrics_port}"}
    with Mirror(tmp_path_factory.mktemp("obs-mirror"), upstream, options=options) as m:
        m.cache_dir = cache
        m.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        yield m


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + ("{" if labels else " ")):
            got = line[len(name):].split(" ")[0].strip("{}")
            if not labels or ",".join(sorted(got.split(","))) == want:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_pulls_cache_and_rate_limit(mirror, upstream, tmp_path):
    # the upstream lives for the whole session: earlier tests' pulls may have used up its allowance
    upstream.set_ratelimit(100)
    for run in ("cold", "warm"):
        result = copy(f"docker://{mirror.host}/library/alpine:3.19", tmp_path / run, "--all")
        assert result.returncode == 0, result.stderr
    r = httpx.get(f"{mirror.url}/_hub/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    up = upstream.api_url
    assert metric(text, "hub_requests_total", upstream=up, kind="blob", status="200") >= 12
    assert metric(text, "hub_cache_requests_total", kind="blob", outcome="miss") == 6
    assert metric(text, "hub_cache_requests_total", kind="blob", outcome="hit") == 6
    assert metric(text, "hub_served_bytes_total", source="cache") == metric(text, "hub_served_bytes_total", source="upstream") > 0
    assert metric(text, "hub_cache_bytes") > 0
    assert metric(text, "hub_transfers_in_flight") == 0
    assert metric(text, "hub_upstream_latency_seconds_count", upstream="127.0.0.1") > 0
    assert 0 < metric(text, "hub_ratelimit_remaining", upstream=up) <= 100
    # whom the upstream counted (a client address, an account) is an identity: not on public metrics
    assert not [line for line in text.splitlines() if line.startswith("hub_ratelimit_remaining{") and "source" in line]
    # the same registry on the loopback metrics listener
    local = httpx.get(mirror.metrics_url)
    assert local.status_code == 200
    assert metric(local.text, "hub_cache_requests_total", kind="blob", outcome="hit") == 6


def test_one_log_line_per_pull_step(mirror, upstream):
    lines = [line for line in mirror.log_text().splitlines() if " pull client=" in line]
    blob_lines = [line for line in lines if " GET blob library/alpine@sha256:" in line]
    assert len(blob_lines) >= 12
    assert any("cache=miss" in line for line in blob_lines) and any("cache=hit" in line for line in blob_lines)
    assert all("status=200" in line and "bytes=" in line and "time=" in line for line in blob_lines)
    assert any(" GET manifest library/alpine:3.19 " in line for line in lines)
    for password in upstream.users.values():
        assert password not in mirror.log_text()


def test_health(mirror, tmp_path):
    r = httpx.get(f"{mirror.url}/_hub/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "client": True, "cache": "writable"}
    tmp = mirror.cache_dir / "tmp"
    shutil.rmtree(tmp)
    tmp.write_text("not a directory")  # the cache can no longer take downloads
    try:
        r = httpx.get(f"{mirror.url}/_hub/health")
        assert r.status_code == 503
        assert r.json()["status"] == "unavailable"
    finally:
        tmp.unlink()
        tmp.mkdir()
    assert httpx.get(f"{mirror.url}/_hub/health").status_code == 200


def test_status_page_renders_in_a_browser(mirror, tmp_path):
    browser = Chromium(tmp_path)
    dom = browser.dump_dom(f"{mirror.url}/")
    assert "hub-rewrite: a mirror of docker.io" in dom
    assert f"docker pull {mirror.host}/library/nginx" in dom
    assert f"[host.&quot;{mirror.url}&quot;]" in dom or f'[host."{mirror.url}"]' in dom
    assert "% hits" in dom

    shot = browser.screenshot(f"{mirror.url}/", screenshot_path(tmp_path, "status.png"), size=(1000, 1400))
    stats = assert_not_blank(shot)
    assert (stats.width, stats.height) == (1000, 1400)
