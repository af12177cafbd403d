"""Non-secret stand-ins for credentials shown to people (logs, mitmweb views).

``fingerprint("Bearer eyJ...")`` gives ``Bearer <hmac:1a2b3c4d5e6f>``: the kind
of credential and 12 hex digits of an HMAC-SHA256 of it. The HMAC key is random
per process, because a plain hash of a weak password can be reversed by trying
candidates; within one process (one mitmweb session) the same credential always
gets the same digits, so a token in a token answer can be matched with the
``Authorization: Bearer`` header that later carries it.

A JWT in a record keeps its header and claims (they say what it grants) and
gets those 12 digits as its signature (``unsigned_jwt``): still a compact JWS
that decodes (12 hex digits are base64url), never a usable token (no real
signature is 12 characters long), and shown with the digits of the original,
so ``fingerprint`` of the record's token and of the original agree. Anything
that already is a fingerprint stays as it is: a record redacted twice (a
saved flow loaded again, mitmdump printing a redacted record) keeps its digits.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets

from hubrewrite.registry import jwt

_KEY = secrets.token_bytes(32)
_DIGITS = 12
_MAX_USER_SHOWN = 64
_HEX_DIGITS = re.compile(rf"[0-9a-f]{{{_DIGITS}}}")
# what fingerprint() gives: fingerprinting it again gives it back
_SHOWN = re.compile(rf"((Bearer|JWT|Basic|Basic user=.+) )?<hmac:[0-9a-f]{{{_DIGITS}}}>")


def fingerprint(secret: str | bytes) -> str:
    """``<kind> <hmac:hex>``; the kind is Bearer, ``Basic user=NAME``, JWT or nothing."""
    text = secret.decode("utf-8", "replace") if isinstance(secret, bytes) else secret
    if _SHOWN.fullmatch(text.strip()):
        return text.strip()
    scheme, _, credential = text.strip().partition(" ")
    credential = credential.strip()
    if scheme.lower() == "bearer" and credential:
        return f"Bearer <hmac:{_token_digits(credential)}>"
    if scheme.lower() == "basic" and credential:
        user = _basic_user(credential)
        kind = f"Basic user={user}" if user else "Basic"
        return f"{kind} {_digest(credential)}"
    if not text:
        return "<empty>"
    if jwt.decode(text) is not None:
        return f"JWT <hmac:{_token_digits(text.strip())}>"
    return _digest(text)


def unsigned_jwt(token: str) -> str:
    """A JWT with its signature replaced by its fingerprint's digits; already done: as it is."""
    head, _, _signature = token.strip().rpartition(".")
    return f"{head}.{_token_digits(token.strip())}"


def _token_digits(token: str) -> str:
    """The digits of a token; a JWT whose signature already is digits (``unsigned_jwt``) keeps them."""
    signature = token.rpartition(".")[2]
    if token.count(".") == 2 and _HEX_DIGITS.fullmatch(signature):
        return signature
    return _hex(token)


def _digest(value: str) -> str:
    return f"<hmac:{_hex(value)}>"


def _hex(value: str) -> str:
    mac = hmac.new(_KEY, value.encode("utf-8", "surrogatepass"), hashlib.sha256)
    return mac.hexdigest()[:_DIGITS]


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
