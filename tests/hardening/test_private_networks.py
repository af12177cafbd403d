"""Issue 17, item 6: who counts as a private client of the forward proxy.

The forward proxy passes traffic for hosts outside its table only for clients
in ``hub_private_networks`` (loopback, RFC 1918, link-local, unique local by
default). Python's ``ipaddress.is_global`` is no such list: on Python 3.13 it
calls 6to4 (2002::/16), Teredo (2001::/32) and carrier-grade NAT
(100.64.0.0/10) "not global", and clients there are anyone on the internet.

Here real clients in a network namespace (tests/support/netns.py) connect
from a 6to4, a Teredo, a CGNAT and a public IPv4 address and probe the proxy
for the ``evil`` canary (a loopback listener outside the table) every way a
proxy client names a host: ``CONNECT``, absolute-form ``GET`` and ``POST``,
origin-form with the canary in ``Host``. Each is refused 403 and the canary
never gets a connection. Clients on an RFC 1918 and a unique local address
still get their tunnel.
"""

from __future__ import annotations

import pytest

from tests.support.netns import PublicClient, available

from .helpers import assert_registry_error
from .setups import public_conn, public_proxy

PUBLIC = {
    "6to4": "2002:c000:204::5",
    "Teredo": "2001:0:4136:e378:8000:63bf:3fff:fdd2",
    "CGNAT": "100.64.7.9",
    "public IPv4": "192.88.99.7",
}
PRIVATE = {"RFC 1918": "172.31.7.9", "unique local": "fdc3:17:6::9"}


@pytest.fixture(scope="module")
def clients():
    problem = available()
    if problem:
        pytest.fail(f"this test needs a network namespace: {problem}")
    with PublicClient([*PUBLIC.values(), *PRIVATE.values()]) as client:
        yield client


@pytest.fixture(scope="module")
def proxy(clients, upstream, tmp_path_factory):
    """The forward proxy with the default hub_private_networks, on IPv4 and IPv6."""
    with public_proxy(clients, tmp_path_factory.mktemp("private-networks-proxy"), upstream, ipv6=True) as m:
        yield m


def probes(host: str) -> dict[str, bytes]:
    """Every way a proxy client names a host it wants reached (``host`` is host:port)."""
    return {
        "CONNECT": f"CONNECT {host} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode(),
        "absolute-form GET": f"GET http://{host}/ HTTP/1.1\r\nHost: {host}\r\n\r\n".encode(),
        "absolute-form POST": f"POST http://{host}/upload HTTP/1.1\r\nHost: {host}\r\n"
                              "Content-Length: 5\r\n\r\nhello".encode(),
        "origin-form, Host names it": f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode(),
    }


@pytest.mark.parametrize("network", list(PUBLIC))
def test_clients_of_public_networks_reach_only_the_registries(proxy, clients, evil, network):
    source = PUBLIC[network]
    before = len(evil.connections())
    answers = {}
    for probe, request in probes(evil.host).items():
        with public_conn(clients, proxy, source) as conn:
            conn.send(request)
            answers[probe] = conn.read_response("CONNECT" if probe == "CONNECT" else "GET")
            if probe == "CONNECT" and answers[probe].status == 200:
                conn.send(b"through the tunnel")
    reached = evil.connections()[before:]
    assert reached == [], f"a client at {source} ({network}) reached a host outside the table: {reached}"
    for probe, resp in answers.items():
        err = assert_registry_error(resp, (403,), f"{probe} from {source} ({network})")
        assert err["code"] == "DENIED", err


@pytest.mark.parametrize("network", list(PRIVATE))
def test_clients_of_private_networks_pass_through(proxy, clients, evil, network):
    source = PRIVATE[network]
    before = len(evil.connections())
    with public_conn(clients, proxy, source) as conn:
        conn.send(probes(evil.host)["CONNECT"])
        resp = conn.read_response("CONNECT")
        assert resp.status == 200, f"CONNECT from {source} ({network}): {resp.short()}"
        conn.send(b"through the tunnel")
        reached = _wait_for(evil, before + 1)
    assert reached[before:] and reached[before][1] == b"through the tunnel", reached[before:]


def _wait_for(evil, count: int, attempts: int = 20) -> list:
    reached = evil.connections()
    while len(reached) < count and attempts:
        attempts -= 1
        reached = evil.connections()
    return reached
