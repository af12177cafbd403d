"""The proxy server's live client connections, and closing one from outside its layers.

Relies on: the proxyserver addon's ``connections`` (client id -> the
``ConnectionHandler`` serving it; mitmproxy's own message injection looks handlers
up there), a handler's ``client``, ``close_connection(connection)`` and
``transports`` (each connection's asyncio reader and writer).
Why: a hook can kill a flow (one request, or one HTTP/2 stream) or refuse a
connection in ``client_connected``; nothing public closes a client connection
later, which the mirror does to a client that sent nothing in time (guard.py) and
to one that resets HTTP/2 streams as fast as it opens them (connwork.py).
"""

from __future__ import annotations

from mitmproxy import connection, ctx


def handler_of(client: connection.Client):
    """The proxy server's ``ConnectionHandler`` of ``client``; None once it is gone."""
    proxyserver = ctx.master.addons.get("proxyserver")
    handler = proxyserver.connections.get(client.id) if proxyserver is not None else None
    return handler if handler is not None and handler.client is client else None


def close_client(client: connection.Client) -> bool:
    """Close a client connection now (its streams end with it); False if it is already gone.

    The handler stops reading at once; its socket is closed here too, as the handler, cancelled
    while it works through what it already read, may not get to close it itself."""
    handler = handler_of(client)
    if handler is None:
        return False
    handler.close_connection(client)
    transport = handler.transports.get(client)
    if transport is not None and transport.writer is not None:
        transport.writer.close()
    return True
