"""mitmproxy's log as the mirror reshapes it: the terminal log's formatter, and the proxy
server's lines about single connections.

Relies on: the ``TermLogHandler`` that mitmdump and mitmweb put on the root logger
(and ``MitmFormatter``, its own formatter); the logger ``mitmproxy.proxy.server``,
where each connection handler logs its connection's start and end and what its
layers report, at INFO, with the client's address in the record's ``client``
extra; and the wording of those messages.
Why: the terminal log has no option for its format (``hub_log_format: json``),
and no option quiets one kind of line: ``termlog_verbosity`` lowers them all.
"""

from __future__ import annotations

import logging

from mitmproxy import log as mitmlog
from mitmproxy.addons import termlog

# where mitmproxy.proxy.server's ConnectionHandler logs (its own lines and its layers')
SERVER_LOGGER = "mitmproxy.proxy.server"
# the start of each message about a single connection, as mitmproxy 12 words it
PER_CONNECTION = (
    "client connect",
    "client disconnect",
    "client kill connection",  # a client_connected hook refused it (the guard's connection limit)
    "server connect ",
    "server disconnect ",
    "Closing connection due to inactivity",
    "Client closed connection before completing request headers",
    "Client TLS handshake failed. The client disconnected during the handshake",
)


def set_termlog_formatter(formatter: logging.Formatter | None) -> None:
    """Put ``formatter`` on mitmproxy's terminal log (the ``TermLogHandler`` on the root logger, in
    mitmdump and mitmweb); None: mitmproxy's own ``MitmFormatter``, coloured as the handler's output allows."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, termlog.TermLogHandler):
            handler.setFormatter(formatter or mitmlog.MitmFormatter(handler.has_vt_codes))


def client_of(record: logging.LogRecord) -> tuple | None:
    """The address of the client connection a record of mitmproxy's proxy server is about
    (its ``client`` extra)."""
    return getattr(record, "client", None)
