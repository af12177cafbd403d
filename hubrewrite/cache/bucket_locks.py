"""Locks in the bucket, so that processes sharing it download each blob once.

A lock is an object created with ``If-None-Match: *`` (Ceph 16 RGW honours it,
so does AWS since 2024); one older than its TTL is taken over with ``If-Match``
on its ETag. Without conditional writes a lock holds within one process only.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any

import botocore.exceptions

from .bucket_errors import BucketError, s3_errors, status_of

SMALL_OBJECT_LIMIT = 4 << 20
_LOCK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,199}$")


@dataclass(frozen=True)
class _LockRecord:
    etag: str
    expired: bool


class BucketLocks:
    """The locks of one Bucket (its S3 client, bucket and key prefix)."""

    def __init__(self, s3: Any, bucket: str, key) -> None:
        self._s3, self._bucket_name, self._key = s3, bucket, key
        self._owner = secrets.token_hex(8)  # this instance's mark on the locks it takes
        self._state_lock = threading.Lock()
        self._held: dict[str, str] = {}  # lock name -> ETag of our lock object
        self._local_locks: dict[str, float] = {}  # without conditional writes: name -> monotonic expiry
        self._conditional: bool | None = None  # probed once
        self._if_match_form: str | None = None  # "quoted", "bare" or None (If-Match on PUT unsupported)

    @property
    def supports_conditional_writes(self) -> bool:
        """Whether the store honours ``If-None-Match: *`` on PUT (Ceph 16 RGW does; so does AWS
        since 2024).  Found out once, with a probe object, on first use; BucketError if unreachable."""
        with self._state_lock:
            if self._conditional is None:
                self._conditional, self._if_match_form = self._probe_conditional_writes()
            return self._conditional

    def try_lock(self, name: str, ttl_seconds: float) -> bool:
        """Take the lock ``name`` for ``ttl_seconds`` unless another holder has it: True if taken.

        Across every process sharing the bucket when the store supports
        conditional writes: the lock is an object created with
        ``If-None-Match: *``; one whose age (by the store's own clock: its
        Date minus the object's Last-Modified) exceeds its TTL is taken over
        with ``If-Match`` on its ETag, so only one taker wins.  Otherwise the
        lock holds within this Bucket (this process) only.  A lock is not
        re-entrant: a second try_lock of a held name returns False.  The
        store's clock has whole seconds: a TTL holds to about a second."""
        _check_lock(name, ttl_seconds)
        if not self.supports_conditional_writes:
            return self._try_local_lock(name, ttl_seconds)
        key, body = self._lock_key(name), self._lock_body(ttl_seconds)
        with self._state_lock:
            if name in self._held:
                return False
        etag = self._put_if_absent(key, body, name)
        if etag is None:
            current = self._lock_record(key, name)
            if current is None:  # released in between
                etag = self._put_if_absent(key, body, name)
            elif current.expired:
                etag = self._take_over(key, body, current.etag, name)
        if etag is None:
            return False
        with self._state_lock:
            self._held[name] = etag
        return True

    def refresh_lock(self, name: str, ttl_seconds: float) -> bool:
        """Extend a lock this Bucket holds to ``ttl_seconds`` from now: False if it was lost
        (it expired and someone else took it over), and then it is no longer ours."""
        _check_lock(name, ttl_seconds)
        if not self.supports_conditional_writes:
            with self._state_lock:
                if name not in self._local_locks:
                    return False
                self._local_locks[name] = time.monotonic() + ttl_seconds
                return True
        with self._state_lock:
            etag = self._held.get(name)
        if etag is None:
            return False
        new = self._take_over(self._lock_key(name), self._lock_body(ttl_seconds), etag, name)
        with self._state_lock:
            if new is None:
                self._held.pop(name, None)
            else:
                self._held[name] = new
        return new is not None

    def release_lock(self, name: str) -> None:
        """Give up a lock this Bucket holds; a lock someone else has taken over is left alone."""
        _check_lock(name, 1)
        with self._state_lock:
            self._local_locks.pop(name, None)
            etag = self._held.pop(name, None)
        if etag is None:
            return
        key = self._lock_key(name)
        head = self._head(key, name)
        # S3 has no conditional DELETE here (Ceph 16 ignores If-Match on DELETE):
        # a holder that took over between this HEAD and the DELETE loses its lock, at worst
        # one more download of the same blob
        if head is not None and _bare(head["ETag"]) == _bare(etag):
            with s3_errors("release lock", name):
                self._s3.delete_object(Bucket=self._bucket_name, Key=key)

    def _lock_key(self, name: str) -> str:
        return self._key("locks", name)

    def _head(self, key: str, name: str) -> dict[str, Any] | None:
        try:
            with s3_errors("head lock", name):
                return self._s3.head_object(Bucket=self._bucket_name, Key=key)
        except BucketError as exc:
            if exc.status == 404 and exc.code != "NoSuchBucket":
                return None
            raise

    def _lock_body(self, ttl_seconds: float) -> bytes:
        # the owner mark makes every lock object's bytes (so its ETag) unique
        return json.dumps({"owner": self._owner, "ttl": ttl_seconds, "host": socket.gethostname(),
                           "pid": os.getpid()}).encode()

    def _try_local_lock(self, name: str, ttl_seconds: float) -> bool:
        now = time.monotonic()
        with self._state_lock:
            if self._local_locks.get(name, 0.0) > now:
                return False
            self._local_locks[name] = now + ttl_seconds
            return True

    def _put_if_absent(self, key: str, body: bytes, name: str) -> str | None:
        """ETag of the new object, or None when one exists already (412)."""
        try:
            with s3_errors("take lock", name):
                return self._s3.put_object(Bucket=self._bucket_name, Key=key, Body=body, IfNoneMatch="*")["ETag"]
        except BucketError as exc:
            if exc.status in (409, 412):  # 409: a concurrent conditional write is in progress (AWS)
                return None
            raise

    def _take_over(self, key: str, body: bytes, etag: str, name: str) -> str | None:
        """Replace the lock object whose ETag is ``etag``; None if it changed meanwhile."""
        if self._if_match_form is None:
            # no conditional overwrite: delete and create.  Two takers of one
            # expired lock may then both win (each deletes, one creates, the other deletes that)
            with s3_errors("take over lock", name):
                self._s3.delete_object(Bucket=self._bucket_name, Key=key)
            return self._put_if_absent(key, body, name)
        condition = f'"{_bare(etag)}"' if self._if_match_form == "quoted" else _bare(etag)
        try:
            with s3_errors("take over lock", name):
                return self._s3.put_object(Bucket=self._bucket_name, Key=key, Body=body, IfMatch=condition)["ETag"]
        except BucketError as exc:
            if exc.status in (404, 409, 412):
                return None
            raise

    def _lock_record(self, key: str, name: str) -> _LockRecord | None:
        try:
            with s3_errors("get lock", name):
                got = self._s3.get_object(Bucket=self._bucket_name, Key=key)
        except BucketError as exc:
            if exc.status == 404 and exc.code != "NoSuchBucket":
                return None
            raise
        try:
            with s3_errors("get lock", name):
                body = got["Body"].read(SMALL_OBJECT_LIMIT)
        finally:
            got["Body"].close()
        try:
            ttl = float(json.loads(body)["ttl"])
        except (ValueError, KeyError, TypeError):
            ttl = 0.0  # not a lock record of ours: let it be taken over
        date = got["ResponseMetadata"]["HTTPHeaders"].get("date")
        server_now = parsedate_to_datetime(date) if date else datetime.now(timezone.utc)
        age = (server_now - got["LastModified"]).total_seconds()
        return _LockRecord(etag=got["ETag"], expired=age > ttl)

    def _probe_conditional_writes(self) -> tuple[bool, str | None]:
        """(If-None-Match honoured, the If-Match form honoured) from a throw-away object."""
        key = self._key("locks", f".probe-{secrets.token_hex(8)}")  # no lock name starts with "."
        put = self._s3.put_object
        b = self._bucket_name
        try:
            with s3_errors("probe conditional writes", "locks"):
                try:
                    etag = put(Bucket=b, Key=key, Body=b"1", IfNoneMatch="*")["ETag"]
                    put(Bucket=b, Key=key, Body=b"2", IfNoneMatch="*")
                    return False, None  # the header was ignored
                except botocore.exceptions.ClientError as exc:
                    if status_of(exc) in (400, 501):  # not implemented
                        return False, None
                    if status_of(exc) != 412:
                        raise
                # AWS takes the ETag quoted, as HTTP says; Ceph 16 RGW compares it without quotes
                for form, value in (("quoted", f'"{_bare(etag)}"'), ("bare", _bare(etag))):
                    try:
                        etag = put(Bucket=b, Key=key, Body=form.encode(), IfMatch=value)["ETag"]
                        return True, form
                    except botocore.exceptions.ClientError as exc:
                        if status_of(exc) != 412:
                            break
                return True, None
        finally:
            try:
                self._s3.delete_object(Bucket=b, Key=key)
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
                pass  # a few bytes left behind; the probe's answer is what matters


def _check_lock(name: str, ttl_seconds: float) -> None:
    if not isinstance(name, str) or not _LOCK_NAME.match(name):
        raise ValueError(f"lock name {name!r}: letters, digits and . _ : - (up to 200)")
    if not 0 < ttl_seconds <= 86400:
        raise ValueError("ttl_seconds must be between 0 and 86400")


def _bare(etag: str) -> str:
    return etag.strip().removeprefix("W/").strip('"')
