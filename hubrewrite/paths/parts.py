"""What the request paths work with, handed to each explicitly (not the whole ``Mirror``).

``paths.serve`` makes them from the mirror's running parts for each request
(parts the options replace are never held past it): ``Upstreams`` for asking
a registry and showing its answer, ``CacheParts`` for the paths that serve
from the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..access.rules import RepositoryRules
from ..cache.ahead import AheadFetches
from ..cache.bloblistener import BlobListener
from ..cache.tiers import TieredCache
from ..observe.metrics import Metrics
from ..observe.ratelimits import RateLimits
from ..realms import Realms
from ..upstream_client import UpstreamClient


@dataclass(frozen=True)
class Upstreams:
    """The mirror's client to registries, and what it learns of them on the way."""

    client: UpstreamClient
    realms: Realms  # their token services and /v2/ answers
    ratelimits: RateLimits
    timeout: float  # hub_upstream_timeout: also how long a client waits for another's fetch
    caching: bool  # a cache is on: /v2/ of an unreachable upstream gets the challenge it sent before


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
