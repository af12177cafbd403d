"""Non-secret stand-ins for credentials shown to people (logs, mitmweb views).

``fingerprint("Bearer eyJ...")`` gives ``Bearer <hmac:1a2b3c4d5e6f>``: the kind
of credential and 12 hex digits of an HMAC-SHA256 of it. The HMAC key is random
per process, because a plain hash of a weak password can be reversed by trying
candidates; within one process (one mitmweb session) the same credential always
gets the same digits, so a token in a token answer can be matched with the
``Authorization: Bearer`` header that later carries it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

from hubrewrite.registry import jwt

_KEY = secrets.token_bytes(32)
_DIGITS = 12
_MAX_USER_SHOWN = 64


def fingerprint(secret: str | bytes) -> str:
    """``<kind> <hmac:hex>``; the kind is Bearer, ``Basic user=NAME``, JWT or nothing."""
    text = secret.decode("utf-8", "replace") if isinstance(secret, bytes) else secret
    scheme, _, credential = text.strip().partition(" ")
    credential = credential.strip()
    if scheme.lower() == "bearer" and credential:
        return f"Bearer {_digest(credential)}"
    if scheme.lower() == "basic" and credential:
        user = _basic_user(credential)
        kind = f"Basic user={user}" if user else "Basic"
        return f"{kind} {_digest(credential)}"
    if not text:
        return "<empty>"
    if jwt.decode(text) is not None:
        return f"JWT {_digest(text.strip())}"
    return _digest(text)


def _digest(value: str) -> str:
    mac = hmac.new(_KEY, value.encode("utf-8", "surrogatepass"), hashlib.sha256)
    return f"<hmac:{mac.hexdigest()[:_DIGITS]}>"


def _basic_user(credential: str) -> str | None:
    """The user name of a Basic credential when it is plain printable text."""
    try:
        decoded = base64.b64decode(credential, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, _password = decoded.partition(":")
    if not sep or not user or len(user) > _MAX_USER_SHOWN or not user.isprintable():
        return None
    return user
