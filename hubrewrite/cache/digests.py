"""Digests as the cache keeps them: sha256 only."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

CHUNK = 1 << 20
_DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")


def hex_of(digest: str) -> str:
    """The hex part of a sha256 digest: the key of its file, or of its object in a bucket."""
    m = _DIGEST.match(digest) if isinstance(digest, str) else None
    if not m:
        raise ValueError(f"expected a digest like sha256:<64 hex digits>, not {digest!r}")
    return m.group(1)


def sha256_of_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def sha256_of_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
