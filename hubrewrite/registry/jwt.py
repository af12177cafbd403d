"""Read a compact JWS (the JWTs registry token services issue) without verifying it.

The mirror only reads tokens (what they grant, when they expire); checking the
signature is the registry's job, so there is no key handling here.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from dataclasses import dataclass
from typing import Any

# base64url without padding, as RFC 7515 section 2 requires
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


@dataclass(frozen=True)
class Jws:
    header: dict[str, Any]
    claims: dict[str, Any]

    @property
    def expires_at(self) -> int | None:
        """``exp`` in seconds since the epoch, or None when absent or not a finite number."""
        exp = self.claims.get("exp")
        if isinstance(exp, bool):
            return None
        if isinstance(exp, int):
            return exp
        # Python's JSON parser also reads Infinity and NaN
        return int(exp) if isinstance(exp, float) and math.isfinite(exp) else None


def decode(token: str) -> Jws | None:
    """Header and claims of ``token``; None for anything that is not a compact JWS
    with a JSON-object header naming an ``alg`` and a JSON-object payload."""
    if not isinstance(token, str):
        return None
    parts = token.strip().split(".")
    if len(parts) != 3 or not all(_B64URL.fullmatch(p) for p in parts):
        return None
    header, claims = _json_object(parts[0]), _json_object(parts[1])
    if header is None or claims is None or not isinstance(header.get("alg"), str):
        return None
    return Jws(header, claims)


def _json_object(part: str) -> dict[str, Any] | None:
    try:
        raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None
