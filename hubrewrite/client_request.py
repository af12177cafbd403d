"""One client request the mirror serves, resolved once when its head arrives.

``admission.admit`` builds a ``ClientRequest`` from a flow: which registry it is for,
the API route with the upstream's repository name, how the client sees the
mirror, who the client is, and the headers to send upstream. The paths read
it; nothing on the way derives any of it again. A path answers with a
response or a ``Retarget`` (where mitmproxy should fetch the answer, streamed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

from mitmproxy import http

from .cache.downloads import Download
from .cache.tiers import Asker
from .registry.names import Route, RouteKind
from .registry.registries import Registries
from .registry.upstream import Upstream


RETRY_PARAM = "_hub_retry"  # a blob request the mirror sent back to itself after a storage refused a signed URL


class RequestKind(Enum):
    """Which part of the mirror answers a client request (an API request's route has a RouteKind)."""

    PREFLIGHT = "preflight"  # OPTIONS: CORS, answered at once
    PAGE = "page"  # the mirror's own pages: status, health, metrics
    TOKEN = "token"  # /token[/<registry>]
    API = "api"  # /v2/...


@dataclass(frozen=True)
class ClientView:
    """What the client of one request sees: the token realm to advertise, and
    the registry prefix it wrote into repository names (path-prefix routing)."""

    mirror_url: str  # the mirror's URL as this client reaches it
    token_url: str
    client_prefix: str = ""


@dataclass
class RequestSummary:
    """What a client request was and how it went: what its log line and metrics say
    (written by observe/summaries.py when it ends)."""

    upstream: str
    kind: RequestKind | RouteKind = RequestKind.API  # an API request's route kind, once its path parsed
    repo: str = ""
    ref: str = ""
    start: float = field(default_factory=time.time)
    streamed: int | None = None  # body bytes of a streamed answer
    # of an answer's body made here (hub_served_bytes_total): a small blob's is "cache" or "upstream"
    source: str = "mirror"
    in_flight: bool = False
    done: bool = False

    @property
    def label(self) -> str:
        """The kind as metrics and log lines name it: "blob", "token", ...; "other" for a
        preflight and a /v2/ path that did not parse."""
        return "other" if self.kind in (RequestKind.PREFLIGHT, RequestKind.API) else self.kind.value


class TransferSource(Enum):
    """Where the bytes of a streamed answer come from."""

    STORAGE = "storage"  # the registry's CDN or the registry itself, relayed by mitmproxy
    CACHE = "cache"  # a verified file, from the loopback server
    DOWNLOAD = "download"  # a download followed as it arrives, from the loopback server
    STREAM = "stream"  # without a cache: the mirror's own transfer from the storage (streams.py)


@dataclass
class Transfer:
    """An answer mitmproxy streams (a blob, a large manifest): from a storage service,
    or from the mirror's loopback server."""

    digest: str
    headers: list[tuple[str, str]]  # for the client's answer: the digest, the cache state
    source: TransferSource
    download: Download | None = None  # the download whose start this request made
    retry_location: str | None = None  # a storage refusing a signed URL sends the client back here once


@dataclass
class Retarget:
    """Let mitmproxy fetch the answer from ``url`` (and stream it)."""

    url: str  # absolute, or a path on the mirror's loopback server
    transfer: Transfer | None = None
    keep_credentials: bool = False  # only the registry itself gets them (a push, a blob it serves)
    loopback: bool = False  # the mirror's own loopback server


Answer = http.Response | Retarget


@dataclass
class ClientRequest:
    flow: http.HTTPFlow
    kind: RequestKind
    path: str  # as the client sent it, without the query
    registries: Registries  # what this listener serves
    fixed: Upstream | None  # already chosen by the host name or the proxy target
    upstream: Upstream  # the registry this request is for
    view: ClientView
    summary: RequestSummary
    route: Route | None = None  # /v2/ requests: with the upstream's repository name
    client_query: list[tuple[str, str]] = field(default_factory=list)  # as the client sent it
    query: str = ""  # to forward: "" or "?..." without the mirror's own parameters
    # the client's Authorization and body (a token form) as it sent them: the flow's record
    # shows them redacted from the moment they are in (debug/records.py)
    client_authorization: str | None = None
    client_body: bytes = b""
    authorization: str | None = None  # what goes upstream (never a mirror-issued token)
    identity: str = ""  # a stable, non-secret name for those credentials
    user: str | None = None  # the mirror account, with accounts on
    headers: list[tuple[str, str]] = field(default_factory=list)  # the client's, as the upstream should see them
    # the URL of the registry that answered (sources.py), and the headers it got (paths/sourced.py)
    source: Upstream | None = None
    source_headers: list[tuple[str, str]] | None = None
    retried: bool = False  # the client was sent back once after a storage refused a signed URL
    transfer: Transfer | None = None
    hidden: http.Response | None = None  # an answer sent from the loopback server, so that its record can differ
    settled: bool = False  # answered (or refused) already: the request hook has nothing left to do

    @property
    def method(self) -> str:
        return self.flow.request.method

    @property
    def url(self) -> str:
        """This request at the upstream."""
        assert self.route is not None
        return self.upstream.url(self.route.path() + self.query)

    @property
    def asker(self) -> Asker:
        """Who asks the cache, for which repository (an API request's)."""
        assert self.route is not None
        return Asker(self.upstream.base, self.route.name, self.identity, self.authorization)

    def client_name(self, name: str) -> str:
        """A repository as the client names it (with its registry prefix)."""
        return self.view.client_prefix + name
