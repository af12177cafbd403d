"""The cache directory's layout version: a stamp file read before anything else is.

``hub-rewrite-cache.json`` in the cache directory says which layout its files
follow (``{"layout": 1, ...}``). A version of the mirror reads the layouts it
knows, migrates an older one once (under a lock: several processes may start
on one directory at the same time), and refuses a newer one with a clear
message instead of misreading it. A directory without a stamp is either new
(stamped now) or a cache written before stamps existed: its layout is
layout 1, so adopting it moves nothing and only writes the stamp.

To change the layout: raise ``LAYOUT``, and add to ``MIGRATIONS`` the step
from the previous version (a function of the directory, safe to run again if
a crash interrupted it: the stamp is written only after it).
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

STAMP = "hub-rewrite-cache.json"
LAYOUT = 1  # blobs/, manifests/, tags/, repos/, tmp/, secret (cache/store.py)
# what a directory holds when a version before the stamp wrote it
UNSTAMPED_PARTS = ("blobs", "manifests", "tags", "repos", "tmp", "secret")


def _adopt_unstamped(root: Path) -> None:
    """Layout 0 (before the stamp) is layout 1: nothing moves."""


# from version N to N + 1
MIGRATIONS: dict[int, Callable[[Path], None]] = {0: _adopt_unstamped}


class LayoutError(Exception):
    """The directory cannot be used as this version's cache (the message says why)."""


@dataclass(frozen=True)
class Found:
    """What a cache directory holds, before anything is changed."""

    layout: int | None  # None: a new (or empty) directory; 0: written before the stamp
    stamped: bool

    def plan(self) -> str:
        """What opening it will do, in words (the check command prints it)."""
        if self.layout is None:
            return f"new cache (layout {LAYOUT})"
        if not self.stamped:
            return f"written before version stamps: adopted as layout {LAYOUT}"
        if self.layout == LAYOUT:
            return f"layout {LAYOUT}"
        return f"layout {self.layout}: migrated once to layout {LAYOUT}"


def version() -> str:
    try:
        return metadata.version("hub-rewrite")
    except metadata.PackageNotFoundError:
        return "unknown"


def inspect(root: Path) -> Found:
    """Read the stamp without changing anything; raises LayoutError for a layout this version cannot read."""
    stamp = root / STAMP
    try:
        text = stamp.read_text(encoding="utf-8")
    except FileNotFoundError:
        try:
            unstamped = any((root / part).exists() for part in UNSTAMPED_PARTS)
        except OSError as e:
            raise LayoutError(f"cache {root}: {e.strerror}") from e
        return Found(0 if unstamped else None, stamped=False)
    except (OSError, UnicodeDecodeError) as e:
        raise LayoutError(f"cache {root}: cannot read {STAMP}: {getattr(e, 'strerror', None) or e}") from e
    try:
        data = json.loads(text)
        layout = data["layout"]
        if not isinstance(layout, int) or isinstance(layout, bool) or layout < 1:
            raise ValueError(layout)
    except (ValueError, TypeError, KeyError) as e:
        raise LayoutError(f"cache {root}: {STAMP} is not a layout stamp (refusing to guess what the files are)") from e
    if layout > LAYOUT:
        written_by = data.get("written_by", "a newer version") if isinstance(data, dict) else "a newer version"
        raise LayoutError(
            f"cache {root} has layout {layout} (written by hub-rewrite {written_by}); this version "
            f"({version()}) reads layout {LAYOUT} and older: refusing to start rather than misread it. "
            "Run the newer version, or point hub_cache_dir at another directory")
    return Found(layout, stamped=True)


def open_layout(root: Path) -> Found:
    """Make ``root`` a cache of this layout: stamp a new one, migrate an older one once.

    Returns what was found. Raises LayoutError (a newer layout, an unreadable
    stamp) or OSError (the directory cannot be written)."""
    root.mkdir(parents=True, exist_ok=True)
    found = inspect(root)
    if found.stamped and found.layout == LAYOUT:
        return found
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)  # the directory itself is the lock: no file left behind
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another process starting on this directory waits here
        found = inspect(root)  # it may have done the work meanwhile
        layout = found.layout or 0
        while found.layout is not None and layout < LAYOUT:
            MIGRATIONS[layout](root)
            layout += 1
        if not (found.stamped and found.layout == LAYOUT):
            _write_stamp(root)
    finally:
        os.close(fd)
    return found


def _write_stamp(root: Path) -> None:
    tmp = root / f"{STAMP}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"layout": LAYOUT, "written_by": version()}) + "\n", encoding="utf-8")
    os.replace(tmp, root / STAMP)
