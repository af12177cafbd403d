"""connection_log: mitmproxy's per-connection INFO lines become DEBUG records; nothing else changes."""

from __future__ import annotations

import logging

import pytest

from hubrewrite import connection_log
from hubrewrite.mitmseams.logs import SERVER_LOGGER


@pytest.fixture
def records():
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record)

    logger = logging.getLogger(SERVER_LOGGER)
    handler, level = Keep(logging.DEBUG), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    connection_log.install()
    yield logger, seen
    connection_log.uninstall()
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_per_connection_lines_are_debug_records(records):
    logger, seen = records
    logger.info("client connect", extra={"client": ("127.0.0.1", 5)})
    logger.info("server connect %s", "127.0.0.1:8080")
    logger.info("Client closed connection before completing request headers: b'GET /'")
    logger.info("error establishing server connection: refused")  # about the upstream: kept
    logger.warning("client disconnect")  # not mitmproxy's INFO line: kept as it is
    assert [(r.levelname, r.getMessage()[:20]) for r in seen] == [
        ("DEBUG", "client connect"), ("DEBUG", "server connect 127.0"), ("DEBUG", "Client closed connec"),
        ("INFO", "error establishing s"), ("WARNING", "client disconnect")]


def test_uninstalled_nothing_is_demoted(records):
    logger, seen = records
    connection_log.uninstall()
    logger.info("client connect")
    assert seen[-1].levelname == "INFO"
