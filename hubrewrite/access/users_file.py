"""The users file of mirror accounts, read again when it changes.

Removing a user or changing a password takes effect without a restart: on use,
at most once per ``CHECK_INTERVAL``, the file's (mtime, size, inode) is looked
at, and a changed file is read again. A file that no longer reads (malformed,
missing, mid-way through an edit) keeps the accounts read before, with one log
line per change of the file, until it reads again.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger("hub_rewrite")

CHECK_INTERVAL = 1.0  # seconds between two looks at the file
# a file modified this recently may change again within the same timestamp tick, with the
# same size and inode (git's "racily clean" index): it is read again at the next look
RACY_SECONDS = 2.0
HASH_PREFIXES = ("$2b$", "$2y$", "$2a$", "$argon2id$", "$argon2i$")


class AccountsError(ValueError):
    pass


def load_users(path: Path) -> dict[str, str]:
    """user -> password hash, from an htpasswd-style file."""
    users: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise AccountsError(f"cannot read {path}: {e}") from e
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user or not hashed:
            raise AccountsError(f"{path}:{number}: expected user:hash")
        if not hashed.startswith(HASH_PREFIXES):
            raise AccountsError(f"{path}:{number}: user {user}: only bcrypt or argon2 hashes are accepted")
        if user in users:
            raise AccountsError(f"{path}:{number}: user {user} listed twice")
        users[user] = hashed
    if not users:
        raise AccountsError(f"{path}: no users")
    return users


Signature = tuple[int, int, int] | None  # (mtime ns, size, inode); None: missing


class UsersFile:
    def __init__(self, path: Path) -> None:
        """Raises AccountsError: at start, a users file that does not read stops the mirror."""
        self.path = path
        self._lock = threading.Lock()  # passwords are checked in threads
        # taken before reading: a change during the read is seen at the next look
        self._read, self._read_racy = self._stat()
        self.users = load_users(path)
        self._problem: tuple[Signature, str] | None = None  # the last one logged
        self._checked = time.monotonic()

    def current(self) -> dict[str, str]:
        """The users as the file has them now (looked at once per CHECK_INTERVAL at most)."""
        now = time.monotonic()
        if now - self._checked >= CHECK_INTERVAL and self._lock.acquire(blocking=False):
            try:
                self._checked = now
                self._reload_if_changed()
            finally:
                self._lock.release()
        return self.users

    def _reload_if_changed(self) -> None:
        signature, racy = self._stat()
        if signature == self._read and not self._read_racy:
            return
        self._read, self._read_racy = signature, racy
        try:
            users = load_users(self.path)
        except AccountsError as e:
            if self._problem != (signature, str(e)):  # one line per change of the file
                log.warning("hub_rewrite: hub_users_file: %s; keeping the accounts read before (%d users)",
                            e, len(self.users))
                self._problem = (signature, str(e))
            return
        self._problem = None
        if users != self.users:
            self.users = users
            log.info("hub_rewrite: hub_users_file %s read again: %d users", self.path, len(users))

    def _stat(self) -> tuple[Signature, bool]:
        """The file's signature, and whether it changed so recently that it may change
        again unseen (within one timestamp tick, same size and inode: git's "racily clean")."""
        try:
            st = os.stat(self.path)
        except OSError:
            return None, False
        return (st.st_mtime_ns, st.st_size, st.st_ino), time.time() - st.st_mtime < RACY_SECONDS
