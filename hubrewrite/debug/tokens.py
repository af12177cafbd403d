"""Plain-text summary of a token service's answer: what the token grants, never the token.

A JWT is shown as its decoded header and claims, without its signature (the
signature is what makes a token usable, so it never appears); opaque tokens
and refresh tokens appear only as fingerprints.
"""

from __future__ import annotations

import math
from typing import Any

from hubrewrite.debug.fingerprint import fingerprint
from hubrewrite.debug.text import plain, utc
from hubrewrite.registry import jwt

_TOKEN_FIELDS = ("token", "access_token")
# fields of a token answer that are not credentials and may be shown as they are
_PUBLIC_FIELDS = ("expires_in", "issued_at", "scope", "token_type")
_CLAIM_NAMES = {"iss": "issuer", "sub": "subject", "aud": "audience", "iat": "issued at",
                "nbf": "not before", "exp": "expires", "jti": "token id"}
_DATE_CLAIMS = ("iat", "nbf", "exp")


def is_token_answer(doc: Any) -> bool:
    return isinstance(doc, dict) and any(isinstance(doc.get(f), str) for f in _TOKEN_FIELDS)


def describe_answer(doc: Any) -> str | None:
    if not is_token_answer(doc):
        return None
    lines = ["Token answer", ""]
    tokens = [f for f in _TOKEN_FIELDS if isinstance(doc.get(f), str)]
    if len(tokens) == 2 and doc["token"] == doc["access_token"]:
        tokens = ["token"]
        lines.append("token and access_token are the same token")
    for field in tokens:
        lines += _token(field, doc[field])
    lines += [f"{f}: {plain(doc[f])}" for f in _PUBLIC_FIELDS if f in doc]
    # anything else (refresh_token, id_token, ...) may be a credential
    for field, value in doc.items():
        if field not in _TOKEN_FIELDS and field not in _PUBLIC_FIELDS:
            shown = fingerprint(value) if isinstance(value, str) else plain(value)
            lines.append(f"{plain(field)}: {shown}")
    return "\n".join(lines)


def _token(label: str, token: str) -> list[str]:
    decoded = jwt.decode(token)
    if decoded is None:
        return [f"{label}: opaque {fingerprint(token)}"]
    lines = [f"{label}: {fingerprint(token)}, signature not shown and not verified", "header:"]
    lines += [f"  {plain(k)}: {_header_value(k, v)}" for k, v in decoded.header.items()]
    lines.append("claims:")
    claims = decoded.claims
    for key, value in claims.items():
        if key == "access":
            lines += _access(value)
            continue
        name = f"{_CLAIM_NAMES[key]} ({key})" if key in _CLAIM_NAMES else plain(key)
        lines.append(f"  {name}: {_claim_value(key, value, claims)}")
    return lines


def _header_value(key: str, value: Any) -> str:
    if key == "x5c" and isinstance(value, list):
        return f"{len(value)} certificate(s), not shown"  # kilobytes of base64
    return plain(value)


def _claim_value(key: str, value: Any, claims: dict[str, Any]) -> str:
    if key == "sub" and value == "":
        return '"" (anonymous)'
    if key not in _DATE_CLAIMS or not _is_number(value):
        return plain(value)
    shown = f"{utc(value)} ({plain(value)})"
    if key == "exp" and _is_number(claims.get("iat")):
        shown += f", expires in {int(value - claims['iat'])} s (counted from iat)"
    return shown


def _access(access: Any) -> list[str]:
    """Docker's ``access`` claim as scope strings, ``type:name:actions``."""
    if not isinstance(access, list):
        return [f"  access: {plain(access)}"]
    lines = [f"  access ({len(access)}):"]
    for entry in access:
        if not isinstance(entry, dict):
            lines.append(f"    {plain(entry)}")
            continue
        actions = entry.get("actions")
        granted = ",".join(plain(a) for a in actions) if isinstance(actions, list) else plain(actions)
        note = "  (nothing granted)" if actions == [] else ""
        lines.append(f"    {plain(entry.get('type'))}:{plain(entry.get('name'))}:{granted}{note}")
    return lines


def _is_number(value: Any) -> bool:
    """An int or a finite float (Python's JSON parser accepts Infinity and NaN)."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))
