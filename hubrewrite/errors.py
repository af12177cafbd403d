"""Registry-style error responses: ``{"errors":[{"code":...,"message":...}]}``.

Every answer the mirror makes up itself goes through here, so a client always
gets a JSON body it can show its user, never a traceback or an HTML page.
"""

from __future__ import annotations

import json
import time

from mitmproxy import http

from .headers import encode_fields

API_VERSION_HEADER = ("Docker-Distribution-API-Version", "registry/2.0")


def error_body(code: str, message: str, detail: object | None = None) -> bytes:
    error: dict[str, object] = {"code": code, "message": message}
    if detail is not None:
        error["detail"] = detail
    return json.dumps({"errors": [error]}).encode()


def error_response(
    status: int,
    code: str,
    message: str,
    detail: object | None = None,
    extra_headers: list[tuple[str, str]] | None = None,
) -> http.Response:
    headers = [
        ("Content-Type", "application/json; charset=utf-8"),
        API_VERSION_HEADER,
        *(extra_headers or []),
    ]
    body = error_body(code, message, detail)
    return make_response(status, [*headers, ("Content-Length", str(len(body)))], body)


def make_response(
    status: int,
    headers: list[tuple[str, str]],
    body: bytes,
) -> http.Response:
    """A response with exactly these headers and raw body.

    ``Response.make`` would rewrite Content-Length to the body's length, which
    is wrong for HEAD (Content-Length is the size of what a GET would return)
    and for bodies still carrying their Content-Encoding.
    """
    now = time.time()
    return http.Response(
        b"HTTP/1.1",
        status,
        b"",
        http.Headers(encode_fields(headers)),
        body,
        None,
        now,
        now,
    )
