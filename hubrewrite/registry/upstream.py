"""An upstream registry's API address."""

from __future__ import annotations

from dataclasses import dataclass, field


def host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def base_url(scheme: str, host: str, port: int) -> str:
    default = {"http": 80, "https": 443}[scheme]
    suffix = "" if port == default else f":{port}"
    return f"{scheme}://{host_for_url(host)}{suffix}"


@dataclass(frozen=True)
class Upstream:
    """A registry API host, e.g. https://registry-1.docker.io."""

    scheme: str
    host: str
    port: int
    name: str = ""  # the registry it serves, e.g. docker.io (its name in hub_upstreams)
    # the registry's further URLs in hub_upstreams, in order of preference (hubrewrite/sources.py
    # picks one per request); not part of its identity: caches and access are kept per registry
    others: tuple[str, ...] = field(default=(), compare=False)

    @property
    def base(self) -> str:
        return base_url(self.scheme, self.host, self.port)

    def url(self, path_and_query: str) -> str:
        return self.base + path_and_query

    @property
    def bases(self) -> tuple[str, ...]:
        """Every URL of the registry, in order of preference."""
        return (self.base, *self.others)
