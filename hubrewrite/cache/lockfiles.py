"""Lock files that exist only while held: ``flock`` on a file that its holder unlinks when done.

Mirror processes sharing a cache directory exclude each other with ``flock``
on ``tmp/<hex>.lock``. A lock file left behind per request would let any
client fill the file system's inodes, so the holder removes it, while still
holding it, before it lets go. That opens the classic race: a process that
opened the file just before it was unlinked then gets its lock on a file no
longer in the directory, while a third process creates and locks a new one.
``acquire`` therefore checks, once locked, that the path still names the
file it locked, and starts over if not. Only a holder (or a process that
found the file unheld, under the lock) ever unlinks it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


def acquire(path: Path) -> int | None:
    """An exclusive lock on ``path`` (created if missing): its descriptor, or None if another
    process holds it. Raises OSError when the file cannot be created (no space, no inode left)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        if names(path, fd):
            return fd
        os.close(fd)  # unlinked (or replaced) between our open and our lock: the path's file now


def names(path: Path, fd: int) -> bool:
    """Does ``path`` still name the file open as ``fd``?"""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def release(path: Path, fd: int) -> None:
    """Remove the lock file, then let go: nobody can lock it in between and believe it current."""
    try:
        path.unlink(missing_ok=True)
    finally:
        os.close(fd)  # releases the lock


def is_held(path: Path) -> bool:
    """Does a process hold the lock on ``path`` now? Creates nothing; a file nobody holds
    (left by a crashed process) is not a lock."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        # shared: followers looking at once do not exclude each other
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
