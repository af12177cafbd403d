"""mitmproxy's per-connection log lines, shown only at debug verbosity.

mitmproxy's proxy server logs every client connection's start and end ("client
connect", "client disconnect"), its server connections, a head left unfinished
and more at INFO, the level mitmdump shows by default: a flood of 1,500
slowloris connections printed some 4,500 lines. The mirror's connection guard
already says what it closed, one line per cause and minute; these lines are
turned into DEBUG records, so mitmdump and mitmweb show them at
``termlog_verbosity=debug`` (``-v``), where an engineer debugging connections
wants them, and the operator's log keeps one line per cause. Which logger and
which lines: ``mitmseams/logs.py``.
"""

from __future__ import annotations

import logging

from .mitmseams.logs import PER_CONNECTION, SERVER_LOGGER


class PerConnectionLines(logging.Filter):
    """Demotes mitmproxy's INFO lines about single connections to DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO and record.getMessage().startswith(PER_CONNECTION):
            record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return True  # never dropped: handlers at debug level still show it


_FILTER = PerConnectionLines()


def install() -> None:
    logging.getLogger(SERVER_LOGGER).addFilter(_FILTER)  # once: adding the same filter again is a no-op


def uninstall() -> None:
    logging.getLogger(SERVER_LOGGER).removeFilter(_FILTER)
