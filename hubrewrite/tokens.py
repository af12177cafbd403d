"""Token requests: what the mirror forwards to the upstream's token service.

Clients fetch tokens from the realm the mirror advertises (its own ``/token``).
The mirror sends them on to the realm it learned from the upstream's own
challenge, never to a URL the client names, with the client's credentials.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .names import rewrite_scope

FORM_TYPE = "application/x-www-form-urlencoded"

# Headers a token service needs; nothing else of the client's goes there.
TOKEN_REQUEST_HEADERS = frozenset({"authorization", "user-agent", "accept", "content-type"})


class TokenRequestError(ValueError):
    pass


def rewrite_query(query: list[tuple[str, str]], official_prefix: str) -> list[tuple[str, str]]:
    """GET form: every repeated ``scope`` is kept, each with the library/ rule applied."""
    return [
        (key, rewrite_scope(value, official_prefix) if key == "scope" else value)
        for key, value in query
    ]


def rewrite_form(body: bytes, official_prefix: str) -> bytes:
    """POST form (containerd, dockerd after login): ``scope`` is space-separated."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TokenRequestError("token request body is not UTF-8") from e
    fields = parse_qsl(text, keep_blank_values=True)
    rewritten = []
    for key, value in fields:
        if key == "scope":
            value = " ".join(rewrite_scope(s, official_prefix) for s in value.split(" ") if s)
        rewritten.append((key, value))
    return urlencode(rewritten).encode()


def realm_url(realm: str, query: list[tuple[str, str]]) -> str:
    """The learned realm with the client's (rewritten) query appended to any it has."""
    parts = urlsplit(realm)
    existing = parse_qsl(parts.query, keep_blank_values=True)
    return urlunsplit(parts._replace(query=urlencode(existing + query)))


def token_request_headers(fields: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in fields if k.lower() in TOKEN_REQUEST_HEADERS]


def carries_credentials(form: bytes | None) -> bool:
    """Does a POST token form carry a password or a refresh token?"""
    if not form:
        return False
    fields = dict(parse_qsl(form.decode("utf-8", "replace"), keep_blank_values=True))
    return bool(fields.get("password") or fields.get("refresh_token"))
