"""The shared cache's S3 store: verified blobs, manifests and small records in
one bucket that several mirror processes use together.

    bucket = Bucket(BucketConfig.parse("s3://mirror-cache/hub", endpoint=...))
    if bucket.blob_size(digest) is None:          # one HEAD
        bucket.upload_blob(digest, verified_path)  # multipart, streamed from the file
    stream = bucket.open_blob(digest)              # None: not there; the reader verifies what it gets
    url = bucket.presigned_blob_url(digest, 60)    # for a 307 to the object itself

Keys under the configured prefix (content-addressed, like the local cache):

    blobs/sha256/<hex>       blob bytes, application/octet-stream
    marks/sha256/<hex>       the mark of the blob's verified object (an HMAC, shared.py)
    manifests/sha256/<hex>   manifest bytes; Content-Type = its media type
    locks/<name>             cross-process locks (bucket_locks.py)
    <anything else>          small records through put_object/get_object
                             (the mirror's tags/<key>.json, repos/<key>/<hex>)

Nothing is stored under a blob or manifest key unless its bytes hash to the
key's digest: upload_blob hashes the file while it uploads and completes the
multipart upload only if the digest matches; put_manifest checks first.
get_manifest verifies what it reads and deletes an object that fails; a blob
read with open_blob is verified by its reader (the mirror's download, which
then calls delete_blob), so one bad object cannot be served to every process
sharing the bucket. Which objects may be handed out as presigned URLs, unread,
is the shared store's decision (shared.py): by their ETag, which upload_blob
and open_blob report, never by their metadata alone.

Permissions needed: s3:GetObject, PutObject, DeleteObject, ListBucket (S3
answers 403 instead of 404 for a missing key without it; the health check is
a HEAD of the bucket) and AbortMultipartUpload.  A lifecycle rule that aborts
incomplete multipart uploads after a day cleans up after killed processes.

Synchronous: boto3 clients are thread-safe, so the mirror calls this from
``asyncio.to_thread``.  Every failure to talk to the store (connection,
timeout, HTTP error) is a BucketError with a short message: an operation,
an object name and a reason, never a URL, a signature or a key.  Bad
arguments (a malformed digest, bytes that do not match it) are ValueError.

boto3 does the S3 work (SigV4, multipart, presigning): no hand-written signing.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from collections.abc import Iterator
from typing import Any

import boto3
import botocore.exceptions
from botocore.config import Config

from .bucket_config import BucketConfig, BucketConfigError
from .bucket_errors import BucketError, s3_errors
from .bucket_locks import BucketLocks
from .bucket_upload import PartUploads
from .digests import hex_of, sha256_of_bytes
from .tier import BlobStat

__all__ = ["Bucket", "BucketConfig", "BucketConfigError", "BucketError", "BlobStat", "BlobStream"]

log = logging.getLogger(__name__)

# botocore's DEBUG records carry request headers (the access key id and the
# signature): keep these loggers at INFO at most, whatever the root logger says.
for _name in ("botocore", "boto3", "s3transfer"):
    _logger = logging.getLogger(_name)
    if _logger.level < logging.INFO:
        _logger.setLevel(logging.INFO)

CHUNK = 1 << 20
PART_SIZE = 8 << 20  # S3's minimum is 5 MiB; above this size a blob goes up in parts
UPLOAD_CONCURRENCY = 2  # parts in flight per Bucket, all uploads together (memory: about 3 x PART_SIZE; 4 cost +20 MB for 20% speed)
SMALL_OBJECT_LIMIT = 4 << 20  # manifests and records; distribution refuses manifests over 4 MiB too
MAX_PRESIGN_SECONDS = 7 * 24 * 3600  # SigV4's limit
BLOB_TYPE = "application/octet-stream"
# object metadata upload_blob sets to the digest it verified: a hint that the mirror stored
# it (another process need not upload it again), never a proof: anyone who can write to the
# bucket can copy it onto other bytes. What proves it is the ETag (marks/, shared.py).
VERIFIED_MARK = "hub-verified-sha256"

_KEY_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")
_MEDIA_TYPE = re.compile(r"^[A-Za-z0-9][\w.+-]*/[\w.+-]+$")
# prefixes whose objects only this module's verified writers may create
_RESERVED = ("blobs", "manifests", "locks", "marks")


def _client_config(connect_timeout: float, read_timeout: float, attempts: int, pool: int,
                   addressing_style: str) -> Config:
    return Config(
        connect_timeout=connect_timeout, read_timeout=read_timeout,
        # standard mode: retries connection errors, throttling and 5xx with a short jittered backoff
        retries={"mode": "standard", "total_max_attempts": attempts},
        max_pool_connections=pool,
        s3={"addressing_style": addressing_style},
        signature_version="s3v4",
        # boto3 >= 1.36 adds CRC32 checksums to every upload by default; over HTTPS
        # it sends them as aws-chunked trailers, which Ceph 16.2 RGW refuses with
        # 400 MissingContentLength (measured; over plain HTTP it puts them in a
        # header, which RGW ignores).  We verify sha256 ourselves anyway.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        user_agent_extra="hub-rewrite",
    )


def _stat(answer: dict[str, Any], size: int, marked: bool) -> BlobStat:
    version = answer.get("VersionId")
    return BlobStat(size, (answer.get("ETag") or "").strip('"'), marked, None if version in (None, "null") else version)


class BlobStream:
    """An open GET of a blob or a range of it: iterate for the bytes, then close.

    ``size``: the whole blob's size; ``length``: the bytes this stream carries."""

    def __init__(self, body: Any, size: int, length: int, digest: str, etag: str = "") -> None:
        self._body, self.size, self.length, self._digest = body, size, length, digest
        self.etag = etag  # of the object this GET read

    def __iter__(self) -> Iterator[bytes]:
        with s3_errors("read blob", self._digest):
            yield from self._body.iter_chunks(CHUNK)

    def close(self) -> None:
        self._body.close()

    def __enter__(self) -> BlobStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Bucket:
    """One bucket (and prefix) of an S3-compatible store; see the module docstring."""

    def __init__(self, config: BucketConfig, *, connect_timeout: float = 3.0, read_timeout: float = 30.0,
                 max_pool: int = 32, part_size: int = PART_SIZE, upload_concurrency: int = UPLOAD_CONCURRENCY) -> None:
        if part_size < 5 << 20:
            raise ValueError("part_size must be at least 5 MiB (S3's minimum part size)")
        self.config = config
        try:
            session = boto3.session.Session(
                aws_access_key_id=config.access_key, aws_secret_access_key=config.secret_key,
                aws_session_token=config.session_token, profile_name=config.profile, region_name=config.region)
            self._s3 = session.client("s3", endpoint_url=config.endpoint_url, config=_client_config(
                connect_timeout, read_timeout, 2, max_pool, config.addressing_style))
            # for the health check: one attempt, short timeouts
            self._quick_s3 = session.client("s3", endpoint_url=config.endpoint_url, config=_client_config(
                min(connect_timeout, 1.0), min(read_timeout, 2.0), 1, 2, config.addressing_style))
        except botocore.exceptions.ProfileNotFound:
            raise BucketConfigError(f"AWS profile {config.profile!r} is not configured") from None
        # parts in flight across all uploads of this Bucket: bounds upload memory per process
        self._uploads = PartUploads(self._s3, config.bucket, part_size, upload_concurrency)
        # cross-process locks: one download per blob among the processes sharing the bucket
        self.locks = BucketLocks(self._s3, config.bucket, self._key)

    def __repr__(self) -> str:
        return f"Bucket({self.config})"

    def close(self) -> None:
        self._uploads.close()
        self._s3.close()
        self._quick_s3.close()

    def __enter__(self) -> Bucket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ blobs

    def blob_size(self, digest: str) -> int | None:
        """The stored blob's size, or None when the bucket does not have it (one HEAD)."""
        stat = self.stat_blob(digest)
        return None if stat is None else stat.size

    def stat_blob(self, digest: str) -> BlobStat | None:
        """Size, and whether upload_blob stored it (it marks what it verified), from one HEAD."""
        head = self._head(self._blob_key(digest), "blob", digest)
        if head is None:
            return None
        return _stat(head, head["ContentLength"], head.get("Metadata", {}).get(VERIFIED_MARK) == hex_of(digest))

    def delete_blob(self, digest: str) -> None:
        """Remove a blob found not to match its digest (deleting a missing one is no error)."""
        self._delete_corrupt(self._blob_key(digest), "blob", digest)

    def upload_blob(self, digest: str, path: str | os.PathLike) -> BlobStat:
        """Store the file as the blob ``digest``; ValueError (and nothing stored) if it does not match.
        Returns the stored object's size, ETag and version, as the store answered the upload.

        Up to PART_SIZE in one PUT, else a multipart upload: the file is read
        once, in order, hashed as it goes, parts uploaded from threads; at most
        ``upload_concurrency`` parts in flight for the whole Bucket, so about
        (upload_concurrency + 1) x part_size bytes of buffers (a finished
        part's buffer is freed just after its slot is)."""
        key, want = self._blob_key(digest), hex_of(digest)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > self._uploads.part_size:
                answer = self._uploads.upload(key, f, size, want, digest, {VERIFIED_MARK: want}, BLOB_TYPE)
                return _stat(answer, size, True)
            body = f.read()
            if sha256_of_bytes(body) != digest:
                raise ValueError(f"{path} does not hash to {digest}")
            with s3_errors("upload blob", digest):
                answer = self._s3.put_object(Bucket=self.config.bucket, Key=key, Body=body, ContentType=BLOB_TYPE,
                                             Metadata={VERIFIED_MARK: want})
            return _stat(answer, size, True)

    def open_blob(self, digest: str, offset: int = 0, length: int | None = None) -> BlobStream | None:
        """A streaming GET of the blob, or of ``length`` bytes from ``offset``; None when absent.

        The bytes are not verified (a range cannot be): serve them, and rely on
        upload_blob having stored only verified blobs.  ValueError when the
        range starts at or past the end of the blob."""
        if offset < 0 or (length is not None and length < 1):
            raise ValueError("offset must be >= 0 and length >= 1")
        extra = {}
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            extra["Range"] = f"bytes={offset}-{end}"
        try:
            got = self._get(self._blob_key(digest), "blob", digest, **extra)
        except BucketError as exc:
            if exc.status == 416:
                raise ValueError(f"range starts past the end of {digest}") from None
            raise
        if got is None:
            return None
        content_range = got.get("ContentRange")  # "bytes 0-99/1000" on a ranged answer
        size = int(content_range.rsplit("/", 1)[1]) if content_range else got["ContentLength"]
        return BlobStream(got["Body"], size, got["ContentLength"], digest, (got.get("ETag") or "").strip('"'))

    def presigned_blob_url(self, digest: str, expires_seconds: int, version: str | None = None) -> str:
        """A GET URL for the blob object that works without credentials for ``expires_seconds``;
        for that ``version`` of it only, when given (a bucket keeping versions).

        Only the host is signed, so a client's Range header works with it.
        The URL is a secret until it expires: never log it.  Made locally,
        without asking the store (so it does not say whether the blob exists)."""
        if not 1 <= expires_seconds <= MAX_PRESIGN_SECONDS:
            raise ValueError(f"expires_seconds must be between 1 and {MAX_PRESIGN_SECONDS}")
        params = {"Bucket": self.config.bucket, "Key": self._blob_key(digest)}
        if version is not None:
            params["VersionId"] = version
        with s3_errors("presign blob", digest):
            return self._s3.generate_presigned_url("get_object", Params=params, ExpiresIn=int(expires_seconds))

    def put_blob_mark(self, digest: str, mark: bytes) -> None:
        """The mark of the blob's verified object (signing.BlobMarkSigner), beside it."""
        with s3_errors("put mark", digest):
            self._s3.put_object(Bucket=self.config.bucket, Key=self._mark_key(digest), Body=mark,
                                ContentType=BLOB_TYPE)

    def get_blob_mark(self, digest: str) -> bytes | None:
        got = self._get_small(self._mark_key(digest), "mark", digest)
        return None if got is None else got[1]

    def shared_secret(self) -> bytes:
        """A random key created once in the bucket, the first writer's, for every process sharing it
        (it signs the mirror's blob URLs and tokens: keep the bucket private)."""
        key = self._record_key("secret")
        try:
            with s3_errors("create", "secret"):
                self._s3.put_object(Bucket=self.config.bucket, Key=key, Body=secrets.token_hex(32).encode(),
                                    ContentType=BLOB_TYPE, IfNoneMatch="*")
        except BucketError as exc:
            if exc.status not in (409, 412):  # there already: read it
                raise
        got = self._get_small(key, "record", "secret")
        if got is None or len(got[1]) < 32:
            raise BucketError("read secret: missing or too short")
        return got[1].strip()

    # ------------------------------------------------------------ manifests

    def put_manifest(self, digest: str, media_type: str, body: bytes) -> None:
        """Store a manifest; ValueError (nothing stored) if ``body`` does not hash to ``digest``."""
        key = self._manifest_key(digest)  # validates the digest
        if not isinstance(media_type, str) or len(media_type) > 255 or not _MEDIA_TYPE.match(media_type):
            raise ValueError(f"not a media type: {media_type!r}")
        if len(body) > SMALL_OBJECT_LIMIT:
            raise ValueError(f"manifest larger than {SMALL_OBJECT_LIMIT} bytes")
        if sha256_of_bytes(body) != digest:
            raise ValueError(f"manifest body does not hash to {digest}")
        with s3_errors("put manifest", digest):
            self._s3.put_object(Bucket=self.config.bucket, Key=key, Body=body, ContentType=media_type)

    def get_manifest(self, digest: str) -> tuple[str, bytes] | None:
        """(media type, body) of a stored manifest, verified; None if absent or corrupt (then deleted)."""
        key = self._manifest_key(digest)  # validates the digest
        got = self._get_small(key, "manifest", digest)
        if got is None:
            return None
        media_type, body = got
        if sha256_of_bytes(body) != digest:
            self._delete_corrupt(key, "manifest", digest)
            return None
        return media_type, body

    # ------------------------------------------------------------ small records

    def put_object(self, key: str, body: bytes) -> None:
        """Store a small record (at most SMALL_OBJECT_LIMIT bytes) under ``key`` (relative to the prefix)."""
        full = self._record_key(key)
        if len(body) > SMALL_OBJECT_LIMIT:
            raise ValueError(f"record larger than {SMALL_OBJECT_LIMIT} bytes")
        with s3_errors("put", key):
            self._s3.put_object(Bucket=self.config.bucket, Key=full, Body=body, ContentType=BLOB_TYPE)

    def get_object(self, key: str) -> bytes | None:
        got = self._get_small(self._record_key(key), "record", key)
        return None if got is None else got[1]

    def delete_object(self, key: str) -> None:
        """Delete a record; deleting a missing one is not an error (S3 semantics)."""
        with s3_errors("delete", key):
            self._s3.delete_object(Bucket=self.config.bucket, Key=self._record_key(key))

    # ------------------------------------------------------------ health

    def check_reachable(self) -> tuple[bool, str]:
        """(reachable, a short reason) from one HEAD of the bucket: at most ~3 s, never raises."""
        try:
            with s3_errors("check bucket", self.config.bucket):
                self._quick_s3.head_bucket(Bucket=self.config.bucket)
        except BucketError as exc:
            if exc.status == 404:
                return False, f"bucket {self.config.bucket} does not exist"
            return False, str(exc)
        return True, f"bucket {self.config.bucket} reachable"

    # ------------------------------------------------------------ plumbing

    def _key(self, *parts: str) -> str:
        return "/".join([self.config.prefix, *parts] if self.config.prefix else parts)

    def _blob_key(self, digest: str) -> str:
        return self._key("blobs", "sha256", hex_of(digest))

    def _manifest_key(self, digest: str) -> str:
        return self._key("manifests", "sha256", hex_of(digest))

    def _mark_key(self, digest: str) -> str:
        return self._key("marks", "sha256", hex_of(digest))

    def _lock_key(self, name: str) -> str:
        return self._key("locks", name)

    def _record_key(self, key: str) -> str:
        segments = key.split("/") if isinstance(key, str) else [""]
        if any(s in ("", ".", "..") or not _KEY_SEGMENT.match(s) for s in segments):
            raise ValueError(f"record key {key!r}: '/'-separated segments of letters, digits, '.', '_', '-'")
        if segments[0] in _RESERVED:
            raise ValueError(f"record key {key!r}: {segments[0]}/ is reserved for verified content and locks")
        return self._key(*segments)

    def _head(self, key: str, kind: str, name: str) -> dict[str, Any] | None:
        try:
            with s3_errors(f"head {kind}", name):
                return self._s3.head_object(Bucket=self.config.bucket, Key=key)
        except BucketError as exc:
            if exc.status == 404 and exc.code != "NoSuchBucket":
                return None
            raise

    def _get(self, key: str, kind: str, name: str, **extra: str) -> dict[str, Any] | None:
        try:
            with s3_errors(f"get {kind}", name):
                return self._s3.get_object(Bucket=self.config.bucket, Key=key, **extra)
        except BucketError as exc:
            if exc.status == 404 and exc.code != "NoSuchBucket":
                return None
            raise

    def _get_small(self, key: str, kind: str, name: str) -> tuple[str, bytes] | None:
        got = self._get(key, kind, name)
        if got is None:
            return None
        try:
            if got["ContentLength"] > SMALL_OBJECT_LIMIT:
                raise BucketError(f"get {kind} {name}: larger than {SMALL_OBJECT_LIMIT} bytes")
            with s3_errors(f"get {kind}", name):
                return got.get("ContentType") or "", got["Body"].read()
        finally:
            got["Body"].close()

    def _delete_corrupt(self, key: str, kind: str, name: str) -> None:
        # Content-addressed keys: the only right bytes are the digest's.  (Another
        # process may have just replaced the object with good bytes; then it is
        # uploaded again on the next miss.)
        log.warning("the bucket's %s %s does not match its digest: deleting it", kind, name)
        with s3_errors(f"delete corrupt {kind}", name):
            self._s3.delete_object(Bucket=self.config.bucket, Key=key)
