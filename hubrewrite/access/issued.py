"""Tokens the mirror handed to signed-in users; with mirror accounts, ``/v2/`` accepts only these."""

from __future__ import annotations

import hashlib
import time

from ..registry.tokens import Grant
from .bounded import BoundedDict
from .confirmations import token_lifetime

# how long a refresh token handed to a signed-in user is honoured
REFRESH_TOKEN_LIFETIME = 7 * 24 * 3600.0


class IssuedTokens:
    def __init__(self) -> None:
        self._tokens = BoundedDict()  # sha256(token) -> (user, valid until, own)

    @staticmethod
    def _key(token: str) -> bytes:
        return hashlib.sha256(token.encode("utf-8", "replace")).digest()

    def issue(self, token: str, user: str, lifetime: float, own: bool = False) -> None:
        """``own``: the mirror's own token (not the upstream's), never sent upstream."""
        self._tokens.put(self._key(token), (user, time.monotonic() + max(lifetime, 1.0), own))

    def _entry(self, token: str | None) -> tuple[str, float, bool] | None:
        if not token:
            return None
        entry = self._tokens.get(self._key(token))
        if entry is not None and entry[1] < time.monotonic():
            self._tokens.pop(self._key(token), None)
            return None
        return entry

    def user_of(self, token: str | None) -> str | None:
        entry = self._entry(token)
        return entry[0] if entry else None

    def is_own(self, token: str | None) -> bool:
        entry = self._entry(token)
        return bool(entry and entry[2])

    def issue_grant(self, user: str, grant: Grant) -> None:
        """Remember the tokens of a token service's answer as issued to ``user``."""
        now = time.time()
        for token in grant.tokens:
            self.issue(token, user, token_lifetime("Bearer " + token, grant.expires_in, now))
        if grant.refresh_token:
            self.issue(grant.refresh_token, user, REFRESH_TOKEN_LIFETIME)
