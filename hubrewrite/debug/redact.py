"""Flows with their secrets replaced by fingerprints: what logs and saved side flows show.

Anything that grants access becomes its fingerprint (``debug/fingerprint.py``):
``Authorization``/``Proxy-Authorization``/``Cookie`` values, a token form's
password or refresh token, the signature of a signed URL (a storage's, or the
blob listener's), the tokens of a token answer (a JWT keeps its header and
claims, readable, and loses its signature, which is what makes it a token).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from mitmproxy import http

from ..loopback import KEY_HEADER
from ..registry.headers import CREDENTIAL_HEADERS as SENT_CREDENTIALS
from .fingerprint import fingerprint

# what a client sends (never forwarded to a CDN), what a server sets, and the mirror's loopback key
CREDENTIAL_HEADERS = (*sorted(SENT_CREDENTIALS), "set-cookie", KEY_HEADER.lower())
# query parameters that sign a URL: S3/R2 (X-Amz-*), Cloudflare (verify), GCS, Azure (sig), the test CDN
_SIGNING_PARAM = re.compile(r"(?i)^(x-amz-|x-goog-)|^(signature|sig|verify|token|expires?|key-pair-id|policy|se|sp|sv)$")
_FORM_SECRETS = ("password", "refresh_token", "access_token", "token")
_GRANT_SECRETS = ("token", "access_token", "refresh_token", "id_token")


def redacted(flow: http.HTTPFlow) -> http.HTTPFlow:
    """A copy of the flow fit for a log: its messages copied, the rest shared (a log only
    reads it, and a whole ``flow.copy()`` serializes both connections, certificates included,
    for every flow)."""
    view = copy.copy(flow)
    view.request = flow.request.copy()
    view.response = flow.response.copy() if flow.response is not None else None
    return redact_flow(view)


def redact_flow(flow: http.HTTPFlow) -> http.HTTPFlow:
    """In place: the request's and the response's secrets."""
    redact_request(flow.request)
    if flow.response is not None:
        redact_headers(flow.response.headers)
        if "location" in flow.response.headers:
            flow.response.headers["location"] = redacted_url(flow.response.headers["location"])
        if flow.response.raw_content and _is_json(flow.response):
            flow.response.content = redacted_grant(flow.response.content)
    return flow


def redact_request(request: http.Request) -> None:
    """In place: a request whose credentials were used already (the record of a flow)."""
    redact_headers(request.headers)
    if request.query:
        request.query = _redacted_query(request.query.items(multi=True))
    if request.raw_content and "x-www-form-urlencoded" in request.headers.get("content-type", ""):
        fields = parse_qsl(request.get_text(strict=False) or "", keep_blank_values=True)
        request.text = urlencode([(k, fingerprint(v) if k in _FORM_SECRETS else v) for k, v in fields])


def redact_headers(headers: http.Headers) -> None:
    for name in CREDENTIAL_HEADERS:
        values = headers.get_all(name)
        if values:
            headers.set_all(name, [fingerprint(v) for v in values])


def redacted_url(url: str) -> str:
    parts = urlsplit(url)
    if not parts.query:
        return url
    query = _redacted_query(parse_qsl(parts.query, keep_blank_values=True))
    return urlunsplit(parts._replace(query=urlencode(query, safe="<>:")))


def _redacted_query(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, fingerprint(v) if _SIGNING_PARAM.search(k) else v) for k, v in pairs]


def redacted_grant(body: bytes) -> bytes:
    """A token answer with its tokens unusable; any other JSON as it is."""
    try:
        grant = json.loads(body)
    except ValueError:
        return body
    if not isinstance(grant, dict) or not any(k in grant for k in _GRANT_SECRETS):
        return body
    for key in _GRANT_SECRETS:
        if isinstance(grant.get(key), str):
            grant[key] = _unsigned(grant[key])
    return json.dumps(grant).encode()


def _unsigned(token: str) -> str:
    """A JWT without its signature keeps what it says (the content views decode it); anything else a fingerprint."""
    parts = token.split(".")
    if len(parts) == 3:
        return f"{parts[0]}.{parts[1]}.{fingerprint(parts[2])}"
    return fingerprint(token)


def _is_json(message: http.Message) -> bool:
    return "json" in message.headers.get("content-type", "")
