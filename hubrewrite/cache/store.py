"""The on-disk cache: content-addressed blobs and manifests, tag lookups, and
which repository holds which digest.

Layout under the cache directory (several mirror processes may share it):

    hub-rewrite-cache.json       the layout's version (cache/layout.py), read first
    blobs/sha256/ab/<hex>        verified blob bytes (never written in place)
    blobs/sha256/ab/<hex>.ok     stamp: size, mtime and inode the bytes had when
                                 verified; its own mtime is the last use (LRU)
    manifests/sha256/ab/<hex>    verified manifest bytes
    manifests/sha256/ab/<hex>.type   its media type
    tags/<key>.json              (upstream, repository, tag, Accept) -> digest
    tags/.lock                   held while a tag record is rewritten
    repos/<key>/<hex>            the upstream confirmed this repository holds it
    tmp/<hex>.download           a blob being downloaded (by the holder of <hex>.lock)
    tmp/<hex>.lock               that download's lock: exists only while held (lockfiles.py)
    tmp/                         other files being written

Nothing is ever visible under its final name before it is complete and
verified: files are written in tmp/ and renamed into place. A blob whose stamp
no longer matches its file (it was modified) is hashed again before it is
served, and deleted if it does not match its digest.

A full or failing disk never fails a request: writes that fail are given up,
the problem is remembered (``problem``, for health and metrics) and the mirror
serves without caching until a write succeeds again.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import layout, lockfiles
from .blobwriter import BlobWriter
from .digests import hex_of, sha256_of_bytes, sha256_of_file
from .eviction import Limits
from .tier import BlobStat

log = logging.getLogger("hub_rewrite")

# a tag has a handful of Accept variants (index, single image, legacy): more is abuse
MAX_TAG_ENTRIES = 16
# space kept free beyond a blob's size before a download starts
FREE_SPACE_MARGIN = 64 << 20
# free inodes kept beyond what a download needs (its lock and file, the blob's stamp, records)
FREE_INODES_MARGIN = 16
# most files kept (hub_cache_max_files): a blob or a manifest is two, a record one
DEFAULT_MAX_FILES = 200_000
_DOWNLOAD_STEM = re.compile(r"^[0-9a-f]{64}$")


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _stat_signature(st: os.stat_result) -> str:
    return f"{st.st_size} {st.st_mtime_ns} {st.st_ino}"


@dataclass
class TagEntry:
    digest: str
    media_type: str
    stored_at: float


class Store:
    def __init__(self, root: Path, max_bytes: int, on_evict: Callable[[int], None] = lambda count: None,
                 max_files: int = DEFAULT_MAX_FILES) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.tmp = root / "tmp"
        # before anything is read or made: a layout this version cannot read stops it here (LayoutError)
        self.found = layout.open_layout(root)
        for sub in ("blobs/sha256", "manifests/sha256", "tags", "repos", "tmp"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self._clean_stale_tmp()
        # digests this process is serving right now: never evicted
        self.in_use: dict[str, int] = {}
        self.limits = Limits(self, max_bytes, max_files, on_evict)
        # why the last write failed (disk full, ...), None once writes work again
        self.problem: str | None = None

    # ---- failing disks -----------------------------------------------------

    def note_problem(self, error: OSError) -> None:
        problem = "disk full" if error.errno in (errno.ENOSPC, errno.EDQUOT) else (error.strerror or str(error))
        if problem != self.problem:
            log.error("cache %s: %s; serving without caching until a write succeeds", self.root, problem)
        self.problem = problem

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """A write that may fail without failing the request: the cache simply misses it."""
        try:
            yield
        except OSError as e:
            self.note_problem(e)
        else:
            if self.problem is not None:
                log.info("cache %s: writes work again", self.root)
                self.problem = None

    def _write_file(self, final: Path, data: bytes) -> None:
        """Written in tmp/ and renamed into place: never seen half-written (nor left behind)."""
        tmp = self.tmp / f"{final.name}.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            tmp.write_bytes(data)
            os.replace(tmp, final)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise

    def has_room_for(self, size: int | None) -> bool:
        """Room for a download of this size (unknown: the margin) without filling the disk or
        using its last inodes."""
        try:
            st = os.statvfs(self.root)
        except OSError as e:
            self.note_problem(e)
            return False
        # f_files is 0 where a file system does not count inodes (btrfs)
        inodes_left = not st.f_files or st.f_favail >= FREE_INODES_MARGIN
        if st.f_bavail * st.f_frsize >= (size or 0) + FREE_SPACE_MARGIN and inodes_left:
            return True
        self.note_problem(OSError(errno.ENOSPC, "disk full"))
        return False

    # ---- blobs -----------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        hex_part = hex_of(digest)
        return self.root / "blobs" / "sha256" / hex_part[:2] / hex_part

    def download_path(self, digest: str) -> Path:
        """Where the holder of the blob's download lock writes it (followers read it there)."""
        return self.tmp / f"{hex_of(digest)}.download"

    def _stamp(self, path: Path) -> Path:
        return path.with_name(path.name + ".ok")

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).exists()

    def check_blob(self, digest: str) -> bool:
        """True if the cached blob may be served: unchanged since verified, or verified now.

        A file whose bytes do not match its digest is deleted. Blocking (it may
        hash the whole file): run it in a thread.
        """
        path = self.blob_path(digest)
        stamp = self._stamp(path)
        try:
            st = path.stat()
        except FileNotFoundError:
            return False
        try:
            if stamp.read_text() == _stat_signature(st):
                return True
        except FileNotFoundError:
            pass
        if sha256_of_file(path) != digest:
            self.remove_blob(digest)
            return False
        with self._writing():
            self._write_stamp(path)
        return True

    async def blob(self, digest: str) -> BlobStat | None:
        """The blob on this disk, if it may be served (``check_blob``, in a thread)."""
        if not self.has_blob(digest) or not await asyncio.to_thread(self.check_blob, digest):
            return None
        size = self.blob_size(digest)
        return BlobStat(size) if size is not None else None

    def blob_size(self, digest: str) -> int | None:
        try:
            return self.blob_path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def touch(self, digest: str) -> None:
        """Mark a blob as just used (LRU)."""
        try:
            os.utime(self._stamp(self.blob_path(digest)))
        except OSError:
            pass

    @contextmanager
    def keeping(self, digest: str) -> Iterator[None]:
        """Never evicted meanwhile (the blob is being sent, or uploaded)."""
        self.in_use[digest] = self.in_use.get(digest, 0) + 1
        try:
            yield
        finally:
            self.in_use[digest] -= 1
            if not self.in_use[digest]:
                del self.in_use[digest]

    def new_writer(self, digest: str) -> BlobWriter:
        return BlobWriter(self, digest)

    def commit_blob(self, tmp_path: Path, hex_part: str) -> bool:
        final = self.root / "blobs" / "sha256" / hex_part[:2] / hex_part
        committed = False
        with self._writing():
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp_path, final)
            self._write_stamp(final)
            committed = True
        if not committed:
            tmp_path.unlink(missing_ok=True)
            return False
        self.limits.blob_added(final, keep=f"sha256:{hex_part}")
        return True

    def _write_stamp(self, path: Path) -> None:
        self._write_file(self._stamp(path), _stat_signature(path.stat()).encode())

    def remove_blob(self, digest: str) -> None:
        path = self.blob_path(digest)
        # the stamp first: a blob without a stamp is re-verified, never trusted
        self._stamp(path).unlink(missing_ok=True)
        path.unlink(missing_ok=True)

    def download_lock_path(self, digest: str) -> Path:
        """Exists only while a process holds it (lockfiles.py); holds the blob's size once known."""
        return self.tmp / f"{hex_of(digest)}.lock"

    def download_lock(self, digest: str) -> int | None:
        """An exclusive lock on downloading this blob, across processes; None if held elsewhere.
        Raises OSError (noted as the cache's problem) when the lock file cannot be created."""
        try:
            return lockfiles.acquire(self.download_lock_path(digest))
        except OSError as e:
            self.note_problem(e)
            raise

    def download_locked(self, digest: str) -> bool:
        """Is a process (this one included) downloading this blob right now? Creates nothing."""
        return lockfiles.is_held(self.download_lock_path(digest))

    def release_download_lock(self, digest: str, fd: int) -> None:
        """The download ended (its file already committed or removed): the lock file goes too."""
        lockfiles.release(self.download_lock_path(digest), fd)

    def total_bytes(self) -> int:
        return self.limits.total_bytes()

    # ---- manifests -----------------------------------------------------------

    def manifest_path(self, digest: str) -> Path:
        hex_part = hex_of(digest)
        return self.root / "manifests" / "sha256" / hex_part[:2] / hex_part

    def put_manifest(self, digest: str, media_type: str, body: bytes) -> bool:
        """Store a manifest if its bytes match the digest (and the disk takes it)."""
        if sha256_of_bytes(body) != digest:
            return False
        path = self.manifest_path(digest)
        stored, new = False, not path.exists()
        with self._writing():
            path.parent.mkdir(parents=True, exist_ok=True)
            self._write_file(path.with_name(path.name + ".type"), media_type.encode())
            self._write_file(path, body)
            stored = True
        if stored and new:
            self.limits.files_added(2)
        return stored

    async def manifest(self, digest: str) -> tuple[str, bytes] | None:
        return self.get_manifest(digest)

    def manifest_size(self, digest: str) -> int | None:
        try:
            return self.manifest_path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def touch_manifest(self, digest: str) -> None:
        """Mark a manifest as just used (the file limit evicts the least recently used)."""
        try:
            os.utime(self.manifest_path(digest))
        except OSError:
            pass

    def has_manifest(self, digest: str) -> bool:
        return self.manifest_path(digest).exists()

    def get_manifest(self, digest: str) -> tuple[str, bytes] | None:
        """(media type, bytes), verified on every read; a corrupted one is deleted."""
        path = self.manifest_path(digest)
        try:
            body = path.read_bytes()
            media_type = path.with_name(path.name + ".type").read_text()
        except FileNotFoundError:
            return None
        if sha256_of_bytes(body) != digest:
            path.unlink(missing_ok=True)
            return None
        return media_type, body

    # ---- tags ---------------------------------------------------------------

    def _tag_path(self, upstream: str, repository: str, tag: str) -> Path:
        return self.root / self.tag_record(upstream, repository, tag)

    def _read_tag_file(self, path: Path) -> dict:
        try:
            data = json.loads(path.read_text())
            return data if isinstance(data, dict) else {}
        except (FileNotFoundError, ValueError):
            return {}

    @staticmethod
    def tag_record(upstream: str, repository: str, tag: str) -> str:
        """Where a tag's record lives, relative to the cache (and to a shared bucket's prefix)."""
        return f"tags/{_key(upstream, repository, tag)}.json"

    @staticmethod
    def member_record(upstream: str, repository: str, digest: str) -> str:
        return f"repos/{_key(upstream, repository)}/{hex_of(digest)}"

    def put_tag(self, upstream: str, repository: str, tag: str, accept: str, digest: str, media_type: str) -> bytes:
        """Remember what a tag resolved to for this (normalized) Accept.

        Read-modify-write under an exclusive lock on tags/.lock, one file for
        every tag (a file per tag would be an inode per tag), so that mirror
        processes sharing the cache do not drop each other's entries (held for
        microseconds). At most MAX_TAG_ENTRIES variants are kept,
        the most recent ones. Returns the record as written (for a shared store).
        """
        path = self._tag_path(upstream, repository, tag)
        record, new = b"", not path.exists()
        with self._writing():
            fd = os.open(self.root / "tags" / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                entries = self._read_tag_file(path)
                entries.pop(accept, None)
                entries[accept] = {"digest": digest, "media_type": media_type, "stored_at": time.time()}
                while len(entries) > MAX_TAG_ENTRIES:
                    del entries[next(iter(entries))]
                record = json.dumps(entries).encode()
                self._write_file(path, record)
            finally:
                os.close(fd)  # releases the lock
        if record and new:
            self.limits.files_added(1)
        return record

    def tag_entries(self, upstream: str, repository: str, tag: str) -> dict[str, TagEntry]:
        """Every Accept variant recorded for a tag: normalized Accept -> what it resolved to."""
        entries = {}
        for accept, data in self._read_tag_file(self._tag_path(upstream, repository, tag)).items():
            try:
                entries[accept] = TagEntry(data["digest"], data["media_type"], float(data["stored_at"]))
            except (KeyError, TypeError, ValueError):
                continue
        return entries

    # ---- records (tags, repository membership), by the key a shared bucket knows them by too ----

    async def record(self, key: str) -> bytes | None:
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            return None

    def put_record(self, key: str, body: bytes) -> bool:
        """Keep a record where this cache has none (a bucket's, or a new membership); True if it is new here."""
        path = self.root / key
        if path.exists():
            return False
        with self._writing():
            for _ in range(2):
                new_folder = not path.parent.exists()
                path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    self._write_file(path, body)
                    break
                except FileNotFoundError:
                    continue  # the folder was just removed as empty (the file limit): once more
            self.limits.files_added(1 + new_folder)
        return True

    def add_member(self, upstream: str, repository: str, digest: str) -> bool:
        """Note that the upstream confirmed this repository holds this digest; True if it is new here."""
        return self.put_record(self.member_record(upstream, repository, digest), b"")

    def is_member(self, upstream: str, repository: str, digest: str) -> bool:
        return (self.root / self.member_record(upstream, repository, digest)).exists()

    # ---- housekeeping ----------------------------------------------------------

    def _clean_stale_tmp(self, older_than: float = 24 * 3600) -> None:
        """Leftovers of crashed processes: download locks and files no live process holds, other
        temporary files after a day (another process may be writing newer ones)."""
        now = time.time()
        downloads = set()
        for path in self.tmp.iterdir():
            stem, _, suffix = path.name.partition(".")
            if suffix in ("lock", "download") and _DOWNLOAD_STEM.match(stem):
                downloads.add(f"sha256:{stem}")
                continue
            try:
                if now - path.stat().st_mtime > older_than:
                    path.unlink()
            except (FileNotFoundError, IsADirectoryError):
                pass
        for digest in downloads:
            self._clean_download(digest)
        for path in (self.root / "tags").glob("*.json.lock"):  # earlier versions' sidecars: one lock now
            path.unlink(missing_ok=True)

    def _clean_download(self, digest: str) -> None:
        """Remove a download's file and lock unless a live process holds the lock."""
        try:
            fd = lockfiles.acquire(self.download_lock_path(digest))
        except OSError:
            return  # no inode for the lock: the next start cleans it
        if fd is None:
            return  # a download in progress
        try:
            self.download_path(digest).unlink(missing_ok=True)
        finally:
            self.release_download_lock(digest, fd)
