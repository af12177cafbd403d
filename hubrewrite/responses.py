"""The answers the mirror makes itself, as mitmproxy responses.

Every one is framed here (its ``Content-Length``) and registry errors get
``{"errors":[{"code":...,"message":...}]}``, so a client always gets a body it
can show its user, never a traceback or an HTML page.
"""

from __future__ import annotations

import json
import time

from mitmproxy import http

from .registry.challenge import Challenge
from .registry.errors import RegistryError, error_body
from .registry.headers import encode_fields, without

API_VERSION_HEADER = ("Docker-Distribution-API-Version", "registry/2.0")
JSON_TYPE = ("Content-Type", "application/json; charset=utf-8")
CORS_HEADERS = [
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Expose-Headers", "*"),
]
PREFLIGHT_HEADERS = [
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Allow-Methods", "GET,POST,PUT,PATCH,TRACE,DELETE,HEAD,OPTIONS"),
    ("Access-Control-Allow-Headers", "*"),
    ("Access-Control-Max-Age", "1728000"),
]
CACHE_HEADER = "X-Hub-Cache"  # hit, miss or stale
SOURCE_HEADER = "X-Hub-Source"  # the URL of the registry that resolved a manifest (hub_upstreams may list several)
STALE_HEADERS = [(CACHE_HEADER, "stale"), ("Warning", '110 hub-rewrite "Response is Stale"')]


def make_response(
    status: int, headers: list[tuple[str, str]], body: bytes = b"", content_length: int | None = None
) -> http.Response:
    """A response with exactly these headers and raw body, and its Content-Length.

    ``content_length`` is for answers to HEAD, which carry the length of what a
    GET would return. (``Response.make`` would also touch the headers, which is
    wrong for bodies still carrying their Content-Encoding.)
    """
    length = len(body) if content_length is None else content_length
    fields = without(headers, ["content-length"]) + [("Content-Length", str(length))]
    now = time.time()
    return http.Response(b"HTTP/1.1", status, b"", http.Headers(encode_fields(fields)), body, None, now, now)


def error_response(error: RegistryError, headers: list[tuple[str, str]] = ()) -> http.Response:
    return make_response(error.status, [JSON_TYPE, API_VERSION_HEADER, *headers], error.body())


def json_response(status: int, document: object, headers: list[tuple[str, str]] = ()) -> http.Response:
    return make_response(status, [JSON_TYPE, *headers], json.dumps(document).encode())


def bearer_challenge(params: dict[str, str], message: str, headers: list[tuple[str, str]] = ()) -> http.Response:
    """401 UNAUTHORIZED pointing the client at a token endpoint (the mirror's)."""
    challenge = ("WWW-Authenticate", Challenge("Bearer", params).format())
    return make_response(401, [challenge, JSON_TYPE, API_VERSION_HEADER, *headers], error_body("UNAUTHORIZED", message))


def without_body_for_head(method: str, response: http.Response) -> http.Response:
    """An answer to HEAD has no body (its Content-Length still says what a GET would get):
    a body here would be read as the start of the next response on the connection."""
    if method == "HEAD" and response.raw_content:
        response.data.content = b""
    return response


def add_missing(response: http.Response, fields: list[tuple[str, str]]) -> None:
    for name, value in fields:
        if name not in response.headers:
            response.headers[name] = value
