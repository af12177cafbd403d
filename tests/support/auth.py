"""Authorization header values the tests send, built the way clients build them."""

from __future__ import annotations

import base64


def basic(user: str, password: str) -> str:
    """``Basic`` credentials (RFC 7617), as docker, skopeo and curl send them."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
