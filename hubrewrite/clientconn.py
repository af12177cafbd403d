"""How a client connection reached the mirror: its listener's mode and target, its
address, and the mirror's own URL as that client sees it."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from mitmproxy import connection, http
from mitmproxy.proxy import mode_specs

from .registry.upstream import Upstream, base_url


def reverse_target(flow: http.HTTPFlow) -> Upstream | None:
    """mitmproxy's reverse-mode target of the listener a flow came in on."""
    mode = flow.client_conn.proxy_mode
    if not isinstance(mode, mode_specs.ReverseMode):
        return None
    host, port = mode.address
    return Upstream(mode.scheme, host, port)


def is_forward_proxy(client: connection.Client) -> bool:
    return isinstance(client.proxy_mode, mode_specs.RegularMode)


def validate_public_url(url: str) -> str:
    """Check a URL option (``hub_public_url``, ``hub_blob_url``); return it without a trailing slash."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an absolute http:// or https:// URL")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError("must not contain credentials, a query or a fragment")
    return url.rstrip("/")


def public_url_of(client: connection.Client, port: int | None = None) -> str:
    """The mirror's URL as this client reached it (on another of the mirror's ports with ``port``).

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
    return base_url(scheme, host, port or local_port)


def ip_of(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a host string names (IPv4-mapped IPv6 as IPv4, zone dropped), or None for a name."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


# hub_private_networks' default: loopback, RFC 1918, link-local and unique local addresses.
# An explicit list rather than ``not ipaddress.is_global``, whose "not global" also covers
# ranges behind which public clients sit: 6to4 (2002::/16), Teredo (2001::/32) and
# carrier-grade NAT (100.64.0.0/10).
DEFAULT_PRIVATE_NETWORKS = (
    "127.0.0.0/8", "::1/128",
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
    "169.254.0.0/16", "fe80::/10",
    "fc00::/7",
)
IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")  # such a client is matched as its IPv4 address


@dataclass(frozen=True)
class PrivateNetworks:
    """The client networks the operator calls private (``hub_private_networks``)."""

    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

    @classmethod
    def parse(cls, specs: Sequence[str]) -> PrivateNetworks:
        networks = []
        for spec in specs:
            try:
                network = ipaddress.ip_network(spec.strip())
            except ValueError as e:
                raise ValueError(f"{spec!r} is not a network in CIDR notation ({e})") from None
            if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(IPV4_MAPPED):
                raise ValueError(f"{spec!r}: IPv4-mapped clients are matched as IPv4, name the IPv4 network")
            networks.append(network)
        return cls(tuple(networks))

    def holds(self, client: connection.Client) -> bool:
        """The client connects from one of the networks (an IPv4-mapped address as its IPv4)."""
        address = ip_of(client.peername[0]) if client.peername else None
        return address is not None and any(address in network for network in self.networks)



def loopback_address(value: str) -> tuple[str, int]:
    """A loopback host and a port, e.g. 127.0.0.1:9464 (metrics are for a local scraper)."""
    host, _, port = value.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        number = int(port)
    except ValueError:
        loopback, number = False, -1
    if not loopback or not 0 < number < 65536:
        raise ValueError("expected a loopback host:port, e.g. 127.0.0.1:9464")
    return host, number
