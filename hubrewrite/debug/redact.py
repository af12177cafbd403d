"""Flows with their secrets replaced by fingerprints: what logs, mitmweb and saved flows show.

Anything that grants access becomes its fingerprint (``debug/fingerprint.py``):
``Authorization``/``Proxy-Authorization``/``Cookie`` values, a token form's
password or refresh token, the signature of a signed URL (a storage's, or the
blob listener's), the tokens of a token answer (a JWT keeps its header and
claims, readable, and gets its fingerprint's digits as signature, so it still
decodes and is never usable), the password mitmproxy's ``proxyauth`` keeps in
``flow.metadata``. Bodies are read whatever their ``Content-Type`` says (token
services differ) and their ``Content-Encoding`` (one that cannot be decoded is
left as it is, never an exception). Redacting twice changes nothing.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from mitmproxy import http

from ..mitmseams import proxyauth
from ..registry.headers import CREDENTIAL_HEADERS as SENT_CREDENTIALS
from ..registry import jwt
from .fingerprint import fingerprint, unsigned_jwt

# what a client sends (never forwarded to a CDN) and what a server sets
CREDENTIAL_HEADERS = (*sorted(SENT_CREDENTIALS), "set-cookie")
# query parameters that sign a URL: S3/R2 (X-Amz-*), Cloudflare (verify), GCS, Azure (sig), the test CDN
_SIGNING_PARAM = re.compile(r"(?i)^(x-amz-|x-goog-)|^(signature|sig|verify|token|expires?|key-pair-id|policy|se|sp|sv)$")
_FORM_SECRETS = ("password", "refresh_token", "access_token", "token")
_GRANT_SECRETS = ("token", "access_token", "refresh_token", "id_token")
MAX_READ_BODY = 64 * 1024  # token answers and forms are small; a larger body is none of them


def redacted(flow: http.HTTPFlow) -> http.HTTPFlow:
    """A copy of the flow fit for a log: its messages copied, the rest shared (a log only
    reads it, and a whole ``flow.copy()`` serializes both connections, certificates included,
    for every flow)."""
    view = copy.copy(flow)
    view.metadata = dict(flow.metadata)
    view.request = flow.request.copy()
    view.response = flow.response.copy() if flow.response is not None else None
    return redact_flow(view)


def redact_flow(flow: http.HTTPFlow) -> http.HTTPFlow:
    """In place: the request's and the response's secrets."""
    redact_request(flow.request)
    if flow.response is not None:
        redact_response(flow.response)
    redact_metadata(flow)
    return flow


def redact_request(request: http.Request) -> None:
    """In place: a request whose credentials were used already (the record of a flow)."""
    redact_headers(request.headers)
    pairs = list(request.query.items(multi=True))
    if any(_SIGNING_PARAM.search(k) for k, _ in pairs):  # else the query stays as the client wrote it
        request.query = _redacted_query(pairs)
    body = _readable_body(request)
    if body:
        # a token form, whatever its Content-Type says (the token endpoint reads it regardless)
        fields = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
        if any(k in _FORM_SECRETS for k, _ in fields):
            request.content = urlencode([(k, fingerprint(v) if k in _FORM_SECRETS else v) for k, v in fields]).encode()


def redact_response(response: http.Response) -> None:
    """In place: credential headers, a signed ``Location``, the tokens of a token answer."""
    redact_headers(response.headers)
    if "location" in response.headers:
        response.headers["location"] = redacted_url(response.headers["location"])
    body = _readable_body(response)
    if body and body.lstrip().startswith(b"{"):
        redacted = redacted_grant(body)
        if redacted is not body:
            response.content = redacted


def redact_metadata(flow: http.HTTPFlow) -> None:
    """mitmproxy's proxyauth keeps the proxy password it accepted in ``flow.metadata``,
    which saved flows (``-w``, mitmweb's /flows/dump) keep too."""
    accepted = proxyauth.accepted_login(flow)
    if accepted is not None:
        proxyauth.replace_accepted_password(flow, fingerprint(accepted[1]))


def carries_credential(response: http.Response) -> bool:
    """Would the record of this answer differ from it (a token answer, a signed ``Location``)?"""
    shown = response.copy()
    redact_response(shown)
    return shown.headers.fields != response.headers.fields or shown.raw_content != response.raw_content


def redact_headers(headers: http.Headers) -> None:
    for name in CREDENTIAL_HEADERS:
        values = headers.get_all(name)
        if values:
            headers.set_all(name, [fingerprint(v) for v in values])


def redacted_url(url: str) -> str:
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    if not any(_SIGNING_PARAM.search(k) for k, _ in pairs):
        return url
    return urlunsplit(parts._replace(query=urlencode(_redacted_query(pairs), safe="<>:")))


def _redacted_query(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, fingerprint(v) if _SIGNING_PARAM.search(k) else v) for k, v in pairs]


def redacted_grant(body: bytes) -> bytes:
    """A token answer with its tokens unusable; any other body (the same object) as it is."""
    try:
        grant = json.loads(body)
    except (ValueError, RecursionError):
        return body
    if not isinstance(grant, dict) or not any(isinstance(grant.get(k), str) for k in _GRANT_SECRETS):
        return body
    shown = {k: _unusable(v) if k in _GRANT_SECRETS and isinstance(v, str) else v for k, v in grant.items()}
    return body if shown == grant else json.dumps(shown).encode()


def _unusable(token: str) -> str:
    """A JWT keeps what it says (the content views decode it), with its fingerprint's digits
    for a signature; anything else becomes its fingerprint."""
    if jwt.decode(token) is not None:
        return unsigned_jwt(token)
    return fingerprint(token)


def _readable_body(message: http.Message) -> bytes | None:
    """The decoded body if it is small enough to be a form or a token answer; None otherwise.
    An encoding that cannot be decoded gives the raw bytes (``get_content(strict=False)``)."""
    raw = message.raw_content
    if not raw or len(raw) > MAX_READ_BODY:
        return None
    body = message.get_content(strict=False)
    return body if body and len(body) <= MAX_READ_BODY else None
