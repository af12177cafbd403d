"""Mirror set-ups the hardening tests of issue 9 share: mirror accounts, a
forward proxy on a public client's network, and what the upstream holds
afterwards (the proof that an attack had no effect)."""

from __future__ import annotations

import secrets
import socket
from pathlib import Path
from urllib.parse import urlsplit

import bcrypt
import httpx

from tests.support.common import read_log
from tests.support.mirror import Mirror
from tests.support.netns import PublicClient

from .helpers import SERVICE
from .wire import Conn

PROXY_REGISTRY = "hub.test"  # a registry name in the proxy's table that no DNS resolves
LOCAL_REGISTRY = "localhost"  # one that resolves (to loopback): a tunnel to it would really connect


def users_file(base: Path, *users: str) -> tuple[Path, dict[str, str]]:
    """An htpasswd-style file of bcrypt hashes for ``users`` with random passwords."""
    passwords = {u: f"{u}-" + secrets.token_urlsafe(10) for u in users}
    path = base / "users.htpasswd"
    path.write_text("".join(f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=4)).decode()}\n"
                            for u, p in passwords.items()))
    return path, passwords


def mirror_token(mirror_url: str, user: str, password: str, scope: str, path: str = "/token",
                 headers: dict[str, str] | None = None) -> str:
    """A token the mirror's token endpoint issued to one of its users."""
    r = httpx.get(f"{mirror_url}{path}", params={"service": SERVICE, "scope": scope}, auth=(user, password),
                  headers=headers, timeout=15)
    assert r.status_code == 200, r.text
    return r.json()["token"]


def public_proxy(client: PublicClient, workdir: Path, upstream, *settings: str, ipv6: bool = False) -> Mirror:
    """A forward proxy (not started) listening on this host's end of ``client``'s veth pair,
    serving the upstream as ``hub.test`` and as ``localhost``. With ``ipv6`` it also listens
    on the IPv6 end, at ``proxy.port6``."""
    args = ["--set", f"hub_upstreams={PROXY_REGISTRY}={upstream.api_url}",
            "--set", f"hub_upstreams={LOCAL_REGISTRY}={upstream.api_url}"]
    for setting in settings:
        args += ["--set", setting]
    port6 = 0
    if ipv6:
        with socket.socket(socket.AF_INET6) as s:
            s.bind((client.host_address6, 0))
            port6 = s.getsockname()[1]
        args += ["--mode", f"regular@{client.host_address6}:{port6}"]  # no brackets: mitmproxy splits at the last ':'
    proxy = Mirror(workdir, "", mode="regular", upstream_ca=upstream.ca_cert, listen_host=client.host_address,
                   extra_args=args)
    proxy.port6 = port6
    return proxy


def public_conn(client: PublicClient, proxy: Mirror, source: str | None = None) -> Conn:
    """A connection to ``proxy`` (a ``public_proxy``) from the public client's address (or ``source``,
    one of its addresses: an IPv6 one connects to the proxy's IPv6 listener)."""
    if source is not None and ":" in source:
        return Conn(client.connect((client.host_address6, proxy.port6), source=source))
    return Conn(client.connect((proxy.listen_host, proxy.port), source=source))


def registry_has_manifest(upstream, repo: str, reference: str) -> bool:
    """Asked of distribution itself, as admin: does ``repo`` hold ``reference``?"""
    token = upstream.get_token(f"repository:{repo}:pull", user="admin")
    r = httpx.head(f"{upstream.registry_url}/v2/{repo}/manifests/{reference}", timeout=15,
                   headers={"Authorization": f"Bearer {token}", "Accept": "application/vnd.oci.image.manifest.v1+json"})
    return r.status_code == 200


def registry_has_blob(upstream, repo: str, digest: str) -> bool:
    token = upstream.get_token(f"repository:{repo}:pull", user="admin")
    r = httpx.head(f"{upstream.registry_url}/v2/{repo}/blobs/{digest}", timeout=15,
                   headers={"Authorization": f"Bearer {token}"})
    return r.status_code in (200, 307)


def upload_session(upstream, repo: str, token: str) -> str:
    """Start a blob upload at distribution directly: the session's path and query."""
    r = httpx.post(f"{upstream.registry_url}/v2/{repo}/blobs/uploads/", timeout=15,
                   headers={"Authorization": f"Bearer {token}", "Content-Length": "0"})
    assert r.status_code == 202, r.text
    location = urlsplit(r.headers["location"])
    return f"{location.path}?{location.query}" if location.query else location.path


def upstream_saw(upstream, since: tuple[int, int], marker: str) -> list[str]:
    """Edge records and distribution log lines naming ``marker`` since ``since`` (see ``log_marks``)."""
    edge = [f"edge: {r.get('method')} {r.get('path')}" for r in upstream.edge_requests()[since[0]:]
            if marker in r.get("path", "")]
    registry = [f"registry: {line[:200]}" for line in read_log(upstream.registry_log_path)[since[1]:].splitlines() if marker in line]
    return edge + registry


def log_marks(upstream) -> tuple[int, int]:
    return len(upstream.edge_requests()), len(read_log(upstream.registry_log_path))
