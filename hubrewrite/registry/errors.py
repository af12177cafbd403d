"""The one error type of the mirror: what it refuses or fails to do, as the registry API says it."""

from __future__ import annotations

import json


class RegistryError(Exception):
    """A status, a distribution error code (``NAME_INVALID``, ``UNAUTHORIZED``, ...) and a message.

    Raised by routing, sign-in, the upstream client and the paths alike; the
    addon turns it into ``{"errors":[{"code":...,"message":...}]}`` once.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def body(self) -> bytes:
        return error_body(self.code, self.message)


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"errors": [{"code": code, "message": message}]}).encode()
