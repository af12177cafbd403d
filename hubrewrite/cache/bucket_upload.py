"""A blob file's multipart upload: read once, in order, hashed as it goes, its parts
uploaded from threads with a bound on the parts in flight for all uploads together
(memory: about (concurrency + 1) x part size)."""

from __future__ import annotations

import hashlib
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import botocore.exceptions

from .bucket_errors import s3_errors

log = logging.getLogger(__name__)

MAX_PARTS = 10_000  # S3's limit: bigger blobs get bigger parts


class PartUploads:
    """Multipart uploads into one bucket; ``concurrency`` parts in flight across all of them."""

    def __init__(self, s3: Any, bucket: str, part_size: int, concurrency: int) -> None:
        self._s3, self._bucket, self.part_size = s3, bucket, part_size
        self._slots = threading.BoundedSemaphore(concurrency)
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="bucket-upload")

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def upload(self, key: str, f: Any, size: int, want: str, digest: str, metadata: dict[str, str],
               content_type: str) -> dict[str, Any]:
        """Upload the open file ``f`` to ``key``, completed only if it hashes to ``want`` (else
        ValueError, and nothing stored); the store's answer to the completion (ETag, VersionId)."""
        part_size = max(self.part_size, -(-size // MAX_PARTS))
        with s3_errors("upload blob", digest):
            upload_id = self._s3.create_multipart_upload(
                Bucket=self._bucket, Key=key, ContentType=content_type, Metadata=metadata)["UploadId"]
        futures: list[Future] = []
        try:
            parts = self._parts(key, upload_id, f, part_size, want, digest, futures)
            with s3_errors("upload blob", digest):
                answer = self._s3.complete_multipart_upload(
                    Bucket=self._bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts})
            # Ceph 16 RGW answers with an empty ETag (measured): S3's rule makes it from the parts'
            return {**answer, "ETag": (answer.get("ETag") or "").strip('"') or _multipart_etag(parts)}
        except BaseException:
            wait(futures)  # no part may land after the abort
            try:
                self._s3.abort_multipart_upload(Bucket=self._bucket, Key=key, UploadId=upload_id)
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
                # left to the bucket's lifecycle rule (AbortIncompleteMultipartUpload)
                log.warning("could not abort the multipart upload of %s", digest)
            raise

    def _parts(self, key: str, upload_id: str, f: Any, part_size: int, want: str, digest: str,
               futures: list[Future]) -> list[dict[str, Any]]:
        h = hashlib.sha256()
        number = 0
        while True:
            self._slots.acquire()
            try:
                for failed in (fut for fut in futures if fut.done() and fut.exception()):
                    failed.result()  # stop reading at the first failed part
                data = f.read(part_size)
                if not data:
                    self._slots.release()
                    break
                h.update(data)
                number += 1
                future = self._pool.submit(self._upload_part, key, upload_id, number, data, digest)
            except BaseException:
                self._slots.release()
                raise
            del data  # only the part upload holds the buffer now
            future.add_done_callback(lambda _: self._slots.release())
            futures.append(future)
        parts = [fut.result() for fut in futures]
        if h.hexdigest() != want:
            raise ValueError(f"{f.name} does not hash to {digest}")
        return parts

    def _upload_part(self, key: str, upload_id: str, number: int, data: bytes, digest: str) -> dict[str, Any]:
        with s3_errors(f"upload part {number} of blob", digest):
            answer = self._s3.upload_part(Bucket=self._bucket, Key=key, UploadId=upload_id,
                                          PartNumber=number, Body=data)
        return {"ETag": answer["ETag"], "PartNumber": number}


def _multipart_etag(parts: list[dict[str, Any]]) -> str:
    """A multipart object's ETag as S3 makes it: the MD5 of its parts' MD5s, then the count."""
    try:
        md5s = b"".join(bytes.fromhex(part["ETag"].strip('"')) for part in parts)
    except ValueError:
        return ""  # not MD5s (encrypted objects): then the store's answer carried it
    return f"{hashlib.md5(md5s, usedforsecurity=False).hexdigest()}-{len(parts)}"
