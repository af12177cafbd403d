"""A client on a public address: a network namespace joined to this host by a veth pair.

The mirror treats clients on private or loopback addresses differently from
the rest of the internet (forward-proxy pass-through is for them only), so a
test of what a public client may do needs a connection whose source address is
really global, not a faked peername. ``PublicClient`` makes one with iproute2
(root only):

    with PublicClient() as client:
        Mirror(..., listen_host=client.host_address)   # reachable from the namespace
        sock = client.connect((client.host_address, port))  # source: client.address

The namespace holds one address, ``192.88.99.N``: globally routable as far as
``ipaddress.is_global`` (and so the mirror) can tell, from the 6to4 relay anycast
block that RFC 7526 retired, so routing it here for a few seconds cannot take
anything from anyone. The host side gets a /32 on its veth end, and a route to
the client's /32 through it; both go when the veth pair is deleted. Nothing
leaves the machine: the namespace has no other link.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import threading
from pathlib import Path


class NetnsError(RuntimeError):
    pass


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if result.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def available() -> str:
    """'' when namespaces can be made here, else why not."""
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    return ""


class PublicClient:
    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        a, b = secrets.randbelow(250) + 1, secrets.randbelow(250) + 1
        self.name = f"hubpub-{tag}"
        self.host_if, self.client_if = f"hp{tag}h", f"hp{tag}c"
        self.host_address = f"10.{a}.{b}.1"  # this host's end: listen here
        self.address = f"192.88.99.{secrets.randbelow(250) + 2}"  # the client's public source address
        self._made = False

    def __enter__(self) -> PublicClient:
        problem = available()
        if problem:
            raise NetnsError(problem)
        _ip("netns", "add", self.name)
        self._made = True
        try:
            _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.client_if, "netns", self.name)
            _ip("addr", "add", f"{self.host_address}/32", "dev", self.host_if)
            _ip("link", "set", self.host_if, "up")
            _ip("route", "add", f"{self.address}/32", "dev", self.host_if)
            _ip("-n", self.name, "addr", "add", f"{self.address}/32", "dev", self.client_if)
            _ip("-n", self.name, "link", "set", self.client_if, "up")
            _ip("-n", self.name, "route", "add", f"{self.host_address}/32", "dev", self.client_if)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if not self._made:
            return
        self._made = False
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, timeout=10)  # takes the route too
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)

    def connect(self, address: tuple[str, int], timeout: float = 15.0) -> socket.socket:
        """A TCP connection made from inside the namespace, from the public address.

        A socket belongs to the namespace it was created in, and setns() moves
        only the calling thread: a short-lived thread makes it, this one uses it.
        """
        made: list[socket.socket | BaseException] = []

        def inside() -> None:
            try:
                with open(Path("/run/netns") / self.name) as ns:
                    os.setns(ns.fileno(), os.CLONE_NEWNET)
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                try:
                    s.settimeout(timeout)
                    s.bind((self.address, 0))
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
