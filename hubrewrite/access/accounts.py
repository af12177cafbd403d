"""Mirror accounts: who may use a mirror that stands on a public address.

Users and password hashes live in an htpasswd-style file (``user:hash`` per
line; bcrypt ``$2b$``/``$2y$`` as written by ``htpasswd -B``, or argon2id).
A client proves itself once, on the mirror's token endpoint, with Basic
credentials; the token it gets back (the upstream's, fetched for it) is sealed
for that user (``issued.py``), and every ``/v2/`` request must carry one. The
file is read again when it changes (``users_file.py``): a removed user or a
changed password ends the user's tokens and sign-ins at once.

Clients keep one username/password per registry host, so a client that also
needs its own upstream account sends both in that one pair::

    username: <mirror user>
    password: <mirror password>[:<upstream user>:<upstream password>]

Mirror passwords therefore never contain ``:``; the upstream password may.
The mirror part is checked and dropped; only the upstream part goes on, and
only to the upstream's own token service.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import argon2
import bcrypt

from ..registry.errors import RegistryError
from ..util.bounded_dict import BoundedDict
from .issued import REFRESH, Holder, IssuedTokens
from .users_file import AccountsError, UsersFile

log = logging.getLogger("hub_rewrite")

SEPARATOR = ":"
# verified (user, password digest) pairs are remembered briefly: bcrypt costs
# ~0.2 s, and a pull asks for tokens several times
VERIFIED_TTL = 300.0
_argon2 = argon2.PasswordHasher()
# compared against when the user is unknown, so timing does not tell
_DUMMY_BCRYPT = bcrypt.hashpw(b"hub-rewrite", bcrypt.gensalt(rounds=10))


@dataclass(frozen=True)
class ClientCredentials:
    mirror_user: str
    mirror_password: str
    upstream_user: str | None = None
    upstream_password: str | None = None

    @property
    def upstream_basic(self) -> str | None:
        """The ``Authorization`` value for the upstream's token service, if any."""
        if self.upstream_user is None or self.upstream_password is None:
            return None
        return basic_header(self.upstream_user, self.upstream_password)


def basic_header(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def parse_basic(authorization: str | None) -> tuple[str, str] | None:
    """(user, password) of a Basic ``Authorization`` header, else None."""
    if not authorization or not authorization[:6].lower() == "basic ":
        return None
    try:
        decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode("utf-8")
    except ValueError:  # binascii.Error, non-ASCII text, UnicodeDecodeError
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


def split_credentials(user: str, password: str) -> ClientCredentials:
    """Split the one username/password pair a client sends (see module doc)."""
    parts = password.split(SEPARATOR, 2)
    if len(parts) == 1:
        return ClientCredentials(user, password)
    if len(parts) == 2:
        raise AccountsError("password must be <mirror password> or <mirror password>:<upstream user>:<upstream password>")
    return ClientCredentials(user, parts[0], parts[1], parts[2])


def bearer_token(authorization: str | None) -> str | None:
    if not authorization or authorization[:7].lower() != "bearer ":
        return None
    return authorization[7:].strip() or None


def hash_password(password: str, scheme: str = "bcrypt") -> str:
    """A hash for the users file (``python -m hubrewrite.access.accounts``)."""
    if SEPARATOR in password:
        raise AccountsError("a mirror password must not contain ':' (it separates upstream credentials)")
    if scheme == "argon2":
        return _argon2.hash(password)
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt()).decode()


