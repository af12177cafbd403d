"""Tokens the mirror issues itself, sealed with its key: any process sharing the key accepts them.

With mirror accounts, a client that signed in gets, in place of each token the
upstream's token service handed out for it, a sealed token: its holder (the
user, a generation of the user's password hash, the end of the signed-in
session), an expiry, and the upstream's token inside, encrypted and
authenticated (Fernet, from the ``cryptography`` package mitmproxy already
uses). ``/v2/`` accepts only these; the mirror opens them and sends the
upstream's token on. Nothing is remembered per process, so a client can land
on any mirror process sharing the key, and a restarted one. The same seal
makes the mirror's own tokens (for an upstream without token auth) and the
offline tokens it gives while a token service is down.

A token naming a user opens only while the users file the mirror has now holds
that user with the same password hash: removing the user or changing the
password ends the user's tokens, and a mirror sharing the key but not the
users file accepts none of its users' tokens. A mirror without accounts
accepts none either (the upstream's token inside may carry another mirror's
rights, such as its operator's upstream account). Refreshing never extends a
session: every token sealed from a refresh expires by the end of the session
the password began.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from typing import Protocol

from cryptography.fernet import Fernet, InvalidToken

from ..registry.tokens import Grant
from .confirmations import token_lifetime

PREFIX = "hub1."  # tells a sealed token from an upstream's at a glance
REFRESH_TOKEN_LIFETIME = 7 * 24 * 3600.0  # a signed-in session: how long its refresh tokens are honoured
OWN_TOKEN_LIFETIME = 300.0  # the mirror's own and offline tokens

UPSTREAM, REFRESH, OWN, OFFLINE = "upstream", "refresh", "own", "offline"
ACCESS = (UPSTREAM, OWN, OFFLINE)  # the kinds that open /v2/; a refresh token opens only the token endpoint


class Accounts(Protocol):
    """The mirror's accounts as they are now (``MirrorAccounts``)."""

    def password_hash(self, user: str) -> str | None: ...


@dataclass(frozen=True)
class Holder:
    """Whom a sealed token was issued to: the user, a digest of the password hash the
    user signed in with, and the end of the session that sign-in began."""

    user: str
    generation: str
    session_end: float


@dataclass(frozen=True)
class Sealed:
    kind: str  # UPSTREAM (an access token inside), REFRESH, OWN (opens the mirror only), OFFLINE
    holder: Holder | None  # None: anonymous (an offline token of a mirror without accounts)
    upstream_token: str | None
    expires: float

    @property
    def user(self) -> str | None:
        return self.holder.user if self.holder is not None else None


def is_sealed(token: str | None) -> bool:
    """Looks like one of the mirror's tokens (whether it opens or not)."""
    return bool(token) and token.startswith(PREFIX)


class IssuedTokens:
    def __init__(self, key: bytes, refresh_lifetime: float = REFRESH_TOKEN_LIFETIME) -> None:
        self._fernet = Fernet(base64.urlsafe_b64encode(hashlib.sha256(b"hub-rewrite tokens\0" + key).digest()))
        self._generation_key = hashlib.sha256(b"hub-rewrite token generations\0" + key).digest()
        self.refresh_lifetime = refresh_lifetime

    def holder(self, user: str, password_hash: str, session_end: float | None = None) -> Holder:
        """The holder of tokens for ``user``, who just proved the password of ``password_hash``:
        a new session unless ``session_end`` is given."""
        end = time.time() + self.refresh_lifetime if session_end is None else session_end
        return Holder(user, self._generation(user, password_hash), end)

    def _generation(self, user: str, password_hash: str) -> str:
        """A short keyed digest of the users-file line: a new password (a new hash) makes another."""
        return hmac.new(self._generation_key, f"{user}:{password_hash}".encode(), hashlib.sha256).hexdigest()[:32]

    def seal(self, kind: str, holder: Holder | None, lifetime: float, upstream_token: str | None = None) -> str:
        """A token of ``kind`` for ``holder``, valid ``lifetime`` seconds but never past the session's end."""
        expires = time.time() + max(lifetime, 1.0)
        payload: dict = {"k": kind, "t": upstream_token, "e": expires}
        if holder is not None:
            payload.update(u=holder.user, g=holder.generation, s=holder.session_end, e=min(expires, holder.session_end))
        return PREFIX + self._fernet.encrypt(json.dumps(payload, separators=(",", ":")).encode()).decode()

    def open(self, token: str | None, accounts: Accounts | None, kinds: tuple[str, ...] = ACCESS) -> Sealed | None:
        """What a sealed token says, if it is ours, untampered, not expired, of one of ``kinds``,
        and anonymous or for a user ``accounts`` hold now with the password it was sealed under."""
        sealed = self._read(token)
        if sealed is None or sealed.kind not in kinds:
            return None
        if sealed.holder is not None and not self._holds(accounts, sealed.holder):
            return None
        return sealed

    def _read(self, token: str | None) -> Sealed | None:
        if not is_sealed(token):
            return None
        try:
            payload = json.loads(self._fernet.decrypt(token[len(PREFIX):].encode()))
            holder = None
            if payload.get("u") is not None:
                holder = Holder(str(payload["u"]), str(payload.get("g", "")), float(payload.get("s", 0)))
            sealed = Sealed(payload["k"], holder, payload["t"], float(payload["e"]))
        except (InvalidToken, ValueError, KeyError, TypeError, AttributeError):
            return None
        return sealed if sealed.expires > time.time() else None

    def _holds(self, accounts: Accounts | None, holder: Holder) -> bool:
        """The holder's user still has the password hash the token was sealed under."""
        password_hash = accounts.password_hash(holder.user) if accounts is not None else None
        if password_hash is None:
            return False
        return hmac.compare_digest(holder.generation, self._generation(holder.user, password_hash))

    def sealed_grant(self, holder: Holder, grant: Grant, body: bytes) -> bytes:
        """A token service's answer with each token sealed for ``holder`` (``access_token`` too:
        a client that POSTed reads that one)."""
        now = time.time()
        answer = json.loads(body)
        access = grant.tokens[0] if grant.tokens else None
        if access is not None:
            lifetime = token_lifetime("Bearer " + access, grant.expires_in, now)
            answer["token"] = answer["access_token"] = self.seal(UPSTREAM, holder, lifetime, access)
            if holder.session_end - now < lifetime:  # the session ends first: say so
                answer["expires_in"] = max(int(holder.session_end - now), 1)
        if grant.refresh_token:
            answer["refresh_token"] = self.seal(REFRESH, holder, self.refresh_lifetime, grant.refresh_token)
        return json.dumps(answer).encode()
