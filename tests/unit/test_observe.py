import html

from hubrewrite.observe.logline import pull_log_line
from hubrewrite.observe.metrics import CountingStream, Metrics
from hubrewrite.observe.status_page import StatusFacts, status_page


def test_pull_log_line_names_the_step_and_nothing_else():
    line = pull_log_line("10.0.0.1", "https://registry-1.docker.io", "GET", "blob", "library/nginx",
                         "sha256:" + "a" * 64, 200, 1234, 0.5, "hit")
    assert line == (
        "pull client=10.0.0.1 upstream=https://registry-1.docker.io GET blob library/nginx@sha256:" + "a" * 64
        + " status=200 bytes=1234 time=0.500s cache=hit"
    )
    assert "manifest library/nginx:1.27 " in pull_log_line("c", "u", "HEAD", "manifest", "library/nginx", "1.27", 200, 0, 0, "")
    assert " GET token status=401 " in pull_log_line("c", "u", "GET", "token", "", "", 401, 0, 0, "")


def test_metrics_exposition_and_hit_rate():
    metrics = Metrics()
    assert metrics.hit_rate() is None
    metrics.cache_requests.labels("blob", "hit").inc(3)
    metrics.cache_requests.labels("manifest", "miss").inc()
    metrics.requests.labels("https://r", "blob", "200").inc()
    assert metrics.hit_rate() == 0.75
    body, content_type = metrics.exposition()
    assert content_type.startswith("text/plain")
    assert b'hub_requests_total{kind="blob",status="200",upstream="https://r"} 1.0' in body


def test_counting_stream_passes_chunks_through():
    seen = []
    stream = CountingStream(seen.append)
    assert stream(b"abc") == b"abc" and stream(b"") == b""
    assert stream.count == 3 and seen == [3]


def test_status_page_fills_in_the_mirror_url_and_escapes():
    page = status_page(StatusFacts("http://mirror.example:5000", "https://registry-1.docker.io", "docker.io",
                                   ["docker.io", "ghcr.io"], "/var/cache/hub", 3 * 1024**3, "20g", 0.5,
                                   {"https://registry-1.docker.io": "87;w=21600"}, 42)).decode()
    page = html.unescape(page)
    assert "docker pull mirror.example:5000/library/nginx" in page
    assert '"registry-mirrors": [\n    "http://mirror.example:5000"\n  ]' in page
    assert '[host."http://mirror.example:5000"]' in page
    assert 'location = "mirror.example:5000"' in page and "insecure = true" in page
    assert "3.0 GiB" in page and "50% hits" in page and "<td>87</td>" in page
    assert "<script" not in page and "<link" not in page and "src=" not in page  # no external assets
    evil = status_page(StatusFacts("https://<x>", "u", "docker.io", [], "", None, "0", None, {}, 0)).decode()
    assert "<x>" not in evil and "&lt;x&gt;" in evil


def test_status_page_of_a_forward_proxy_says_how_to_use_a_proxy():
    """Through a forward proxy clients keep the registries' names: no mirror host to pull from."""
    page = html.unescape(status_page(StatusFacts(
        "https://ghcr.io", "https://ghcr.io", "ghcr.io", ["docker.io", "ghcr.io"], "", None, "0", None, {}, 3,
        proxy_url="http://10.0.0.5:8080")).decode())
    assert "This forward proxy at <code>http://10.0.0.5:8080</code> serves" in page
    assert "HTTPS_PROXY=http://10.0.0.5:8080" in page and "mitmproxy-ca-cert.pem" in page
    assert "docker pull" not in page and "registry-mirrors" not in page and "hosts.toml" not in page


def test_status_page_and_metrics_say_since_when_a_registry_is_unreachable():
    from hubrewrite.observe.status_page import RegistrySources
    from hubrewrite.registry.registries import parse_upstream
    from hubrewrite.sources import SourceList, describe_stale

    sources = SourceList(parse_upstream("docker.io=https://a.example,https://b.example"), backoff=30)
    first, second = sources.sources
    facts = lambda: StatusFacts("http://m:5000", first.base, "docker.io", ["docker.io"], "", None, "0", None, {}, 0,
                                sources=[RegistrySources(sources.name, sources.state(), sources.unreachable_since,
                                                         describe_stale(sources.stale_served))])
    page = html.unescape(status_page(facts()).decode())
    assert "https://b.example" in page and "unreachable" not in page  # several URLs: listed, in order
    sources.failed(first, "upstream unreachable: [Errno 111] Connection refused")
    sources.failed(second, "answered 503")
    sources.note_stale("manifest")
    sources.note_stale("blob")
    sources.note_stale("blob")
    page = html.unescape(status_page(facts()).decode())
    assert "docker.io is unreachable since " in page and "served from the cache meanwhile: 2 blobs, 1 manifest." in page
    assert "failed, tried again in 30 s" in page and "answered 503" in page
    metrics = Metrics()
    metrics.note_sources([sources])
    body = metrics.exposition()[0].decode()
    since = next(line for line in body.splitlines() if line.startswith("hub_upstream_unreachable_since_seconds{"))
    assert abs(float(since.rsplit(" ", 1)[1]) - sources.unreachable_since) < 1
    assert 'hub_source_up{source="https://b.example",upstream="https://a.example"} 0.0' in body
    sources.answered(second)
    metrics.note_sources([sources])
    body = metrics.exposition()[0].decode()
    assert 'hub_upstream_unreachable_since_seconds{upstream="https://a.example"} 0.0' in body
    assert 'hub_source_up{source="https://b.example",upstream="https://a.example"} 1.0' in body
