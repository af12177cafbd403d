"""Digests as the cache keeps them: sha256 only."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 20


def hex_of(digest: str) -> str:
    algorithm, _, hex_part = digest.partition(":")
    if algorithm != "sha256" or len(hex_part) != 64:
        raise ValueError(f"the cache stores sha256 digests only, not {digest!r}")
    return hex_part


def sha256_of_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def sha256_of_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
