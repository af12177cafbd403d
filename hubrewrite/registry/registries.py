"""The upstream table: which registries the mirror serves, and which one a request is for.

One mirror serves Docker Hub, ghcr.io, quay.io and others. A request names
its registry in one of the ways clients and existing mirrors use, checked in
this order (the first that applies decides):

1. containerd's ``?ns=<registry>`` parameter;
2. the host name the client used (``hub_host_map``: ``ghcr.mirror.example=ghcr.io``);
3. a path prefix naming a registry (``/v2/ghcr.io/owner/img/...``, podman
   ``registries.conf`` mirror locations with a path);
4. otherwise the default registry (Docker Hub, with the ``library/`` rule).

Nothing outside the table is ever contacted: a registry name that is not in
it is refused here, before any connection.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit

from .errors import RegistryError
from .names import REGISTRY_HOST_RE, official_name
from .scopes import Scope
from .upstream import Upstream

DEFAULT_UPSTREAMS = (
    "docker.io=https://registry-1.docker.io",
    "ghcr.io",
    "quay.io",
    "gcr.io",
    "registry.k8s.io",
    "nvcr.io",
    "mcr.microsoft.com",
)


class TableError(ValueError):
    pass


def parse_upstream(entry: str) -> Upstream:
    """``name`` (API at https://name) or ``name=URL[,URL...]`` (e.g. docker.io=https://registry-1.docker.io),
    several URLs in order of preference."""
    name, sep, urls = entry.strip().partition("=")
    name = name.strip().lower()
    if not REGISTRY_HOST_RE.fullmatch(name):
        raise TableError(f"{entry!r}: {name!r} is not a registry host name")
    listed = [url.strip() for url in urls.split(",")] if sep else [f"https://{name}"]
    parsed = [parse_url(entry, url) for url in listed]
    bases = [upstream.base for upstream in parsed]
    if len(set(bases)) != len(bases):
        raise TableError(f"{entry!r}: a URL is listed twice")
    first = parsed[0]
    return Upstream(first.scheme, first.host, first.port, name, tuple(bases[1:]))


def parse_url(entry: str, url: str) -> Upstream:
    """One API URL of an entry: just scheme://host[:port]."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TableError(f"{entry!r}: {url!r}: an API URL must be http:// or https://host[:port]")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        raise TableError(f"{entry!r}: {url!r}: an API URL must be just scheme://host[:port]")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:
        raise TableError(f"{entry!r}: {e}") from e
    return Upstream(parts.scheme, parts.hostname, port)


def parse_table(entries: list[str] | tuple[str, ...]) -> dict[str, Upstream]:
    table: dict[str, Upstream] = {}
    for entry in entries:
        upstream = parse_upstream(entry)
        if upstream.name in table:
            raise TableError(f"registry {upstream.name} is listed twice")
        table[upstream.name] = upstream
    return table


def parse_host_map(entries: list[str] | tuple[str, ...], registries: set[str]) -> dict[str, str]:
    """``mirror-host=registry`` pairs; every registry must be in the table."""
    host_map: dict[str, str] = {}
    for entry in entries:
        host, sep, registry = entry.partition("=")
        host, registry = host.strip().lower(), registry.strip().lower()
        if not sep or not REGISTRY_HOST_RE.fullmatch(host) or ":" in host:
            raise TableError(f"{entry!r}: expected host-name=registry, e.g. ghcr.mirror.example=ghcr.io")
        if registry not in registries:
            raise TableError(f"{entry!r}: registry {registry} is not in hub_upstreams")
        host_map[host] = registry
    return host_map


def _name_address(name: str) -> tuple[str, int]:
    """A registry name as a client dials it: ``ghcr.io`` is ghcr.io:443, ``reg.example:5000`` port 5000."""
    host, sep, port = name.rpartition(":")
    return (host, int(port)) if sep and port.isdigit() else (name, 443)


def looks_like_host(segment: str) -> bool:
    """The first component of a reference names a registry when it has a dot or
    a port, or is localhost (the rule docker's reference parser uses)."""
    return "." in segment or ":" in segment or segment == "localhost"


def hostname_of(host_header: str) -> str:
    """``name[:port]`` or ``[v6]:port`` -> the lower-case name."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


@dataclass(frozen=True)
class Routed:
    """Which upstream a repository request is for, and how the client named it."""

    upstream: Upstream
    name: str  # the repository as the upstream knows it (no registry prefix)
    client_prefix: str = ""  # "ghcr.io/" when the client wrote the registry into the path

    def client_name(self, upstream_name: str) -> str:
        return self.client_prefix + upstream_name


@dataclass(frozen=True)
class Registries:
    table: dict[str, Upstream]  # registry name -> its API
    default: str  # the registry for requests that name none
    host_map: dict[str, str] = field(default_factory=dict)  # client-facing host -> registry name
    # Docker Hub's rule: one-segment names live under "library/" (hub_registry_name, hub_official_prefix)
    official_registry: str = "docker.io"
    official_prefix: str = "library"

    def with_default(self, upstream: Upstream) -> Registries:
        """This listener's target is the default registry's API (reverse mode)."""
        named = next((u for u in self.table.values() if u.base == upstream.base), None)
        if named is not None:
            return replace(self, default=named.name)
        table = dict(self.table)
        table[self.default] = replace(upstream, name=self.default)
        return replace(self, table=table)

    @property
    def default_upstream(self) -> Upstream:
        upstream = self.table.get(self.default)
        if upstream is None:
            raise RegistryError(404, "NAME_UNKNOWN", f"the default registry {self.default} is not in hub_upstreams")
        return upstream

    def named(self, name: str) -> Upstream | None:
        """By registry name (``ghcr.io``) or API host (``registry-1.docker.io[:443]``)."""
        name = name.lower()
        if name in self.table:
            return self.table[name]
        for upstream in self.table.values():
            if name in (upstream.host, f"{upstream.host}:{upstream.port}"):
                return upstream
        return None

    def for_client_host(self, host_header: str | None) -> Upstream | None:
        """The registry a client-facing host name maps to (``hub_host_map``)."""
        if not host_header:
            return None
        registry = self.host_map.get(hostname_of(host_header))
        return self.table[registry] if registry else None

    def for_proxy_target(self, host: str, port: int) -> Upstream | None:
        """Forward-proxy mode: the registry a client asked the proxy for, if served,
        on that registry's own port only (a name or a mapped host: 443)."""
        address = (host.lower(), port)
        for upstream in self.table.values():
            if address in (_name_address(upstream.name), (upstream.host, upstream.port)):
                return upstream
        registry = self.host_map.get(address[0])
        return self.table[registry] if registry and port == 443 else None

    def by_ns(self, ns_values: list[str]) -> Upstream | None:
        """containerd's ``ns``: must name a registry in the table."""
        chosen: Upstream | None = None
        for ns in ns_values:
            if not REGISTRY_HOST_RE.fullmatch(ns):
                raise RegistryError(400, "NAME_INVALID", "invalid ns parameter")
            upstream = self.named(ns)
            if upstream is None:
                raise RegistryError(404, "NAME_UNKNOWN", f"this mirror does not serve registry {ns}")
            if chosen is not None and upstream != chosen:
                raise RegistryError(400, "NAME_INVALID", "conflicting ns parameters")
            chosen = upstream
        return chosen

    def registry_prefix(self, name: str) -> tuple[str, Upstream | None] | None:
        """A repository name's first segment when it names a registry (looks
        like a host), with that registry's table entry (None: not served)."""
        first, slash, _ = name.partition("/")
        if not slash or not looks_like_host(first):
            return None
        return first, self.named(first)

    def route(self, fixed: Upstream | None, name: str) -> Routed:
        """The upstream of a repository. ``fixed``: already decided by ns, host or proxy target."""
        if fixed is not None:
            return Routed(fixed, self.official(fixed, name))
        prefix = self.registry_prefix(name)
        if prefix is None:
            return Routed(self.default_upstream, self.official(self.default_upstream, name))
        first, upstream = prefix
        if upstream is None:
            raise RegistryError(404, "NAME_UNKNOWN", f"this mirror does not serve registry {first}")
        return Routed(upstream, self.official(upstream, name[len(first) + 1:]), first + "/")

    def official(self, upstream: Upstream, name: str) -> str:
        """A repository name with Docker Hub's ``library/`` rule applied where it holds."""
        return official_name(name, self.official_prefix) if upstream.name == self.official_registry else name

    def for_token(self, fixed: Upstream | None, named: str | None, scope_names: list[str]) -> Upstream:
        """Which upstream a token request is for: ``/token/<named>``, else the
        one the host fixed, else the registry its scopes name by prefix, else the default.

        Scopes of more than one registry in one request are refused.
        """
        chosen = fixed
        if named is not None:
            chosen = self.named(named) if REGISTRY_HOST_RE.fullmatch(named) else None
            if chosen is None:
                raise RegistryError(404, "NAME_UNKNOWN", "this mirror does not serve that registry")
        prefixed: set[Upstream] = set()
        unprefixed = False
        for name in scope_names:
            prefix = self.registry_prefix(name)
            if prefix is None:
                unprefixed = True
            elif prefix[1] is not None:
                prefixed.add(prefix[1])
            elif chosen is None:
                raise RegistryError(404, "NAME_UNKNOWN", f"this mirror does not serve registry {prefix[0]}")
        if len(prefixed) > 1 or (prefixed and (unprefixed and chosen is None or chosen not in (None, *prefixed))):
            raise RegistryError(400, "DENIED", "a token request names repositories of more than one registry")
        return chosen or (prefixed.pop() if prefixed else self.default_upstream)

    def upstream_scope(self, upstream: Upstream, scope: Scope) -> Scope:
        """A client's scope as the upstream names it: registry prefix dropped, ``library/`` rule applied."""
        if not scope.is_repository:
            return scope
        name = scope.name
        prefix = self.registry_prefix(name)
        if prefix is not None and prefix[1] == upstream:
            name = name[len(prefix[0]) + 1:]
        return scope.renamed(self.official(upstream, name))
