"""Tokens the mirror issues itself, sealed with its key: any process sharing the key accepts them.

With mirror accounts, a client that signed in gets, in place of each token the
upstream's token service handed out for it, a sealed token: the user, an expiry,
and the upstream's token inside, encrypted and authenticated (Fernet, from the
``cryptography`` package mitmproxy already uses). ``/v2/`` accepts only these;
the mirror opens them and sends the upstream's token on. Nothing is remembered
per process, so a client can land on any mirror process sharing the key, and a
restarted one. The same seal makes the mirror's own tokens (for an upstream
without token auth) and the offline tokens it gives while a token service is down.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from dataclasses import dataclass

from cryptography.fernet import Fernet, InvalidToken

from ..registry.tokens import Grant
from .confirmations import token_lifetime

PREFIX = "hub1."  # tells a sealed token from an upstream's at a glance
REFRESH_TOKEN_LIFETIME = 7 * 24 * 3600.0  # how long a refresh token handed to a signed-in user is honoured
OWN_TOKEN_LIFETIME = 300.0  # the mirror's own and offline tokens

UPSTREAM, REFRESH, OWN, OFFLINE = "upstream", "refresh", "own", "offline"


@dataclass(frozen=True)
class Sealed:
    kind: str  # UPSTREAM (an access token inside), REFRESH, OWN (opens the mirror only), OFFLINE (anonymous)
    user: str | None
    upstream_token: str | None
    expires: float


class IssuedTokens:
    def __init__(self, key: bytes) -> None:
        self._fernet = Fernet(base64.urlsafe_b64encode(hashlib.sha256(b"hub-rewrite tokens\0" + key).digest()))

    def seal(self, kind: str, user: str | None, lifetime: float, upstream_token: str | None = None) -> str:
        payload = {"k": kind, "u": user, "t": upstream_token, "e": time.time() + max(lifetime, 1.0)}
        return PREFIX + self._fernet.encrypt(json.dumps(payload, separators=(",", ":")).encode()).decode()

    def open(self, token: str | None) -> Sealed | None:
        """What a sealed token says, if it is ours, untampered and not expired."""
        if not token or not token.startswith(PREFIX):
            return None
        try:
            payload = json.loads(self._fernet.decrypt(token[len(PREFIX):].encode()))
            sealed = Sealed(payload["k"], payload["u"], payload["t"], float(payload["e"]))
        except (InvalidToken, ValueError, KeyError, TypeError):
            return None
        return sealed if sealed.expires > time.time() else None

    def user_of(self, token: str | None) -> str | None:
        sealed = self.open(token)
        return sealed.user if sealed is not None and sealed.kind != REFRESH else None

    def sealed_grant(self, user: str, grant: Grant, body: bytes) -> bytes:
        """A token service's answer with each token sealed for ``user`` (``access_token`` too:
        a client that POSTed reads that one)."""
        now = time.time()
        answer = json.loads(body)
        access = grant.tokens[0] if grant.tokens else None
        if access is not None:
            lifetime = token_lifetime("Bearer " + access, grant.expires_in, now)
            answer["token"] = answer["access_token"] = self.seal(UPSTREAM, user, lifetime, access)
        if grant.refresh_token:
            answer["refresh_token"] = self.seal(REFRESH, user, REFRESH_TOKEN_LIFETIME, grant.refresh_token)
        return json.dumps(answer).encode()