class MirrorAccounts:
    def __init__(self, users: dict[str, str] | UsersFile) -> None:
        """``users``: user -> password hash, fixed, or a users file read again when it changes."""
        self._file = users if isinstance(users, UsersFile) else None
        self._fixed = users if isinstance(users, dict) else {}
        self._verified = BoundedDict()  # sha256(user, password hash, password) -> verified until

    @classmethod
    def from_file(cls, path: Path) -> MirrorAccounts:
        """Raises AccountsError."""
        return cls(UsersFile(path))

    @property
    def users(self) -> dict[str, str]:
        return self._file.current() if self._file is not None else self._fixed

    def password_hash(self, user: str) -> str | None:
        return self.users.get(user)

    def verify(self, user: str, password: str) -> bool:
        """Blocking: call from a thread."""
        return self.verified_hash(user, password) is not None

    def verified_hash(self, user: str, password: str) -> str | None:
        """The user's password hash, if ``password`` matches it. Blocking (bcrypt/argon2 are
        slow by design): call from a thread."""
        hashed = self.users.get(user)
        if hashed is None:
            bcrypt.checkpw(password.encode(), _DUMMY_BCRYPT)
            return None
        # remembered with the hash: a changed password is checked afresh, a removed user never found
        key = hashlib.sha256(f"{user}\0{hashed}\0{password}".encode()).digest()
        now = time.monotonic()
        if self._verified.get(key, 0) > now:
            return hashed
        if not _matches(hashed, password):
            return None
        self._verified.put(key, now + VERIFIED_TTL)
        return hashed


def _matches(hashed: str, password: str) -> bool:
    if hashed.startswith("$argon2"):
        try:
            return _argon2.verify(hashed, password)
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            return False
    try:
        return bcrypt.checkpw(password.encode(), hashed.replace("$2y$", "$2b$", 1).encode())
    except ValueError:
        return False


Form = list[tuple[str, str]]


async def sign_in(
    accounts: MirrorAccounts, issued: IssuedTokens, authorization: str | None, form: Form | None
) -> tuple[Holder, str | None, Form | None]:
    """Check a token request's mirror account.

    Returns (the holder of the tokens to seal, the ``Authorization`` for the
    upstream's token service, the form for it): the mirror part of the
    credentials is dropped. Raises a 401 RegistryError. A refresh token counts
    only if the mirror sealed it for a user the accounts still hold with the
    same password; it continues that sign-in's session, never a new one.
    """
    fields = dict(form or [])
    grant_type = fields.get("grant_type") if form is not None else None
    if grant_type == "refresh_token":
        sealed = issued.open(fields.get("refresh_token"), accounts, kinds=(REFRESH,))
        if sealed is None or sealed.holder is None:
            raise _refused("refresh token not issued by this mirror, expired, or its account changed")
        # the upstream's own refresh token, sealed inside the mirror's, goes on
        return sealed.holder, None, [(k, sealed.upstream_token if k == "refresh_token" else v) for k, v in form]
    basic = parse_basic(authorization)
    if basic is None and grant_type == "password":
        basic = (fields.get("username", ""), fields.get("password", ""))
    if basic is None:
        raise _refused("mirror account required: user and password of this mirror")
    try:
        credentials = split_credentials(*basic)
    except AccountsError as e:
        raise _refused(str(e), basic[0]) from e
    user = credentials.mirror_user
    hashed = await asyncio.to_thread(accounts.verified_hash, user, credentials.mirror_password)
    if hashed is None:
        raise _refused("mirror account required: user and password of this mirror", user)
    holder = issued.holder(user, hashed)
    if grant_type == "password":
        rest = [(k, v) for k, v in form or [] if k not in ("username", "password")]
        if credentials.upstream_user is not None:
            rest += [("username", credentials.upstream_user), ("password", credentials.upstream_password or "")]
        return holder, None, rest
    return holder, credentials.upstream_basic, form


def _refused(message: str, user: str = "") -> RegistryError:
    if user:
        log.warning("mirror sign-in refused for user %r: %s", user[:64], message)
    return RegistryError(401, "UNAUTHORIZED", message)


def main(argv: list[str] | None = None) -> None:
    """Print a users-file line: python -m hubrewrite.access.accounts USER [--argon2] (password on stdin)."""
    import argparse
    import getpass
    import sys

    parser = argparse.ArgumentParser(prog="python -m hubrewrite.access.accounts", description=main.__doc__)
    parser.add_argument("user")
    parser.add_argument("--argon2", action="store_true", help="argon2id instead of bcrypt")
    args = parser.parse_args(argv)
    if SEPARATOR in args.user:
        parser.error("a user name must not contain ':'")
    password = getpass.getpass("password: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\n")
    try:
        print(f"{args.user}:{hash_password(password, 'argon2' if args.argon2 else 'bcrypt')}")
    except AccountsError as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()
