"""Prometheus metrics of the mirror (a registry of their own: a reloaded script must not collide)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("hub_requests", "Client requests answered", ["upstream", "kind", "status"], registry=r)
        self.bytes_served = Counter("hub_served_bytes", "Body bytes sent to clients", ["source"], registry=r)
        self.bytes_fetched = Counter("hub_upstream_fetched_bytes", "Body bytes received from upstreams and their CDNs", ["upstream"], registry=r)
        self.cache_requests = Counter("hub_cache_requests", "Cache lookups by outcome", ["kind", "outcome"], registry=r)
        self.ahead_requests = Counter(
            "hub_ahead_requests", "Upstream requests made ahead of a client (hub_fetch_ahead)", ["kind"], registry=r)
        self._slow_network_metrics(r)
        self.cache_evictions = Counter("hub_cache_evictions", "Blobs evicted from the cache", registry=r)
        self.cache_bytes = Gauge("hub_cache_bytes", "Size of cached blobs", registry=r)
        self.in_flight = Gauge("hub_transfers_in_flight", "Blob transfers streaming right now", registry=r)
        self.upstream_latency = Histogram(
            "hub_upstream_latency_seconds", "Time to the upstream's answer headers", ["upstream"], registry=r
        )
        # per upstream only: the source (a client address or account) is an identity
        self.ratelimit_remaining = Gauge(
            "hub_ratelimit_remaining", "Latest ratelimit-remaining from the upstream", ["upstream"], registry=r
        )
        self.store_requests = Counter(
            "hub_store_requests", "Requests to the shared bucket that worked: read or write, and of what",
            ["what", "kind"], registry=r)
        self.store_errors = Counter("hub_store_errors", "Requests to the shared bucket that failed", ["what"], registry=r)
        self.store_presigned = Counter(
            "hub_store_presigned_redirects", "Blob requests sent to a presigned URL of the bucket", registry=r)
        self.tier_hits = Counter(
            "hub_cache_tier_hits", "Cached blobs served, by where they were: local (disk) or shared (bucket)",
            ["tier"], registry=r)
        self.cache_writable = Gauge(
            "hub_cache_writable", "1 while the cache takes writes, 0 while it cannot (disk full): serving uncached",
            registry=r,
        )

    def _slow_network_metrics(self, r: CollectorRegistry) -> None:
        """What the mirror does for slow and filtered networks: images kept warm, downloads resumed,
        registries with several URLs and their outages (docs/sources.md)."""
        self.prefetch_images = Gauge("hub_prefetch_images", "Images of hub_prefetch by state", ["state"], registry=r)
        self.prefetch_pending_blobs = Gauge(
            "hub_prefetch_pending_blobs", "Blobs of the image being prefetched not cached yet", registry=r)
        self.prefetch_requests = Counter(
            "hub_prefetch_requests", "Upstream requests made to keep hub_prefetch images warm", ["kind"], registry=r)
        self.prefetch_rounds = Counter(
            "hub_prefetch_rounds", "Prefetch rounds: done here, or left to another process of the bucket", ["outcome"],
            registry=r)
        self.download_resumes = Counter(
            "hub_download_resumes", "Requests resuming a blob transfer cut in the middle (Range from the byte it "
            "reached), by why: interrupted, refused (a 5xx or 429 before), expired (a fresh redirect after a 403)",
            ["reason"], registry=r)
        self.stale_served = Counter(
            "hub_stale_served", "Answers from the cache while the registry failed (X-Hub-Cache: stale)",
            ["upstream", "kind"], registry=r)
        self.source_up = Gauge(
            "hub_source_up", "1 while a URL of a registry answers, 0 while it is backing off after failing",
            ["upstream", "source"], registry=r)
        self.unreachable_since = Gauge(
            "hub_upstream_unreachable_since_seconds",
            "Unix time since which every URL of a registry fails; 0 while one answers", ["upstream"], registry=r)

    def note_sources(self, source_lists) -> None:
        """Each registry URL's health and since when a registry is unreachable (sources.SourceList), as now."""
        for sources in source_lists:
            name = sources.upstream.base
            since = sources.unreachable_since
            self.unreachable_since.labels(name).set(since or 0)
            for base, healthy, _, _ in sources.state():
                self.source_up.labels(name, base).set(1 if healthy else 0)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def value(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def hit_rate(self) -> float | None:
        hits = sum(self.value("hub_cache_requests_total", kind=k, outcome="hit") for k in ("blob", "manifest"))
        misses = sum(self.value("hub_cache_requests_total", kind=k, outcome="miss") for k in ("blob", "manifest"))
        return hits / (hits + misses) if hits + misses else None


class CountingStream:
    """A pass-through stream callable that counts the bytes it forwards."""

    def __init__(self, on_bytes) -> None:
        self.on_bytes = on_bytes
        self.count = 0

    def __call__(self, chunk: bytes) -> bytes:
        self.count += len(chunk)
        if chunk:
            self.on_bytes(len(chunk))
        return chunk
