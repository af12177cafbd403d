"""Token requests and answers, as a registry's token service speaks them.

Clients fetch tokens from the realm the mirror advertises (its own ``/token``).
The mirror sends them on to the realm it learned from the upstream's own
challenge, never to a URL the client names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .errors import RegistryError

FORM_TYPE = "application/x-www-form-urlencoded"
# A token form is a few hundred bytes; anything near this is not one.
MAX_FORM_BYTES = 64 * 1024

# Headers a token service needs; nothing else of the client's goes there.
TOKEN_REQUEST_HEADERS = frozenset({"authorization", "user-agent", "accept"})

Fields = list[tuple[str, str]]


def parse_form(body: bytes) -> Fields:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RegistryError(400, "UNSUPPORTED", "malformed token request: the form is not UTF-8") from e
    return parse_qsl(text, keep_blank_values=True)


def encode_form(fields: Fields) -> bytes:
    return urlencode(fields).encode()


def realm_url(realm: str, query: Fields) -> str:
    """The learned realm with the (rewritten) query appended to any it has."""
    parts = urlsplit(realm)
    existing = parse_qsl(parts.query, keep_blank_values=True)
    return urlunsplit(parts._replace(query=urlencode(existing + query)))


def token_request_headers(fields: Fields) -> Fields:
    return [(k, v) for k, v in fields if k.lower() in TOKEN_REQUEST_HEADERS]


def carries_credentials(form: Fields | None) -> bool:
    """Does a POST token form carry a password or a refresh token?"""
    values = dict(form or [])
    return bool(values.get("password") or values.get("refresh_token"))


def with_service(fields: Fields, service: str | None) -> Fields:
    """The upstream's own service name: a path-prefix client may have taken another registry's."""
    if not service:
        return fields
    return [(k, service if k == "service" else v) for k, v in fields]


@dataclass(frozen=True)
class Grant:
    """A token service's answer: the tokens it handed out and how long they live."""

    tokens: tuple[str, ...]  # "token" and "access_token" (often the same)
    refresh_token: str | None
    expires_in: float  # seconds; 60 when absent, as the distribution spec says


def parse_grant(body: bytes) -> Grant | None:
    try:
        grant = json.loads(body)
    except ValueError:
        return None
    if not isinstance(grant, dict):
        return None
    tokens = tuple(dict.fromkeys(v for k in ("token", "access_token") if isinstance(v := grant.get(k), str)))
    expires = grant.get("expires_in")
    expires_in = float(expires) if isinstance(expires, (int, float)) and expires > 0 else 60.0
    refresh = grant.get("refresh_token")
    return Grant(tokens, refresh if isinstance(refresh, str) else None, expires_in)


def without_refresh_token(body: bytes) -> bytes:
    """A grant without its refresh token (a long-lived credential of the account it was made for)."""
    try:
        grant = json.loads(body)
    except ValueError:
        return body
    if isinstance(grant, dict) and "refresh_token" in grant:
        del grant["refresh_token"]
        return json.dumps(grant).encode()
    return body
