"""A client on a public address: a network namespace joined to this host by a veth pair.

The mirror treats clients on private or loopback addresses differently from
the rest of the internet (forward-proxy pass-through is for them only), so a
test of what a public client may do needs a connection whose source address is
really global, not a faked peername. ``PublicClient`` makes one with iproute2
(root only):

    with PublicClient() as client:
        Mirror(..., listen_host=client.host_address)   # reachable from the namespace
        sock = client.connect((client.host_address, port))  # source: client.address

By default the namespace holds one address, ``192.88.99.N``: outside every
private network, from the 6to4 relay anycast block that RFC 7526 retired, so
routing it here for a few seconds cannot take anything from anyone. The host
side gets a /32 on its veth end, and a route to the client's /32 through it;
both go when the veth pair is deleted. Nothing leaves the machine: the
namespace has no other link.

A test may choose the client's addresses, IPv4 or IPv6, several at once
(``PublicClient(["2002:c000:204::5", "100.64.7.9"])``) and connect from any of
them (``connect(address, source=...)``). With an IPv6 client address the host
end also gets an IPv6 address, ``host_address6`` (a unique local /128), to
listen on. IPv6 addresses are added without duplicate address detection, so
they work at once.
"""

from __future__ import annotations

import os
import ipaddress
import secrets
import shutil
import socket
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path


class NetnsError(RuntimeError):
    pass


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if result.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def _host_prefix(address: str) -> str:
    return "32" if ipaddress.ip_address(address).version == 4 else "128"


def _nodad(address: str) -> list[str]:
    """IPv6 addresses usable at once (duplicate address detection would hold them for a second)."""
    return ["nodad"] if ipaddress.ip_address(address).version == 6 else []


def available() -> str:
    """'' when namespaces can be made here, else why not."""
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    return ""


class PublicClient:
    def __init__(self, addresses: Sequence[str] | None = None) -> None:
        tag = secrets.token_hex(3)
        a, b = secrets.randbelow(250) + 1, secrets.randbelow(250) + 1
        self.name = f"hubpub-{tag}"
        self.host_if, self.client_if = f"hp{tag}h", f"hp{tag}c"
        self.host_address = f"10.{a}.{b}.1"  # this host's end: listen here
        self.host_address6 = f"fd{tag[:2]}:{tag[2:]}:{a:x}::1"  # its IPv6 end, for IPv6 clients
        # the client's source addresses; the first is the default
        self.addresses = list(addresses or [f"192.88.99.{secrets.randbelow(250) + 2}"])
        self.address = self.addresses[0]
        self._made = False

    def _has_ipv6(self) -> bool:
        return any(ipaddress.ip_address(a).version == 6 for a in self.addresses)

    def __enter__(self) -> PublicClient:
        problem = available()
        if problem:
            raise NetnsError(problem)
        _ip("netns", "add", self.name)
        self._made = True
        try:
            _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.client_if, "netns", self.name)
            _ip("link", "set", self.host_if, "up")
            _ip("-n", self.name, "link", "set", self.client_if, "up")
            self._host_end(self.host_address)
            if self._has_ipv6():
                self._host_end(self.host_address6)
            for address in self.addresses:
                prefix = _host_prefix(address)
                _ip("-n", self.name, "addr", "add", f"{address}/{prefix}", "dev", self.client_if, *_nodad(address))
                _ip("route", "add", f"{address}/{prefix}", "dev", self.host_if)
        except BaseException:
            self.close()
            raise
        return self

    def _host_end(self, address: str) -> None:
        """An address on this host's end, and the namespace's route to it."""
        _ip("addr", "add", f"{address}/{_host_prefix(address)}", "dev", self.host_if, *_nodad(address))
        _ip("-n", self.name, "route", "add", f"{address}/{_host_prefix(address)}", "dev", self.client_if)

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if not self._made:
            return
        self._made = False
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, timeout=10)  # takes the routes too
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)

    def connect(self, address: tuple[str, int], timeout: float = 15.0, source: str | None = None) -> socket.socket:
        """A TCP connection made from inside the namespace, from ``source`` (default: the first address).

        A socket belongs to the namespace it was created in, and setns() moves
        only the calling thread: a short-lived thread makes it, this one uses it.
        """
        source = source or self.address
        family = socket.AF_INET6 if ipaddress.ip_address(source).version == 6 else socket.AF_INET
        made: list[socket.socket | BaseException] = []

        def inside() -> None:
            try:
                with open(Path("/run/netns") / self.name) as ns:
                    os.setns(ns.fileno(), os.CLONE_NEWNET)
                s = socket.socket(family, socket.SOCK_STREAM)
                try:
                    s.settimeout(timeout)
                    s.bind((source, 0))
                    s.connect(address)
                except BaseException:
                    s.close()
                    raise
                made.append(s)
            except BaseException as e:  # handed to the caller's thread
                made.append(e)

        thread = threading.Thread(target=inside, name=f"netns-{self.name}")
        thread.start()
        thread.join(timeout + 5)
        if not made:
            raise NetnsError(f"no connection to {address} from {self.name} within {timeout}s")
        if isinstance(made[0], BaseException):
            raise made[0]
        return made[0]
