"""Small formatting helpers shared by the debug views."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any


def plain(value: Any) -> str:
    """A value as one line of text: printable strings as they are, anything else
    (numbers, objects, "", strings with newlines or control characters) as JSON,
    so that a field's content can never break or fake the lines around it."""
    if isinstance(value, str) and value and value.isprintable():
        return value
    return json.dumps(value, ensure_ascii=False)


_UNITS = ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB"))


def size(n: int) -> str:
    """``528 B`` or ``2412544 B (2.3 MiB)``: exact bytes first, since that is what
    people compare with Content-Length and descriptors."""
    exact = f"{n} B"
    for scale, unit in _UNITS:
        if scale <= n < scale * 1024:
            return f"{exact} ({n / scale:.1f} {unit})"
    return exact


def utc(seconds: int | float) -> str:
    """Seconds since the epoch as an ISO 8601 UTC date; the number itself when out of range."""
    try:
        return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return str(seconds)
