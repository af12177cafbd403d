"""Where a flow's registry lives, and the mirror's own public URL."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from mitmproxy import connection, http
from mitmproxy.proxy import mode_specs


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def base_url(scheme: str, host: str, port: int) -> str:
    default = {"http": 80, "https": 443}[scheme]
    suffix = "" if port == default else f":{port}"
    return f"{scheme}://{_host_for_url(host)}{suffix}"


@dataclass(frozen=True)
class Upstream:
    """A registry API host, e.g. https://registry-1.docker.io."""

    scheme: str
    host: str
    port: int
    name: str = ""  # the registry it serves, e.g. docker.io (its name in hub_upstreams)

    @property
    def base(self) -> str:
        return base_url(self.scheme, self.host, self.port)

    def url(self, path_and_query: str) -> str:
        return self.base + path_and_query


def reverse_target(flow: http.HTTPFlow) -> Upstream | None:
    """mitmproxy's reverse-mode target of the listener a flow came in on."""
    mode = flow.client_conn.proxy_mode
    if not isinstance(mode, mode_specs.ReverseMode):
        return None
    host, port = mode.address
    return Upstream(mode.scheme, host, port)


def is_forward_proxy(flow_or_client) -> bool:
    client = getattr(flow_or_client, "client_conn", flow_or_client)
    return isinstance(client.proxy_mode, mode_specs.RegularMode)


def validate_public_url(url: str) -> str:
    """Check ``hub_public_url``; return it without a trailing slash."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an absolute http:// or https:// URL")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError("must not contain credentials, a query or a fragment")
    return url.rstrip("/")


def public_url_of(client: connection.Client) -> str:
    """The mirror's URL as this client reached it, when hub_public_url is unset.

    In reverse mode mitmproxy has replaced the Host header with the upstream's
    before any hook runs, so the client's view is rebuilt from the connection:
    the TLS server name it asked for, else the local address it connected to.
    """
    scheme = "https" if client.tls_established else "http"
    local_host, local_port = client.sockname[0], client.sockname[1]
    host = client.sni or local_host
    address = ip_of(host)
    if address is not None and address.version == 4 and ":" in host:
        host = str(address)  # IPv4-mapped ::ffff:10.0.0.1 -> 10.0.0.1
    return base_url(scheme, host, local_port)


def ip_of(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a host string names (IPv4-mapped IPv6 as IPv4, zone dropped), or None for a name."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address
