"""The mirror's running parts, made from ``Settings`` and replaced when they change.

``paths.serve`` hands each request path the parts it uses (``paths/parts.py``): the
settings, the HTTP client to upstreams, what was learned about their token services,
the tokens issued to mirror accounts, the cache, and the metrics.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import ssl
from dataclasses import dataclass, field

from mitmproxy import exceptions
from prometheus_client import start_http_server as start_metrics_server

from .access.confirmations import AccessMemory
from .access.issued import IssuedTokens
from .cache.ahead import AheadFetches
from .cache.bloblistener import BlobListener
from .cache.bucket import Bucket
from .cache.bucket_config import BucketConfigError
from .cache.bucket_errors import BucketError
from .cache.shared import SharedStore
from .cache.downloads import Downloads
from .cache.layout import LayoutError
from .cache.serving import BlobSender
from .cache.signing import URL_LIFETIME as PRESIGNED_URL_LIFETIME
from .cache.signing import BlobUrlSigner, SecretError, load_or_create_secret
from .cache.store import Store
from .cache.tiers import TieredCache
from .connlimits import FileBudget
from .debug.sideflows import SideFlows
from .httpserver import ServerLimits
from .loopback import Loopback
from .observe.metrics import Metrics
from .observe.ratelimits import RateLimits
from .realms import Realms
from .settings import CacheSettings, Settings
from .source_tokens import SourceTokens
from .sources import Sources
from .upstream_client import UpstreamClient, make_ssl_context

log = logging.getLogger("hub_rewrite")

# connections the kernel takes for the blob listener before it accepts them: a burst is
# accepted (and beyond the listener's share closed at once) rather than dropped
LISTEN_BACKLOG = 1024


@dataclass
class Cache:
    settings: CacheSettings
    store: Store
    access: AccessMemory
    downloads: Downloads
    blobs: BlobSender
    tiers: TieredCache  # the store, the downloads and the bucket in their order: what the request paths ask
    ahead: AheadFetches = field(default_factory=AheadFetches)  # fetches ahead of clients (paths/ahead.py)
    listener: BlobListener | None = None
    listener_socket: socket.socket | None = None
    shared: SharedStore | None = None  # the bucket behind the local tier (hub_store_url)


class Mirror:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.budget = FileBudget(lambda: self.settings)  # the open files, shared by the main port and the listener
        self.metrics = Metrics()
        self.ratelimits = RateLimits(self.metrics)
        self.realms = Realms()  # per URL of a registry: each has its own token service
        self.sources = Sources(settings.registries.table, settings.source_backoff)  # which URL a request goes to
        self.source_tokens = SourceTokens()  # which URL's token service issued a token
        self.secret = secrets.token_bytes(32)  # the key of the mirror's URLs and tokens (see _replace_cache)
        self.issued = IssuedTokens(self.secret)
        self.loopback = Loopback()
        self.side_flows = SideFlows(lambda: self.settings.side_flows, lambda: self.settings.show_secrets)
        self.client = self._new_client(settings)
        self.cache: Cache | None = None
        self.metrics_server = None  # (server, thread) of the loopback metrics listener
        self.tls: ssl.SSLContext | None = None  # the mirror's own certificate (--certs), for the blob listener
        self.prefetch = None  # the images kept warm (prefetch/rounds.py), with hub_prefetch

    def apply(self, settings: Settings, tls: ssl.SSLContext | None) -> None:
        """Take new settings: replace only the parts they changed. Raises OptionsError."""
        old, self.settings = self.settings, settings
        if _urls(settings) != _urls(old):
            self.sources = Sources(settings.registries.table, settings.source_backoff).kept_from(self.sources)
        if settings.client != old.client:
            _close_later(self.client.aclose())
            self.client = self._new_client(settings)
        if settings.metrics_listen != old.metrics_listen or self.metrics_server is None:
            self._replace_metrics_listener()
        if settings.cache != (self.cache.settings if self.cache else None) or tls is not self.tls:
            self.tls = tls
            self._replace_cache()
            self.issued = IssuedTokens(self.secret)
            self._replace_prefetch()
        elif settings.prefetch != old.prefetch or (settings.prefetch and self.prefetch is None):
            self._replace_prefetch()
        self._warn_of_file_limit(old if old is not settings else None)

    def _warn_of_file_limit(self, old: Settings | None) -> None:
        """Once, and when the options change it: the open-file limit holding the ports below hub_max_connections."""
        allowed, wanted = self.budget.connections(), self.settings.limits.max_connections
        if allowed < wanted and (old is None or old.limits != self.settings.limits or old.cache != self.settings.cache):
            log.warning("hub_rewrite: %d open files allow %d client connections per port, not hub_max_connections "
                        "(%d): raise the hard limit (README: Open files)", self.budget.file_limit, allowed, wanted)

    def _new_client(self, settings: Settings) -> UpstreamClient:
        c = settings.client
        verify = make_ssl_context(c.ssl_insecure, c.ca_file, c.ca_dir)
        return UpstreamClient(verify, timeout=c.timeout, max_body=c.max_body, on_answer=self._observe_latency,
                              observer=self.side_flows.record)

    def _observe_latency(self, host: str, seconds: float) -> None:
        self.metrics.upstream_latency.labels(host).observe(seconds)

    def _replace_prefetch(self) -> None:
        from .prefetch.rounds import Prefetcher  # here: it works through the paths, which import this module

        if self.prefetch is not None:
            _close_later(self.prefetch.close())
        self.prefetch = Prefetcher(self.settings.prefetch, self) if self.settings.prefetch else None
        if self.prefetch is not None and self.loopback.server.running:
            self.prefetch.start()  # options changed while serving: not only at the next request

    def _replace_metrics_listener(self) -> None:
        self._stop_metrics_listener()
        address = self.settings.metrics_listen
        if address is None:
            self.metrics_server = ()
            return
        host, port = address
        try:
            self.metrics_server = start_metrics_server(port, host, self.metrics.registry)
        except OSError as e:
            raise exceptions.OptionsError(f"hub_metrics_listen {host}:{port}: {e.strerror}") from e
        log.info("hub_rewrite: metrics also at http://%s:%d/metrics", host, port)

    def _stop_metrics_listener(self) -> None:
        if self.metrics_server:
            server, _thread = self.metrics_server
            server.shutdown()
            server.server_close()
        self.metrics_server = None

    def _replace_cache(self) -> None:
        if self.cache is not None:
            _close_later(self._close_cache(self.cache))
            self.cache = None
            self.loopback.blobs = self.loopback.store = None
        c = self.settings.cache
        if c is None:
            return
        try:
            store = Store(c.directory, c.max_bytes, self.metrics.cache_evictions.inc, c.max_files)
        except LayoutError as e:
            raise exceptions.OptionsError(f"hub_cache_dir: {e}") from e
        except OSError as e:
            raise exceptions.OptionsError(f"hub_cache_dir {c.directory}: {e.strerror}") from e
        if not store.found.stamped:
            log.info("hub_rewrite: cache %s: %s", c.directory, store.found.plan())
        downloads = Downloads(store)
        blobs = BlobSender(store, downloads)
        shared = None
        if c.store is not None:
            try:
                shared = SharedStore(Bucket(c.store), PRESIGNED_URL_LIFETIME if c.presign else 0, self.metrics)
            except BucketConfigError as e:
                raise exceptions.OptionsError(f"hub_store_url: {e}") from e
        access = AccessMemory(c.auth_ttl, c.stale_seconds, c.stale_grace)
        cache = Cache(c, store, access, downloads, blobs, TieredCache(store, downloads, access, self.metrics, shared),
                      shared=shared)
        self.secret, kept_in_bucket = self._secret(c, cache.shared)
        if cache.shared is not None:
            # a key the bucket holds proves nothing against whoever can write to the bucket
            cache.shared.use_mark_key(None if kept_in_bucket else self.secret)
        if c.blob_listen is not None:
            cache.listener, cache.listener_socket = self._blob_listener(c, blobs)
        self.cache = cache
        self.loopback.blobs, self.loopback.store = blobs, store
        log.info("hub_rewrite: caching in %s (limit %s bytes)", c.directory, c.max_bytes or "no")

    @staticmethod
    def _secret(c: CacheSettings, shared: SharedStore | None) -> tuple[bytes, bool]:
        """The key of the blob listener's URLs and of the tokens the mirror issues: hub_blob_secret,
        else one kept in the shared bucket, else one in the cache directory, so that every process
        sharing those accepts the others' (a bucket unreachable at start: the directory's, for now);
        and whether it is the bucket's."""
        try:
            if c.blob_secret is not None:
                return load_or_create_secret(c.blob_secret, create=False), False
            if shared is not None:
                try:
                    return shared.bucket.shared_secret(), True
                except BucketError as e:
                    log.warning("hub_rewrite: shared store: %s; using the cache directory's key", e)
            return load_or_create_secret(c.directory / "secret", create=True), False
        except SecretError as e:
            raise exceptions.OptionsError(f"hub_blob_secret: {e}") from e

    def _blob_listener(self, c: CacheSettings, blobs: BlobSender) -> tuple[BlobListener, socket.socket]:
        host, port = c.blob_listen
        try:
            # bound now, so a port in use stops the mirror at startup; served once the loop runs
            sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                        backlog=LISTEN_BACKLOG, reuse_port=False)
        except OSError as e:
            raise exceptions.OptionsError(f"hub_blob_listen {host}:{port}: {e.strerror}") from e
        return BlobListener(BlobUrlSigner(self.secret), blobs, self._count_listener_bytes, self._listener_limits), sock

    def _listener_limits(self) -> ServerLimits:
        """The main port's limits (guard.py), and the same share of the open files."""
        limits = self.settings.limits
        return ServerLimits(self.budget.connections(), limits.head_timeout, limits.max_head_bytes, limits.stall_timeout)

    def _count_listener_bytes(self, source: str, count: int) -> None:
        self.metrics.bytes_served.labels(source).inc(count)

    async def start(self) -> None:
        """What needs the event loop: the loopback server and the blob listener."""
        await self.loopback.start()
        if self.prefetch is not None:
            self.prefetch.start()
        cache = self.cache
        if cache is not None and cache.listener is not None and not cache.listener.server.running:
            await cache.listener.start_on(cache.listener_socket, self.tls)

    @staticmethod
    async def _close_cache(cache: Cache) -> None:
        """Run in the background when the cache is replaced, awaited at shutdown: downloads
        cancelled first (each lets its lock go), then the bucket's work (uploads) is waited for."""
        if cache.listener is not None:
            await cache.listener.stop()
            if cache.listener_socket is not None:
                cache.listener_socket.close()
        await cache.ahead.close()
        await cache.downloads.close()
        if cache.shared is not None:
            await cache.shared.close()

    async def close(self) -> None:
        self._stop_metrics_listener()
        if self.prefetch is not None:
            await self.prefetch.close()
        if self.cache is not None:
            await self._close_cache(self.cache)
        await self.loopback.stop()
        await self.client.aclose()


def _urls(settings: Settings) -> tuple:
    """What the registries' SourceLists are made of (an Upstream's further URLs are not part of its identity)."""
    return settings.source_backoff, [(name, u.bases) for name, u in settings.registries.table.items()]


def _close_later(closing) -> None:
    """Close a replaced part (an awaitable) on the running loop; without a loop (tests, shutdown) drop it."""
    try:
        asyncio.get_running_loop().create_task(closing)
    except RuntimeError:
        closing.close()
