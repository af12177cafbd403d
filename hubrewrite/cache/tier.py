"""One tier of the cache: what this process's disk (``store.py``) and the bucket every
process shares (``shared.py``) both answer.

``TieredCache`` (``tiers.py``) asks its tiers in order, nearest first, and keeps what a
farther one had in the nearer ones: the order is written there once, whatever the
tiers are. A new tier implements this, and takes its place in that list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class BlobStat:
    """A blob as a tier holds it (an object store says more of it than a disk)."""

    size: int
    etag: str = ""  # an object store's, quotes removed: other bytes, another ETag
    marked: bool = False  # an object carrying the mirror's upload metadata (stored by a mirror, or copied)
    version: str | None = None  # the object's version id, where the bucket keeps versions


class Tier(Protocol):
    async def blob(self, digest: str) -> BlobStat | None:
        """The blob, if this tier holds it, checked as far as this tier can without reading it all."""

    async def manifest(self, digest: str) -> tuple[str, bytes] | None:
        """(media type, bytes), verified against the digest."""

    async def record(self, key: str) -> bytes | None:
        """A small record (a tag's, a repository's membership) by its key (``Store.tag_record``,
        ``Store.member_record``)."""

    def put_manifest(self, digest: str, media_type: str, body: bytes) -> bool:
        """Keep a manifest whose bytes are its digest; False: not kept (nor by a farther tier)."""

    def put_record(self, key: str, body: bytes) -> bool:
        """Keep a record; False: this tier had it already (a farther one then has it too)."""
