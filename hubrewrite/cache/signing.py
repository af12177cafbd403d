"""Signed blob URLs for the blob listener (an HMAC over the digest and an expiry),
and the marks of verified blob objects in a shared bucket.

The key comes from ``hub_blob_secret`` (a file) or, when that is unset, from
the shared bucket or a file generated once in the cache directory, so mirror
processes sharing a cache (or a bucket) accept each other's URLs. Each use
derives its own key from it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import time
from pathlib import Path
from urllib.parse import urlencode

# long enough for a client to follow the redirect, short enough that a leaked URL soon means nothing
URL_LIFETIME = 300
# exactly as query() writes them: ASCII digits without a leading zero (int() would read other
# spellings of the same number, and any length), a lower-case hex HMAC
EXPIRES_RE = re.compile(r"[1-9][0-9]{0,11}")
SIGNATURE_RE = re.compile(r"[0-9a-f]{64}")


class SecretError(ValueError):
    pass


def load_or_create_secret(path: Path, create: bool) -> bytes:
    """The key in ``path``; created (0600, atomically, first writer wins) when ``create`` and missing."""
    if create and not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        try:
            os.link(tmp, path)  # fails if another process created it first: theirs wins
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    try:
        text = path.read_text().strip()
    except OSError as e:
        raise SecretError(f"cannot read {path}: {e.strerror}") from e
    if len(text) < 32:
        raise SecretError(f"{path}: a secret of at least 32 characters is needed")
    return text.encode()


class BlobUrlSigner:
    def __init__(self, key: bytes) -> None:
        self._key = hashlib.sha256(b"hub-rewrite blob url\0" + key).digest()

    def _mac(self, digest: str, expires: int) -> str:
        return hmac.new(self._key, f"{digest}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def query(self, digest: str, lifetime: int = URL_LIFETIME) -> str:
        expires = int(time.time()) + lifetime
        return urlencode({"expires": expires, "signature": self._mac(digest, expires)})

    def verify(self, digest: str, expires: str, signature: str) -> bool:
        if not EXPIRES_RE.fullmatch(expires) or not SIGNATURE_RE.fullmatch(signature) or int(expires) < time.time():
            return False
        return hmac.compare_digest(self._mac(digest, int(expires)), signature)


class BlobMarkSigner:
    """The mark a shared bucket's blob object gets once verified: an HMAC over the digest and
    the object's size and ETag, as the bucket reported them for the verified upload. A copy of
    the mark on other bytes has another ETag; only a holder of the key can make a new one."""

    def __init__(self, key: bytes) -> None:
        self._key = hashlib.sha256(b"hub-rewrite blob mark\0" + key).digest()

    def mark(self, digest: str, size: int, etag: str) -> bytes:
        return hmac.new(self._key, f"{digest}\n{size}\n{etag}".encode(), hashlib.sha256).hexdigest().encode()

    def verify(self, digest: str, size: int, etag: str, mark: bytes) -> bool:
        return hmac.compare_digest(self.mark(digest, size, etag), mark.strip())
