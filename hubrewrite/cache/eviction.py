"""The cache's limits: bytes of blobs (``hub_cache_max_size``) and files (``hub_cache_max_files``).

Bytes: beyond the size limit the least recently used blobs go, never one being
served. A commit far under the limit does not scan every cached file: the
estimate is the last scan plus this process's commits since (other processes'
are seen at the next scan).

Files: every request for content an upstream holds may leave small files (a
blob's stamp, a manifest and its type, a tag record, a membership record), a
public registry holds more content than a disk has inodes, and tiny blobs use
inodes up long before bytes. So the number of files is bounded too: beyond the
limit the least recently used entries of any kind go (blobs by their last use,
manifests by their last use or write, records by their last write), with the
repository folders they leave empty, down to nine tenths of the limit. That
scan runs in a thread of its own when this process's estimate (the last scan
plus the files it added since) passes the limit: about once per tenth of the
limit added.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .store import Store

log = logging.getLogger("hub_rewrite")

# how long a commit trusts the estimated cache size before scanning the files again
RESCAN_SECONDS = 60.0
# a scan over the file limit removes entries down to this share of it
FILES_LOW_WATER = 0.9


@dataclass(order=True)
class Entry:
    """Something the cache can forget: its last use, the files it takes, how to remove it."""

    used: float
    files: int = field(compare=False)
    remove: Callable[[], bool] = field(compare=False)  # False: not now (a blob being served)
    folder: Path | None = field(default=None, compare=False)  # removed too once empty


class Limits:
    def __init__(self, store: Store, max_bytes: int, max_files: int, on_evict: Callable[[int], None]) -> None:
        self.store = store
        self.max_bytes = max_bytes
        self.max_files = max_files  # 0: no limit
        self.on_evict = on_evict  # (how many blobs were evicted), for the metrics
        self._estimated_bytes: int | None = None
        self._scanned_at = 0.0
        self._estimated_files: int | None = None  # None: not counted yet (or being counted)
        self._counting = threading.Lock()
        self._scanning = False
        self._added_meanwhile = 0  # files added while a scan runs (it may not have seen them)

    # ---- bytes -------------------------------------------------------------

    def blob_added(self, path: Path, keep: str) -> None:
        """Evict if the cache may now be over its size limit."""
        self.files_added(2)  # the blob and its stamp
        if self.max_bytes <= 0:
            return
        if self._estimated_bytes is not None and time.monotonic() - self._scanned_at < RESCAN_SECONDS:
            try:
                self._estimated_bytes += path.stat().st_size
            except FileNotFoundError:
                pass
            if self._estimated_bytes <= self.max_bytes:
                return
        self.evict(keep)

    def blob_entries(self) -> list[tuple[float, int, str]]:
        """(last use, size, digest) of every committed blob."""
        entries = []
        for path in (self.store.root / "blobs" / "sha256").glob("*/*"):
            if path.name.endswith(".ok"):
                continue
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            entries.append((_mtime(path.with_name(path.name + ".ok")), size, f"sha256:{path.name}"))
        return entries

    def total_bytes(self) -> int:
        return sum(size for _, size, _ in self.blob_entries())

    def evict(self, keep: str | None = None) -> list[str]:
        """Delete least recently used blobs until under the size limit."""
        if self.max_bytes <= 0:
            return []
        entries = self.blob_entries()
        total = sum(size for _, size, _ in entries)
        evicted = []
        for _, size, digest in sorted(entries):
            if total <= self.max_bytes:
                break
            if digest == keep or self.store.in_use.get(digest):
                continue
            self.store.remove_blob(digest)
            total -= size
            evicted.append(digest)
        self._estimated_bytes, self._scanned_at = total, time.monotonic()
        if evicted:
            self.on_evict(len(evicted))
        return evicted

    # ---- files -------------------------------------------------------------

    def files_added(self, count: int) -> None:
        """This process added ``count`` files: count them, and scan once the limit may be passed."""
        if self.max_files <= 0:
            return
        with self._counting:
            if self._scanning:
                self._added_meanwhile += count
                return
            if self._estimated_files is not None and self._estimated_files + count <= self.max_files:
                self._estimated_files += count
                return
            self._scanning, self._added_meanwhile = True, 0
        threading.Thread(target=self._scan, name="cache-file-limit", daemon=True).start()

    def _scan(self) -> None:
        """Until a scan ends within the limit, counting what was added while it ran."""
        while True:
            try:
                files = self.evict_files()
            except OSError as e:  # the directory went away, or cannot be read: counted again next time
                log.warning("cache %s: counting files: %s", self.store.root, e.strerror or e)
                files = None
            with self._counting:
                if files is not None:
                    files += self._added_meanwhile
                    self._added_meanwhile = 0
                if files is None or files <= self.max_files:
                    self._estimated_files, self._scanning = files, False
                    return

    def evict_files(self) -> int:
        """Remove least recently used entries while over the file limit; the files left."""
        entries = list(self._entries())
        folders = {e.folder for e in entries if e.folder is not None}
        total = sum(e.files for e in entries) + len(folders)
        if total <= self.max_files:
            return total
        before, target, emptied = total, int(self.max_files * FILES_LOW_WATER), set()
        for entry in sorted(entries):
            if total <= target:
                break
            if entry.remove():
                total -= entry.files
                if entry.folder is not None:
                    emptied.add(entry.folder)
        for folder in emptied:
            try:
                folder.rmdir()
                total -= 1
            except OSError:
                pass  # not empty
        log.info("cache %s: %d files, over hub_cache_max_files (%d): the least recently used went, %d left",
                 self.store.root, before, self.max_files, total)
        return total

    def _entries(self) -> Iterator[Entry]:
        root = self.store.root
        for used, _, digest in self.blob_entries():
            yield Entry(used, 2, lambda d=digest: self._remove_blob(d))
        for path in (root / "manifests" / "sha256").glob("*/*"):
            if "." not in path.name:
                type_file = path.with_name(path.name + ".type")
                yield Entry(_mtime(path), 2, lambda p=path, t=type_file: _unlink(p, t))
        for path in (root / "tags").glob("*.json"):
            yield Entry(_mtime(path), 1, lambda p=path: _unlink(p))
        for folder in (root / "repos").iterdir():
            members = list(folder.iterdir()) if folder.is_dir() else []
            for path in members:
                yield Entry(_mtime(path), 1, lambda p=path: _unlink(p), folder)
            if not members:
                yield Entry(0.0, 0, lambda: True, folder)  # an empty folder: the first to go

    def _remove_blob(self, digest: str) -> bool:
        if self.store.in_use.get(digest):
            return False
        self.store.remove_blob(digest)
        self.on_evict(1)
        return True


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _unlink(*paths: Path) -> bool:
    for path in paths:
        path.unlink(missing_ok=True)
    return True
