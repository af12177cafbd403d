"""What the request paths work with, handed to each explicitly (not the whole ``Mirror``).

``paths.serve`` makes them from the mirror's running parts for each request
(parts the options replace are never held past it): ``Upstreams`` for asking
a registry and showing its answer, ``CacheParts`` for the paths that serve
from the cache, ``TokenParts`` for the token endpoint, ``PageParts`` for the
mirror's own pages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..access.accounts import MirrorAccounts
from ..access.confirmations import AccessMemory
from ..access.credentials import UpstreamCredentials
from ..access.issued import IssuedTokens
from ..access.rules import RepositoryRules
from ..cache.ahead import AheadFetches
from ..cache.bloblistener import BlobListener
from ..cache.shared import SharedStore
from ..cache.store import Store
from ..cache.tiers import TieredCache
from ..observe.metrics import Metrics
from ..observe.ratelimits import RateLimits
from ..settings import CacheSettings
from ..realms import Realms
from ..source_tokens import SourceTokens
from ..sources import Sources
from ..upstream_client import UpstreamClient


@dataclass(frozen=True)
class Upstreams:
    """The mirror's client to registries, and what it learns of them on the way."""

    client: UpstreamClient
    realms: Realms  # their token services and /v2/ answers
    ratelimits: RateLimits
    timeout: float  # hub_upstream_timeout: also how long a client waits for another's fetch
    caching: bool  # a cache is on: /v2/ of an unreachable upstream gets the challenge it sent before
    sources: Sources  # a registry's URLs: which one a request goes to (sources.py)
    source_tokens: SourceTokens  # which URL's token service issued a token (source_tokens.py)
    credentials: UpstreamCredentials  # the operator's own upstream accounts, per URL
    metrics: Metrics  # what the mirror's own transfers fetch, and how often they resume


@dataclass(frozen=True)
class CacheParts:
    """The tiered cache and the ways its bytes reach clients."""

    tiers: TieredCache
    ahead: AheadFetches  # fetches ahead of clients
    metrics: Metrics
    listener: BlobListener | None  # hub_blob_listen
    blob_url: str  # hub_blob_url, or "": the mirror's host as the client reached it
    tls: bool  # the listener speaks HTTPS (--certs)
    records_flows: bool  # flows are recorded: no signed URL in an answer without a body
    fetch_ahead: bool  # hub_fetch_ahead
    rules: RepositoryRules  # a fetch ahead is checked against them again


@dataclass(frozen=True)
class TokenParts:
    """What the token endpoint works with: who may ask for which scopes, and the mirror's own tokens."""

    upstreams: Upstreams
    issued: IssuedTokens  # the mirror's sealed tokens (accounts, offline tokens)
    accounts: MirrorAccounts | None  # hub_users
    rules: RepositoryRules  # hub_allow, hub_deny: scopes beyond them are dropped
    allow_push: bool
    access: AccessMemory | None  # with a cache: the tokens of anonymous clients are noted there (stale mode)


@dataclass(frozen=True)
class PageParts:
    """What the status page, the health check and the metrics show."""

    metrics: Metrics
    ratelimits: RateLimits
    metrics_auth: bool  # hub_metrics_auth: the metrics need a mirror account
    accounts: MirrorAccounts | None
    issued: IssuedTokens
    cache_settings: CacheSettings | None
    store: Store | None  # the cache's disk: its size and whether it is writable
    shared: SharedStore | None  # the bucket: whether it is reachable
    prefetch_facts: Callable[[], dict]  # the images kept warm (hub_prefetch), as the status page shows them
    sources: Sources  # every registry's URLs and their health
