"""Forward-proxy mode (``--mode regular``): registries are intercepted, other hosts pass through.

Requests for hosts in the upstream table get the mirror's handling (the
``HubRewrite`` addon). Anything else passes through untouched, TLS not
intercepted, so clients trust mitmproxy's CA only for registries; but only for
clients in ``hub_private_networks`` (an explicit list: loopback, RFC 1918,
link-local and unique local addresses by default), or for any client once
mitmproxy's ``proxyauth`` guards the proxy: mitm.conf turns ``block_global`` off
for the mirror, and a proxy that passes anything for anyone is an open proxy.
"""

from __future__ import annotations

from mitmproxy import connection, http, tls

from .admission import carries_body
from .clientconn import is_forward_proxy
from .debug.sideflows import is_side_flow
from .loopback import CLIENT_URL
from .registry.errors import RegistryError
from .responses import error_response, without_body_for_head


class ForwardProxy:
    def __init__(self, mirror_of) -> None:
        self.mirror_of = mirror_of  # -> the running Mirror (it changes with the options)

    def may_pass_through(self, client: connection.Client) -> bool:
        if self.mirror_of() is None:
            return False  # not running (its options stopped the start): nothing passes
        settings = self.mirror_of().settings
        return settings.proxy_passthrough and (settings.proxy_guarded or settings.private_networks.holds(client))

    def _served(self, host: str | None, port: int) -> bool:
        mirror = self.mirror_of()
        return bool(host) and mirror is not None and mirror.settings.registries.for_proxy_target(host, port) is not None

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        """TLS to a host outside the table is passed through, not intercepted."""
        client = data.context.client
        if not is_forward_proxy(client) or not self.may_pass_through(client):
            return  # intercepted: its requests are refused unless for a registry
        address = data.context.server.address
        port = address[1] if address else 443
        if not any(self._served(host, port) for host in (data.client_hello.sni, address[0] if address else None)):
            data.ignore_connection = True

    def http_connect(self, flow: http.HTTPFlow) -> None:
        if not self.may_pass_through(flow.client_conn) and not self._served(flow.request.host, flow.request.port):
            flow.response = _not_in_table()

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        """A request for a host outside the table, from a client that may not pass: refused
        before any byte of it goes anywhere (a body is drained by the mirror)."""
        if flow.response or flow.error or CLIENT_URL in flow.metadata or is_side_flow(flow) \
                or not is_forward_proxy(flow.client_conn):
            return  # answered, taken by the mirror (a registry), the mirror's own, or not a proxy flow
        if self.may_pass_through(flow.client_conn):
            return
        if self._served(flow.request.host, flow.request.port):
            return
        refusal = _not_in_table()
        if carries_body(flow.request):
            await self.mirror_of().loopback.start()
            self.mirror_of().loopback.park(flow, refusal)
        else:
            flow.response = without_body_for_head(flow.request.method, refusal)


def _not_in_table() -> http.Response:
    return error_response(RegistryError(403, "DENIED", "this proxy only serves the registries in its table"))
