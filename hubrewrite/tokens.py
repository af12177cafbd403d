"""Token requests: what the mirror forwards to the upstream's token service.

Clients fetch tokens from the realm the mirror advertises (its own ``/token``).
The mirror sends them on to the realm it learned from the upstream's own
challenge, never to a URL the client names, with the client's credentials.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from collections.abc import Callable

from .names import scope_name

FORM_TYPE = "application/x-www-form-urlencoded"

# Headers a token service needs; nothing else of the client's goes there.
TOKEN_REQUEST_HEADERS = frozenset({"authorization", "user-agent", "accept", "content-type"})


class TokenRequestError(ValueError):
    pass


ScopeMap = Callable[[str], str]


def rewrite_query(query: list[tuple[str, str]], scope_map: ScopeMap) -> list[tuple[str, str]]:
    """GET form: every repeated ``scope`` is kept, each mapped to the upstream's
    names; a scope mapped to "" is dropped."""
    mapped = [(key, scope_map(value) if key == "scope" else value) for key, value in query]
    return [(key, value) for key, value in mapped if key != "scope" or value]


def parse_form(body: bytes) -> list[tuple[str, str]]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TokenRequestError("token request body is not UTF-8") from e
    return parse_qsl(text, keep_blank_values=True)


def rewrite_form(fields: list[tuple[str, str]], scope_map: ScopeMap) -> list[tuple[str, str]]:
    """POST form (containerd, dockerd after login): ``scope`` is space-separated."""
    rewritten = []
    for key, value in fields:
        if key == "scope":
            value = " ".join(m for m in (scope_map(s) for s in value.split(" ") if s) if m)
            if not value:
                continue
        rewritten.append((key, value))
    return rewritten


def encode_form(fields: list[tuple[str, str]]) -> bytes:
    return urlencode(fields).encode()


def scope_names(fields: list[tuple[str, str]]) -> list[str]:
    """Repository names of every scope in a query or form (``scope`` may hold several)."""
    found = []
    for key, value in fields:
        if key == "scope":
            found += [n for n in (scope_name(s) for s in value.split(" ") if s) if n is not None]
    return found


def realm_url(realm: str, query: list[tuple[str, str]]) -> str:
    """The learned realm with the client's (rewritten) query appended to any it has."""
    parts = urlsplit(realm)
    existing = parse_qsl(parts.query, keep_blank_values=True)
    return urlunsplit(parts._replace(query=urlencode(existing + query)))


def token_request_headers(fields: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in fields if k.lower() in TOKEN_REQUEST_HEADERS]


def carries_credentials(form: list[tuple[str, str]] | None) -> bool:
    """Does a POST token form carry a password or a refresh token?"""
    fields = dict(form or [])
    return bool(fields.get("password") or fields.get("refresh_token"))
