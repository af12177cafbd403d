"""The log as JSON lines (``hub_log_format: json``), for journald or a log shipper.

Every line mitmdump prints becomes one JSON object: the mirror's own log
lines (a pull step's object carries the same facts as its text line, as
fields), mitmproxy's log lines, and the flow lines of mitmdump's dumper (still
redacted by ``debug/dumper_redaction.py``: the objects hold exactly the text the text form
would print). Only the line mitmproxy prints before it loads the addon
(``Loading script ...``) stays text.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import sys
import time

from mitmproxy.utils import human

from ..mitmseams import dumper, logs

HUB_FIELDS = "hub_fields"  # a log record's attribute (logging's ``extra``) with fields for the JSON form
TERMINAL_STYLE = re.compile(r"\x1b\[[0-9;]*m")  # the colours mitmproxy adds on a terminal


def unstyled(text: str) -> str:
    return TERMINAL_STYLE.sub("", text)


def _time(created: float) -> str:
    moment = datetime.datetime.fromtimestamp(created, datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def json_line(created: float, level: str, logger: str, message: str, **fields) -> str:
    entry = {"time": _time(created), "level": level, "logger": logger, "message": message, **fields}
    return json.dumps(entry, ensure_ascii=False, default=str)


class JsonLines(logging.Formatter):
    """A log record as one JSON object."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, object] = {}
        if address := logs.client_of(record):
            fields["client"] = human.format_address(address)  # the connection mitmproxy logs about
        fields.update(getattr(record, HUB_FIELDS, None) or {})
        if record.exc_info:
            fields["error"] = self.formatException(record.exc_info)
        message = unstyled(record.getMessage())
        return json_line(record.created, record.levelname.lower(), record.name, message, **fields)


def use(log_format: str) -> None:
    """Print the log as ``log_format`` ("text" or "json") from now on, a line at a time."""
    # A service's standard output is a pipe (journald, podman's log), which Python buffers in
    # blocks: lines would reach the log minutes late, or be lost with a killed process.
    if hasattr(sys.stdout, "reconfigure") and not sys.stdout.line_buffering:
        sys.stdout.reconfigure(line_buffering=True)
    if log_format == "json":
        logs.set_termlog_formatter(JsonLines())
        dumper.print_lines_as(_echo_json)
    else:
        logs.set_termlog_formatter(None)
        dumper.print_lines_as(None)


def _echo_json(text: str) -> str:
    """A flow line of mitmdump's dumper (already redacted) as a JSON object."""
    return json_line(time.time(), "info", "mitmproxy.dumper", unstyled(text).strip())
